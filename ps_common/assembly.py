"""Incoming chunks written straight into their destination tensors, one copy
per byte and no Python loop over elements, for both sides: a server's
pushed gradients (kept sparse where they travelled so), a worker's pulled
weights (cast where they travelled in half precision)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ps_common import codec
from ps_common.errors import InvalidArgument

__all__ = ["Allocator", "ChunkAssembler", "HasChunks", "OnComplete", "SparseParts", "new_tensor_for", "receive"]


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
        return codec.sparse_bytes(self.values.numel(), self.values.element_size())

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
Allocator = Callable[[codec.ChunkLike], torch.Tensor]
# Called with a key as soon as its tensor is whole.
OnComplete = Callable[[str], None] | None


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
        on_complete: OnComplete = None,
        keep_sparse: Callable[[codec.ChunkLike], object] | None = None,
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

    def add(self, chunk: codec.ChunkLike) -> None:
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
            codec.dtype_from_proto(chunk.dtype)  # a known dtype, before anything is allocated
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
        itemsize = codec.dtype_from_proto(chunk.dtype).itemsize
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
            if dest.dtype == codec.dtype_from_proto(chunk.dtype):
                _copy_into(codec.byte_view(dest), chunk.data)
            else:
                dest.copy_(self._read_into_buffer(chunk, count))
        pending.filled = stop
        self.bytes_received += len(chunk.data) + len(chunk.indices)
        if stop == numel:
            if pending.dest is None:
                self.sparse[key] = _joined(pending.shape, pending.parts)
            if self._on_complete is not None:
                self._on_complete(key)

    def _make_dense(self, key: str, chunk: codec.ChunkLike, pending: _Pending) -> torch.Tensor:
        """Give `key` its destination, holding what its sparse chunks brought
        so far; returns it, flat."""
        tensor = self._allocate(chunk)
        self._tensors[key] = tensor
        flat = pending.dest = tensor.view(-1)
        if pending.parts:
            _joined(pending.shape, pending.parts).densify(flat[: pending.filled])
            pending.parts = []
        return flat

    def _read_into_buffer(self, chunk: codec.ChunkLike, count: int) -> torch.Tensor:
        """The dense chunk's `count` elements, in its own dtype, read into a
        buffer reused from chunk to chunk, to be cast into the destination."""
        dtype = codec.dtype_from_proto(chunk.dtype)
        if self._buffer is None or self._buffer.dtype != dtype or self._buffer.numel() < count:
            self._buffer = torch.empty(count, dtype=dtype)
        buffer = self._buffer[:count]
        _copy_into(codec.byte_view(buffer), chunk.data)
        return buffer

    def finish(self) -> dict[str, torch.Tensor]:
        """The dense tensors (`sparse` holds the keys kept sparse)."""
        incomplete = [k for k, p in self._pending.items() if p.filled != p.numel]
        if incomplete:
            raise InvalidArgument(f"stream ended before these keys were complete: {incomplete}")
        return self._tensors


def _copy_into(dest: np.ndarray, data: codec.Data) -> None:
    if isinstance(data, (bytes, bytearray, memoryview)):
        dest[:] = np.frombuffer(data, dtype=np.uint8)
    else:
        data.readinto(memoryview(dest))  # type: ignore[arg-type]


def _writable_copy(data: codec.Data) -> bytearray:
    out = bytearray(len(data))
    _copy_into(np.frombuffer(out, dtype=np.uint8), data)
    return out


def _sparse_parts(key: str, chunk: codec.ChunkLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse chunk's positions (int64, within the chunk) and values, read
    out of the message and checked: as many values as positions, each inside
    the chunk, strictly ascending (so that each element is sent once)."""
    dtype = codec.dtype_from_proto(chunk.dtype)
    count = len(chunk.indices) // codec.INDEX_BYTES
    if len(chunk.indices) % codec.INDEX_BYTES or len(chunk.data) != count * dtype.itemsize:
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
    def chunks(self) -> Iterable[codec.ChunkLike]: ...


def receive(
    responses: Iterable[HasChunks], allocate: Allocator, on_complete: OnComplete = None
) -> dict[str, torch.Tensor]:
    """Assemble a Pull's response stream into the tensors `allocate` gives,
    calling `on_complete(key)` as soon as each tensor is whole."""
    assembler = ChunkAssembler(allocate, on_complete)
    for response in responses:
        for chunk in response.chunks:
            assembler.add(chunk)
    return assembler.finish()


def new_tensor_for(chunk: codec.ChunkLike) -> torch.Tensor:
    """A fresh flat tensor sized for the whole tensor that `chunk` starts."""
    numel = 1
    for dim in chunk.shape:
        if dim < 0:
            raise InvalidArgument(f"key {chunk.key!r}: negative dimension in shape {list(chunk.shape)}")
        numel *= dim
    return torch.empty(numel, dtype=codec.dtype_from_proto(chunk.dtype))
