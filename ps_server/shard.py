"""One server's shard: its slices of the model and their optimizer, changed
by pushes and read by pulls as the job's consistency mode allows
(ps_server.consistency), with its workers' clocks and liveness
(ps_server.workers).

Plain Python and torch: the transports translate messages and errors.
Every change happens under one lock and only after every check has passed,
so a refused request leaves weights, optimizer state and counters as they were.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ps_common import assembly, codec
from ps_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, WaitTimeout
from ps_common.proto import ps_pb2 as pb
from ps_server import consistency, keys
from ps_server.buffers import BufferPool
from ps_server.keys import Gradient, PulledKey, Slot, updates_taken
from ps_server.metrics import ServerMetrics
from ps_server.optimizer import ShardOptimizer
from ps_server.optimizer_state import checked_state
from ps_server.shared_weights import SharedWeights, WeightMemory
from ps_server.snapshots import read_state, state_of, stats_of
from ps_server.storage import ShardState
from ps_server.updates import CheckedPush, Updater, step_complete
from ps_server.workers import Workers

__all__ = ["Gradient", "PulledKey", "Shard", "Slot", "updates_taken"]

log = logging.getLogger(__name__)


class Shard:
    """The state of one parameter server and the rules that change it."""

    def __init__(
        self,
        wait_log_interval: float = 10.0,
        metrics: ServerMetrics | None = None,
        worker_timeout: float = 60.0,
        fused_updates: bool = True,
    ) -> None:
        self._cond = threading.Condition()
        self._casting = threading.Lock()  # pulled_as: one cast per update, whoever asks first
        self._fused_updates = fused_updates
        self.workers = Workers(worker_timeout)
        self._metrics = metrics
        self._wait_log_interval = wait_log_interval
        self._closed = False
        self.job: pb.JobSpec | None = None
        self.slots: dict[str, Slot] = {}
        self._updater: Updater | None = None  # the job's optimizer, once initialized
        self._pulled_version: dict[tuple[int, str], int] = {}  # for the staleness of ASP/SSP pushes
        self.counters: Counter[str] = Counter()
        self.buffers = BufferPool()  # pushed gradients, their fp32 casts, ASP pull copies (handler.py)
        self.memory = WeightMemory()  # where the weights live

    # -- handshake and initialization ------------------------------------------------

    def hello(self, worker_id: int, num_workers: int) -> tuple[pb.JobSpec | None, int]:
        """Check a worker's identity; return the job (None before Init) and its clock."""
        with self._cond:
            if self.job is not None:
                self._check_worker(worker_id)
                if num_workers != self.job.num_workers:
                    raise InvalidArgument(
                        f"worker {worker_id} believes the job has {num_workers} workers, "
                        f"it was initialized with {self.job.num_workers}"
                    )
                self._seen(worker_id)
            elif not 0 <= worker_id < num_workers:
                raise InvalidArgument(f"worker id {worker_id} is out of range for {num_workers} workers")
            clock = self._clocks().get(worker_id, 0)
            if self.job is not None and self.job.mode == pb.BSP:
                # A worker that was left behind resumes at the step the others reached.
                clock = max(clock, min((s.version for s in self.slots.values()), default=0))
            return self.job, clock

    def init_allocator(self, job: pb.JobSpec) -> assembly.Allocator:
        """Allocator for an Init stream: a chunk must match its KeySpec."""
        keys.validate_job(job)  # before any chunk is taken in
        specs = {k.key: k for k in job.keys}

        with self._cond:
            views = self.memory.receive(job)  # init() adopts it if it holds the values

        def allocate(chunk: codec.ChunkLike) -> torch.Tensor:
            spec = specs.get(chunk.key)
            if spec is None:
                raise InvalidArgument(f"Init sends key {chunk.key!r} that its job does not declare")
            keys.check_matches(spec, chunk)
            return views[chunk.key] if chunk.key in views else assembly.new_tensor_for(chunk)

        return allocate

    def init(self, job: pb.JobSpec, values: dict[str, torch.Tensor]) -> bool:
        """Install the job and initial values; True if an identical job was already there."""
        keys.validate_job(job)
        missing = [k.key for k in job.keys if k.key not in values]
        if missing:
            raise InvalidArgument(f"Init carries no initial value for keys {missing}")
        with self._cond:
            if self.job is not None:
                self.memory.drop_received()
                if self.job == job:
                    return True
                raise FailedPrecondition(
                    "this server was already initialized with a different job "
                    f"({keys.describe_difference(self.job, job)}); restart the servers to start a new job"
                )
            slots = {k.key: Slot(spec=k, value=values[k.key]) for k in job.keys}
            self._share(slots)
            self.job, self.slots, self._updater = job, slots, self._new_updater(job, slots)
            self.workers.restart()
            log.info(
                "initialized: %s, %d workers, optimizer %s, %d keys, %.1f MiB",
                pb.Mode.Name(job.mode),
                job.num_workers,
                job.optimizer.name,
                len(slots),
                sum(s.nbytes for s in slots.values()) / 2**20,
            )
            self._cond.notify_all()
            return False

    def _share(self, slots: dict[str, Slot]) -> None:
        """Put the weights in shared memory (ps_server.shared_weights)."""
        copies = self.memory.adopt(slot.value for slot in slots.values())
        if copies is not None:
            for slot, copy in zip(slots.values(), copies, strict=True):
                slot.value = copy

    @property
    def shared(self) -> SharedWeights | None:
        """The shared weights, on Linux once initialized."""
        return self.memory.current

    def _new_updater(self, job: pb.JobSpec, slots: dict[str, Slot]) -> Updater:
        values = [s.value for s in slots.values()]
        optimizer = ShardOptimizer(job.optimizer, values, [k.group for k in job.keys], self._fused_updates)
        return Updater(optimizer, self.buffers, self._metrics, self._add)

    def _add(self, counter: str, amount: int) -> None:
        self.counters[counter] += amount  # under the lock, held by whoever updates

    # -- push ------------------------------------------------------------------------

    def push_allocator(self, chunk: codec.ChunkLike) -> torch.Tensor:
        """Allocator for a Push stream (see `push_layout`)."""
        return self.buffers.take(*self.push_layout(chunk))

    def push_layout(self, chunk: codec.ChunkLike) -> tuple[torch.Size, torch.dtype]:
        """The shape and dtype a pushed key's chunks fill: only known keys,
        with their shape, and their dtype or (compressed gradients) a
        half-precision one; raises for any other."""
        return self._slot(chunk.key).push_layout(chunk)

    def push(
        self,
        worker_id: int,
        step: int,
        groups: Sequence[pb.ParamGroup],
        grads: Mapping[str, Gradient],
        absent: Iterable[str] = (),
        thresholds: Mapping[str, float] | None = None,
    ) -> tuple[int, int]:
        """Accept one worker's gradients for `step` (dense, or as they
        travelled sparse); returns (accepted, duplicates).

        `thresholds` (worker 0, on pruning steps) prune this step's weights,
        by parameter name, before its update.
        """
        absent = set(absent)
        thresholds = dict(thresholds or {})
        # Half-precision (compressed) gradients stay so until used: casting
        # cannot make a finite value non-finite, and casting late saves a
        # gradient-sized allocation per push.
        for key, grad in grads.items():
            if not codec.all_finite(grad.values if isinstance(grad, assembly.SparseParts) else grad):
                raise InvalidArgument(f"gradient of key {key!r} contains NaN or Inf; nothing was applied")
        with self._cond:
            job, updater = self._require_job()
            self._check_worker(worker_id)
            if step < 0:
                raise InvalidArgument(f"step {step} is negative")
            options = updater.optimizer.check_options(groups) if groups else None
            if thresholds:
                keys.check_thresholds(job, worker_id, self.slots.values(), thresholds)
            consistency.check_ssp_bound(job, worker_id, step, self._clocks())
            fresh = consistency.fresh_keys(job, worker_id, step, [self._slot(key) for key in [*grads, *absent]])
            self._seen(worker_id)
            checked = CheckedPush(worker_id, step, options, fresh, grads, thresholds)
            if job.mode == pb.BSP:
                updater.accumulate(checked, self.workers.live(job.num_workers))
            else:
                updater.apply_now(job, checked, self._pulled_version)
            # What is not kept as a BSP step's sum is free for the next push.
            summed = {id(slot.grad_sum) for slot in fresh.values()}
            self.buffers.give(g for g in grads.values() if isinstance(g, torch.Tensor) and id(g) not in summed)
            self.workers.pushed(worker_id, step, self.slots.values())
            duplicates = len(grads) + len(absent) - len(fresh)
            self.counters["pushes"] += 1
            self.counters["duplicate_keys"] += duplicates
            self.counters["bytes_in"] += sum(keys.gradient_bytes(g) for k, g in grads.items() if k in fresh)
            self._cond.notify_all()
            return len(fresh), duplicates

    def _seen(self, worker_id: int) -> None:
        """Note that a worker is alive; a departed one rejoins."""
        if self.workers.seen(worker_id):
            self.counters["workers_rejoined"] += 1
            log.warning("worker %d rejoined", worker_id)

    def _expire_workers(self) -> None:
        """Workers silent for longer than worker_timeout stop holding the others back:
        BSP steps complete without them, SSP stops waiting for them."""
        job, updater = self._require_job()
        expired = self.workers.expire(job.num_workers)
        if not expired:
            return
        self.counters["workers_departed"] += len(expired)
        log.warning(
            "workers %s sent nothing for %.0fs: continuing without them (%d of %d workers left)",
            expired, self.workers.timeout, len(self.workers.live(job.num_workers)), job.num_workers,
        )  # fmt: skip
        self._without_departed(job, updater)

    def leave(self, worker_id: int) -> None:
        """The worker left the job (its client closed): nobody waits for it
        any more. Its next call, if any, rejoins it."""
        with self._cond:
            job, updater = self._require_job()
            self._check_worker(worker_id)
            if self.workers.leave(worker_id):
                self.counters["workers_left"] += 1
                log.info("worker %d left the job (%d of %d workers left)", worker_id,
                         len(self.workers.live(job.num_workers)), job.num_workers)  # fmt: skip
                self._without_departed(job, updater)

    def _without_departed(self, job: pb.JobSpec, updater: Updater) -> None:
        """Complete the BSP steps that waited only for departed workers, and
        wake the pulls that did (called holding the lock)."""
        if job.mode == pb.BSP:
            live = self.workers.live(job.num_workers)
            updater.apply_steps(None, [s for s in self.slots.values() if step_complete(s, live)])
        self._cond.notify_all()

    def _clocks(self) -> dict[int, int]:
        return self.workers.clocks(self.slots.values())

    # -- pull ------------------------------------------------------------------------

    def pull(
        self,
        worker_id: int,
        step: int,
        keys: Sequence[str],
        wait_for_all: bool,
        timeout: float | None,
        masks: bool = False,
    ) -> Iterator[list[PulledKey]]:
        """`keys` (all if empty), in batches as `worker_id` may read them for
        `step`; with `masks`, the pruning masks of those that have one instead.

        In BSP a key may be read as soon as its own step is complete, while
        others still wait for pushes: a worker that pulls while it pushes
        receives the first keys while it sends the last. In ASP and SSP, and
        when waiting for all workers, every key becomes readable at once.

        The values are the live tensors, not copies (a copy of the whole shard
        per pull would double the server's memory): read them inside
        `reading()`, a piece at a time, unless `values_hold_still()`. In ASP
        each piece read is whole, and pieces may come from successive
        updates, as in any asynchronous server."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._require_job()
            self._check_worker(worker_id)
            pending = [self._slot(k) for k in keys] if keys else list(self.slots.values())
            self._seen(worker_id)
        while pending:
            with self._cond:
                ready = self._wait_readable(worker_id, step, pending, wait_for_all, deadline)
                taken = {id(slot) for slot in ready}
                pending = [slot for slot in pending if id(slot) not in taken]
                if masks:
                    batch = [
                        PulledKey(s.spec.key, s.mask.view(tuple(s.spec.shape)), s.version, sparse=False)
                        for s in ready
                        if s.mask is not None
                    ]
                else:
                    batch = []
                    for slot in ready:
                        value = slot.value.view(tuple(slot.spec.shape))
                        batch.append(PulledKey(slot.spec.key, value, slot.version, sparse=slot.mask is not None))
                        self._pulled_version[(worker_id, slot.spec.key)] = slot.version
            yield batch
        with self._cond:
            self.counters["pulls"] += 1

    def _wait_readable(
        self, worker_id: int, step: int, slots: list[Slot], wait_for_all: bool, deadline: float | None
    ) -> list[Slot]:
        """Those of `slots` that `worker_id` may read for `step`, once there are
        any (called holding the lock, which waiting releases)."""
        next_log = time.monotonic() + self._wait_log_interval
        while not self._closed:
            self._expire_workers()
            job, _ = self._require_job()
            read = consistency.Read(job, step, slots, wait_for_all, self.workers.live(job.num_workers), self._clocks)
            ready = read.readable()
            if ready:
                return ready
            blocking = read.blocking_workers()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.counters["pull_timeouts"] += 1
                raise WaitTimeout(
                    f"worker {worker_id} cannot read step {step} yet: waiting for workers {blocking} to push"
                )
            if now >= next_log:
                log.info("worker %d waits to read step %d: workers %s have not pushed yet", worker_id, step, blocking)
                next_log = now + self._wait_log_interval
            # Wake at least every second to notice departed workers.
            self._cond.wait(min(next_log, deadline or next_log, now + 1.0) - now)
        raise Unavailable("server is shutting down")

    # -- introspection and lifecycle ---------------------------------------------------

    def values_hold_still(self) -> bool:
        """Whether pulled values stay as they are until the puller pushes
        again, so that they may be sent without a copy: in BSP no update
        comes before every live worker's next push. (A worker silent for
        `worker_timeout` in the middle of a pull stops holding the others
        back and may read a later update midway; its next push is then too
        late and is dropped, so what it read cannot reach the model.)"""
        return self.job is not None and self.job.mode == pb.BSP

    def pulled_as(self, item: PulledKey, dtype: torch.dtype) -> torch.Tensor:
        """`item`'s values (weights pulled where `values_hold_still()`) as
        they travel in `dtype`: cast once per update into a tensor the key
        keeps, and shared by every worker that pulls that update, so that a
        server of W workers casts a step's weights once, not W times. The
        copy (half the key's bytes, for bf16) is kept from the key's first
        half-precision pull on. A pull of an update that is no longer the
        key's (by a worker that fell behind) gets a cast of its own."""
        travels = codec.wire_dtype(item.value.dtype, dtype)
        if travels == item.value.dtype:
            return item.value
        slot = self._slot(item.key)
        with self._casting:
            return slot.cast_as(item.value, item.version, travels)

    def reading(self) -> threading.Condition:
        """Hold this while reading pulled values: no update runs meanwhile."""
        return self._cond

    def stats(self) -> pb.StatsResponse:
        with self._cond:
            return stats_of(self.job, self.slots, self._clocks(), self.workers.last_push_time, self.counters)

    def snapshot(self) -> ShardState | None:
        """Everything needed to restart this shard where it is (None before Init)."""
        with self._cond:
            if self.job is None or self._updater is None:
                return None
            return state_of(self.job, self.slots, self._clocks(), self._updater.optimizer, self.counters)

    def restore(self, state: ShardState) -> None:
        """Become the shard a checkpoint describes (before serving any request)."""
        restored = read_state(state)
        self._share(restored.slots)
        updater = self._new_updater(restored.job, restored.slots)
        updater.optimizer.load_state_parts(restored.optimizer_tensors, restored.optimizer_meta)
        with self._cond:
            self.job, self.slots, self._updater = restored.job, restored.slots, updater
            self.workers.restore(restored.clocks)
            self.counters = restored.counters

    def progress(self) -> int:
        """The shard's `updates_taken`."""
        with self._cond:
            return updates_taken(s.version for s in self.slots.values())

    def metrics_snapshot(self) -> dict[str, Any]:
        with self._cond:
            return {
                "counters": dict(self.counters),
                "version": min((s.version for s in self.slots.values()), default=0),
                "bytes": sum(s.nbytes for s in self.slots.values()),
                "keys": len(self.slots),
                "last_push": dict(self.workers.last_push_time),
                "buffer_pool_bytes": self.buffers.idle_bytes,
                "pull_cast_bytes": sum(
                    s.cast.numel() * s.cast.element_size() for s in self.slots.values() if s.cast is not None
                ),
            }

    def get_state(self, worker_id: int) -> list[tuple[str, torch.Tensor]]:
        """The optimizer state of every key, as ("<key>/<field>", copy) pairs."""
        with self._cond:
            _, updater = self._require_job()
            self._check_worker(worker_id)
            return [
                (f"{key}/{name}", value)
                for key, slot in self.slots.items()
                for name, value in updater.optimizer.state_of(slot.value).items()
            ]

    def set_state(self, worker_id: int, states: Mapping[str, torch.Tensor], check_only: bool = False) -> int:
        """Worker 0 sets the optimizer state of keys ("<key>/<field>": tensor)
        before the job's first update: every field torch keeps for each key
        named, with its shape, or nothing changes (`check_only`: nothing
        does, once checked). Returns the keys set, or that would be."""
        with self._cond:
            job, updater = self._require_job()
            if worker_id != 0:
                raise InvalidArgument(f"only worker 0 sets the optimizer state, not worker {worker_id}")
            if updates_taken(s.version for s in self.slots.values()):
                raise FailedPrecondition(
                    "the job has taken updates already: load the optimizer state before the first step"
                )
            for name in states:
                self._slot(name.rpartition("/")[0])  # NOT_FOUND for a key this server does not hold
            checked = checked_state(job, self.slots, updater.optimizer, states)
            if not check_only:
                updater.optimizer.set_state(checked, [s.value for s in self.slots.values()])
            return len(checked)

    @property
    def optimizer(self) -> ShardOptimizer | None:
        """The job's optimizer over the shard's keys (None before Init)."""
        return None if self._updater is None else self._updater.optimizer

    def count(self, counter: str, amount: int) -> None:
        with self._cond:
            self.counters[counter] += amount

    def close(self) -> None:
        """Wake every waiting pull so that shutdown never hangs on a barrier."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self.memory.close()

    def _require_job(self) -> tuple[pb.JobSpec, Updater]:
        if self.job is None or self._updater is None:
            raise FailedPrecondition("this server has not been initialized yet: worker 0 must call Init first")
        return self.job, self._updater

    def _check_worker(self, worker_id: int) -> None:
        assert self.job is not None
        if not 0 <= worker_id < self.job.num_workers:
            raise InvalidArgument(f"worker id {worker_id} is out of range for {self.job.num_workers} workers")

    def _slot(self, key: str) -> Slot:
        self._require_job()
        slot = self.slots.get(key)
        if slot is None:
            raise NotFound(f"unknown key {key!r}; this server holds {len(self.slots)} keys")
        return slot
