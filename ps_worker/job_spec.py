"""What a worker declares to the servers at Init: the optimizer (torch's
class, with its param groups' hyperparameters) and the keys each server
holds."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ps_common import codec
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb
from ps_worker.sharding import Piece

__all__ = ["group_options", "key_spec", "torch_optimizer_class", "with_keys"]

# What a subclass may not define: the servers run torch's own, not the subclass's.
_UPDATE_METHODS = ("step", "_init_group")


def torch_optimizer_class(optimizer: torch.optim.Optimizer) -> type[torch.optim.Optimizer]:
    """The torch.optim class whose update the servers apply for `optimizer`:
    its own, or the one a subclass that only adds methods derives from. A
    subclass that changes the update, or a class of the same name outside
    torch.optim, is refused: the servers would silently run torch's update."""
    cls = type(optimizer)
    torch_class = next(
        (
            base
            for base in cls.__mro__
            if base.__module__.startswith("torch.optim") and base is not torch.optim.Optimizer
        ),
        None,
    )
    if torch_class is None:
        raise InvalidArgument(
            f"{cls.__module__}.{cls.__qualname__} is not a torch.optim optimizer: the servers apply torch.optim's "
            "own update rules, and cannot run the update of another class"
        )
    for own in cls.__mro__[: cls.__mro__.index(torch_class)]:
        changed = [name for name in _UPDATE_METHODS if name in vars(own)]
        if changed:
            raise InvalidArgument(
                f"{own.__qualname__} overrides {changed[0]}() of torch.optim.{torch_class.__name__}: the servers "
                f"apply torch.optim.{torch_class.__name__}'s own update, so the change would be silently lost; "
                "keep the update as torch defines it (a subclass may add other methods)"
            )
    return torch_class


def group_options(optimizer: torch.optim.Optimizer) -> list[pb.ParamGroup]:
    """The optimizer's current hyperparameters, only those torch declares as
    defaults (an LR scheduler's own bookkeeping such as `initial_lr` stays local)."""
    defaults = optimizer.defaults
    return [codec.options_to_proto({k: g[k] for k in defaults if k in g}) for g in optimizer.param_groups]


def key_spec(
    piece: Piece, params: Mapping[str, torch.Tensor], group_of: Mapping[int, int], prunable: set[str]
) -> pb.KeySpec:
    """The KeySpec of `piece`: its dtype, size and param group, and the
    parameters (and ranges of them) it holds."""
    first = params[piece.parts[0].name]
    spec = pb.KeySpec(
        key=piece.key, dtype=codec.dtype_to_proto(first.dtype), shape=[piece.numel], group=group_of[id(first)]
    )
    if piece.fused:
        spec.parts.extend(pb.KeyPart(tensor=n, tensor_shape=list(params[n].shape)) for n in piece.names)
    else:
        part = piece.parts[0]
        spec.tensor, spec.offset, spec.prunable = part.name, part.start, part.name in prunable
        spec.tensor_shape.extend(first.shape)
    return spec


def with_keys(job: pb.JobSpec, keys: list[pb.KeySpec]) -> pb.JobSpec:
    """`job` as one server declares it: with the keys that server holds."""
    spec = pb.JobSpec()
    spec.CopyFrom(job)
    spec.keys.extend(keys)
    return spec
