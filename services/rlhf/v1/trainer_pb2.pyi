import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_IDLE: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_PAUSED: _ClassVar[RunState]
    RUN_STATE_COMPLETED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_SFT: _ClassVar[Stage]
    STAGE_REWARD_MODEL: _ClassVar[Stage]
    STAGE_PPO: _ClassVar[Stage]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_IDLE: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_PAUSED: RunState
RUN_STATE_COMPLETED: RunState
RUN_STATE_FAILED: RunState
STAGE_UNSPECIFIED: Stage
STAGE_SFT: Stage
STAGE_REWARD_MODEL: Stage
STAGE_PPO: Stage

class TrainerStatus(_message.Message):
    __slots__ = ("run_id", "state", "stage", "step", "total_steps", "metrics", "policy_version", "reward_model_version", "feedback_events_consumed", "updated_at", "message", "responses_consumed", "lag", "dataset", "new_comparisons", "consuming", "freshness", "weight_sync")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class DatasetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_EVENTS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    NEW_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    CONSUMING_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SYNC_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: RunState
    stage: Stage
    step: int
    total_steps: int
    metrics: _containers.ScalarMap[str, float]
    policy_version: str
    reward_model_version: str
    feedback_events_consumed: int
    updated_at: _timestamp_pb2.Timestamp
    message: str
    responses_consumed: int
    lag: _containers.RepeatedCompositeFieldContainer[PartitionLag]
    dataset: _containers.ScalarMap[str, int]
    new_comparisons: int
    consuming: bool
    freshness: LatencySummary
    weight_sync: LatencySummary
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., stage: _Optional[_Union[Stage, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., policy_version: _Optional[str] = ..., reward_model_version: _Optional[str] = ..., feedback_events_consumed: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message: _Optional[str] = ..., responses_consumed: _Optional[int] = ..., lag: _Optional[_Iterable[_Union[PartitionLag, _Mapping]]] = ..., dataset: _Optional[_Mapping[str, int]] = ..., new_comparisons: _Optional[int] = ..., consuming: bool = ..., freshness: _Optional[_Union[LatencySummary, _Mapping]] = ..., weight_sync: _Optional[_Union[LatencySummary, _Mapping]] = ...) -> None: ...

class LatencySummary(_message.Message):
    __slots__ = ("count", "p50_seconds", "p95_seconds", "max_seconds")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P95_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    count: int
    p50_seconds: float
    p95_seconds: float
    max_seconds: float
    def __init__(self, count: _Optional[int] = ..., p50_seconds: _Optional[float] = ..., p95_seconds: _Optional[float] = ..., max_seconds: _Optional[float] = ...) -> None: ...

class PartitionLag(_message.Message):
    __slots__ = ("topic", "partition", "stored_offset", "end_offset", "lag")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    STORED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    stored_offset: int
    end_offset: int
    lag: int
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., stored_offset: _Optional[int] = ..., end_offset: _Optional[int] = ..., lag: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("stages", "ppo_steps", "parent_policy_version")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PPO_STEPS_FIELD_NUMBER: _ClassVar[int]
    PARENT_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedScalarFieldContainer[Stage]
    ppo_steps: int
    parent_policy_version: str
    def __init__(self, stages: _Optional[_Iterable[_Union[Stage, str]]] = ..., ppo_steps: _Optional[int] = ..., parent_policy_version: _Optional[str] = ...) -> None: ...

class PauseRunRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRunRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainRewardModelRequest(_message.Message):
    __slots__ = ("min_comparisons",)
    MIN_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    min_comparisons: int
    def __init__(self, min_comparisons: _Optional[int] = ...) -> None: ...

class TrainRewardModelResponse(_message.Message):
    __slots__ = ("version", "heldout_accuracy", "comparisons", "published", "incumbent_heldout_accuracy", "heldout_comparisons")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    INCUMBENT_HELDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    heldout_accuracy: float
    comparisons: int
    published: bool
    incumbent_heldout_accuracy: float
    heldout_comparisons: int
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., heldout_accuracy: _Optional[float] = ..., comparisons: _Optional[int] = ..., published: bool = ..., incumbent_heldout_accuracy: _Optional[float] = ..., heldout_comparisons: _Optional[int] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("kind", "limit")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    kind: _common_pb2.ModelKind
    limit: int
    def __init__(self, kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[_common_pb2.ModelVersion, _Mapping]]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("version", "traffic_percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: str
    traffic_percent: int
    def __init__(self, version: _Optional[str] = ..., traffic_percent: _Optional[int] = ...) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ("version", "traffic_percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    traffic_percent: int
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., traffic_percent: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: _common_pb2.ModelKind
    def __init__(self, kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ...) -> None: ...
