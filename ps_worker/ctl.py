"""`ps-ctl`: look at a running cluster.

ps-ctl status --servers a:50051,b:50051   a table: health, keys, bytes, version, workers, last push
ps-ctl health --servers a:50051           exit 0 only if every server reports SERVING
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from ps_common.config import parse_config, setting
from ps_common.proto import ps_pb2 as pb
from ps_common.proto import ps_pb2_grpc

COMMANDS = ("status", "health")


@dataclass(frozen=True)
class CtlConfig:
    servers: str = setting("127.0.0.1:50051", "comma-separated server addresses")
    timeout: float = setting(5.0, "deadline of each call in seconds")


def health_of(channel: grpc.Channel, timeout: float) -> str:
    """The server's overall health status name, or why it could not be asked."""
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _status_row(address: str, timeout: float) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        health = health_of(channel, timeout)
        try:
            stats = ps_pb2_grpc.ParameterServerStub(channel).Stats(pb.StatsRequest(), timeout=timeout)  # type: ignore[no-untyped-call]
        except grpc.RpcError as exc:
            return [address, health, "-", "-", "-", "-", "-", exc.code().name]
    if not stats.initialized:
        return [address, health, "waiting for Init", "0", "0", "-", "-", "never"]
    versions = [k.version for k in stats.keys]
    last = max((w.last_push_unix for w in stats.workers), default=0.0)
    return [
        address,
        health,
        pb.Mode.Name(stats.job.mode),
        str(len(stats.keys)),
        f"{stats.total_bytes:,}",
        f"{min(versions)}..{max(versions)}" if versions else "-",
        f"{len(stats.workers)}/{stats.job.num_workers}",
        f"{time.time() - last:.1f}s ago" if last else "never",
    ]


def status_table(addresses: Sequence[str], timeout: float) -> Table:
    table = Table(title="parameter servers")
    for column in ("server", "health", "mode", "keys", "bytes", "version", "workers", "last push"):
        table.add_column(column)
    for address in addresses:
        table.add_row(*_status_row(address, timeout))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(f"usage: ps-ctl {{{','.join(COMMANDS)}}} [--servers A,B] [--timeout S]", file=sys.stderr)
        return 2
    command = args.pop(0)
    config = parse_config(CtlConfig, f"ps-ctl {command}", args)
    addresses = [a.strip() for a in config.servers.split(",") if a.strip()]
    if command == "health":
        statuses = {}
        for address in addresses:
            with grpc.insecure_channel(address) as channel:
                statuses[address] = health_of(channel, config.timeout)
        for address, status in statuses.items():
            print(f"{address}: {status}")
        return 0 if all(s == "SERVING" for s in statuses.values()) else 1
    Console().print(status_table(addresses, config.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
