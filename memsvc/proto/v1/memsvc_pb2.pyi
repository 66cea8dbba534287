import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_DEVICE: _ClassVar[Tier]
    TIER_HOST: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_DEVICE: Tier
TIER_HOST: Tier
TIER_DISK: Tier

class Session(_message.Message):
    __slots__ = ("session_id", "name", "model_hash", "position", "durable_position", "tier", "created_at", "state_bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DURABLE_POSITION_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    model_hash: str
    position: int
    durable_position: int
    tier: Tier
    created_at: _timestamp_pb2.Timestamp
    state_bytes: int
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ..., model_hash: _Optional[str] = ..., position: _Optional[int] = ..., durable_position: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_bytes: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Input(_message.Message):
    __slots__ = ("token_ids", "text", "expected_position")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITION_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: bytes
    expected_position: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[bytes] = ..., expected_position: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "max_new_tokens", "stop", "allow_eos", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EOS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[bytes]
    allow_eos: bool
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[bytes]] = ..., allow_eos: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("request_id", "open", "append", "query", "generate")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    open: OpenStream
    append: Input
    query: Prompt
    generate: Prompt
    def __init__(self, request_id: _Optional[int] = ..., open: _Optional[_Union[OpenStream, _Mapping]] = ..., append: _Optional[_Union[Input, _Mapping]] = ..., query: _Optional[_Union[Prompt, _Mapping]] = ..., generate: _Optional[_Union[Prompt, _Mapping]] = ...) -> None: ...

class OpenStream(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("input", "params")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    input: Input
    params: SamplingParams
    def __init__(self, input: _Optional[_Union[Input, _Mapping]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("request_id", "opened", "ack", "answer", "generated")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    opened: Session
    ack: AppendAck
    answer: QueryAnswer
    generated: GeneratedTokens
    def __init__(self, request_id: _Optional[int] = ..., opened: _Optional[_Union[Session, _Mapping]] = ..., ack: _Optional[_Union[AppendAck, _Mapping]] = ..., answer: _Optional[_Union[QueryAnswer, _Mapping]] = ..., generated: _Optional[_Union[GeneratedTokens, _Mapping]] = ...) -> None: ...

class AppendAck(_message.Message):
    __slots__ = ("position", "appended", "writes_applied", "writes_skipped", "surprise", "memory_norm")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    APPENDED_FIELD_NUMBER: _ClassVar[int]
    WRITES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    WRITES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SURPRISE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_NORM_FIELD_NUMBER: _ClassVar[int]
    position: int
    appended: int
    writes_applied: int
    writes_skipped: int
    surprise: float
    memory_norm: float
    def __init__(self, position: _Optional[int] = ..., appended: _Optional[int] = ..., writes_applied: _Optional[int] = ..., writes_skipped: _Optional[int] = ..., surprise: _Optional[float] = ..., memory_norm: _Optional[float] = ...) -> None: ...

class QueryAnswer(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class GeneratedTokens(_message.Message):
    __slots__ = ("token_ids", "done", "finish_reason")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    done: bool
    finish_reason: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "input")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    input: Input
    def __init__(self, session_id: _Optional[str] = ..., input: _Optional[_Union[Input, _Mapping]] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("session_id", "prompt")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: Prompt
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: Prompt
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("session_id", "generation", "position", "size_bytes", "checksum")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    generation: int
    position: int
    size_bytes: int
    checksum: str
    def __init__(self, session_id: _Optional[str] = ..., generation: _Optional[int] = ..., position: _Optional[int] = ..., size_bytes: _Optional[int] = ..., checksum: _Optional[str] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id", "chunk_bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    chunk_bytes: int
    def __init__(self, session_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ImportHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ImportHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImportHeader(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListResidentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResidentSession(_message.Message):
    __slots__ = ("session_id", "tenant_id", "tier", "state_bytes", "position", "last_access", "pinned", "updates_per_1k_tokens", "memory_norm", "surprise", "step_scale", "forget_boost")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCESS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_PER_1K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_NORM_FIELD_NUMBER: _ClassVar[int]
    SURPRISE_FIELD_NUMBER: _ClassVar[int]
    STEP_SCALE_FIELD_NUMBER: _ClassVar[int]
    FORGET_BOOST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tenant_id: str
    tier: Tier
    state_bytes: int
    position: int
    last_access: _timestamp_pb2.Timestamp
    pinned: bool
    updates_per_1k_tokens: float
    memory_norm: float
    surprise: float
    step_scale: float
    forget_boost: float
    def __init__(self, session_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., state_bytes: _Optional[int] = ..., position: _Optional[int] = ..., last_access: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pinned: _Optional[bool] = ..., updates_per_1k_tokens: _Optional[float] = ..., memory_norm: _Optional[float] = ..., surprise: _Optional[float] = ..., step_scale: _Optional[float] = ..., forget_boost: _Optional[float] = ...) -> None: ...

class ListResidentResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[ResidentSession]
    def __init__(self, sessions: _Optional[_Iterable[_Union[ResidentSession, _Mapping]]] = ...) -> None: ...

class EvictSessionRequest(_message.Message):
    __slots__ = ("session_id", "tier")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tier: Tier
    def __init__(self, session_id: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class EvictSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("resident", "bytes_used", "budgets", "evictions", "restores", "appends", "tokens_appended", "checkpoints", "corruptions", "quarantined", "restore_seconds", "eviction_seconds")
    class ResidentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BytesUsedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BudgetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    RESTORES_FIELD_NUMBER: _ClassVar[int]
    APPENDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_APPENDED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    CORRUPTIONS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    RESTORE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVICTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    resident: _containers.ScalarMap[str, int]
    bytes_used: _containers.ScalarMap[str, int]
    budgets: _containers.ScalarMap[str, int]
    evictions: int
    restores: int
    appends: int
    tokens_appended: int
    checkpoints: int
    corruptions: int
    quarantined: int
    restore_seconds: float
    eviction_seconds: float
    def __init__(self, resident: _Optional[_Mapping[str, int]] = ..., bytes_used: _Optional[_Mapping[str, int]] = ..., budgets: _Optional[_Mapping[str, int]] = ..., evictions: _Optional[int] = ..., restores: _Optional[int] = ..., appends: _Optional[int] = ..., tokens_appended: _Optional[int] = ..., checkpoints: _Optional[int] = ..., corruptions: _Optional[int] = ..., quarantined: _Optional[int] = ..., restore_seconds: _Optional[float] = ..., eviction_seconds: _Optional[float] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("tenant_id", "kind", "session_id", "limit")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    kind: str
    session_id: str
    limit: int
    def __init__(self, tenant_id: _Optional[str] = ..., kind: _Optional[str] = ..., session_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "tenant_id", "session_id", "kind", "created_at", "payload")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    tenant_id: str
    session_id: str
    kind: str
    created_at: _timestamp_pb2.Timestamp
    payload: _struct_pb2.Struct
    def __init__(self, event_id: _Optional[int] = ..., tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., kind: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...
