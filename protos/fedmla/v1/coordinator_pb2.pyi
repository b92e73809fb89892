from fedmla.protos.fedmla.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("capabilities",)
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    capabilities: _types_pb2.ClientCapabilities
    def __init__(self, capabilities: _Optional[_Union[_types_pb2.ClientCapabilities, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("client_id", "run_id", "heartbeat_interval_s", "model_config_json", "model", "seeded_init")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEEDED_INIT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    run_id: str
    heartbeat_interval_s: float
    model_config_json: str
    model: _types_pb2.ModelVersion
    seeded_init: SeededInit
    def __init__(self, client_id: _Optional[str] = ..., run_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., model_config_json: _Optional[str] = ..., model: _Optional[_Union[_types_pb2.ModelVersion, _Mapping]] = ..., seeded_init: _Optional[_Union[SeededInit, _Mapping]] = ...) -> None: ...

class SeededInit(_message.Message):
    __slots__ = ("seed", "sha256")
    SEED_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    seed: int
    sha256: str
    def __init__(self, seed: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("status", "task", "retry_after_s", "current_round", "model")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[GetTaskResponse.Status]
        READY: _ClassVar[GetTaskResponse.Status]
        WAIT: _ClassVar[GetTaskResponse.Status]
        SUBMITTED: _ClassVar[GetTaskResponse.Status]
        FINISHED: _ClassVar[GetTaskResponse.Status]
    STATUS_UNSPECIFIED: GetTaskResponse.Status
    READY: GetTaskResponse.Status
    WAIT: GetTaskResponse.Status
    SUBMITTED: GetTaskResponse.Status
    FINISHED: GetTaskResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    status: GetTaskResponse.Status
    task: _types_pb2.Task
    retry_after_s: float
    current_round: int
    model: _types_pb2.ModelVersion
    def __init__(self, status: _Optional[_Union[GetTaskResponse.Status, str]] = ..., task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ..., retry_after_s: _Optional[float] = ..., current_round: _Optional[int] = ..., model: _Optional[_Union[_types_pb2.ModelVersion, _Mapping]] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("since_version",)
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    since_version: int
    def __init__(self, since_version: _Optional[int] = ...) -> None: ...

class DownloadModelResponse(_message.Message):
    __slots__ = ("header", "data")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[DownloadModelResponse.Kind]
        FULL: _ClassVar[DownloadModelResponse.Kind]
        DELTA: _ClassVar[DownloadModelResponse.Kind]
        CODEC_CHAIN: _ClassVar[DownloadModelResponse.Kind]
        CODEC_FULL: _ClassVar[DownloadModelResponse.Kind]
    KIND_UNSPECIFIED: DownloadModelResponse.Kind
    FULL: DownloadModelResponse.Kind
    DELTA: DownloadModelResponse.Kind
    CODEC_CHAIN: DownloadModelResponse.Kind
    CODEC_FULL: DownloadModelResponse.Kind
    class Header(_message.Message):
        __slots__ = ("kind", "model", "base_version", "total_bytes", "payload_sha256")
        KIND_FIELD_NUMBER: _ClassVar[int]
        MODEL_FIELD_NUMBER: _ClassVar[int]
        BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
        TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
        PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
        kind: DownloadModelResponse.Kind
        model: _types_pb2.ModelVersion
        base_version: int
        total_bytes: int
        payload_sha256: str
        def __init__(self, kind: _Optional[_Union[DownloadModelResponse.Kind, str]] = ..., model: _Optional[_Union[_types_pb2.ModelVersion, _Mapping]] = ..., base_version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., payload_sha256: _Optional[str] = ...) -> None: ...
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: DownloadModelResponse.Header
    data: bytes
    def __init__(self, header: _Optional[_Union[DownloadModelResponse.Header, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CodecDownlinks(_message.Message):
    __slots__ = ("base_version", "downlinks")
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOWNLINKS_FIELD_NUMBER: _ClassVar[int]
    base_version: int
    downlinks: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, base_version: _Optional[int] = ..., downlinks: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "data")
    class Header(_message.Message):
        __slots__ = ("round_id", "model_version", "total_bytes", "payload_sha256")
        ROUND_ID_FIELD_NUMBER: _ClassVar[int]
        MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
        TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
        PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
        round_id: int
        model_version: int
        total_bytes: int
        payload_sha256: str
        def __init__(self, round_id: _Optional[int] = ..., model_version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., payload_sha256: _Optional[str] = ...) -> None: ...
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: SubmitUpdateRequest.Header
    data: bytes
    def __init__(self, header: _Optional[_Union[SubmitUpdateRequest.Header, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("round_id", "bytes_received", "replies_in_round")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    REPLIES_IN_ROUND_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    bytes_received: int
    replies_in_round: int
    def __init__(self, round_id: _Optional[int] = ..., bytes_received: _Optional[int] = ..., replies_in_round: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("round_id", "state")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    state: str
    def __init__(self, round_id: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("action", "current_round", "heartbeat_interval_s")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[HeartbeatResponse.Action]
        CONTINUE: _ClassVar[HeartbeatResponse.Action]
        NEW_TASK: _ClassVar[HeartbeatResponse.Action]
        REJOIN: _ClassVar[HeartbeatResponse.Action]
    ACTION_UNSPECIFIED: HeartbeatResponse.Action
    CONTINUE: HeartbeatResponse.Action
    NEW_TASK: HeartbeatResponse.Action
    REJOIN: HeartbeatResponse.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    action: HeartbeatResponse.Action
    current_round: int
    heartbeat_interval_s: float
    def __init__(self, action: _Optional[_Union[HeartbeatResponse.Action, str]] = ..., current_round: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
