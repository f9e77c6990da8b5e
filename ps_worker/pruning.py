"""Gradual magnitude pruning: the schedule, and which tensors take part.

The schedule is Zhu & Gupta (2017), as TensorFlow Model Optimization's
prune_low_magnitude with PolynomialDecay(power=3) uses it. Worker 0 evaluates
it: on a pruning step it computes each prunable parameter's magnitude
threshold on the whole tensor (it holds the whole tensor after every pull;
no server does when a tensor is split across servers) and sends it with its
push. The servers then prune their ranges with that one threshold, keep the
masks beside their shards and re-apply them after every update, so pruned
weights stay zero. The mask of a split tensor is therefore exactly the mask
of the whole tensor pruned in one process.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ps_common import codec
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb
from ps_worker.layout import Layout
from ps_worker.servers import Servers


@dataclass(frozen=True)
class PruningConfig:
    """Prune each matching parameter to `final_sparsity` (fraction of zeros).

    Sparsity rises from `initial_sparsity` at `begin_step` to `final_sparsity`
    at `end_step`, pruning every `frequency` steps and at `end_step`.
    Parameters are pruned if their name matches one of `include` and none of
    `exclude`, they have at least two dimensions (biases and norm scales never)
    and at least `min_numel` elements: pruning a tiny layer (a first conv of
    a few hundred weights) saves next to nothing and costs the most accuracy.
    """

    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int = 10
    initial_sparsity: float = 0.0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("*bias*", "*norm*", "*bn*")
    min_numel: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity < 1.0:
            raise ValueError("need 0 <= initial_sparsity <= final_sparsity < 1")
        if not 0 <= self.begin_step <= self.end_step or self.frequency < 1:
            raise ValueError("need 0 <= begin_step <= end_step and frequency >= 1")

    def prunable(self, name: str, tensor: torch.Tensor) -> bool:
        return (
            tensor.dim() >= 2
            and tensor.numel() >= self.min_numel
            and tensor.is_floating_point()
            and any(fnmatch.fnmatchcase(name, p) for p in self.include)
            and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
        )

    def sparsity_at(self, step: int) -> float | None:
        """Target sparsity if `step` is a pruning step, else None."""
        if step < self.begin_step or step > self.end_step:
            return None
        if (step - self.begin_step) % self.frequency and step != self.end_step:
            return None
        span = self.end_step - self.begin_step
        progress = 1.0 if span == 0 else (step - self.begin_step) / span
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def to_proto(self) -> pb.PruningSpec:
        return pb.PruningSpec(
            initial_sparsity=self.initial_sparsity,
            final_sparsity=self.final_sparsity,
            begin_step=self.begin_step,
            end_step=self.end_step,
            frequency=self.frequency,
        )


def magnitude_threshold(tensor: torch.Tensor, sparsity: float) -> float | None:
    """The magnitude at or below which elements go, to reach `sparsity`
    (ties at the threshold go too); None when nothing is to be pruned."""
    magnitudes = tensor.detach().abs().reshape(-1)
    count = round(magnitudes.numel() * sparsity)
    if count == 0:
        return None
    return float(torch.kthvalue(magnitudes.float().cpu(), count).values)


def magnitude_mask(tensor: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Single-process reference: the mask pruning `tensor` whole would give."""
    threshold = magnitude_threshold(tensor, sparsity)
    return torch.ones_like(tensor, dtype=torch.bool) if threshold is None else tensor.abs() > threshold


def read_masks(servers: Servers, layout: Layout, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The pruning masks (True = kept) the servers hold for the parameters
    of `shapes` (prunable ones: their keys are never fused)."""
    masks = {name: torch.ones(shape, dtype=torch.bool) for name, shape in shapes.items()}

    def read(server: int) -> None:
        pieces = {p.key: p for p in layout.pieces[server]}

        def destination(chunk: codec.ChunkLike) -> torch.Tensor:
            piece = pieces.get(chunk.key)
            if piece is None or piece.fused or piece.parts[0].name not in masks or chunk.dtype != pb.BOOL:
                raise InvalidArgument(f"{servers.addresses[server]} sent an unexpected mask for {chunk.key!r}")
            part = piece.parts[0]
            return masks[part.name].view(-1)[part.start : part.stop]

        request = pb.PullRequest(worker_id=servers.worker_id, masks=True)
        servers.transports[server].pull(request, servers.config.timeout, destination)

    servers.on_every(read)
    return masks
