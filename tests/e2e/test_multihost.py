"""Servers and workers on separate hosts: Linux network namespaces joined by
veth pairs to a bridge, each host with its own address. Only addresses of
namespaces this test creates are used, and everything is removed afterwards."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.hosts import Host, available, emulated_hosts
from ps_worker.transport import socket_client
from tests.support.processes import worker_result

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(available() is not None, reason=available() or ""),
]


@pytest.fixture
def hosts() -> Iterator[dict[str, Host]]:
    """Four hosts on one private segment."""
    with emulated_hosts(["server0", "server1", "worker0", "worker1"]) as made:
        yield made


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _in(host: Host, *command: str, **kwargs) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    return subprocess.Popen(host.command(*command), **kwargs)


def test_tcp_between_two_hosts_crosses_a_link(hosts: dict[str, Host]) -> None:
    """What makes pushes to a server over a link send one after another (ps_worker/transport/socket_client.py)."""
    sockets: dict[str, socket.socket] = {}

    def on(host: Host, make: Callable[[], socket.socket], name: str) -> None:
        host.enter()  # this thread only: its sockets stay on that host
        sockets[name] = make()

    server = threading.Thread(
        target=on, args=(hosts["server0"], lambda: socket.create_server((hosts["server0"].address, 0)), "listener")
    )
    server.start()
    server.join()
    address = sockets["listener"].getsockname()
    client = threading.Thread(
        target=on, args=(hosts["worker0"], lambda: socket.create_connection(address, timeout=10), "client")
    )
    client.start()
    client.join()
    try:
        assert socket_client.crosses_a_link(sockets["client"])
    finally:
        for sock in sockets.values():
            sock.close()


def test_job_completes_across_separate_hosts(hosts: dict[str, Host], tmp_path: Path) -> None:
    port = "50051"
    servers = [hosts["server0"], hosts["server1"]]
    addresses = ",".join(f"{h.address}:{port}" for h in servers)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, host in enumerate(servers):
            log = open(tmp_path / f"server{i}.log", "wb")  # noqa: SIM115
            processes.append(_in(host, sys.executable, "-m", "ps_server", "--host", host.address, "--port", port,
                                 stderr=log))  # fmt: skip
        workers = []
        for i, name in enumerate(["worker0", "worker1"]):
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
            command = [sys.executable, "-m", "ps_worker", "--servers", addresses, "--worker-id", str(i),
                       "--num-workers", "2", "--epochs", "8", "--torch-threads", "1"]  # fmt: skip
            workers.append(_in(hosts[name], *command, stderr=log))
        processes += workers
        for worker in workers:
            assert worker.wait(timeout=180) == 0, (tmp_path / "worker0.log").read_text()[-2000:]
        result = worker_result(tmp_path / "worker0.log")
        assert result["test_accuracy"] >= 0.9
        # The servers really were reached at their own hosts' addresses.
        assert hosts["server0"].address in (tmp_path / "server0.log").read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=30)


def test_worker_cut_off_for_seconds_recovers_when_the_link_returns(hosts: dict[str, Host], tmp_path: Path) -> None:
    """Calls time out within their deadlines while the link is down (retried,
    logged); nothing hangs, and training completes once it is back."""
    port = "50051"
    addresses = ",".join(f"{hosts[h].address}:{port}" for h in ("server0", "server1"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, name in enumerate(["server0", "server1"]):
            log = open(tmp_path / f"server{i}.log", "wb")  # noqa: SIM115
            processes.append(_in(hosts[name], sys.executable, "-m", "ps_server", "--host", hosts[name].address,
                                 "--port", port, stderr=log))  # fmt: skip
        workers = []
        for i, name in enumerate(["worker0", "worker1"]):
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
            command = [sys.executable, "-m", "ps_worker", "--servers", addresses, "--worker-id", str(i),
                       "--num-workers", "2", "--epochs", "12", "--torch-threads", "1", "--timeout", "3",
                       "--wait-log-interval", "1", "--report", "json"]  # fmt: skip
            workers.append(_in(hosts[name], *command, stderr=log, stdout=subprocess.PIPE))
        processes += workers
        assert workers[1].stdout is not None
        for line in workers[1].stdout:  # wait until training is well under way
            if json.loads(line).get("step", 0) >= 30:
                break
        namespace = hosts["worker1"].namespace
        _ip("-n", namespace, "link", "set", "eth0", "down")
        time.sleep(4)
        _ip("-n", namespace, "link", "set", "eth0", "up")
        for worker in workers:
            worker.stdout.read()  # type: ignore[union-attr]
            assert worker.wait(timeout=180) == 0, (tmp_path / "worker1.log").read_text()[-2000:]
        assert "still waiting" in (tmp_path / "worker1.log").read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=30)
