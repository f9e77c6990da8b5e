"""A job's parameters laid out on its servers' keys (ps_worker.sharding's
placement), and the moves between the two: a key's elements gathered from
the parameters for a push, scattered back into them from a pull."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch._utils import _flatten_dense_tensors

from ps_common.errors import InvalidArgument
from ps_worker.sharding import Piece

__all__ = ["Layout", "checked", "flat", "gather", "scatter"]


@dataclass(frozen=True)
class Layout:
    """`pieces[s]`: the keys server s holds; `pieces_of[name]`: the keys a
    parameter lies in; `numel[name]`: its elements."""

    pieces: list[list[Piece]]
    pieces_of: dict[str, list[Piece]]
    numel: dict[str, int]

    @staticmethod
    def of(placement: Sequence[Piece], numel: Mapping[str, int], num_servers: int) -> Layout:
        return Layout(
            [[p for p in placement if p.server == s] for s in range(num_servers)],
            {name: [p for p in placement if name in p.names] for name in numel},
            dict(numel),
        )

    @property
    def every_piece(self) -> list[Piece]:
        return [piece for pieces in self.pieces for piece in pieces]

    def check_fits(self, name: str, tensor: torch.Tensor, what: str) -> None:
        """Raise unless `tensor` is a CPU tensor PSClient can use for parameter `name`, of its size."""
        if checked(tensor, name).numel() != self.numel[name]:
            raise InvalidArgument(f"{what} has {tensor.numel()} elements, expected {self.numel[name]}")


def gather(piece: Piece, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The elements of `piece` from the tensors by parameter name: a view of
    one parameter's, or a fused key's parameters end to end (a copy)."""
    if not piece.fused:
        part = piece.parts[0]
        return flat(tensors[part.name])[part.start : part.stop]
    # One call for all: half the time of concatenating their flat views.
    with torch.no_grad():
        gathered: torch.Tensor = _flatten_dense_tensors([tensors[name] for name in piece.names])  # type: ignore[no-untyped-call]
    return gathered


def scatter(piece: Piece, elements: torch.Tensor, into: Mapping[str, torch.Tensor]) -> None:
    """Copy a fused key's `elements` into those of its parameters in `into`."""
    for name, values in zip(piece.names, torch.split(elements, piece.sizes), strict=True):
        flat(into[name]).copy_(values)


def checked(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """`tensor`, once checked to be one PSClient can read and write in place."""
    if not tensor.is_cpu:
        raise InvalidArgument(
            f"{name!r} is on {tensor.device}; PSClient moves CPU tensors (stage device tensors first)"
        )
    if not tensor.is_contiguous():
        raise InvalidArgument(f"{name!r} is not contiguous")
    return tensor


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view of a checked tensor, detached from autograd. A 1-D tensor
    is its own: a view costs microseconds, which every small tensor would pay
    on every step."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor if tensor.dim() == 1 else tensor.view(-1)
