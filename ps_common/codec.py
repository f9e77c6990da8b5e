"""Conversions between torch objects and protobuf messages, for both sides.

Tensors travel as raw bytes of their flattened elements: `tensor_to_chunks`
cuts one into Chunks (TensorChunk messages whose data is a view of the
tensor, see ps_common.wire), and ps_common.assembly writes incoming chunks
straight into destination tensors. Hyperparameters travel as typed Values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb

# 64 KiB below gRPC's default 4 MiB message limit leaves room for the
# message's other fields, so chunks never need a raised limit.
DEFAULT_CHUNK_BYTES = 4 * 2**20 - 64 * 2**10

_DTYPES: dict[pb.DType, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT64: torch.float64,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.INT8: torch.int8,
    pb.INT16: torch.int16,
    pb.INT32: torch.int32,
    pb.INT64: torch.int64,
    pb.UINT8: torch.uint8,
    pb.BOOL: torch.bool,
    pb.COMPLEX64: torch.complex64,
    pb.COMPLEX128: torch.complex128,
}
_PROTO_DTYPES = {dtype: code for code, dtype in _DTYPES.items()}

# Like hivemind's codec registry: a DType added to the proto without a torch
# dtype here fails at import, not on the first tensor that uses it.
_unmapped = set(pb.DType.values()) - set(_DTYPES) - {pb.DTYPE_UNSPECIFIED}
if _unmapped:
    raise ImportError(f"proto DType values without a torch dtype: {sorted(_unmapped)}")


def dtype_to_proto(dtype: torch.dtype) -> pb.DType:
    try:
        return _PROTO_DTYPES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} cannot travel; supported: {sorted(map(str, _PROTO_DTYPES))}") from None


def dtype_from_proto(code: pb.DType) -> torch.dtype:
    try:
        return _DTYPES[code]
    except KeyError:
        raise InvalidArgument(f"unknown or unspecified dtype code {code}") from None


class Streamed(Protocol):
    """Bytes still in a connection (ps_common.wire reads them): `readinto`
    moves them straight into their destination, without a buffer between."""

    def __len__(self) -> int: ...
    def __bytes__(self) -> bytes: ...
    def readinto(self, dest: memoryview) -> None: ...


Data = bytes | memoryview | Streamed


@dataclass
class Chunk:
    """A TensorChunk (see proto/ps.proto) whose data and indices may be views
    of memory owned elsewhere, or (data) still in the connection, so they
    travel without copies."""

    key: str
    dtype: pb.DType = pb.DTYPE_UNSPECIFIED
    shape: Sequence[int] = field(default_factory=list)
    offset: int = 0
    data: Data = b""
    absent: bool = False
    sparse: bool = False
    indices: bytes | memoryview = b""
    length: int = 0
    # (offset, size): the data lies in the server's shared weights (see
    # TensorChunk.shared); the client that maps them puts a view in `data`.
    shared: tuple[int, int] | None = None

    def to_proto(self) -> pb.TensorChunk:
        return pb.TensorChunk(
            key=self.key, dtype=self.dtype, shape=self.shape, offset=self.offset, data=bytes(self.data),
            absent=self.absent, sparse=self.sparse, indices=bytes(self.indices), length=self.length,
            shared=self.shared_range(),
        )  # fmt: skip

    def shared_range(self) -> pb.SharedRange | None:
        return None if self.shared is None else pb.SharedRange(offset=self.shared[0], size=self.shared[1])


class ChunkLike(Protocol):
    """A Chunk or a pb.TensorChunk: what readers of chunks need."""

    @property
    def key(self) -> str: ...
    @property
    def dtype(self) -> pb.DType: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def offset(self) -> int: ...
    @property
    def data(self) -> Data: ...
    @property
    def absent(self) -> bool: ...
    @property
    def sparse(self) -> bool: ...
    @property
    def indices(self) -> bytes | memoryview: ...
    @property
    def length(self) -> int: ...


def byte_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a flat uint8 array (no copy); any dtype, bf16 too."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def wire_dtype(stored: torch.dtype, half: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored as `stored` travels in when its transfer is
    compressed to the 16-bit float `half` (None: not compressed): floats
    wider than `half` are cast to it, everything else travels as stored."""
    if half is not None and stored.is_floating_point and stored.itemsize > half.itemsize:
        return half
    return stored


def tensor_to_chunks(
    key: str,
    tensor: torch.Tensor,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sparse_if_smaller: bool = False,
    cast_to: torch.dtype | None = None,
) -> Iterator[Chunk]:
    """Cut a CPU tensor into chunks of at most `chunk_bytes` data bytes.

    With `sparse_if_smaller`, a chunk whose non-zeros take fewer bytes as
    (index, value) pairs travels that way. With `cast_to`, a floating-point
    tensor wider than that dtype travels cast to it, a chunk at a time.
    Otherwise dense chunks are views of the tensor, so callers must not
    change it until the chunks are sent.
    """
    flat = tensor.detach().contiguous().reshape(-1)
    shape = list(tensor.shape)
    dtype = wire_dtype(flat.dtype, cast_to)
    for offset, stop in _chunk_ranges(flat.numel(), dtype.itemsize, chunk_bytes):
        part = flat[offset:stop]
        if part.dtype != dtype:
            part = part.to(dtype)
        if sparse_if_smaller and _sparse_is_smaller(int(torch.count_nonzero(part)), part.numel(), part.element_size()):
            indices = torch.nonzero(part).view(-1)
            yield _sparse_chunk(key, shape, offset, stop - offset, indices, part[indices])
        else:
            yield _dense_chunk(key, shape, offset, part)


def sparse_to_chunks(
    key: str, indices: torch.Tensor, values: torch.Tensor, length: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[Chunk]:
    """The chunks of a flat tensor of `length` elements, zero but for `values`
    at the sorted `indices`, as tensor_to_chunks(..., sparse_if_smaller=True)
    cuts it, without making the tensor or searching it for its non-zeros."""
    ranges = list(_chunk_ranges(length, values.element_size(), chunk_bytes))
    starts = torch.tensor([offset for offset, _ in ranges] + [length], dtype=indices.dtype)
    bounds = torch.searchsorted(indices, starts).tolist()
    for (offset, stop), low, high in zip(ranges, bounds[:-1], bounds[1:], strict=True):
        local, part_values = indices[low:high] - offset, values[low:high]
        if _sparse_is_smaller(high - low, stop - offset, values.element_size()):
            yield _sparse_chunk(key, [length], offset, stop - offset, local, part_values)
        else:
            part = values.new_zeros(stop - offset)
            part[local] = part_values
            yield _dense_chunk(key, [length], offset, part)


def _chunk_ranges(numel: int, itemsize: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, stop) element ranges of at most `chunk_bytes`; one empty range
    for an empty tensor, which still travels (its shape does)."""
    per_chunk = max(1, chunk_bytes // itemsize)
    offset = 0
    while True:
        stop = min(offset + per_chunk, numel)
        yield offset, stop
        offset = stop
        if offset >= numel:
            return


# An index takes 4 bytes; sparse wins below itemsize / (4 + itemsize) density.
INDEX_BYTES = 4


def sparse_bytes(nonzeros: int, itemsize: int) -> int:
    """Bytes of the sparse encoding's data: a position and a value per non-zero."""
    return nonzeros * (INDEX_BYTES + itemsize)


def _sparse_is_smaller(nonzeros: int, numel: int, itemsize: int) -> bool:
    return sparse_bytes(nonzeros, itemsize) < numel * itemsize


def _dense_chunk(key: str, shape: list[int], offset: int, part: torch.Tensor) -> Chunk:
    """A chunk whose data is a view of `part`'s memory."""
    return Chunk(key=key, dtype=dtype_to_proto(part.dtype), shape=shape, offset=offset,
                 data=memoryview(byte_view(part)))  # type: ignore[arg-type]  # fmt: skip


def _sparse_chunk(
    key: str, shape: list[int], offset: int, length: int, indices: torch.Tensor, values: torch.Tensor
) -> Chunk:
    """`values` at `indices` (counted from `offset`), the rest of the `length` elements zero."""
    return Chunk(
        key=key, dtype=dtype_to_proto(values.dtype), shape=shape, offset=offset, sparse=True,
        indices=byte_view(indices.to(torch.int32)).tobytes(), data=byte_view(values).tobytes(),
        length=length,
    )  # fmt: skip


def batched(chunks: Iterable[Chunk], max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[list[Chunk]]:
    """Group consecutive chunks into batches of at most `max_bytes` payload
    (a larger chunk alone), one message each."""
    batch: list[Chunk] = []
    size = 0
    for chunk in chunks:
        payload = len(chunk.data) + len(chunk.indices)
        if batch and size + payload > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(chunk)
        size += payload
    if batch:
        yield batch


def absent_chunk(key: str) -> Chunk:
    """The marker for a key without a gradient this step."""
    return Chunk(key=key, absent=True)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf, in one pass and without a tensor of flags (isfinite().all()
    took 20x longer). A sum is finite only if every element is (NaN and Inf
    propagate through it), and takes half the time of min and max together
    (fp32, 4 MiB, one core: 185 against 331 us); only a sum that overflowed
    from finite elements needs min and max, which propagate NaN and show an Inf."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if math.isfinite(tensor.sum().item()):
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def value_to_proto(name: str, value: Any) -> pb.Value:
    # bool before int: bool is a subclass of int.
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return pb.Value(flag=value)
    if isinstance(value, int):
        return pb.Value(integer=value)
    if isinstance(value, float):
        return pb.Value(number=value)
    if isinstance(value, str):
        return pb.Value(text=value)
    if value is None:
        return pb.Value(none=True)
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return pb.Value(numbers=pb.NumberList(values=[float(v) for v in value]))
    raise InvalidArgument(f"hyperparameter {name!r} = {value!r} has a type that cannot travel")


def value_from_proto(value: pb.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "numbers":
        return tuple(value.numbers.values)
    if kind is None or kind == "none":
        return None
    return getattr(value, kind)


def options_to_proto(options: Mapping[str, Any]) -> pb.ParamGroup:
    return pb.ParamGroup(options={k: value_to_proto(k, v) for k, v in options.items()})


def options_from_proto(group: pb.ParamGroup) -> dict[str, Any]:
    return {k: value_from_proto(v) for k, v in group.options.items()}
