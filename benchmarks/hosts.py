"""Separate hosts on one machine, for the benchmarks and tests that need a
real network between processes: Linux network namespaces joined by veth
pairs to a bridge, each with its own address and, if asked, each link
shaped to a rate in both directions (tc's token bucket), so that a
measurement sees a network's bandwidth rather than loopback's memory copy.

Needs root and iproute2. Only addresses of namespaces created here are
used, and everything is removed on exit.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

_CLONE_NEWNET = 0x40000000
_SUBNET = "10.231.{}.{}"


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    interface: str = "eth0"

    def command(self, *argv: str) -> list[str]:
        """`argv` run on this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def enter(self) -> None:
        """Move the calling process onto this host. Call it first thing in a
        new process: setns moves only the calling thread, and threads started
        later inherit it."""
        fd = os.open(f"/var/run/netns/{self.namespace}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"cannot enter network namespace {self.namespace}")
        finally:
            os.close(fd)


def available() -> str | None:
    """Why hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2's `ip` and `tc`"
    return None


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


@contextmanager
def emulated_hosts(names: Sequence[str], rate_mbit: int | None = None) -> Iterator[dict[str, Host]]:
    """One host per name on a private segment; with `rate_mbit`, each host's
    link carries at most that many Mbit/s each way, as a switched network
    with links of that speed would."""
    tag = f"ps{os.getpid() % 10000}"
    bridge = f"{tag}-br"
    third = os.getpid() % 200 + 20
    hosts = {name: Host(f"{tag}-{name}", _SUBNET.format(third, i + 2)) for i, name in enumerate(names)}
    created = []
    try:
        _run("ip", "netns", "add", bridge)
        created.append(bridge)
        _run("ip", "-n", bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", bridge, "link", "set", "br0", "up")
        for i, host in enumerate(hosts.values()):
            port = f"port{i}"
            _run("ip", "netns", "add", host.namespace)
            created.append(host.namespace)
            _run("ip", "-n", host.namespace, "link", "add", host.interface, "type", "veth", "peer", "name", port,
                 "netns", bridge)  # fmt: skip
            _run("ip", "-n", bridge, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _run("ip", "-n", host.namespace, "link", "set", host.interface, "up")
            _run("ip", "-n", host.namespace, "link", "set", "lo", "up")
            if rate_mbit is not None:
                # Out of the host on its side of the pair, into it on the bridge's.
                for namespace, device in ((host.namespace, host.interface), (bridge, port)):
                    _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
                         "rate", f"{rate_mbit}mbit", "burst", "1mb", "latency", "50ms")  # fmt: skip
        yield hosts
    finally:
        for namespace in reversed(created):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
