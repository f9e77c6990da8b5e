"""One server's shard: its slices of the model, their optimizer, and the
consistency rules (BSP, ASP, SSP) that decide when a push is applied and when
a pull may read.

Plain Python and torch, no gRPC: the service translates messages and errors.
Every change happens under one lock and only after every check has passed,
so a refused request leaves weights, optimizer state and counters as they were.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from google.protobuf import json_format

from ps_common import codec
from ps_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    WaitTimeout,
)
from ps_common.proto import ps_pb2 as pb
from ps_server.buffers import BufferPool
from ps_server.metrics import ServerMetrics
from ps_server.optimizer import ShardOptimizer
from ps_server.shared_weights import SharedWeights
from ps_server.storage import ShardState

log = logging.getLogger(__name__)

# A pushed gradient: dense, or as it travelled sparse (top-k), added to a
# step's sum without filling in its zeros.
Gradient = torch.Tensor | codec.SparseParts


@dataclass
class Slot:
    """One key: a tensor or a range of one, stored flat."""

    spec: pb.KeySpec
    value: torch.Tensor  # a parameter of the shard's torch optimizer
    version: int = 0  # updates applied so far
    grad_sum: torch.Tensor | None = None  # BSP: sum of this step's gradients so far
    contributors: int = 0  # BSP: workers that pushed step `version` so far
    last_push: dict[int, int] = field(default_factory=dict)  # worker -> last step pushed
    mask: torch.Tensor | None = None  # pruning: True where the weight is kept
    prune_threshold: float | None = None  # BSP: to prune with once this step completes
    # Restored from a checkpoint and not updated since: a BSP push may be for a
    # later step (the steps in between were lost with the crash). Workers may
    # be a step apart when the server died, so the latest step pushed wins.
    restored: bool = False
    # BSP: the weights cast for pulls in half precision, as of update `cast_version`.
    cast: torch.Tensor | None = None
    cast_version: int = -1

    def prune(self, threshold: float) -> None:
        """Keep only elements whose magnitude exceeds `threshold` (zeros never come back)."""
        self.mask = self.value.abs() > threshold
        self.value.mul_(self.mask)

    @property
    def nbytes(self) -> int:
        return self.value.numel() * self.value.element_size()


@dataclass
class _Push:
    """A checked push, ready to change the shard."""

    worker_id: int
    step: int
    options: list[dict[str, Any]] | None  # the param groups' hyperparameters, None: unchanged
    fresh: dict[str, Slot]  # keys this worker had not pushed for this step yet
    grads: Mapping[str, Gradient]  # absent keys have no entry
    thresholds: dict[str, float]  # pruning thresholds by parameter name


@dataclass
class PulledKey:
    key: str
    value: torch.Tensor  # the live tensor: see Shard.pull
    version: int
    sparse: bool  # pruned: worth trying the sparse encoding


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
        self._worker_timeout = worker_timeout
        self._last_seen: dict[int, float] = {}
        self._departed: set[int] = set()
        self._started = time.monotonic()
        self._metrics = metrics
        self._wait_log_interval = wait_log_interval
        self._closed = False
        self.job: pb.JobSpec | None = None
        self.slots: dict[str, Slot] = {}
        self._optimizer: ShardOptimizer | None = None
        self._clock: dict[int, int] = {}  # worker -> steps completely pushed; read through _clocks()
        self._clock_stale: set[int] = set()  # workers that pushed since their clock was computed
        self._last_push_time: dict[int, float] = {}
        self._pulled_version: dict[tuple[int, str], int] = {}  # for the staleness of ASP/SSP pushes
        self.counters: Counter[str] = Counter()
        self.buffers = BufferPool()  # pushed gradients, their fp32 casts, ASP pull copies (service.py)
        self.shared: SharedWeights | None = None  # where the weights live, on Linux
        self._receiving: SharedWeights | None = None  # where the latest Init stream writes its values

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

    def init_allocator(self, job: pb.JobSpec) -> codec.Allocator:
        """Allocator for an Init stream: a chunk must match its KeySpec."""
        _validate_job(job)  # before any chunk is taken in
        specs = {k.key: k for k in job.keys}

        # Values are received straight into shared memory where there is some:
        # a copy afterwards holds the weights twice for a moment, and what it
        # frees may stay in the receiving thread's malloc arena, unused by the
        # threads that allocate later (the likely cause of a benchmark's peak
        # of 266 MiB against 222, see benchmarks/HISTORY.md).
        views: dict[str, torch.Tensor] = {}
        if SharedWeights.supported():
            layout = [(math.prod(k.shape), codec.dtype_from_proto(k.dtype)) for k in job.keys]
            try:
                shared = SharedWeights(layout)
            except (OSError, OverflowError) as exc:
                size = sum(numel * dtype.itemsize for numel, dtype in layout)
                raise ResourceExhausted(f"the job's {size} bytes of weights cannot be mapped: {exc}") from None
            views = {k.key: view for k, view in zip(job.keys, shared.views, strict=True)}
            with self._cond:
                self._receiving = shared  # init() adopts it if it holds the values

        def allocate(chunk: codec.ChunkLike) -> torch.Tensor:
            spec = specs.get(chunk.key)
            if spec is None:
                raise InvalidArgument(f"Init sends key {chunk.key!r} that its job does not declare")
            _check_matches(spec, chunk)
            return views[chunk.key] if chunk.key in views else codec.new_tensor_for(chunk)

        return allocate

    def init(self, job: pb.JobSpec, values: dict[str, torch.Tensor]) -> bool:
        """Install the job and initial values; True if an identical job was already there."""
        _validate_job(job)
        missing = [k.key for k in job.keys if k.key not in values]
        if missing:
            raise InvalidArgument(f"Init carries no initial value for keys {missing}")
        with self._cond:
            if self.job is not None:
                self._receiving = None  # a repeated Init's values are not kept
                if self.job == job:
                    return True
                raise FailedPrecondition(
                    "this server was already initialized with a different job "
                    f"({_describe_difference(self.job, job)}); restart the servers to start a new job"
                )
            slots = {k.key: Slot(spec=k, value=values[k.key]) for k in job.keys}
            self._share(slots)
            optimizer = self._build_optimizer(job, slots)
            self.job, self.slots, self._optimizer = job, slots, optimizer
            self._started = time.monotonic()
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
        """Put the weights in shared memory (ps_server.shared_weights), before
        the optimizer is built on them: where an Init received them, else a copy."""
        if not SharedWeights.supported():
            return
        values = [slot.value for slot in slots.values()]
        received, self._receiving = self._receiving, None
        if received is not None and received.holds(values):
            shared = received
        else:
            shared = SharedWeights.holding(values)
            for slot, view in zip(slots.values(), shared.views, strict=True):
                slot.value = view
        if self.shared is not None:
            self.shared.close()
        self.shared = shared

    def _build_optimizer(self, job: pb.JobSpec, slots: dict[str, Slot]) -> ShardOptimizer:
        values = [s.value for s in slots.values()]
        return ShardOptimizer(job.optimizer, values, [k.group for k in job.keys], self._fused_updates)

    # -- push ------------------------------------------------------------------------

    def push_allocator(self, chunk: codec.ChunkLike) -> torch.Tensor:
        """Allocator for a Push stream (see `push_layout`)."""
        return self.buffers.take(*self.push_layout(chunk))

    def push_layout(self, chunk: codec.ChunkLike) -> tuple[torch.Size, torch.dtype]:
        """The shape and dtype a pushed key's chunks fill: only known keys,
        with their shape, and their dtype or (compressed gradients) a
        half-precision one; raises for any other."""
        slot = self._slot(chunk.key)
        half = codec.dtype_from_proto(chunk.dtype) if chunk.dtype in _WIRE_HALVES else None
        if half is not None and codec.wire_dtype(slot.value.dtype, half) == half:
            _check_matches(slot.spec, chunk, dtype=chunk.dtype)
            return slot.value.shape, half
        _check_matches(slot.spec, chunk)
        return slot.value.shape, slot.value.dtype

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
            if not codec.all_finite(grad.values if isinstance(grad, codec.SparseParts) else grad):
                raise InvalidArgument(f"gradient of key {key!r} contains NaN or Inf; nothing was applied")
        with self._cond:
            job, optimizer = self._require_job()
            self._check_worker(worker_id)
            if step < 0:
                raise InvalidArgument(f"step {step} is negative")
            options = optimizer.check_options(groups) if groups else None
            if thresholds:
                self._check_thresholds(job, worker_id, thresholds)
            if job.mode == pb.SSP:
                fastest = max(self._clocks().values(), default=0)
                if step < fastest - job.staleness - 1:
                    raise FailedPrecondition(
                        f"worker {worker_id} pushed step {step}, older than the staleness bound {job.staleness} "
                        f"allows (the fastest worker has pushed {fastest} steps); nothing was applied"
                    )
            fresh = {}
            for key in [*grads, *absent]:
                slot = self._slot(key)
                if step <= slot.last_push.get(worker_id, -1):
                    continue  # a retry of a push already taken: applied once
                if job.mode == pb.BSP and step < slot.version:
                    continue  # a step already completed, or lost with a crash: too late either way
                if job.mode == pb.BSP and step != slot.version and not (slot.restored and step > slot.version):
                    raise FailedPrecondition(
                        f"worker {worker_id} pushed step {step} for key {key!r}, which is at step {slot.version}; "
                        "in BSP a worker pulls each step's result before pushing the next"
                    )
                fresh[key] = slot
            for slot in fresh.values():
                if slot.restored and job.mode == pb.BSP and step > slot.version:
                    log.warning("key %s resumes at step %d: steps %d..%d were lost", slot.spec.key, step,
                                slot.version, step - 1)  # fmt: skip
                    slot.version, slot.contributors, slot.grad_sum = step, 0, None
            self._seen(worker_id)
            checked = _Push(worker_id, step, options, fresh, grads, thresholds)
            if job.mode == pb.BSP:
                self._accumulate(job, optimizer, checked)
            else:
                self._apply_now(job, optimizer, checked)
            # What is not kept as a BSP step's sum is free for the next push.
            summed = {id(slot.grad_sum) for slot in fresh.values()}
            self.buffers.give(g for g in grads.values() if isinstance(g, torch.Tensor) and id(g) not in summed)
            self._advance_clock(worker_id, step)
            duplicates = len(grads) + len(absent) - len(fresh)
            self.counters["pushes"] += 1
            self.counters["duplicate_keys"] += duplicates
            self.counters["bytes_in"] += sum(_nbytes(g) for k, g in grads.items() if k in fresh)
            self._last_push_time[worker_id] = time.time()
            self._cond.notify_all()
            return len(fresh), duplicates

    def _accumulate(self, job: pb.JobSpec, optimizer: ShardOptimizer, push: _Push) -> None:
        """BSP: add to the step's sum; apply the average once all workers contributed."""
        ready = []
        for key, slot in push.fresh.items():
            grad = push.grads.get(key)
            if grad is not None:
                if slot.grad_sum is None:
                    slot.grad_sum = self._in_value_dtype(grad, slot)  # the stream's buffer is ours: no copy if fp32
                elif isinstance(grad, codec.SparseParts):
                    grad.add_to(slot.grad_sum)  # only the elements sent: no zeros filled in, none added
                else:
                    slot.grad_sum.add_(grad)  # adds a half-precision gradient without casting it first
            slot.contributors += 1
            slot.last_push[push.worker_id] = push.step
            if slot.spec.tensor in push.thresholds:
                slot.prune_threshold = push.thresholds[slot.spec.tensor]
            if slot.contributors >= self._expected_contributors(job):
                ready.append(slot)
        self._apply_steps(optimizer, push.options, ready)

    def _expected_contributors(self, job: pb.JobSpec) -> int:
        return job.num_workers - len(self._departed)

    def _apply_steps(self, optimizer: ShardOptimizer, options: list[dict[str, Any]] | None, ready: list[Slot]) -> None:
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
            self._step(optimizer, options, slots, contributions=contributors)
        self.buffers.give(slot.grad_sum for slot in with_grad)  # type: ignore[misc]
        for slot in ready:
            slot.grad_sum, slot.contributors = None, 0
            slot.version += 1
            slot.restored = False

    def _seen(self, worker_id: int) -> None:
        """Note that a worker is alive; a departed one rejoins."""
        self._last_seen[worker_id] = time.monotonic()
        if worker_id in self._departed:
            self._departed.discard(worker_id)
            self.counters["workers_rejoined"] += 1
            log.warning("worker %d rejoined", worker_id)

    def _expire_workers(self) -> None:
        """Workers silent for longer than worker_timeout stop holding the others back:
        BSP steps complete without them, SSP stops waiting for them."""
        job, optimizer = self._require_job()
        now = time.monotonic()
        expired = [
            w for w in range(job.num_workers)
            if w not in self._departed and now - self._last_seen.get(w, self._started) > self._worker_timeout
        ]  # fmt: skip
        if not expired:
            return
        self._departed.update(expired)
        self.counters["workers_departed"] += len(expired)
        log.warning(
            "workers %s sent nothing for %.0fs: continuing without them (%d of %d workers left)",
            expired, self._worker_timeout, self._expected_contributors(job), job.num_workers,
        )  # fmt: skip
        if job.mode == pb.BSP:
            expected = self._expected_contributors(job)
            ready = [s for s in self.slots.values() if s.contributors > 0 and s.contributors >= expected]
            self._apply_steps(optimizer, None, ready)
        self._cond.notify_all()

    def _apply_now(self, job: pb.JobSpec, optimizer: ShardOptimizer, push: _Push) -> None:
        """ASP/SSP: apply the push at once; its staleness is how many updates it missed."""
        with_grad = [slot for key, slot in push.fresh.items() if key in push.grads]
        staleness = max(
            (s.version - self._pulled_version.get((push.worker_id, s.spec.key), 0) for s in with_grad), default=0
        )
        if self._metrics:
            self._metrics.push_staleness.observe(staleness)
        for slot in push.fresh.values():
            if slot.spec.tensor in push.thresholds:
                slot.prune(push.thresholds[slot.spec.tensor])
        grads = [self._in_value_dtype(push.grads[slot.spec.key], slot) for slot in with_grad]
        for slot, grad in zip(with_grad, grads, strict=True):
            slot.value.grad = grad
        lr_scale = 1.0 / max(1, staleness) if job.scale_lr_by_staleness else 1.0
        self._step(optimizer, push.options, with_grad, lr_scale)
        self.buffers.give(grads)
        for key, slot in push.fresh.items():
            slot.last_push[push.worker_id] = push.step
            if key in push.grads:
                slot.version += 1
                slot.restored = False

    def _in_value_dtype(self, grad: Gradient, slot: Slot) -> torch.Tensor:
        """`grad` itself if dense and in the weights' dtype, else a dense copy in
        that dtype lent by the pool."""
        if isinstance(grad, codec.SparseParts):
            return grad.densify(self.buffers.take(slot.value.shape, slot.value.dtype))
        if grad.dtype == slot.value.dtype:
            return grad
        return self.buffers.take(grad.shape, slot.value.dtype).copy_(grad)

    def _step(
        self,
        optimizer: ShardOptimizer,
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
            optimizer.step([s.value for s in slots], options, lr_scale, contributions)
        finally:
            for slot in slots:
                slot.value.grad = None
            # Pruned weights stay zero whatever the optimizer state says.
            for slot, mask in masked:
                slot.value.mul_(mask)
        self.counters["updates"] += 1
        if self._metrics:
            self._metrics.update_seconds.observe(time.perf_counter() - started)

    def _check_thresholds(self, job: pb.JobSpec, worker_id: int, thresholds: dict[str, float]) -> None:
        if worker_id != 0 or not job.HasField("pruning"):
            raise InvalidArgument("only worker 0 of a job with pruning sends pruning thresholds")
        prunable = {s.spec.tensor for s in self.slots.values() if s.spec.prunable}
        held = {p.tensor for s in self.slots.values() for p in s.spec.parts or [s.spec]}
        for name, threshold in thresholds.items():
            if name in held and name not in prunable:
                raise InvalidArgument(f"parameter {name!r} is not prunable")
            if not math.isfinite(threshold) or threshold < 0:
                raise InvalidArgument(f"pruning threshold {threshold} of {name!r} must be finite and >= 0")

    def _advance_clock(self, worker_id: int, step: int) -> None:
        if self.slots:
            self._clock_stale.add(worker_id)
        else:
            self._clock[worker_id] = max(self._clock.get(worker_id, 0), step + 1)

    def _clocks(self) -> dict[int, int]:
        """Each worker's clock: the steps it has pushed for every key of this
        server. Computed when read, for the workers that pushed since: on
        each push request it would be a pass over every key (a model cut
        into many pieces sends many requests per step)."""
        for worker in self._clock_stale:
            self._clock[worker] = min(s.last_push.get(worker, -1) for s in self.slots.values()) + 1
        self._clock_stale.clear()
        return self._clock

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
            ready = self._readable(step, slots, wait_for_all)
            if ready:
                return ready
            blocking = self._blocking_workers(step, slots, wait_for_all)
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

    def _readable(self, step: int, slots: list[Slot], wait_for_all: bool) -> list[Slot]:
        assert self.job is not None
        if self.job.mode == pb.BSP and not wait_for_all:
            ready = [s for s in slots if s.version >= step]
            if ready:
                return ready
        return [] if self._blocking_workers(step, slots, wait_for_all) else slots

    def _blocking_workers(self, step: int, slots: list[Slot], wait_for_all: bool) -> list[int]:
        """The workers whose pushes a read of `slots` for `step` still waits for (empty: may read)."""
        assert self.job is not None
        workers = [w for w in range(self.job.num_workers) if w not in self._departed]
        if wait_for_all:
            needed = step
        elif self.job.mode == pb.BSP:
            if all(s.version >= step for s in slots):
                return []
            return [w for w in workers if any(s.last_push.get(w, -1) < step - 1 for s in slots)]
        elif self.job.mode == pb.SSP:
            needed = step - self.job.staleness
        else:
            return []
        clocks = self._clocks()
        return [w for w in workers if clocks.get(w, 0) < needed]

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
            cast = slot.cast if slot.cast is not None and slot.cast.dtype == travels else None
            if cast is not None and slot.cast_version == item.version:
                return cast
            if item.version != slot.version:
                return item.value.to(travels)
            if cast is None:
                cast = slot.cast = torch.empty(item.value.shape, dtype=travels)
            # In place: in BSP nobody reads the last update's cast once a new one is
            # there, as nobody reads the last update's weights (values_hold_still).
            cast.copy_(item.value)
            slot.cast_version = item.version
            return cast

    def reading(self) -> threading.Condition:
        """Hold this while reading pulled values: no update runs meanwhile."""
        return self._cond

    def stats(self) -> pb.StatsResponse:
        with self._cond:
            return pb.StatsResponse(
                initialized=self.job is not None,
                job=self.job,
                keys=[
                    pb.KeyStats(
                        key=k,
                        dtype=s.spec.dtype,
                        shape=s.spec.shape,
                        bytes=s.nbytes,
                        version=s.version,
                        nonzeros=int(torch.count_nonzero(s.value)),
                        masked=s.mask is not None,
                    )  # fmt: skip
                    for k, s in self.slots.items()
                ],
                workers=[
                    pb.WorkerStats(worker_id=w, clock=c, last_push_unix=self._last_push_time.get(w, 0.0))
                    for w, c in sorted(self._clocks().items())
                ],
                total_bytes=sum(s.nbytes for s in self.slots.values()),
                pushes=self.counters["pushes"],
                pulls=self.counters["pulls"],
                updates=self.counters["updates"],
                bytes_in=self.counters["bytes_in"],
                bytes_out=self.counters["bytes_out"],
            )

    def snapshot(self) -> ShardState | None:
        """Everything needed to restart this shard where it is (None before Init).

        Only applied updates are recorded: BSP contributions to a step not yet
        complete are left out, so their workers push them again after a restore.
        """
        with self._cond:
            if self.job is None or self._optimizer is None:
                return None
            bsp = self.job.mode == pb.BSP
            tensors: dict[str, torch.Tensor] = {}
            slots: dict[str, Any] = {}
            for key, slot in self.slots.items():
                tensors[f"value/{key}"] = slot.value.clone()
                if slot.mask is not None:
                    tensors[f"mask/{key}"] = slot.mask.clone()
                applied = {w: min(s, slot.version - 1) if bsp else s for w, s in slot.last_push.items()}
                slots[key] = {"version": slot.version, "last_push": {str(w): s for w, s in applied.items()}}
            lowest = min((s.version for s in self.slots.values()), default=0)
            clocks = {str(w): min(c, lowest) if bsp else c for w, c in self._clocks().items()}
            optimizer_tensors, optimizer_meta = self._optimizer.state_parts()
            tensors.update({f"optimizer/{k}": v for k, v in optimizer_tensors.items()})
            meta = {
                "job": json_format.MessageToDict(self.job),
                "slots": slots,
                "clocks": clocks,
                "optimizer": optimizer_meta,
                "counters": dict(self.counters),
            }
            return ShardState(tensors, meta)

    def restore(self, state: ShardState) -> None:
        """Become the shard a checkpoint describes (before serving any request)."""
        job = json_format.ParseDict(state.meta["job"], pb.JobSpec())
        slots = {}
        for spec in job.keys:
            saved = state.meta["slots"][spec.key]
            slots[spec.key] = Slot(
                spec=spec,
                value=state.tensors[f"value/{spec.key}"],
                version=saved["version"],
                last_push={int(w): s for w, s in saved["last_push"].items()},
                mask=state.tensors.get(f"mask/{spec.key}"),
                restored=True,
            )
        self._share(slots)
        optimizer = self._build_optimizer(job, slots)
        prefix = "optimizer/"
        optimizer.load_state_parts(
            {k.removeprefix(prefix): v for k, v in state.tensors.items() if k.startswith(prefix)},
            state.meta["optimizer"],
        )
        with self._cond:
            self.job, self.slots, self._optimizer = job, slots, optimizer
            self._clock = {int(w): c for w, c in state.meta["clocks"].items()}
            self._clock_stale.clear()
            self._started = time.monotonic()
            self.counters = Counter(state.meta["counters"])

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
                "last_push": dict(self._last_push_time),
                "buffer_pool_bytes": self.buffers.idle_bytes,
                "pull_cast_bytes": sum(
                    s.cast.numel() * s.cast.element_size() for s in self.slots.values() if s.cast is not None
                ),
            }

    def count(self, counter: str, amount: int) -> None:
        with self._cond:
            self.counters[counter] += amount

    def close(self) -> None:
        """Wake every waiting pull so that shutdown never hangs on a barrier."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            for shared in (self.shared, self._receiving):
                if shared is not None:
                    shared.close()

    def _require_job(self) -> tuple[pb.JobSpec, ShardOptimizer]:
        if self.job is None or self._optimizer is None:
            raise FailedPrecondition("this server has not been initialized yet: worker 0 must call Init first")
        return self.job, self._optimizer

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


# Dtypes a compressed gradient of a wider floating-point key may travel in.
_WIRE_HALVES = (pb.FLOAT16, pb.BFLOAT16)


def _nbytes(grad: Gradient) -> int:
    return grad.nbytes if isinstance(grad, codec.SparseParts) else grad.numel() * grad.element_size()


def updates_taken(versions: Iterable[int]) -> int:
    """Updates the most-updated of keys at `versions` has taken: the steps done
    in BSP, the pushes taken in ASP/SSP, however many requests each push came in."""
    return max(versions, default=0)


def _check_matches(spec: pb.KeySpec, chunk: codec.ChunkLike, dtype: int | None = None) -> None:
    """The chunk has the key's shape and `dtype` (default: the key's own)."""
    if chunk.dtype != (spec.dtype if dtype is None else dtype) or list(chunk.shape) != list(spec.shape):
        raise InvalidArgument(
            f"key {spec.key!r}: got dtype {_dtype_name(chunk.dtype)} shape {list(chunk.shape)}, "
            f"expected {_dtype_name(spec.dtype)} shape {list(spec.shape)}"
        )


def _dtype_name(code: int) -> str:
    """Proto3 enums are open: a message may carry a number no name belongs to."""
    return pb.DType.Name(code) if code in pb.DType.values() else f"unknown dtype {code}"


def _validate_job(job: pb.JobSpec) -> None:
    if job.mode not in (pb.BSP, pb.ASP, pb.SSP):
        raise InvalidArgument(f"unknown consistency mode {job.mode}")
    if job.num_workers < 1:
        raise InvalidArgument(f"a job needs at least one worker, got {job.num_workers}")
    if job.staleness < 0:
        raise InvalidArgument(f"staleness must be >= 0, got {job.staleness}")
    seen = set()
    for spec in job.keys:
        if not spec.key or spec.key in seen:
            raise InvalidArgument(f"key names must be non-empty and unique, got {spec.key!r} twice or empty")
        seen.add(spec.key)
        codec.dtype_from_proto(spec.dtype)
        if any(d < 0 for d in spec.shape):
            raise InvalidArgument(f"key {spec.key!r} has a negative dimension: {list(spec.shape)}")
        if not 0 <= spec.group < len(job.optimizer.groups):
            raise InvalidArgument(f"key {spec.key!r} names param group {spec.group} of {len(job.optimizer.groups)}")
        if spec.parts and (
            spec.prunable or sum(math.prod(p.tensor_shape) for p in spec.parts) != math.prod(spec.shape)
        ):
            raise InvalidArgument(f"fused key {spec.key!r} is prunable, or its parameters' sizes do not add up to it")


def _describe_difference(old: pb.JobSpec, new: pb.JobSpec) -> str:
    if old.keys != new.keys:
        return "different keys, shapes or dtypes"
    if old.optimizer != new.optimizer:
        return f"optimizer {old.optimizer.name} vs {new.optimizer.name} or different hyperparameters"
    return "different mode, worker count or staleness"
