"""Rows, timing and process helpers shared by the benchmarks."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from benchmarks.hosts import Host
from ps_server import cli


@dataclass
class Row:
    """One comparison; `ratio` is oriented so that higher is better for us."""

    name: str
    ours: float
    baseline: float
    unit: str
    ratio: float
    target: float


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system, all its threads) a process has used so far, from Linux's /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def interleaved(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """The median of each measurement taken `rounds` times, the measurements
    taking turns: a comparison made minutes apart on a shared machine measures
    the machine's swings as much as the code (we saw 2x between runs)."""
    results: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            results[name].append(measure())
    return {name: statistics.median(values) for name, values in results.items()}


def process_context() -> ForkServerContext:
    """Where the benchmarks' child processes come from: forked from one
    server process that has imported torch, gRPC and the benchmarks once.
    A spawned child spent about 2 s importing them, longer than most of the
    measurements it was started for."""
    context = mp.get_context("forkserver")
    # torch._dynamo: the compiler machinery a server's optimizers import, 1.6 s each time.
    context.set_forkserver_preload(["benchmarks.training_step", "benchmarks.wire", "torch._dynamo"])
    return context


def wait_for(results: Any, processes: Sequence[BaseProcess], what: str, timeout: float = 600) -> Any:
    """The next item that one of `processes` puts in the queue `results`;
    fails as soon as one of them has died instead of waiting out `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            failed = [p for p in processes if p.exitcode not in (None, 0)]
            if failed:
                codes = ", ".join(f"{p.name} exited with code {p.exitcode}" for p in failed)
                raise RuntimeError(f"waiting for {what}: {codes}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for {what}") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(host: Host | None, argv: list[str], fresh: bool) -> None:
    """`ps-server argv` on `host`, in this process forked from the benchmarks'
    preloaded one, or (`fresh`) in a new interpreter that replaces it."""
    if host is not None:
        host.enter()
    if fresh:
        os.execv(sys.executable, [sys.executable, "-m", "ps_server", *argv])
    cli.main(argv)


@contextmanager
def server_processes(
    count: int, *flags: str, hosts: Sequence[Host] | None = None, fresh: bool = False
) -> Iterator[tuple[list[str], list[int]]]:
    """`count` ps-server processes, on loopback or each on one of `hosts`;
    yields their addresses and pids. They run the ps-server command's
    code (`ps_server.cli.main`) in processes forked from `process_context`'s,
    started and stopped together: started afresh, each took about 4 s to
    import torch and the compiler machinery its optimizers load, half of the
    quick run's time. `fresh`: each in a new interpreter, as a user starts
    one, for the memory rows (a forked server faults in the library code
    its parent had loaded as it first runs it, about 5 MiB of RSS growth
    that is not the model's)."""
    context = process_context()
    with tempfile.TemporaryDirectory() as tmp:
        processes: list[BaseProcess] = []
        addresses: list[str] = []
        pids: list[int] = []
        try:
            for i in range(count):
                argv = ["--port", "0", "--port-file", f"{tmp}/{i}.port", "--log-level", "WARNING", *flags]
                host = hosts[i] if hosts is not None else None
                address = "127.0.0.1" if host is None else host.address
                if host is not None:
                    argv += ["--host", address]
                process: BaseProcess = context.Process(target=_serve, args=(host, argv, fresh))
                processes.append(process)
                process.start()
                assert process.pid is not None  # set by start()
                pids.append(process.pid)
                addresses.append(address)
            deadline = time.monotonic() + 60
            for i, process in enumerate(processes):
                port_file = Path(tmp) / f"{i}.port"
                while not port_file.exists():
                    if time.monotonic() > deadline or process.exitcode is not None:
                        raise RuntimeError(f"benchmark server {i} did not start (waited for {port_file})")
                    time.sleep(0.05)
                addresses[i] += f":{port_file.read_text()}"
            yield addresses, pids
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():  # did not stop on SIGTERM within its grace
                    process.kill()
                    process.join(timeout=5)
