"""The settings of a worker's connection to the servers (PSClient's config)."""

from __future__ import annotations

from dataclasses import dataclass

from ps_common import codec
from ps_common.config import setting
from ps_worker.transport import ClientSecurity, TransportOptions

__all__ = ["ClientConfig"]


@dataclass(frozen=True)
class ClientConfig:
    timeout: float = setting(60.0, "deadline in seconds of a call that waits for nobody (push, the transfer of a pull)")
    wait_timeout: float = setting(600.0, "longest wait for servers to come up, for initialization or for other workers")
    wait_log_interval: float = setting(10.0, "seconds between log lines while waiting")
    pull_while_pushing: bool | None = setting(
        None,
        "BSP: pull the next step's weights while pushing, each key as soon as its step is complete (using a "
        "link both ways at once); default: on, unless every server is at a loopback address, where there is no "
        "link and the two transfers only compete for this machine's cores",
        tuning=True,
    )
    chunk_bytes: int = setting(codec.DEFAULT_CHUNK_BYTES, "largest tensor chunk a worker sends", tuning=True)
    max_piece_bytes: int = setting(
        codec.DEFAULT_CHUNK_BYTES, "largest range of a tensor kept on one server", tuning=True
    )
    # From about 256 KiB, gathering a tensor into a shared key and copying it
    # out again costs as much as a key of its own.
    fuse_below_bytes: int = setting(
        256 * 1024,
        "parameters smaller than this share keys, laid end to end (0: each its own key); fused parameters "
        "must get their gradients in the same steps, as torch.optim would otherwise update them apart",
        tuning=True,
    )
    push_request_bytes: int | None = setting(
        None,
        "most gradient bytes in one push request: a server applies each request as it lands, all or nothing; "
        "default: 1 MiB, so that over a link a key's update and pull follow its push closely, unless every "
        "server is at a loopback address, where each request costs CPU the cores lack: 4 MiB",
        tuning=True,
    )
    heartbeat_interval: float = setting(5.0, "seconds between heartbeats, so a long step is not taken for a crash")
    auth_token: str | None = setting(None, "shared token the servers require")
    tls_ca: str | None = setting(None, "PEM CA that signed the servers' certificates: connect with TLS")
    tls_cert: str | None = setting(None, "PEM client certificate, for servers that require mutual TLS")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    data_channel: bool = setting(
        True, "call the servers over their data channel (a TCP port beside gRPC) where offered, else over gRPC"
    )
    data_socket: bool = setting(
        True,
        "reach the data channel of a server on this host (in this network namespace) through its Unix socket, "
        "which costs less CPU than loopback TCP",
        tuning=True,
    )
    shared_weights: bool = setting(
        True,
        "BSP, through a server's Unix socket without TLS: read pulled weights straight from the server's memory, "
        "which it shares read-only, instead of having them sent",
        tuning=True,
    )

    def security(self) -> ClientSecurity:
        return ClientSecurity(self.auth_token, self.tls_ca, self.tls_cert, self.tls_key)

    def transport_options(self) -> TransportOptions:
        return TransportOptions(self.data_channel, self.data_socket, self.shared_weights)
