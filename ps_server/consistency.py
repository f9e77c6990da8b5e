"""The consistency rules (BSP, ASP, SSP): which of a push's keys a shard
takes, and which keys a worker may read for a step.

Pure functions of a job, its keys' versions and its workers' clocks: the
shard calls them under its lock and acts on the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ps_common.errors import FailedPrecondition
from ps_common.proto import ps_pb2 as pb
from ps_server.keys import Slot

__all__ = ["Read", "check_ssp_bound", "fresh_keys"]

log = logging.getLogger(__name__)


def check_ssp_bound(job: pb.JobSpec, worker: int, step: int, clocks: Mapping[int, int]) -> None:
    """SSP: refuse a push older than the staleness bound allows."""
    if job.mode != pb.SSP:
        return
    fastest = max(clocks.values(), default=0)
    if step < fastest - job.staleness - 1:
        raise FailedPrecondition(
            f"worker {worker} pushed step {step}, older than the staleness bound {job.staleness} "
            f"allows (the fastest worker has pushed {fastest} steps); nothing was applied"
        )


def fresh_keys(job: pb.JobSpec, worker: int, step: int, slots: Iterable[Slot]) -> dict[str, Slot]:
    """Those of `slots` that take `worker`'s push of `step`: not a retry of a
    push already taken (applied once), and in BSP not a step already
    completed or lost with a crash. A BSP push for a step ahead is refused;
    a key restored from a checkpoint resumes at the latest step pushed
    (workers may have been a step apart when the server died)."""
    fresh = {}
    bsp = job.mode == pb.BSP
    for slot in slots:
        key = slot.spec.key
        if step <= slot.last_push.get(worker, -1):
            continue
        if bsp and step < slot.version:
            continue
        if bsp and step != slot.version and not (slot.restored and step > slot.version):
            raise FailedPrecondition(
                f"worker {worker} pushed step {step} for key {key!r}, which is at step {slot.version}; "
                "in BSP a worker pulls each step's result before pushing the next"
            )
        fresh[key] = slot
    for slot in fresh.values():
        if bsp and slot.restored and step > slot.version:
            log.warning("key %s resumes at step %d: steps %d..%d were lost", slot.spec.key, step,
                        slot.version, step - 1)  # fmt: skip
            slot.version, slot.contributors, slot.grad_sum = step, 0, None
    return fresh


@dataclass(frozen=True)
class Read:
    """A read of `slots` for `step` by a worker (`wait_for_all`: only once
    every worker pushed `step` steps, whatever the mode), with the `live`
    workers and `clocks()`, which gives their clocks and is asked only where
    the mode needs them."""

    job: pb.JobSpec
    step: int
    slots: Sequence[Slot]
    wait_for_all: bool
    live: Sequence[int]
    clocks: Callable[[], Mapping[int, int]]

    def blocking_workers(self) -> list[int]:
        """The workers whose pushes the read still waits for (empty: it may read)."""
        step, slots = self.step, self.slots
        if self.wait_for_all:
            needed = step
        elif self.job.mode == pb.BSP:
            if all(s.version >= step for s in slots):
                return []
            return [w for w in self.live if any(s.last_push.get(w, -1) < step - 1 for s in slots)]
        elif self.job.mode == pb.SSP:
            needed = step - self.job.staleness
        else:
            return []
        clock = self.clocks()
        return [w for w in self.live if clock.get(w, 0) < needed]

    def readable(self) -> list[Slot]:
        """Those of the slots the worker may read now. In BSP a key may be read
        as soon as its own step is complete, while others still wait; in ASP
        and SSP, and when waiting for all workers, all become readable at once."""
        if self.job.mode == pb.BSP and not self.wait_for_all:
            ready = [s for s in self.slots if s.version >= self.step]
            if ready:
                return ready
        return [] if self.blocking_workers() else list(self.slots)
