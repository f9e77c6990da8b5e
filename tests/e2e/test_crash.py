"""kill -9 a server mid-training, restart it: it restores its checkpoint, the
workers reconnect on their own and the job still reaches its target."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from ps_common.proto import ps_pb2 as pb
from ps_common.proto import ps_pb2_grpc
from tests.support.processes import free_port, worker_result

pytestmark = pytest.mark.e2e

WORKERS = 4


def _version(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            stats = ps_pb2_grpc.ParameterServerStub(channel).Stats(pb.StatsRequest(), timeout=2)
        except grpc.RpcError:
            return -1
    return min((k.version for k in stats.keys), default=-1)


def test_killed_server_restores_and_training_reaches_target(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]

    def start_server(index: int, run: int) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "ps_server", "--port", str(ports[index]),
                   "--checkpoint-dir", str(tmp_path / f"ckpt{index}"), "--checkpoint-every-updates", "20",
                   "--checkpoint-every-seconds", "0"]  # fmt: skip
        return subprocess.Popen(command, stderr=open(tmp_path / f"server{index}.{run}.log", "wb"))  # noqa: SIM115

    servers = [start_server(0, 0), start_server(1, 0)]
    workers = []
    try:
        for i in range(WORKERS):
            command = [sys.executable, "-m", "ps_worker", "--servers", ",".join(addresses), "--worker-id", str(i),
                       "--num-workers", str(WORKERS), "--torch-threads", "1", "--wait-log-interval", "2"]  # fmt: skip
            workers.append(subprocess.Popen(command, stderr=open(tmp_path / f"worker{i}.log", "wb")))  # noqa: SIM115
        deadline = time.monotonic() + 120
        while _version(addresses[1]) < 70:
            assert time.monotonic() < deadline, "training never got going"
            assert all(w.poll() is None for w in workers)
            time.sleep(0.1)
        servers[1].send_signal(signal.SIGKILL)
        servers[1].wait()
        killed_at = _version(addresses[0])
        time.sleep(1.0)
        servers[1] = start_server(1, 1)
        for worker in workers:
            assert worker.wait(timeout=240) == 0, (tmp_path / "worker0.log").read_text()[-3000:]
    finally:
        for process in [*workers, *servers]:
            if process.poll() is None:
                process.kill()
            process.wait()
    restart_log = (tmp_path / "server1.1.log").read_text()
    assert "restored" in restart_log
    result = worker_result(tmp_path / "worker0.log")
    assert result["test_accuracy"] >= 0.97
    assert killed_at >= 70
    # The workers noticed the outage and waited, logging, instead of failing.
    assert any("still waiting" in (tmp_path / f"worker{i}.log").read_text() for i in range(WORKERS))
