"""A shard's state as a bad request must leave it, to compare before and after."""

from __future__ import annotations

import copy
from typing import Any

import torch

from ps_server.shard import Shard


def snapshot(shard: Shard) -> dict[str, Any]:
    """Everything a bad request must not change (rejection counts aside)."""
    optimizer = shard.optimizer
    return {
        "job": copy.deepcopy(shard.job),
        "values": {k: s.value.clone() for k, s in shard.slots.items()},
        "versions": {k: (s.version, s.contributors, dict(s.last_push)) for k, s in shard.slots.items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()) if optimizer else None,
        "clocks": {w.worker_id: w.clock for w in shard.stats().workers},
        "counters": {k: v for k, v in shard.counters.items() if not k.startswith("rejected_")},
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["job"] == b["job"] and a["versions"] == b["versions"] and a["clocks"] == b["clocks"]
    assert a["counters"] == b["counters"]
    assert a["values"].keys() == b["values"].keys()
    assert all(torch.equal(a["values"][k], b["values"][k]) for k in a["values"])
    torch.testing.assert_close(a["optimizer"], b["optimizer"], rtol=0, atol=0)
