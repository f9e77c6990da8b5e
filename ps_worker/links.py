"""Where a server is, as far as the client's defaults care: on this host's
loopback, where client and servers share the cores and no link exists, or
over a link, whose bandwidth sets the pace."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

__all__ = ["host_of", "is_loopback", "over_links", "pulls_while_pushing", "push_request_bytes"]

# Over a link, a request small enough that a key's update and pull follow
# its push closely; on loopback, where each request costs the shared cores
# CPU, a size that two of the 2 MiB pieces power-of-two tensors are cut
# into fill together (benchmarks/HISTORY.md has the measurements).
LINK_REQUEST_BYTES = 2**20
LOOPBACK_REQUEST_BYTES = 2**22


def is_loopback(host: str | None) -> bool:
    """Whether `host` (an address, or "localhost") is this host's loopback."""
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return False


def host_of(address: str) -> str | None:
    """The host of a "host:port" address ("[v6]:port" too); None for other
    gRPC targets (dns:///..., unix:...), which get no data channel."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in host or host.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        return None
    return host.strip("[]")


def over_links(addresses: Sequence[str]) -> bool:
    """Whether any server is reached over a link rather than loopback."""
    return not all(is_loopback(host_of(address)) for address in addresses)


def pulls_while_pushing(setting: bool | None, addresses: Sequence[str]) -> bool:
    """`setting` (ClientConfig.pull_while_pushing), or when it is None, whether
    any server is reached over a link."""
    return over_links(addresses) if setting is None else setting


def push_request_bytes(setting: int | None, addresses: Sequence[str]) -> int:
    """`setting` (ClientConfig.push_request_bytes), or when it is None, 1 MiB
    if any server is reached over a link, else 4 MiB."""
    if setting is not None:
        return setting
    return LINK_REQUEST_BYTES if over_links(addresses) else LOOPBACK_REQUEST_BYTES
