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

class SubmitStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBMIT_STATUS_UNSPECIFIED: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_ACCEPTED: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_DUPLICATE: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_REJECTED: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_FAILED: _ClassVar[SubmitStatus]

class Thumb(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THUMB_UNSPECIFIED: _ClassVar[Thumb]
    THUMB_UP: _ClassVar[Thumb]
    THUMB_DOWN: _ClassVar[Thumb]

class PreferenceStrength(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFERENCE_STRENGTH_UNSPECIFIED: _ClassVar[PreferenceStrength]
    PREFERENCE_STRENGTH_SLIGHT: _ClassVar[PreferenceStrength]
    PREFERENCE_STRENGTH_CLEAR: _ClassVar[PreferenceStrength]
    PREFERENCE_STRENGTH_STRONG: _ClassVar[PreferenceStrength]
SUBMIT_STATUS_UNSPECIFIED: SubmitStatus
SUBMIT_STATUS_ACCEPTED: SubmitStatus
SUBMIT_STATUS_DUPLICATE: SubmitStatus
SUBMIT_STATUS_REJECTED: SubmitStatus
SUBMIT_STATUS_FAILED: SubmitStatus
THUMB_UNSPECIFIED: Thumb
THUMB_UP: Thumb
THUMB_DOWN: Thumb
PREFERENCE_STRENGTH_UNSPECIFIED: PreferenceStrength
PREFERENCE_STRENGTH_SLIGHT: PreferenceStrength
PREFERENCE_STRENGTH_CLEAR: PreferenceStrength
PREFERENCE_STRENGTH_STRONG: PreferenceStrength

class SubmitRequest(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: FeedbackEvent
    def __init__(self, event: _Optional[_Union[FeedbackEvent, _Mapping]] = ...) -> None: ...

class SubmitStreamRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[FeedbackEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[FeedbackEvent, _Mapping]]] = ...) -> None: ...

class SubmitStreamResponse(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[SubmitResponse]
    def __init__(self, acks: _Optional[_Iterable[_Union[SubmitResponse, _Mapping]]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("event_id", "status", "sequence", "unknown_response_ids", "error_code", "error_message")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    status: SubmitStatus
    sequence: int
    unknown_response_ids: _containers.RepeatedScalarFieldContainer[str]
    error_code: int
    error_message: str
    def __init__(self, event_id: _Optional[str] = ..., status: _Optional[_Union[SubmitStatus, str]] = ..., sequence: _Optional[int] = ..., unknown_response_ids: _Optional[_Iterable[str]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("event_id", "product", "annotator_id", "created_at", "prompt_id", "rating", "pairwise", "ranking", "demonstration", "edit", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATION_FIELD_NUMBER: _ClassVar[int]
    EDIT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    product: str
    annotator_id: str
    created_at: _timestamp_pb2.Timestamp
    prompt_id: str
    rating: Rating
    pairwise: PairwisePreference
    ranking: Ranking
    demonstration: Demonstration
    edit: Edit
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, event_id: _Optional[str] = ..., product: _Optional[str] = ..., annotator_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., prompt_id: _Optional[str] = ..., rating: _Optional[_Union[Rating, _Mapping]] = ..., pairwise: _Optional[_Union[PairwisePreference, _Mapping]] = ..., ranking: _Optional[_Union[Ranking, _Mapping]] = ..., demonstration: _Optional[_Union[Demonstration, _Mapping]] = ..., edit: _Optional[_Union[Edit, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Rating(_message.Message):
    __slots__ = ("response_id", "thumb", "scale")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    THUMB_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    thumb: Thumb
    scale: ScaleRating
    def __init__(self, response_id: _Optional[str] = ..., thumb: _Optional[_Union[Thumb, str]] = ..., scale: _Optional[_Union[ScaleRating, _Mapping]] = ...) -> None: ...

class ScaleRating(_message.Message):
    __slots__ = ("value", "min", "max")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    value: int
    min: int
    max: int
    def __init__(self, value: _Optional[int] = ..., min: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class PairwisePreference(_message.Message):
    __slots__ = ("chosen_response_id", "rejected_response_id", "strength")
    CHOSEN_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    chosen_response_id: str
    rejected_response_id: str
    strength: PreferenceStrength
    def __init__(self, chosen_response_id: _Optional[str] = ..., rejected_response_id: _Optional[str] = ..., strength: _Optional[_Union[PreferenceStrength, str]] = ...) -> None: ...

class Ranking(_message.Message):
    __slots__ = ("response_ids",)
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    response_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, response_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Demonstration(_message.Message):
    __slots__ = ("prompt", "messages", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _common_pb2.Conversation
    response: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., response: _Optional[str] = ...) -> None: ...

class Edit(_message.Message):
    __slots__ = ("response_id", "edited_text")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    EDITED_TEXT_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    edited_text: str
    def __init__(self, response_id: _Optional[str] = ..., edited_text: _Optional[str] = ...) -> None: ...
