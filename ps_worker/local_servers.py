"""Parameter-server processes on this host for a launcher (ps-run, ps-train):
each on a free port, which it reports through a file once it serves."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from ps_common.errors import WaitTimeout

__all__ = ["START_TIMEOUT", "start_servers", "stop_processes"]

START_TIMEOUT = 60.0


def start_servers(
    count: int,
    workdir: Path,
    output: Callable[[int], IO[Any] | int],
    args: Sequence[str] = (),
    tail: Callable[[int], str] = lambda index: "",
) -> tuple[list[subprocess.Popen[Any]], list[str]]:
    """Start `count` servers on 127.0.0.1 (with the extra `args`), each
    writing to `output(index)`; return them and their addresses once every
    one serves. A server that exits first, or takes longer than
    START_TIMEOUT, is an error naming it (with `tail(index)`, its last output)."""
    port_files = [workdir / f"server{i}.port" for i in range(count)]
    servers: list[subprocess.Popen[Any]] = []
    for index, port_file in enumerate(port_files):
        command = [sys.executable, "-m", "ps_server", "--host", "127.0.0.1", "--port", "0",
                   "--port-file", str(port_file), *args]  # fmt: skip
        servers.append(subprocess.Popen(command, stdout=output(index), stderr=subprocess.STDOUT))
    addresses = []
    deadline = time.monotonic() + START_TIMEOUT
    try:
        for index, port_file in enumerate(port_files):
            while not port_file.exists():
                if servers[index].poll() is not None:
                    raise RuntimeError(f"server {index} exited with {servers[index].returncode}: {tail(index)}")
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"server {index} did not report its port within {START_TIMEOUT:.0f}s")
                time.sleep(0.05)
            addresses.append(f"127.0.0.1:{port_file.read_text()}")
    except BaseException:
        stop_processes(servers)
        raise
    return servers, addresses


def stop_processes(processes: Sequence[subprocess.Popen[Any]], grace: float = 10.0) -> None:
    """SIGTERM to every process still running, SIGKILL to those still there after `grace` seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
