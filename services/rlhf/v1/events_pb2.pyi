import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rlhf.v1 import common_pb2 as _common_pb2
from rlhf.v1 import feedback_pb2 as _feedback_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_ACTION_UNSPECIFIED: _ClassVar[ModelAction]
    MODEL_ACTION_PUBLISHED: _ClassVar[ModelAction]
    MODEL_ACTION_PROMOTED: _ClassVar[ModelAction]
    MODEL_ACTION_ROLLED_BACK: _ClassVar[ModelAction]
MODEL_ACTION_UNSPECIFIED: ModelAction
MODEL_ACTION_PUBLISHED: ModelAction
MODEL_ACTION_PROMOTED: ModelAction
MODEL_ACTION_ROLLED_BACK: ModelAction

class ServedResponse(_message.Message):
    __slots__ = ("response_id", "prompt_id", "prompt", "messages", "text", "policy_version", "sampling", "finish_reason", "prompt_tokens", "completion_tokens", "served_at", "product", "routing_key", "replica_id", "input_prompt")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVED_AT_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_PROMPT_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    prompt_id: str
    prompt: str
    messages: _common_pb2.Conversation
    text: str
    policy_version: str
    sampling: _common_pb2.SamplingParams
    finish_reason: _common_pb2.FinishReason
    prompt_tokens: int
    completion_tokens: int
    served_at: _timestamp_pb2.Timestamp
    product: str
    routing_key: str
    replica_id: str
    input_prompt: str
    def __init__(self, response_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., text: _Optional[str] = ..., policy_version: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., served_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., product: _Optional[str] = ..., routing_key: _Optional[str] = ..., replica_id: _Optional[str] = ..., input_prompt: _Optional[str] = ...) -> None: ...

class FeedbackRecord(_message.Message):
    __slots__ = ("event", "received_at", "unknown_response_ids", "replica_id", "responses_unchecked")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_UNCHECKED_FIELD_NUMBER: _ClassVar[int]
    event: _feedback_pb2.FeedbackEvent
    received_at: _timestamp_pb2.Timestamp
    unknown_response_ids: _containers.RepeatedScalarFieldContainer[str]
    replica_id: str
    responses_unchecked: bool
    def __init__(self, event: _Optional[_Union[_feedback_pb2.FeedbackEvent, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., unknown_response_ids: _Optional[_Iterable[str]] = ..., replica_id: _Optional[str] = ..., responses_unchecked: bool = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("event_id", "source_topic", "source_partition", "source_offset", "payload", "reason", "at")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PARTITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    source_topic: str
    source_partition: int
    source_offset: int
    payload: bytes
    reason: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., source_topic: _Optional[str] = ..., source_partition: _Optional[int] = ..., source_offset: _Optional[int] = ..., payload: _Optional[bytes] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PromptRecord(_message.Message):
    __slots__ = ("prompt_id", "prompt", "messages", "source", "created_at")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    prompt: str
    messages: _common_pb2.Conversation
    source: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, prompt_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., source: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelEvent(_message.Message):
    __slots__ = ("version", "action", "traffic_percent", "previous_version", "at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    action: ModelAction
    traffic_percent: int
    previous_version: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., action: _Optional[_Union[ModelAction, str]] = ..., traffic_percent: _Optional[int] = ..., previous_version: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
