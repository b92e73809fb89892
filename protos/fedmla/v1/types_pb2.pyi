from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT4: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    INT2: _ClassVar[DType]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    DEFLATE: _ClassVar[Compression]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
FLOAT64: DType
INT8: DType
INT4: DType
UINT8: DType
INT32: DType
INT64: DType
BOOL: DType
INT2: DType
COMPRESSION_NONE: Compression
DEFLATE: Compression

class Quantization(_message.Message):
    __slots__ = ("scheme", "scales", "stochastic")
    class Scheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SCHEME_NONE: _ClassVar[Quantization.Scheme]
        INT8_ROW: _ClassVar[Quantization.Scheme]
        INT4_ROW: _ClassVar[Quantization.Scheme]
        INT2_ROW: _ClassVar[Quantization.Scheme]
    SCHEME_NONE: Quantization.Scheme
    INT8_ROW: Quantization.Scheme
    INT4_ROW: Quantization.Scheme
    INT2_ROW: Quantization.Scheme
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    STOCHASTIC_FIELD_NUMBER: _ClassVar[int]
    scheme: Quantization.Scheme
    scales: Tensor
    stochastic: bool
    def __init__(self, scheme: _Optional[_Union[Quantization.Scheme, str]] = ..., scales: _Optional[_Union[Tensor, _Mapping]] = ..., stochastic: _Optional[bool] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "quant", "compression")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    quant: Quantization
    compression: Compression
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., quant: _Optional[_Union[Quantization, _Mapping]] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class HeadSelection(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, heads: _Optional[_Iterable[int]] = ...) -> None: ...

class LowRankFactor(_message.Message):
    __slots__ = ("name", "left", "right", "rank", "heads")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    name: str
    left: Tensor
    right: Tensor
    rank: int
    heads: HeadSelection
    def __init__(self, name: _Optional[str] = ..., left: _Optional[_Union[Tensor, _Mapping]] = ..., right: _Optional[_Union[Tensor, _Mapping]] = ..., rank: _Optional[int] = ..., heads: _Optional[_Union[HeadSelection, _Mapping]] = ...) -> None: ...

class DenseUpdate(_message.Message):
    __slots__ = ("name", "value", "heads", "sparse")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: Tensor
    heads: HeadSelection
    sparse: SparseChunks
    def __init__(self, name: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ..., heads: _Optional[_Union[HeadSelection, _Mapping]] = ..., sparse: _Optional[_Union[SparseChunks, _Mapping]] = ...) -> None: ...

class SparseChunks(_message.Message):
    __slots__ = ("chunk", "k", "positions", "positions_compression", "values")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    chunk: int
    k: int
    positions: bytes
    positions_compression: Compression
    values: Tensor
    def __init__(self, chunk: _Optional[int] = ..., k: _Optional[int] = ..., positions: _Optional[bytes] = ..., positions_compression: _Optional[_Union[Compression, str]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class HeadScores(_message.Message):
    __slots__ = ("num_layers", "num_heads", "scores")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_heads: int
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, num_layers: _Optional[int] = ..., num_heads: _Optional[int] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelUpdate(_message.Message):
    __slots__ = ("factors", "dense", "importance", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    factors: _containers.RepeatedCompositeFieldContainer[LowRankFactor]
    dense: _containers.RepeatedCompositeFieldContainer[DenseUpdate]
    importance: HeadScores
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, factors: _Optional[_Iterable[_Union[LowRankFactor, _Mapping]]] = ..., dense: _Optional[_Iterable[_Union[DenseUpdate, _Mapping]]] = ..., importance: _Optional[_Union[HeadScores, _Mapping]] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ClientCapabilities(_message.Message):
    __slots__ = ("device", "free_memory_bytes", "num_examples", "software_version", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    device: str
    free_memory_bytes: int
    num_examples: int
    software_version: str
    extra: _containers.ScalarMap[str, str]
    def __init__(self, device: _Optional[str] = ..., free_memory_bytes: _Optional[int] = ..., num_examples: _Optional[int] = ..., software_version: _Optional[str] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class HyperParameters(_message.Message):
    __slots__ = ("local_steps", "learning_rate", "batch_size", "seq_len", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    local_steps: int
    learning_rate: float
    batch_size: int
    seq_len: int
    extra: _containers.ScalarMap[str, str]
    def __init__(self, local_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CodecSettings(_message.Message):
    __slots__ = ("rank", "max_rank", "quant_bits", "keep_ratio", "max_update_bytes", "extra", "config_json")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    QUANT_BITS_FIELD_NUMBER: _ClassVar[int]
    KEEP_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    rank: int
    max_rank: int
    quant_bits: int
    keep_ratio: float
    max_update_bytes: int
    extra: _containers.ScalarMap[str, str]
    config_json: str
    def __init__(self, rank: _Optional[int] = ..., max_rank: _Optional[int] = ..., quant_bits: _Optional[int] = ..., keep_ratio: _Optional[float] = ..., max_update_bytes: _Optional[int] = ..., extra: _Optional[_Mapping[str, str]] = ..., config_json: _Optional[str] = ...) -> None: ...

class HeadMask(_message.Message):
    __slots__ = ("num_layers", "num_heads", "active")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_heads: int
    active: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, num_layers: _Optional[int] = ..., num_heads: _Optional[int] = ..., active: _Optional[_Iterable[bool]] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    version: int
    sha256: str
    def __init__(self, version: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("round_id", "model", "hyper", "active_heads", "codec", "deadline_unix_ms", "model_config_json", "seed")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_HEADS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    model: ModelVersion
    hyper: HyperParameters
    active_heads: HeadMask
    codec: CodecSettings
    deadline_unix_ms: int
    model_config_json: str
    seed: int
    def __init__(self, round_id: _Optional[int] = ..., model: _Optional[_Union[ModelVersion, _Mapping]] = ..., hyper: _Optional[_Union[HyperParameters, _Mapping]] = ..., active_heads: _Optional[_Union[HeadMask, _Mapping]] = ..., codec: _Optional[_Union[CodecSettings, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., model_config_json: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...
