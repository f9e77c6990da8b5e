"""Reused buffers for the tensors a server receives and sends on every step.

Each push lands in gradient-sized buffers that live until the push is
applied, and each asynchronous pull message is copied before it is sent.
Allocated afresh on every step, these buffers were either given back to the
kernel and faulted in again (a quarter of the server's CPU with bf16 pushes)
or kept by malloc, scattered across its arenas: four ASP workers grew the
server by 1.45x its weights and optimizer state, where the buffers live at
once account for 1.17x. Reusing them keeps both the CPU and the memory at
what the buffers in flight need.
"""

from __future__ import annotations

import bisect
import math
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_MAX_IDLE_BYTES = 2**30


class BufferPool:
    """Tensors lent by `take` and `joined` and handed back by `give`, for
    later loans of the same size or a little smaller.

    A model's pieces and a pull's messages come in many sizes a few bytes
    apart; buffers are byte buffers, of any dtype, rounded up so that few
    sizes serve them all, and a loan may use a waiting buffer of up to twice
    its size. `give` takes back only tensors this pool lent and has not had
    back, so handing back a caller's own tensor, or one tensor twice, does
    nothing; a lent tensor never given back is simply freed. At most
    `max_idle_bytes` wait in the pool; beyond that, given-back buffers are freed.
    """

    def __init__(self, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES) -> None:
        self._max_idle_bytes = max_idle_bytes
        self._lock = threading.Lock()
        self._idle: list[torch.Tensor] = []  # uint8 buffers, smallest first
        self._idle_bytes = 0
        # id of a lent tensor -> (the tensor, weakly; the buffer it views).
        # Not a WeakSet: tensors compare elementwise.
        self._lent: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    def take(self, shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor of `shape` and `dtype`."""
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffer(nbytes)
        return self._lend(buffer[:nbytes].view(dtype).view(shape), buffer)

    def joined(self, parts: Sequence[Any]) -> torch.Tensor:
        """The bytes-like `parts` joined into one lent uint8 tensor (b"".join into a reused buffer)."""
        sizes = [len(memoryview(part).cast("B")) for part in parts]
        total = sum(sizes)
        buffer = self._buffer(total)
        dest = buffer.numpy()
        start = 0
        for part, size in zip(parts, sizes, strict=True):
            dest[start : start + size] = np.frombuffer(part, dtype=np.uint8)
            start += size
        return self._lend(buffer[:total], buffer)

    def give(self, tensors: Iterable[torch.Tensor]) -> None:
        """Hand back lent tensors the caller no longer uses (nor any view of them)."""
        with self._lock:
            for tensor in tensors:
                loan = self._lent.get(id(tensor))
                if loan is None or loan[0]() is not tensor:
                    continue
                del self._lent[id(tensor)]
                buffer = loan[1]
                if self._idle_bytes + buffer.numel() <= self._max_idle_bytes:
                    bisect.insort(self._idle, buffer, key=torch.Tensor.numel)
                    self._idle_bytes += buffer.numel()

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A waiting buffer of `nbytes` to twice that, else a new one."""
        with self._lock:
            index = bisect.bisect_left(self._idle, nbytes, key=torch.Tensor.numel)
            if index < len(self._idle) and self._idle[index].numel() <= 2 * nbytes:
                buffer = self._idle.pop(index)
                self._idle_bytes -= buffer.numel()
                return buffer
        return torch.empty(_rounded_up(nbytes), dtype=torch.uint8)

    def _lend(self, tensor: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        # `tensor` is a new view object on each loan, so a stale reference to
        # an earlier loan of the same memory is never taken for this one. The
        # loan is dropped when the tensor is freed, before its id can be reused.
        key = id(tensor)
        with self._lock:
            self._lent[key] = (weakref.ref(tensor, lambda _: self._lent.pop(key, None)), buffer)
        return tensor


def _rounded_up(nbytes: int) -> int:
    """`nbytes` up to a multiple of an eighth of the power of two above it: at most 1/8 more."""
    step = max(1, (1 << max(0, nbytes - 1).bit_length()) // 8)
    return -(-nbytes // step) * step
