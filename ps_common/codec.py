"""Conversions between torch objects and protobuf messages, for both sides.

Tensors travel as raw bytes of their flattened elements: `tensor_to_chunks`
cuts one into Chunks (TensorChunk messages whose data is a view of the
tensor, see ps_common.wire) and `ChunkAssembler` writes incoming chunks
straight into destination tensors, one copy per byte, no Python loop over
elements. Hyperparameters travel as typed Values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
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
_INDEX_BYTES = 4


def sparse_bytes(nonzeros: int, itemsize: int) -> int:
    """Bytes of the sparse encoding's data: a position and a value per non-zero."""
    return nonzeros * (_INDEX_BYTES + itemsize)


def _sparse_is_smaller(nonzeros: int, numel: int, itemsize: int) -> bool:
    return sparse_bytes(nonzeros, itemsize) < numel * itemsize


def _dense_chunk(key: str, shape: list[int], offset: int, part: torch.Tensor) -> Chunk:
    """A chunk whose data is a view of `part`'s memory."""
    return Chunk(key=key, dtype=dtype_to_proto(part.dtype), shape=shape, offset=offset,
                 data=memoryview(_byte_view(part)))  # type: ignore[arg-type]  # fmt: skip


def _sparse_chunk(
    key: str, shape: list[int], offset: int, length: int, indices: torch.Tensor, values: torch.Tensor
) -> Chunk:
    """`values` at `indices` (counted from `offset`), the rest of the `length` elements zero."""
    return Chunk(
        key=key, dtype=dtype_to_proto(values.dtype), shape=shape, offset=offset, sparse=True,
        indices=_byte_view(indices.to(torch.int32)).tobytes(), data=_byte_view(values).tobytes(),
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


@dataclass
class _Pending:
    dest: torch.Tensor | None  # flat destination; None while the key is kept sparse
    dtype: int  # the chunks' dtype, which `dest` may be wider than (a compressed transfer)
    shape: tuple[int, ...]
    filled: int = 0  # elements written (or, kept sparse, received) so far
    parts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # kept sparse: (indices, values)

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.dest is None else self.dest.numel()


@dataclass(frozen=True)
class SparseParts:
    """A tensor of `shape` that travelled sparse, kept so: zero except at the
    flat, ascending `indices`, where it holds `values` (in the chunks' dtype).
    A server adds one to a sum in time proportional to what was sent."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sparse_bytes(self.values.numel(), self.values.element_size())

    def densify(self, dest: torch.Tensor) -> torch.Tensor:
        """Write the tensor into `dest` (any float dtype; flat, its whole `shape`
        or, while a key turns dense, the part received so far); returns it."""
        _scatter(dest.view(-1), self.indices, self.values)
        return dest

    def add_to(self, dest: torch.Tensor) -> None:
        """`dest += self`, touching only the elements that were sent."""
        dest.view(-1).index_add_(0, self.indices, self.values.to(dest.dtype))


# Called with a key's first chunk; returns the flat tensor to fill, after
# checking that key, dtype and shape are acceptable (raising otherwise). Its
# dtype may differ from the chunks' (weights pulled in bf16 into fp32
# parameters): each chunk is then cast into it.
Allocator = Callable[[ChunkLike], torch.Tensor]


class ChunkAssembler:
    """Reassembles streamed chunks into tensors, checking as it goes.

    Destinations come from `allocate`, so a server can refuse an unknown key
    or wrong shape before reserving memory, and a client can receive straight
    into its parameters; `on_complete(key)` hears of each tensor made whole
    (so a worker can use a layer's weights before the rest arrive).
    `finish()` returns the completed tensors and raises if any is
    incomplete; `absent` holds the keys marked absent.

    With `keep_sparse` (a check of a key's first chunk, raising if the key,
    dtype or shape is not acceptable), a key whose chunks all come sparse is
    not written into a destination: `sparse` holds it as SparseParts once
    complete. A dense chunk after sparse ones makes the key dense.
    """

    def __init__(
        self,
        allocate: Allocator,
        on_complete: Callable[[str], None] | None = None,
        keep_sparse: Callable[[ChunkLike], object] | None = None,
    ) -> None:
        self._allocate = allocate
        self._on_complete = on_complete
        self._keep_sparse = keep_sparse
        self._pending: dict[str, _Pending] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self.sparse: dict[str, SparseParts] = {}
        self.absent: set[str] = set()
        self.bytes_received = 0
        self._buffer: torch.Tensor | None = None

    def add(self, chunk: ChunkLike) -> None:
        key = chunk.key
        if key in self.absent:
            raise InvalidArgument(f"key {key!r}: data after the absent marker")
        if chunk.absent:
            if key in self._pending:
                raise InvalidArgument(f"key {key!r}: absent marker after data")
            self.absent.add(key)
            return
        pending = self._pending.get(key)
        if pending is None:
            if chunk.offset != 0:
                raise InvalidArgument(f"key {key!r}: first chunk starts at element {chunk.offset}, not 0")
            dtype_from_proto(chunk.dtype)  # a known dtype, before anything is allocated
            pending = _Pending(None, chunk.dtype, tuple(chunk.shape))
            if self._keep_sparse is not None and chunk.sparse:
                self._keep_sparse(chunk)
            else:
                self._make_dense(key, chunk, pending)
            self._pending[key] = pending
        elif chunk.dtype != pending.dtype or tuple(chunk.shape) != pending.shape:
            raise InvalidArgument(f"key {key!r}: dtype or shape changed between chunks")
        if chunk.offset != pending.filled:
            raise InvalidArgument(
                f"key {key!r}: chunk at element {chunk.offset} but {pending.filled} elements received"
            )
        itemsize = dtype_from_proto(chunk.dtype).itemsize
        count = chunk.length if chunk.sparse else len(chunk.data) // itemsize
        stop = chunk.offset + count
        numel = pending.numel
        if stop > numel or len(chunk.data) % itemsize:
            raise InvalidArgument(f"key {key!r}: chunk of {len(chunk.data)} bytes overruns or splits an element")
        if chunk.sparse:
            indices, values = _sparse_parts(key, chunk)
            if pending.dest is None:
                pending.parts.append((indices + chunk.offset, values))
            else:
                _scatter(pending.dest[chunk.offset : stop], indices, values)
        else:
            flat = self._make_dense(key, chunk, pending) if pending.dest is None else pending.dest
            dest = flat[chunk.offset : stop]
            if dest.dtype == dtype_from_proto(chunk.dtype):
                _copy_into(_byte_view(dest), chunk.data)
            else:
                dest.copy_(self._read_into_buffer(chunk, count))
        pending.filled = stop
        self.bytes_received += len(chunk.data) + len(chunk.indices)
        if stop == numel:
            if pending.dest is None:
                self.sparse[key] = _joined(pending.shape, pending.parts)
            if self._on_complete is not None:
                self._on_complete(key)

    def _make_dense(self, key: str, chunk: ChunkLike, pending: _Pending) -> torch.Tensor:
        """Give `key` its destination, holding what its sparse chunks brought
        so far; returns it, flat."""
        tensor = self._allocate(chunk)
        self._tensors[key] = tensor
        flat = pending.dest = tensor.view(-1)
        if pending.parts:
            _joined(pending.shape, pending.parts).densify(flat[: pending.filled])
            pending.parts = []
        return flat

    def _read_into_buffer(self, chunk: ChunkLike, count: int) -> torch.Tensor:
        """The dense chunk's `count` elements, in its own dtype, read into a
        buffer reused from chunk to chunk, to be cast into the destination."""
        dtype = dtype_from_proto(chunk.dtype)
        if self._buffer is None or self._buffer.dtype != dtype or self._buffer.numel() < count:
            self._buffer = torch.empty(count, dtype=dtype)
        buffer = self._buffer[:count]
        _copy_into(_byte_view(buffer), chunk.data)
        return buffer

    def finish(self) -> dict[str, torch.Tensor]:
        """The dense tensors (`sparse` holds the keys kept sparse)."""
        incomplete = [k for k, p in self._pending.items() if p.filled != p.numel]
        if incomplete:
            raise InvalidArgument(f"stream ended before these keys were complete: {incomplete}")
        return self._tensors


def _copy_into(dest: np.ndarray, data: Data) -> None:
    if isinstance(data, (bytes, bytearray, memoryview)):
        dest[:] = np.frombuffer(data, dtype=np.uint8)
    else:
        data.readinto(memoryview(dest))  # type: ignore[arg-type]


def _writable_copy(data: Data) -> bytearray:
    out = bytearray(len(data))
    _copy_into(np.frombuffer(out, dtype=np.uint8), data)
    return out


def _sparse_parts(key: str, chunk: ChunkLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse chunk's positions (int64, within the chunk) and values, read
    out of the message and checked: as many values as positions, each inside
    the chunk, strictly ascending (so that each element is sent once)."""
    dtype = dtype_from_proto(chunk.dtype)
    count = len(chunk.indices) // _INDEX_BYTES
    if len(chunk.indices) % _INDEX_BYTES or len(chunk.data) != count * dtype.itemsize:
        raise InvalidArgument(f"key {key!r}: sparse chunk has {count} indices but {len(chunk.data)} value bytes")
    if not count:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dtype)
    # bytearray: torch wants a writable buffer; the copy is of the non-zeros only.
    indices = torch.frombuffer(bytearray(chunk.indices), dtype=torch.int32).long()
    values = torch.frombuffer(_writable_copy(chunk.data), dtype=dtype)
    if int(indices[0]) < 0 or int(indices[-1]) >= chunk.length:
        raise InvalidArgument(f"key {key!r}: sparse index outside its chunk of {chunk.length} elements")
    if not bool((indices[1:] > indices[:-1]).all()):
        raise InvalidArgument(f"key {key!r}: sparse indices are not strictly ascending")
    return indices, values


def _scatter(dest: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Write a sparse chunk into `dest` (its range): zeros, then the values
    (cast to `dest`'s dtype)."""
    dest.zero_()
    dest[indices] = values.to(dest.dtype)


def _joined(shape: tuple[int, ...], parts: list[tuple[torch.Tensor, torch.Tensor]]) -> SparseParts:
    if len(parts) == 1:
        return SparseParts(shape, *parts[0])
    return SparseParts(shape, torch.cat([i for i, _ in parts]), torch.cat([v for _, v in parts]))


class HasChunks(Protocol):
    @property
    def chunks(self) -> Iterable[ChunkLike]: ...


def receive(
    responses: Iterable[HasChunks], allocate: Allocator, on_complete: Callable[[str], None] | None = None
) -> dict[str, torch.Tensor]:
    """Assemble a Pull's response stream into the tensors `allocate` gives,
    calling `on_complete(key)` as soon as each tensor is whole."""
    assembler = ChunkAssembler(allocate, on_complete)
    for response in responses:
        for chunk in response.chunks:
            assembler.add(chunk)
    return assembler.finish()


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


def new_tensor_for(chunk: ChunkLike) -> torch.Tensor:
    """A fresh flat tensor sized for the whole tensor that `chunk` starts."""
    numel = 1
    for dim in chunk.shape:
        if dim < 0:
            raise InvalidArgument(f"key {chunk.key!r}: negative dimension in shape {list(chunk.shape)}")
        numel *= dim
    return torch.empty(numel, dtype=dtype_from_proto(chunk.dtype))


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
