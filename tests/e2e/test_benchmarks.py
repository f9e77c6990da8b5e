"""The benchmarks' plumbing on tiny sizes: every measurement of `make bench`
runs, against real processes, and rows keep their orientation. Nothing here
asserts a speed: that is what the benchmarks themselves report."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import forkserver

import pytest

from benchmarks import hosts, training_step, update_rate, wire
from benchmarks.common import Row, process_context, process_cpu_seconds, wait_for
from ps_common.codec import DEFAULT_CHUNK_BYTES

pytestmark = pytest.mark.e2e

SMALL = 2**20  # bytes moved by the wire measurements
WIDTH = 8  # the training step's MLP at about 1M parameters


@pytest.fixture(scope="module", autouse=True)
def forkserver_first() -> Iterator[None]:
    """The benchmarks' fork server (and its resource tracker) lives as long
    as this process: started here, it is not one test's leftover."""
    process_context()
    forkserver.ensure_running()
    yield


def test_wire_measurements_run_and_rows_say_faster_is_higher() -> None:
    measured = [
        wire.raw_echo_seconds(SMALL, repeats=1),
        wire.raw_echo_seconds(SMALL, repeats=1, unix=True),
        wire.raw_echo_seconds(SMALL, repeats=1, model_sized=True),
        wire.minimal_ps_seconds(SMALL + DEFAULT_CHUNK_BYTES, repeats=1),  # two messages, the second short
        wire.bare_grpc_seconds(SMALL, repeats=1),
        wire.bare_grpc_seconds(SMALL, repeats=1, use_aio=True),
        wire.ours_seconds(SMALL, servers=2, repeats=1),
        wire.ours_seconds(SMALL, servers=1, repeats=1, unix=True),
        wire.small_tensors_seconds(8, 16, fuse_below_bytes=2**10, repeats=1),
    ]
    assert all(seconds > 0 for seconds in measured)
    with wire._ours(16 * 2**20, 1, unix=False) as (step, pids):
        step()
        assert pids[0] == os.getpid() and len(pids) == 2
        before = process_cpu_seconds(pids[1])
        for _ in range(3):
            step()
        assert process_cpu_seconds(pids[1]) > before  # the server process: it took and applied the pushes
    row = wire._row("half the baseline's time", SMALL, ours=0.5, baseline=1.0)
    assert row.ratio == 2.0 and row.ours == 2 * row.baseline  # GB/s: twice the throughput


def test_an_echo_through_model_sized_buffers_moves_each_byte_from_its_own_place() -> None:
    nbytes = 2 * DEFAULT_CHUNK_BYTES + 10
    model_sized, cached = wire._messages(nbytes, model_sized=True), wire._messages(nbytes, model_sized=False)
    assert [len(m) for m in model_sized] == [len(m) for m in cached] == [DEFAULT_CHUNK_BYTES] * 2 + [10]
    model_sized[1][0] = 1  # the pieces of one buffer, one after another
    assert model_sized[0].obj is model_sized[2].obj and bytes(model_sized[0].obj)[DEFAULT_CHUNK_BYTES] == 1
    cached[1][0] = 1  # one reused buffer
    assert cached[0][0] == cached[2][0] == 1


def test_cpu_seconds_is_the_cpu_time_of_one_run() -> None:
    @contextmanager
    def burner() -> Iterator[wire.RoundTrip]:
        def burn() -> None:
            until = time.process_time() + 0.1
            while time.process_time() < until:
                pass

        yield burn, [os.getpid()]

    assert 0.08 <= wire.cpu_seconds(burner(), repeats=3) < 0.2  # per run


@pytest.mark.parametrize("optimizer", list(update_rate.OPTIMIZERS))
def test_update_rate_measurements_run(optimizer: str) -> None:
    for step in (update_rate._shard_step(optimizer, 1000), update_rate._fused_step(optimizer, 1000)):
        assert update_rate._timed(step)() > 0


def test_training_step_measurements_run_on_every_system() -> None:
    assert training_step.ddp_seconds(2, steps=3, warmup=1, width=WIDTH) > 0
    assert training_step.rpc_seconds(2, steps=3, warmup=1, width=WIDTH) > 0
    for optimizer, mode, workers in training_step.MEMORY_RUNS:
        seconds, growth = training_step.our_run(workers, 1, steps=3, warmup=1, width=WIDTH, optimizer=optimizer,
                                                mode=mode)  # fmt: skip
        assert seconds > 0 and len(growth) == 1 and growth[0] > 0


def _bytes_sent(host: hosts.Host) -> int:
    stats = subprocess.run(host.command("cat", f"/sys/class/net/{host.interface}/statistics/tx_bytes"),
                           capture_output=True, text=True, check=True)  # fmt: skip
    return int(stats.stdout)


@pytest.mark.skipif(hosts.available() is not None, reason=hosts.available() or "")
def test_training_step_measurements_cross_the_links_between_separate_hosts() -> None:
    """Each system's gradients really travel between the hosts (TensorPipe,
    left to itself, finds the processes on one machine and takes shared memory)."""
    model_bytes = 4 * sum(p.numel() for p in training_step.build_model(WIDTH).parameters())
    steps = 3
    with hosts.emulated_hosts(["worker0", "worker1", "server"], rate_mbit=1000) as on:
        workers = [on["worker0"], on["worker1"]]
        for measure in (
            lambda: training_step.ddp_seconds(2, steps, 1, WIDTH, hosts=workers),
            lambda: training_step.rpc_seconds(2, steps, 1, WIDTH, hosts=[on["server"], *workers]),
            lambda: training_step.our_seconds(2, 1, steps, 1, WIDTH, server_hosts=[on["server"]],
                                              worker_hosts=workers),
        ):  # fmt: skip
            before = _bytes_sent(workers[1])
            assert measure() > 0
            # DDP sends each worker's half of the gradients; the others all of them.
            assert _bytes_sent(workers[1]) - before > steps * model_bytes / 2


def test_rows_are_written_with_the_fields_the_json_promises() -> None:
    row = Row(name="n", ours=1.0, baseline=2.0, unit="ms/step", ratio=2.0, target=1.0)
    assert list(dataclasses.asdict(row)) == ["name", "ours", "baseline", "unit", "ratio", "target"]


def _exit_without_reporting(results: object) -> None:
    sys.exit(3)


def test_waiting_for_a_benchmark_process_that_died_fails_at_once_with_its_exit_code() -> None:
    context = process_context()
    results = context.Queue()
    process = context.Process(target=_exit_without_reporting, args=(results,))
    process.start()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        wait_for(results, [process], "a report", timeout=60)
    assert time.monotonic() - started < 30  # not the timeout
    process.join()
