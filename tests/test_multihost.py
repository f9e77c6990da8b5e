"""Servers and workers on separate hosts: Linux network namespaces joined by
veth pairs to a bridge, each host with its own address. Only addresses of
namespaces this test creates are used, and everything is removed afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import worker_result

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip`"),
]

SUBNET = "10.231.{}.{}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    """Four hosts on one private segment: name -> (namespace, address)."""
    tag = f"ps{os.getpid() % 10000}"
    bridge_ns = f"{tag}-br"
    names = ["server0", "server1", "worker0", "worker1"]
    namespaces = {name: f"{tag}-{name}" for name in names}
    third = os.getpid() % 200 + 20
    addresses = {name: SUBNET.format(third, i + 2) for i, name in enumerate(names)}
    created = []
    try:
        _ip("netns", "add", bridge_ns)
        created.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ns = namespaces[name]
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}", "netns", bridge_ns)
            _ip("-n", bridge_ns, "link", "set", f"port{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addresses[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {name: f"{namespaces[name]} {addresses[name]}" for name in names}
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in(host: str, *command: str, **kwargs) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    namespace = host.split()[0]
    return subprocess.Popen(["ip", "netns", "exec", namespace, *command], **kwargs)


def test_job_completes_across_separate_hosts(hosts: dict[str, str], tmp_path: Path) -> None:
    port = "50051"
    servers = [hosts["server0"], hosts["server1"]]
    addresses = ",".join(f"{h.split()[1]}:{port}" for h in servers)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, host in enumerate(servers):
            log = open(tmp_path / f"server{i}.log", "wb")  # noqa: SIM115
            processes.append(_in(host, sys.executable, "-m", "ps_server", "--host", host.split()[1], "--port", port,
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
        assert hosts["server0"].split()[1] in (tmp_path / "server0.log").read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=30)


def test_worker_cut_off_for_seconds_recovers_when_the_link_returns(hosts: dict[str, str], tmp_path: Path) -> None:
    """Calls time out within their deadlines while the link is down (retried,
    logged); nothing hangs, and training completes once it is back."""
    port = "50051"
    addresses = ",".join(f"{hosts[h].split()[1]}:{port}" for h in ("server0", "server1"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, name in enumerate(["server0", "server1"]):
            log = open(tmp_path / f"server{i}.log", "wb")  # noqa: SIM115
            processes.append(_in(hosts[name], sys.executable, "-m", "ps_server", "--host", hosts[name].split()[1],
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
        namespace = hosts["worker1"].split()[0]
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
