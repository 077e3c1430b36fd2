from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "messages", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _common_pb2.Conversation
    response: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., response: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., version: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "reward_model_version", "cache_hits")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    reward_model_version: str
    cache_hits: int
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., reward_model_version: _Optional[str] = ..., cache_hits: _Optional[int] = ...) -> None: ...

class GetRewardModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRewardModelResponse(_message.Message):
    __slots__ = ("version", "loaded")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    loaded: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelVersion]
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., loaded: _Optional[_Iterable[_Union[_common_pb2.ModelVersion, _Mapping]]] = ...) -> None: ...

class LoadRewardModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ...) -> None: ...
