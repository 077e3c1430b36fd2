from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_STATE_UNSPECIFIED: _ClassVar[PolicyState]
    POLICY_STATE_LOADING: _ClassVar[PolicyState]
    POLICY_STATE_READY: _ClassVar[PolicyState]
    POLICY_STATE_DRAINING: _ClassVar[PolicyState]

class PolicyRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_ROLE_UNSPECIFIED: _ClassVar[PolicyRole]
    POLICY_ROLE_STABLE: _ClassVar[PolicyRole]
    POLICY_ROLE_CANDIDATE: _ClassVar[PolicyRole]
    POLICY_ROLE_STANDBY: _ClassVar[PolicyRole]
POLICY_STATE_UNSPECIFIED: PolicyState
POLICY_STATE_LOADING: PolicyState
POLICY_STATE_READY: PolicyState
POLICY_STATE_DRAINING: PolicyState
POLICY_ROLE_UNSPECIFIED: PolicyRole
POLICY_ROLE_STABLE: PolicyRole
POLICY_ROLE_CANDIDATE: PolicyRole
POLICY_ROLE_STANDBY: PolicyRole

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "sampling", "num_samples", "routing_key", "prompt_id", "product", "version")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _common_pb2.Conversation
    sampling: _common_pb2.SamplingParams
    num_samples: int
    routing_key: str
    prompt_id: str
    product: str
    version: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., num_samples: _Optional[int] = ..., routing_key: _Optional[str] = ..., prompt_id: _Optional[str] = ..., product: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("response_id", "text", "finish_reason", "completion_tokens")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    text: str
    finish_reason: _common_pb2.FinishReason
    completion_tokens: int
    def __init__(self, response_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("prompt_id", "policy_version", "samples", "prompt_tokens")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    policy_version: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    prompt_tokens: int
    def __init__(self, prompt_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("prompt_id", "policy_version", "sample_index", "response_id", "text_delta", "finish_reason", "prompt_tokens", "completion_tokens")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    policy_version: str
    sample_index: int
    response_id: str
    text_delta: str
    finish_reason: _common_pb2.FinishReason
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., sample_index: _Optional[int] = ..., response_id: _Optional[str] = ..., text_delta: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadedPolicy(_message.Message):
    __slots__ = ("version", "state", "role", "traffic_percent", "backend")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    state: PolicyState
    role: PolicyRole
    traffic_percent: int
    backend: str
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., state: _Optional[_Union[PolicyState, str]] = ..., role: _Optional[_Union[PolicyRole, str]] = ..., traffic_percent: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policies", "previous_version")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[LoadedPolicy]
    previous_version: str
    def __init__(self, policies: _Optional[_Iterable[_Union[LoadedPolicy, _Mapping]]] = ..., previous_version: _Optional[str] = ...) -> None: ...

class LoadPolicyRequest(_message.Message):
    __slots__ = ("version", "traffic_percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    traffic_percent: int
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., traffic_percent: _Optional[int] = ...) -> None: ...

class SetTrafficSplitRequest(_message.Message):
    __slots__ = ("candidate_version", "traffic_percent")
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    candidate_version: str
    traffic_percent: int
    def __init__(self, candidate_version: _Optional[str] = ..., traffic_percent: _Optional[int] = ...) -> None: ...

class RollbackPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
