"""The benchmarks' plumbing on tiny sizes: every measurement of `make bench`
runs, against real processes, and rows keep their orientation. Nothing here
asserts a speed: that is what the benchmarks themselves report."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from multiprocessing import resource_tracker

import pytest

from benchmarks import training_step, update_rate, wire
from benchmarks.common import Row

pytestmark = pytest.mark.e2e

SMALL = 2**20  # bytes moved by the wire measurements
WIDTH = 8  # the training step's MLP at about 1M parameters


@pytest.fixture(scope="module", autouse=True)
def resource_tracker_first() -> Iterator[None]:
    """multiprocessing's spawn starts one resource tracker per process, which
    lives as long as it does: started here, it is not one test's leftover."""
    resource_tracker.ensure_running()
    yield


def test_wire_measurements_run_and_rows_say_faster_is_higher() -> None:
    measured = [
        wire.raw_tcp_seconds(SMALL, repeats=1),
        wire.bare_grpc_seconds(SMALL, repeats=1),
        wire.bare_grpc_seconds(SMALL, repeats=1, use_aio=True),
        wire.ours_seconds(SMALL, servers=2, repeats=1),
    ]
    assert all(seconds > 0 for seconds in measured)
    row = wire._row("half the baseline's time", SMALL, ours=0.5, baseline=1.0)
    assert row.ratio == 2.0 and row.ours == 2 * row.baseline  # GB/s: twice the throughput


@pytest.mark.parametrize("optimizer", list(update_rate.OPTIMIZERS))
def test_update_rate_measurements_run(optimizer: str) -> None:
    assert update_rate._shard_seconds(optimizer, 1000, repeats=1) > 0
    assert update_rate._fused_seconds(optimizer, 1000, repeats=1) > 0


def test_training_step_measurements_run_on_every_system() -> None:
    assert training_step.ddp_seconds(2, steps=3, warmup=1, width=WIDTH) > 0
    assert training_step.rpc_seconds(2, steps=3, warmup=1, width=WIDTH) > 0
    for optimizer, mode, workers in training_step.MEMORY_RUNS:
        seconds, growth = training_step.our_run(workers, 1, steps=3, warmup=1, width=WIDTH, optimizer=optimizer,
                                                mode=mode)  # fmt: skip
        assert seconds > 0 and len(growth) == 1 and growth[0] > 0


def test_rows_are_written_with_the_fields_the_json_promises() -> None:
    row = Row(name="n", ours=1.0, baseline=2.0, unit="ms/step", ratio=2.0, target=1.0)
    assert list(dataclasses.asdict(row)) == ["name", "ours", "baseline", "unit", "ratio", "target"]
