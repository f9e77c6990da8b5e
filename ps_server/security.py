"""Server-side security, configured once and applied by every transport: TLS
or mutual TLS from PEM files, and the shared-token check."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from dataclasses import dataclass

from ps_common.errors import Unauthenticated
from ps_common.security import read_pem
from ps_server.config import ServerConfig

__all__ = ["ServerSecurity", "TlsFiles"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes of a server's TLS: its key and certificate chain, and
    the CA its clients' certificates must be signed by (mutual TLS) or None."""

    key: bytes
    cert: bytes
    client_ca: bytes | None


class ServerSecurity:
    """What a server requires of its clients, from its config: `tls` (None:
    plain TCP), as PEM bytes and as an ssl context, and the shared token."""

    def __init__(self, config: ServerConfig) -> None:
        self._token = config.auth_token.encode() if config.auth_token else None
        self.tls: TlsFiles | None = None
        self.tls_context: ssl.SSLContext | None = None
        if config.tls_cert is None:
            if config.tls_key or config.tls_client_ca:
                raise ValueError("--tls-key and --tls-client-ca need --tls-cert")
            if not _is_loopback(config.host):
                log.warning(
                    "SERVING WITHOUT TLS ON %s: anyone who can reach this address can read and change the model. "
                    "Use --tls-cert/--tls-key (and --tls-client-ca) or keep the server on a private network.",
                    config.host,
                )
            return
        key, cert = read_pem(config.tls_key), read_pem(config.tls_cert)
        if key is None or cert is None:
            raise ValueError("--tls-cert needs --tls-key")
        self.tls = TlsFiles(key, cert, read_pem(config.tls_client_ca))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(config.tls_client_ca)
        self.tls_context = context

    @property
    def requires_token(self) -> bool:
        return self._token is not None

    def check_token(self, presented: str) -> None:
        """Raise Unauthenticated unless `presented` is the shared token (or none is required)."""
        if self._token is not None and not hmac.compare_digest(presented.encode(), self._token):
            raise Unauthenticated("missing or wrong token (set PS_AUTH_TOKEN on the client)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
