"""`ps-ctl`: look at and operate a running cluster::

ps-ctl status --servers a:50051,b:50051   a table: health, keys, bytes, version, workers, last push
ps-ctl health --servers a:50051           exit 0 only if every server reports SERVING
ps-ctl checkpoint --servers a,b           every server writes a checkpoint now
ps-ctl export --servers a,b --out DIR     the whole model as a state_dict (safetensors)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps_common import assembly, codec
from ps_common.config import parse_config, setting
from ps_common.errors import FailedPrecondition, PSError
from ps_common.proto import ps_pb2 as pb
from ps_worker.client_config import ClientConfig
from ps_worker.export import ExportedModel
from ps_worker.transport import open_channel
from ps_worker.transport.grpc_client import GrpcTransport

COMMANDS = ("status", "health", "checkpoint", "export")


@dataclass(frozen=True)
class CtlConfig:
    servers: str = setting("127.0.0.1:50051", "comma-separated server addresses")
    out: str = setting("exported-model", "export: directory to write model.safetensors and masks.safetensors")
    client: ClientConfig = field(default_factory=ClientConfig)  # deadline and credentials


HEADINGS = ("server", "health", "mode", "keys", "bytes", "version", "workers", "last push")


def health_of(address: str, client: ClientConfig) -> str:
    """The server's overall health status name, or why it could not be asked."""
    with open_channel(address, client.security()) as channel:
        try:
            request = health_pb2.HealthCheckRequest()
            response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=client.timeout)
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _server(address: str, client: ClientConfig) -> GrpcTransport:
    """The server at `address`, over gRPC (the port an operator can reach)."""
    return GrpcTransport(address, client.security())


def _status_row(address: str, client: ClientConfig) -> list[str]:
    health = health_of(address, client)
    server = _server(address, client)
    try:
        stats = server.stats(client.timeout)
    except PSError as exc:
        return [address, health, "-", "-", "-", "-", "-", exc.code.name]
    finally:
        server.close()
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


def _pull_whole(
    server: GrpcTransport,
    specs: dict[str, pb.KeySpec],
    whole: dict[str, torch.Tensor],
    masks: bool,
    timeout: float,
) -> None:
    """Pull a server's keys into the whole tensors they belong to."""
    fused: dict[str, torch.Tensor] = {}  # received whole, then copied into their parameters

    def destination(chunk: codec.ChunkLike) -> torch.Tensor:
        spec = specs[chunk.key]
        if spec.parts:
            return fused.setdefault(chunk.key, assembly.new_tensor_for(chunk))
        if spec.tensor not in whole:  # only masks are created here: parameters without one stay unmasked
            whole[spec.tensor] = torch.ones(tuple(spec.tensor_shape), dtype=torch.bool)
        return whole[spec.tensor].view(-1)[spec.offset : spec.offset + spec.shape[0]]

    def complete(key: str) -> None:
        if key in fused:
            parts = specs[key].parts
            sizes = [math.prod(p.tensor_shape) for p in parts]
            for part, values in zip(parts, torch.split(fused.pop(key), sizes), strict=True):
                whole[part.tensor].view(-1).copy_(values)

    request = pb.PullRequest(worker_id=0, step=0, masks=masks)
    server.pull(request, timeout, destination, complete)


def _parameters_of(spec: pb.KeySpec) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters a key holds elements of, with their shapes."""
    if spec.parts:
        return [(p.tensor, tuple(p.tensor_shape)) for p in spec.parts]
    return [(spec.tensor, tuple(spec.tensor_shape))]


def export_from_servers(addresses: Sequence[str], client: ClientConfig) -> ExportedModel:
    """Reassemble every parameter (and pruning mask) from the servers' keys."""
    weights: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for address in addresses:
        server = _server(address, client)
        try:
            stats = server.stats(client.timeout)
            if not stats.initialized:
                raise FailedPrecondition(f"{address} has not been initialized: nothing to export")
            specs = {k.key: k for k in stats.job.keys}
            for spec in specs.values():
                dtype = codec.dtype_from_proto(spec.dtype)
                for name, shape in _parameters_of(spec):
                    weights.setdefault(name, torch.empty(shape, dtype=dtype))
            _pull_whole(server, specs, weights, masks=False, timeout=client.timeout)
            _pull_whole(server, specs, masks, masks=True, timeout=client.timeout)
        finally:
            server.close()
    return ExportedModel(weights, masks)


def status_table(addresses: Sequence[str], client: ClientConfig) -> str:
    """Every server's row under the headings, in aligned columns."""
    rows = [list(HEADINGS), *(_status_row(address, client) for address in addresses)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADINGS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(
            f"usage: ps-ctl {{{','.join(COMMANDS)}}} [--servers A,B] [--timeout S] [--auth-token T] [--tls-ca PEM]...",
            file=sys.stderr,
        )
        return 2
    command = args.pop(0)
    config = parse_config(CtlConfig, f"ps-ctl {command}", args)
    addresses = [a.strip() for a in config.servers.split(",") if a.strip()]
    if command == "health":
        statuses = {address: health_of(address, config.client) for address in addresses}
        for address, status in statuses.items():
            print(f"{address}: {status}")
        return 0 if all(s == "SERVING" for s in statuses.values()) else 1
    try:
        if command == "checkpoint":
            for address in addresses:
                server = _server(address, config.client)
                try:
                    response = server.checkpoint(config.client.timeout)
                finally:
                    server.close()
                print(f"{address}: {response.path} (version {response.version})")
        elif command == "export":
            exported = export_from_servers(addresses, config.client)
            exported.save(config.out)
            print(f"wrote {len(exported.state_dict)} parameters to {config.out}")
        else:
            print(status_table(addresses, config.client))
    except PSError as exc:
        print(f"ps-ctl {command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
