"""Optimizer state set from outside (a worker resuming from a saved
state_dict), checked against what torch keeps before any of it is used."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ps_common import codec
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb
from ps_server.keys import Slot
from ps_server.optimizer import ShardOptimizer

__all__ = ["checked_state"]


def checked_state(
    job: pb.JobSpec, slots: Mapping[str, Slot], optimizer: ShardOptimizer, states: Mapping[str, torch.Tensor]
) -> dict[int, dict[str, torch.Tensor]]:
    """`states` ("<key>/<field>": tensor, keys of `slots`) by the key's index,
    each field in the dtype torch keeps it; InvalidArgument unless every key
    named has exactly the fields torch keeps for it, with their shapes, finite."""
    by_key: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in states.items():
        key, _, field = name.rpartition("/")
        by_key.setdefault(key, {})[field] = value
    order = list(slots)
    checked = {}
    for key, fields in by_key.items():
        expected = optimizer.state_fields(slots[key].value)
        if set(fields) != set(expected):
            name = job.optimizer.name
            raise InvalidArgument(
                f"optimizer state of key {key!r} has fields {sorted(fields)}; {name} keeps {sorted(expected)}"
            )
        shaped = {}
        for field, value in fields.items():
            shape, dtype = expected[field]
            if value.numel() == math.prod(shape):
                value = value.view(shape)  # it travelled flat
            if tuple(value.shape) != shape or not (value.is_floating_point() or value.dtype == dtype):
                raise InvalidArgument(
                    f"optimizer state {key}/{field} has shape {list(value.shape)} and dtype {value.dtype}; "
                    f"expected shape {list(shape)}, {dtype}"
                )
            if not codec.all_finite(value):
                raise InvalidArgument(f"optimizer state {key}/{field} contains NaN or Inf")
            shaped[field] = value.to(dtype)
        checked[order.index(key)] = shaped
    return checked
