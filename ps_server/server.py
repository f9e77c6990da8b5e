"""A running parameter server: a shard, its service, the transports that
carry calls to it, its checkpoints and metrics, started and stopped together."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ps_server.checkpointer import Checkpointer
from ps_server.config import ServerConfig
from ps_server.handler import ParameterService
from ps_server.metrics import ServerMetrics
from ps_server.optimizer import warm_up
from ps_server.security import ServerSecurity
from ps_server.shard import Shard
from ps_server.transport import GrpcServer, SocketServer

__all__ = ["RunningServer", "start_server"]

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    """A started server; `stop()` shuts it down and frees its ports and threads."""

    shard: Shard
    service: ParameterService
    port: int
    address: str
    metrics_port: int | None
    checkpointer: Checkpointer | None
    grpc_server: GrpcServer
    data_server: SocketServer | None
    metrics: ServerMetrics

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, wake waiting pulls, give in-flight calls `grace`
        seconds, then write a last checkpoint."""
        self.grpc_server.stop_serving()
        self.shard.close()
        if self.data_server is not None:
            self.data_server.stop(grace)
        self.grpc_server.stop(grace)
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.metrics.close()


def start_server(config: ServerConfig) -> RunningServer:
    """Bind, start serving and return at once; health reports SERVING when ready."""
    metrics = ServerMetrics()
    shard = Shard(config.wait_log_interval, metrics, config.worker_timeout, config.fused_updates)
    metrics.watch(shard)
    checkpointer = None
    if config.checkpoint_dir:
        checkpointer = Checkpointer(
            shard, Path(config.checkpoint_dir), config.checkpoint_every_updates,
            config.checkpoint_every_seconds, config.checkpoint_keep,
        )  # fmt: skip
        checkpointer.restore()
    security = ServerSecurity(config)
    service = ParameterService(shard, config, checkpointer)
    grpc_server = GrpcServer(service, config.host, config.port, config.threads, security)
    data_server = None
    if config.data_channel:
        # A worker holds one or two connections per server, idle between calls:
        # the cap is for runaway clients, not for handler threads as --threads is.
        data_server = SocketServer(service, config.host, config.data_port, 16 * config.threads, security)
        data_server.start()
        service.data_port, service.data_socket = data_server.port, data_server.socket_name
        metrics.watch_data_channel(data_server.calls)
    metrics_port = None if config.metrics_port is None else metrics.serve(config.metrics_port, config.host)
    if checkpointer is not None:
        checkpointer.start()
    warm_up()
    # Only now is the shard ready (restored, if there was a checkpoint).
    grpc_server.serving()
    address = f"{config.host}:{grpc_server.port}"
    log.info(
        "parameter server listening on %s%s%s%s", address,
        f", data channel on :{data_server.port}" if data_server else "",
        f" and on Unix socket @{data_server.socket_name}" if data_server and data_server.socket_name else "",
        f", metrics on :{metrics_port}" if metrics_port else "",
    )  # fmt: skip
    return RunningServer(
        shard, service, grpc_server.port, address, metrics_port, checkpointer, grpc_server, data_server, metrics
    )
