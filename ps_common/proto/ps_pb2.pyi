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
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    COMPLEX64: _ClassVar[DType]
    COMPLEX128: _ClassVar[DType]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    BSP: _ClassVar[Mode]
    ASP: _ClassVar[Mode]
    SSP: _ClassVar[Mode]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
UINT8: DType
BOOL: DType
COMPLEX64: DType
COMPLEX128: DType
MODE_UNSPECIFIED: Mode
BSP: Mode
ASP: Mode
SSP: Mode

class TensorChunk(_message.Message):
    __slots__ = ("key", "dtype", "shape", "offset", "data", "absent", "sparse", "indices", "length", "shared")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ABSENT_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    key: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    absent: bool
    sparse: bool
    indices: bytes
    length: int
    shared: SharedRange
    def __init__(self, key: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., absent: _Optional[bool] = ..., sparse: _Optional[bool] = ..., indices: _Optional[bytes] = ..., length: _Optional[int] = ..., shared: _Optional[_Union[SharedRange, _Mapping]] = ...) -> None: ...

class SharedRange(_message.Message):
    __slots__ = ("offset", "size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    size: int
    def __init__(self, offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("number", "integer", "flag", "text", "none", "numbers")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    number: float
    integer: int
    flag: bool
    text: str
    none: bool
    numbers: NumberList
    def __init__(self, number: _Optional[float] = ..., integer: _Optional[int] = ..., flag: _Optional[bool] = ..., text: _Optional[str] = ..., none: _Optional[bool] = ..., numbers: _Optional[_Union[NumberList, _Mapping]] = ...) -> None: ...

class NumberList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ParamGroup(_message.Message):
    __slots__ = ("options",)
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    options: _containers.MessageMap[str, Value]
    def __init__(self, options: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "groups")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroup]
    def __init__(self, name: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[ParamGroup, _Mapping]]] = ...) -> None: ...

class KeySpec(_message.Message):
    __slots__ = ("key", "dtype", "shape", "group", "tensor", "prunable", "tensor_shape", "offset", "parts")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    PRUNABLE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    key: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    group: int
    tensor: str
    prunable: bool
    tensor_shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    parts: _containers.RepeatedCompositeFieldContainer[KeyPart]
    def __init__(self, key: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., group: _Optional[int] = ..., tensor: _Optional[str] = ..., prunable: _Optional[bool] = ..., tensor_shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[KeyPart, _Mapping]]] = ...) -> None: ...

class KeyPart(_message.Message):
    __slots__ = ("tensor", "tensor_shape")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SHAPE_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    tensor_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tensor: _Optional[str] = ..., tensor_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PruningSpec(_message.Message):
    __slots__ = ("initial_sparsity", "final_sparsity", "begin_step", "end_step", "frequency")
    INITIAL_SPARSITY_FIELD_NUMBER: _ClassVar[int]
    FINAL_SPARSITY_FIELD_NUMBER: _ClassVar[int]
    BEGIN_STEP_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int
    def __init__(self, initial_sparsity: _Optional[float] = ..., final_sparsity: _Optional[float] = ..., begin_step: _Optional[int] = ..., end_step: _Optional[int] = ..., frequency: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("mode", "num_workers", "staleness", "scale_lr_by_staleness", "optimizer", "keys", "pruning")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    SCALE_LR_BY_STALENESS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PRUNING_FIELD_NUMBER: _ClassVar[int]
    mode: Mode
    num_workers: int
    staleness: int
    scale_lr_by_staleness: bool
    optimizer: OptimizerSpec
    keys: _containers.RepeatedCompositeFieldContainer[KeySpec]
    pruning: PruningSpec
    def __init__(self, mode: _Optional[_Union[Mode, str]] = ..., num_workers: _Optional[int] = ..., staleness: _Optional[int] = ..., scale_lr_by_staleness: _Optional[bool] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., keys: _Optional[_Iterable[_Union[KeySpec, _Mapping]]] = ..., pruning: _Optional[_Union[PruningSpec, _Mapping]] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("protocol_version", "worker_id", "num_workers")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    worker_id: int
    num_workers: int
    def __init__(self, protocol_version: _Optional[int] = ..., worker_id: _Optional[int] = ..., num_workers: _Optional[int] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("protocol_version", "initialized", "job", "clock", "data_port", "data_socket")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_SOCKET_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    initialized: bool
    job: JobSpec
    clock: int
    data_port: int
    data_socket: str
    def __init__(self, protocol_version: _Optional[int] = ..., initialized: _Optional[bool] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ..., clock: _Optional[int] = ..., data_port: _Optional[int] = ..., data_socket: _Optional[str] = ...) -> None: ...

class InitHeader(_message.Message):
    __slots__ = ("protocol_version", "worker_id", "job")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    worker_id: int
    job: JobSpec
    def __init__(self, protocol_version: _Optional[int] = ..., worker_id: _Optional[int] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class InitRequest(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: InitHeader
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, header: _Optional[_Union[InitHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class InitResponse(_message.Message):
    __slots__ = ("already_initialized",)
    ALREADY_INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    already_initialized: bool
    def __init__(self, already_initialized: _Optional[bool] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("worker_id", "step", "groups", "prune_thresholds")
    class PruneThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    PRUNE_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    step: int
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroup]
    prune_thresholds: _containers.ScalarMap[str, float]
    def __init__(self, worker_id: _Optional[int] = ..., step: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[ParamGroup, _Mapping]]] = ..., prune_thresholds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("accepted", "duplicates")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker_id", "step", "keys", "wait_for_all_workers", "wait_seconds", "masks", "dtype", "shared")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_ALL_WORKERS_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    step: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    wait_for_all_workers: bool
    wait_seconds: float
    masks: bool
    dtype: DType
    shared: bool
    def __init__(self, worker_id: _Optional[int] = ..., step: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ..., wait_for_all_workers: _Optional[bool] = ..., wait_seconds: _Optional[float] = ..., masks: _Optional[bool] = ..., dtype: _Optional[_Union[DType, str]] = ..., shared: _Optional[bool] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyStats(_message.Message):
    __slots__ = ("key", "dtype", "shape", "bytes", "version", "nonzeros", "masked")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NONZEROS_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    key: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    bytes: int
    version: int
    nonzeros: int
    masked: bool
    def __init__(self, key: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., bytes: _Optional[int] = ..., version: _Optional[int] = ..., nonzeros: _Optional[int] = ..., masked: _Optional[bool] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "clock", "last_push_unix")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    LAST_PUSH_UNIX_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    clock: int
    last_push_unix: float
    def __init__(self, worker_id: _Optional[int] = ..., clock: _Optional[int] = ..., last_push_unix: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("initialized", "job", "keys", "workers", "total_bytes", "pushes", "pulls", "updates", "bytes_in", "bytes_out")
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    initialized: bool
    job: JobSpec
    keys: _containers.RepeatedCompositeFieldContainer[KeyStats]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStats]
    total_bytes: int
    pushes: int
    pulls: int
    updates: int
    bytes_in: int
    bytes_out: int
    def __init__(self, initialized: _Optional[bool] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ..., keys: _Optional[_Iterable[_Union[KeyStats, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerStats, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., pushes: _Optional[int] = ..., pulls: _Optional[int] = ..., updates: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ...) -> None: ...

class ShareResponse(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    def __init__(self, worker_id: _Optional[int] = ...) -> None: ...

class SetStateRequest(_message.Message):
    __slots__ = ("worker_id", "chunks", "check_only")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHECK_ONLY_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    check_only: bool
    def __init__(self, worker_id: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., check_only: _Optional[bool] = ...) -> None: ...

class SetStateResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: int
    def __init__(self, keys: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    def __init__(self, worker_id: _Optional[int] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("path", "version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DataHeader(_message.Message):
    __slots__ = ("method", "last", "code", "details", "body_length", "auth_token", "timeout")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    BODY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    method: str
    last: bool
    code: int
    details: str
    body_length: int
    auth_token: str
    timeout: float
    def __init__(self, method: _Optional[str] = ..., last: _Optional[bool] = ..., code: _Optional[int] = ..., details: _Optional[str] = ..., body_length: _Optional[int] = ..., auth_token: _Optional[str] = ..., timeout: _Optional[float] = ...) -> None: ...
