"""How pushed gradients become optimizer updates of a shard's keys: BSP sums
a step's contributions and applies their average once every live worker's
is in; ASP and SSP apply each push on arrival. Called under the shard's lock."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ps_common import assembly
from ps_common.proto import ps_pb2 as pb
from ps_server.buffers import BufferPool
from ps_server.keys import Gradient, Slot
from ps_server.metrics import ServerMetrics
from ps_server.optimizer import ShardOptimizer

__all__ = ["CheckedPush", "Updater", "step_complete"]


@dataclass
class CheckedPush:
    """A checked push, ready to change the shard."""

    worker_id: int
    step: int
    options: list[dict[str, Any]] | None  # the param groups' hyperparameters, None: unchanged
    fresh: dict[str, Slot]  # keys this worker had not pushed for this step yet
    grads: Mapping[str, Gradient]  # absent keys have no entry
    thresholds: dict[str, float]  # pruning thresholds by parameter name


def step_complete(slot: Slot, live: Sequence[int]) -> bool:
    """BSP: whether the step `slot` is at has every live worker's push. By
    worker, not by count: a worker that left after pushing this step still
    counts among its contributions, and must not stand in for one that has
    not pushed yet."""
    return slot.contributors > 0 and all(slot.last_push.get(w, -1) >= slot.version for w in live)


class Updater:
    """Applies checked pushes with `optimizer`, taking buffers from `buffers`,
    counting each update with `count("updates", 1)` and timing it in `metrics`."""

    def __init__(
        self,
        optimizer: ShardOptimizer,
        buffers: BufferPool,
        metrics: ServerMetrics | None,
        count: Callable[[str, int], None],
    ) -> None:
        self.optimizer = optimizer
        self._buffers = buffers
        self._metrics = metrics
        self._count = count

    def accumulate(self, push: CheckedPush, live: Sequence[int]) -> None:
        """BSP: add to the step's sum; apply the average once every `live` worker contributed."""
        ready = []
        for key, slot in push.fresh.items():
            grad = push.grads.get(key)
            if grad is not None:
                if slot.grad_sum is None:
                    slot.grad_sum = self._in_value_dtype(grad, slot)  # the stream's buffer is ours: no copy if fp32
                elif isinstance(grad, assembly.SparseParts):
                    grad.add_to(slot.grad_sum)  # only the elements sent: no zeros filled in, none added
                else:
                    slot.grad_sum.add_(grad)  # adds a half-precision gradient without casting it first
            slot.contributors += 1
            slot.last_push[push.worker_id] = push.step
            if slot.spec.tensor in push.thresholds:
                slot.prune_threshold = push.thresholds[slot.spec.tensor]
            if step_complete(slot, live):
                ready.append(slot)
        self.apply_steps(push.options, ready)

    def apply_steps(self, options: list[dict[str, Any]] | None, ready: list[Slot]) -> None:
        """BSP: apply the average of each ready slot's contributions, over those who contributed."""
        for slot in ready:
            if slot.prune_threshold is not None:
                slot.prune(slot.prune_threshold)
                slot.prune_threshold = None
        with_grad = [s for s in ready if s.grad_sum is not None]
        # Slots ready together have had the same contributors, but for a
        # worker that departed or rejoined in between.
        by_contributors: dict[int, list[Slot]] = {}
        for slot in with_grad:
            slot.value.grad = slot.grad_sum
            by_contributors.setdefault(slot.contributors, []).append(slot)
        for contributors, slots in by_contributors.items():
            self._step(options, slots, contributions=contributors)
        self._buffers.give(slot.grad_sum for slot in with_grad)  # type: ignore[misc]
        for slot in ready:
            slot.grad_sum, slot.contributors = None, 0
            slot.version += 1
            slot.restored = False

    def apply_now(self, job: pb.JobSpec, push: CheckedPush, pulled_version: Mapping[tuple[int, str], int]) -> None:
        """ASP/SSP: apply the push at once; its staleness is how many updates it
        missed since its worker last read (`pulled_version`, by worker and key)."""
        with_grad = [slot for key, slot in push.fresh.items() if key in push.grads]
        staleness = max((s.version - pulled_version.get((push.worker_id, s.spec.key), 0) for s in with_grad), default=0)
        if self._metrics:
            self._metrics.push_staleness.observe(staleness)
        for slot in push.fresh.values():
            if slot.spec.tensor in push.thresholds:
                slot.prune(push.thresholds[slot.spec.tensor])
        grads = [self._in_value_dtype(push.grads[slot.spec.key], slot) for slot in with_grad]
        for slot, grad in zip(with_grad, grads, strict=True):
            slot.value.grad = grad
        lr_scale = 1.0 / max(1, staleness) if job.scale_lr_by_staleness else 1.0
        self._step(push.options, with_grad, lr_scale)
        self._buffers.give(grads)
        for key, slot in push.fresh.items():
            slot.last_push[push.worker_id] = push.step
            if key in push.grads:
                slot.version += 1
                slot.restored = False

    def _in_value_dtype(self, grad: Gradient, slot: Slot) -> torch.Tensor:
        """`grad` itself if dense and in the weights' dtype, else a dense copy in
        that dtype lent by the pool."""
        if isinstance(grad, assembly.SparseParts):
            return grad.densify(self._buffers.take(slot.value.shape, slot.value.dtype))
        if grad.dtype == slot.value.dtype:
            return grad
        return self._buffers.take(grad.shape, slot.value.dtype).copy_(grad)

    def _step(
        self,
        options: list[dict[str, Any]] | None,
        slots: list[Slot],
        lr_scale: float = 1.0,
        contributions: int = 1,
    ) -> None:
        if not slots:
            return
        masked = [(s, s.mask) for s in slots if s.mask is not None]
        for slot, mask in masked:
            slot.value.grad.mul_(mask)  # type: ignore[union-attr]
        started = time.perf_counter()
        try:
            self.optimizer.step([s.value for s in slots], options, lr_scale, contributions)
        finally:
            for slot in slots:
                slot.value.grad = None
            # Pruned weights stay zero whatever the optimizer state says.
            for slot, mask in masked:
                slot.value.mul_(mask)
        self._count("updates", 1)
        if self._metrics:
            self._metrics.update_seconds.observe(time.perf_counter() - started)
