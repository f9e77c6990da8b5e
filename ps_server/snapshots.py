"""A shard's state as a checkpoint holds it (ps_server.storage writes and
reads the files), and back."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from google.protobuf import json_format

from ps_common.proto import ps_pb2 as pb
from ps_server.keys import Slot
from ps_server.optimizer import ShardOptimizer
from ps_server.storage import ShardState

__all__ = ["Restored", "read_state", "state_of", "stats_of"]

_OPTIMIZER = "optimizer/"


def state_of(
    job: pb.JobSpec,
    slots: Mapping[str, Slot],
    clocks: Mapping[int, int],
    optimizer: ShardOptimizer,
    counters: Mapping[str, int],
) -> ShardState:
    """Everything needed to restart a shard where it is. Only applied updates
    are recorded: BSP contributions to a step not yet complete are left out,
    so their workers push them again after a restore."""
    bsp = job.mode == pb.BSP
    tensors: dict[str, torch.Tensor] = {}
    saved: dict[str, Any] = {}
    for key, slot in slots.items():
        tensors[f"value/{key}"] = slot.value.clone()
        if slot.mask is not None:
            tensors[f"mask/{key}"] = slot.mask.clone()
        applied = {w: min(s, slot.version - 1) if bsp else s for w, s in slot.last_push.items()}
        saved[key] = {"version": slot.version, "last_push": {str(w): s for w, s in applied.items()}}
    lowest = min((s.version for s in slots.values()), default=0)
    optimizer_tensors, optimizer_meta = optimizer.state_parts()
    tensors.update({_OPTIMIZER + k: v for k, v in optimizer_tensors.items()})
    meta = {
        "job": json_format.MessageToDict(job),
        "slots": saved,
        "clocks": {str(w): min(c, lowest) if bsp else c for w, c in clocks.items()},
        "optimizer": optimizer_meta,
        "counters": dict(counters),
    }
    return ShardState(tensors, meta)


@dataclass
class Restored:
    """A checkpoint's shard: its job, keys (marked restored), clocks,
    counters, and its optimizer's state to load once the optimizer is built."""

    job: pb.JobSpec
    slots: dict[str, Slot]
    clocks: dict[int, int]
    counters: Counter[str]
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_meta: dict[str, Any]


def read_state(state: ShardState) -> Restored:
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
    return Restored(
        job,
        slots,
        {int(w): c for w, c in state.meta["clocks"].items()},
        Counter(state.meta["counters"]),
        {k.removeprefix(_OPTIMIZER): v for k, v in state.tensors.items() if k.startswith(_OPTIMIZER)},
        state.meta["optimizer"],
    )


def stats_of(
    job: pb.JobSpec | None,
    slots: Mapping[str, Slot],
    clocks: Mapping[int, int],
    last_push_time: Mapping[int, float],
    counters: Mapping[str, int],
) -> pb.StatsResponse:
    """What Stats answers: the job, each key's bytes and version, each worker's clock."""
    return pb.StatsResponse(
        initialized=job is not None,
        job=job,
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
            for k, s in slots.items()
        ],
        workers=[
            pb.WorkerStats(worker_id=w, clock=c, last_push_unix=last_push_time.get(w, 0.0))
            for w, c in sorted(clocks.items())
        ],
        total_bytes=sum(s.nbytes for s in slots.values()),
        pushes=counters.get("pushes", 0),
        pulls=counters.get("pulls", 0),
        updates=counters.get("updates", 0),
        bytes_in=counters.get("bytes_in", 0),
        bytes_out=counters.get("bytes_out", 0),
    )
