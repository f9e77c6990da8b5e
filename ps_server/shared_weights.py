"""A shard's weights in one block of shared memory, which workers on the
server's host map read-only (the data channel's "Share" call) and copy
pulled weights from, instead of having the server send them.

Sending a 37.6 MB share to two workers cost the server about a tenth of its
CPU in kernel copies alone, and each worker as much again to receive it; on
a host whose cores the server and its workers share, that CPU is what a
step waits for. Read from shared memory, a pull costs the server a small
answer and the worker one memcpy. It is safe only where the weights hold
still while a worker reads them (BSP, Shard.values_hold_still), so that is
the only place a pull answers with shared ranges.

Linux only (memfd): elsewhere the weights stay in ordinary memory and pulls
send bytes.
"""

from __future__ import annotations

import mmap
import os
import sys

import torch

_ALIGN = 64  # a cache line: every tensor starts on one


class SharedWeights:
    """Flat tensors carved out of one memfd, laid out in the order given."""

    def __init__(self, layout: list[tuple[int, torch.dtype]]) -> None:
        """`views`: one flat tensor per (numel, dtype) of `layout`, uninitialized."""
        offsets, size = [], 0
        for numel, dtype in layout:
            offsets.append(size)
            size += -(-numel * dtype.itemsize // _ALIGN) * _ALIGN
        self.size = max(size, _ALIGN)  # mmap refuses an empty mapping
        self._fd = os.memfd_create("ps-weights", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.size)  # pages come as they are first written
        self._memory = mmap.mmap(self._fd, self.size)
        self._base = torch.frombuffer(self._memory, dtype=torch.uint8)
        self.views = [
            self._base[offset : offset + numel * dtype.itemsize].view(dtype)
            for (numel, dtype), offset in zip(layout, offsets, strict=True)
        ]

    @classmethod
    def holding(cls, tensors: list[torch.Tensor]) -> SharedWeights:
        """A copy of `tensors`, flattened, as `views`."""
        shared = cls([(tensor.numel(), tensor.dtype) for tensor in tensors])
        for view, tensor in zip(shared.views, tensors, strict=True):
            view.copy_(tensor.reshape(-1))
        return shared

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every non-empty tensor of `tensors` lies in this memory."""
        return all(tensor.numel() == 0 or self.range_of(tensor) is not None for tensor in tensors)

    @classmethod
    def supported(cls) -> bool:
        return sys.platform == "linux" and hasattr(os, "memfd_create")

    def range_of(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(offset, size) in bytes of a contiguous tensor lying in this memory; None if it does not."""
        start = tensor.data_ptr() - self._base.data_ptr()
        size = tensor.numel() * tensor.element_size()
        if not tensor.is_contiguous() or start < 0 or start + size > self.size:
            return None
        return start, size

    def readonly_fd(self) -> int:
        """A new descriptor of this memory that can only be mapped for reading,
        for a client (the caller closes it once passed on)."""
        return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """Drop this object's descriptor; the memory lives on while views of it do."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
