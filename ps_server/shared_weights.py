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

import math
import mmap
import os
import sys
from collections.abc import Iterable

import torch

from ps_common import codec
from ps_common.errors import ResourceExhausted
from ps_common.proto import ps_pb2 as pb

__all__ = ["SharedWeights", "WeightMemory"]

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


class WeightMemory:
    """Where a shard's weights live: on Linux, one SharedWeights block
    (`current`), and the block the latest Init stream is received into
    (`receiving`), adopted if it ends up holding the job's values. The
    shard calls it under its lock."""

    def __init__(self) -> None:
        self.current: SharedWeights | None = None
        self.receiving: SharedWeights | None = None

    def receive(self, job: pb.JobSpec) -> dict[str, torch.Tensor]:
        """Flat tensors, by key, for an Init stream to write `job`'s values
        into (none where there is no shared memory). Receiving straight into
        shared memory spares a copy afterwards, which would hold the weights
        twice for a moment and leave what it frees in the receiving thread's
        malloc arena, unused by the threads that allocate later."""
        if not SharedWeights.supported():
            return {}
        layout = [(math.prod(k.shape), codec.dtype_from_proto(k.dtype)) for k in job.keys]
        try:
            shared = SharedWeights(layout)
        except (OSError, OverflowError) as exc:
            size = sum(numel * dtype.itemsize for numel, dtype in layout)
            raise ResourceExhausted(f"the job's {size} bytes of weights cannot be mapped: {exc}") from None
        self.receiving = shared
        return {k.key: view for k, view in zip(job.keys, shared.views, strict=True)}

    def drop_received(self) -> None:
        """A repeated Init's values are not kept."""
        self.receiving = None

    def adopt(self, values: Iterable[torch.Tensor]) -> list[torch.Tensor] | None:
        """Make `values` the shared weights, before an optimizer is built on
        them: where an Init received them, as they are (None); else copied,
        and the copies returned to take their place."""
        if not SharedWeights.supported():
            return None
        values = list(values)
        received, self.receiving = self.receiving, None
        copies = None
        if received is not None and received.holds(values):
            shared = received
        else:
            shared = SharedWeights.holding(values)
            copies = shared.views
        if self.current is not None:
            self.current.close()
        self.current = shared
        return copies

    def close(self) -> None:
        for shared in (self.current, self.receiving):
            if shared is not None:
                shared.close()
