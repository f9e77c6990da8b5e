"""A shard's keys: the state each one carries (`Slot`), what a pull reads of
one, and the checks a job and its keys' chunks must pass."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ps_common import assembly, codec
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb

__all__ = [
    "WIRE_HALVES",
    "Gradient",
    "PulledKey",
    "Slot",
    "check_matches",
    "check_thresholds",
    "dtype_name",
    "describe_difference",
    "gradient_bytes",
    "updates_taken",
    "validate_job",
]

# A pushed gradient: dense, or as it travelled sparse (top-k), added to a
# step's sum without filling in its zeros.
Gradient = torch.Tensor | assembly.SparseParts


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

    def push_layout(self, chunk: codec.ChunkLike) -> tuple[torch.Size, torch.dtype]:
        """The shape and dtype a pushed chunk of this key fills: the key's
        shape, and its dtype or (compressed gradients) a half-precision one;
        raises for any other."""
        half = codec.dtype_from_proto(chunk.dtype) if chunk.dtype in WIRE_HALVES else None
        if half is not None and codec.wire_dtype(self.value.dtype, half) == half:
            check_matches(self.spec, chunk, dtype=chunk.dtype)
            return self.value.shape, half
        check_matches(self.spec, chunk)
        return self.value.shape, self.value.dtype

    def cast_as(self, value: torch.Tensor, version: int, travels: torch.dtype) -> torch.Tensor:
        """`value` (this key's weights as of update `version`) cast to
        `travels`: into the copy the key keeps, cast once per update, where
        `version` is the key's latest; else a cast of its own. The caller
        holds a lock for it: one cast per update, whoever asks first."""
        cast = self.cast if self.cast is not None and self.cast.dtype == travels else None
        if cast is not None and self.cast_version == version:
            return cast
        if version != self.version:
            return value.to(travels)
        if cast is None:
            cast = self.cast = torch.empty(value.shape, dtype=travels)
        # In place: in BSP nobody reads the last update's cast once a new one is
        # there, as nobody reads the last update's weights (Shard.values_hold_still).
        cast.copy_(value)
        self.cast_version = version
        return cast

    @property
    def nbytes(self) -> int:
        return self.value.numel() * self.value.element_size()


@dataclass
class PulledKey:
    key: str
    value: torch.Tensor  # the live tensor: see Shard.pull
    version: int
    sparse: bool  # pruned: worth trying the sparse encoding


# Dtypes a compressed gradient of a wider floating-point key may travel in.
WIRE_HALVES = (pb.FLOAT16, pb.BFLOAT16)


def gradient_bytes(grad: Gradient) -> int:
    return grad.nbytes if isinstance(grad, assembly.SparseParts) else grad.numel() * grad.element_size()


def updates_taken(versions: Iterable[int]) -> int:
    """Updates the most-updated of keys at `versions` has taken: the steps done
    in BSP, the pushes taken in ASP/SSP, however many requests each push came in."""
    return max(versions, default=0)


def check_matches(spec: pb.KeySpec, chunk: codec.ChunkLike, dtype: int | None = None) -> None:
    """The chunk has the key's shape and `dtype` (default: the key's own)."""
    if chunk.dtype != (spec.dtype if dtype is None else dtype) or list(chunk.shape) != list(spec.shape):
        raise InvalidArgument(
            f"key {spec.key!r}: got dtype {dtype_name(chunk.dtype)} shape {list(chunk.shape)}, "
            f"expected {dtype_name(spec.dtype)} shape {list(spec.shape)}"
        )


def dtype_name(code: int) -> str:
    """Proto3 enums are open: a message may carry a number no name belongs to."""
    return pb.DType.Name(code) if code in pb.DType.values() else f"unknown dtype {code}"


def validate_job(job: pb.JobSpec) -> None:
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


def describe_difference(old: pb.JobSpec, new: pb.JobSpec) -> str:
    if old.keys != new.keys:
        return "different keys, shapes or dtypes"
    if old.optimizer != new.optimizer:
        return f"optimizer {old.optimizer.name} vs {new.optimizer.name} or different hyperparameters"
    return "different mode, worker count or staleness"


def check_thresholds(job: pb.JobSpec, worker_id: int, slots: Iterable[Slot], thresholds: Mapping[str, float]) -> None:
    """Pruning thresholds come from worker 0 of a job with pruning, each
    finite, >= 0 and for a prunable parameter (of those the slots hold)."""
    if worker_id != 0 or not job.HasField("pruning"):
        raise InvalidArgument("only worker 0 of a job with pruning sends pruning thresholds")
    held_slots = list(slots)
    prunable = {s.spec.tensor for s in held_slots if s.spec.prunable}
    held = {p.tensor for s in held_slots for p in s.spec.parts or [s.spec]}
    for name, threshold in thresholds.items():
        if name in held and name not in prunable:
            raise InvalidArgument(f"parameter {name!r} is not prunable")
        if not math.isfinite(threshold) or threshold < 0:
            raise InvalidArgument(f"pruning threshold {threshold} of {name!r} must be finite and >= 0")
