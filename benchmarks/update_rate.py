"""Parameters per second one shard applies, against torch's fused CPU
optimizer stepping the same tensor standalone."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from benchmarks.common import Row, interleaved
from ps_common import codec
from ps_common.proto import ps_pb2 as pb
from ps_server.shard import Shard

TARGET = 0.8
OPTIMIZERS = {
    "Adam": (torch.optim.Adam, {"lr": 1e-3}),
    "SGD-momentum": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
}


def _timed(run: Callable[[], object]) -> Callable[[], float]:
    def measure() -> float:
        started = time.perf_counter()
        run()
        return time.perf_counter() - started

    return measure


def _shard_step(name: str, numel: int) -> Callable[[], object]:
    cls, options = OPTIMIZERS[name]
    spec = pb.KeySpec(key="w", dtype=pb.FLOAT32, shape=[numel])
    optimizer = pb.OptimizerSpec(name=cls.__name__, groups=[codec.options_to_proto(options)])
    job = pb.JobSpec(mode=pb.ASP, num_workers=1, keys=[spec], optimizer=optimizer)
    shard = Shard()
    shard.init(job, {"w": torch.randn(numel)})
    grad = torch.randn(numel)
    step = iter(range(10**9))
    return lambda: shard.push(0, next(step), [], {"w": grad.clone()})


def _fused_step(name: str, numel: int) -> Callable[[], object]:
    cls, options = OPTIMIZERS[name]
    param = torch.nn.Parameter(torch.randn(numel))
    param.grad = torch.randn(numel)
    optimizer = cls([param], fused=True, **options)
    grad = param.grad

    def step() -> None:
        param.grad = grad.clone()  # the same copy our path makes, to compare updates alone
        optimizer.step()

    return step


def run(quick: bool) -> list[Row]:
    numel = 16 * 2**20
    rounds = 7 if quick else 21
    rows = []
    for name in OPTIMIZERS:
        ours, fused = _shard_step(name, numel), _fused_step(name, numel)
        ours(), fused()  # the first step allocates the optimizer state
        # One step at a time, taking turns: both sides see the same swings of a shared machine.
        seconds = interleaved({"ours": _timed(ours), "fused": _timed(fused)}, rounds)
        rows.append(Row(
            name=f"server update: {name} on a 16M-parameter shard vs torch fused standalone",
            ours=round(numel / seconds["ours"] / 1e9, 3), baseline=round(numel / seconds["fused"] / 1e9, 3),
            unit="G params/s", ratio=round(seconds["fused"] / seconds["ours"], 3), target=TARGET,
        ))  # fmt: skip
    return rows
