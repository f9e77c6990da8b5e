"""Settings of one parameter-server process (flags and PS_* variables)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ps_common.codec import DEFAULT_CHUNK_BYTES
from ps_common.config import setting


@dataclass(frozen=True)
class ServerConfig:
    host: str = setting("127.0.0.1", "address to bind; 0.0.0.0 for every interface")
    port: int = setting(50051, "port to bind; 0 picks a free one")
    data_channel: bool = setting(
        True,
        "serve every call on a TCP port of its own beside gRPC, and on a Unix socket for workers on this "
        "host (the same TLS and token)",
    )
    data_port: int = setting(0, "port of the data channel; 0 picks a free one (workers learn it from Hello)")
    port_file: str | None = setting(None, "write the bound port to this file once serving")
    metrics_port: int | None = setting(None, "serve Prometheus metrics on this port (0: a free one)")
    checkpoint_dir: str | None = setting(None, "write checkpoints there and restore the newest on start")
    checkpoint_every_updates: int = setting(
        100, "checkpoint after this many updates: steps in BSP, pushes in ASP/SSP (0: not by count)"
    )
    checkpoint_every_seconds: float = setting(60.0, "checkpoint after this many seconds (0: not by time)")
    checkpoint_keep: int = setting(2, "checkpoints kept on disk")
    auth_token: str | None = setting(None, "require this shared token from every client (health checks exempt)")
    tls_cert: str | None = setting(None, "PEM certificate chain: serve TLS")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = setting(None, "PEM CA: require client certificates it signed (mutual TLS)")
    threads: int = setting(64, "gRPC handler threads; each waiting pull holds one", tuning=True)
    torch_threads: int = setting(1, "torch intra-op threads for updates (one server process per core)", tuning=True)
    fused_updates: bool = setting(
        True, "torch's fused CPU kernels where the worker's optimizer leaves it to torch", tuning=True
    )
    chunk_bytes: int = setting(DEFAULT_CHUNK_BYTES, "largest tensor chunk the server sends", tuning=True)
    max_wait: float = setting(600.0, "longest a pull waits for other workers, whatever its deadline")
    worker_timeout: float = setting(60.0, "seconds of silence after which a worker no longer holds back BSP/SSP")
    wait_log_interval: float = setting(10.0, "seconds between log lines while a pull waits")
    grace: float = setting(5.0, "seconds in-flight calls get to finish on shutdown")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = setting("INFO", "log level")
    log_json: bool = setting(False, "log one JSON object a line")
