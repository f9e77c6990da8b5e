"""Client-side security, configured once and applied by every transport:
the shared token, and TLS (mutual, with a client certificate) from PEM files."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ps_common.security import read_pem

__all__ = ["ClientSecurity"]


@dataclass(frozen=True)
class ClientSecurity:
    """`tls_ca`: the PEM CA that signed the servers' certificates (None:
    plain TCP); `tls_cert`/`tls_key`: a client certificate for mutual TLS."""

    auth_token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.tls_ca is None and (self.tls_cert or self.tls_key):
            raise ValueError("a client certificate needs --tls-ca too")

    @property
    def token(self) -> str:
        return self.auth_token or ""

    def pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """The CA, key and certificate as PEM bytes (gRPC's credentials)."""
        return read_pem(self.tls_ca), read_pem(self.tls_key), read_pem(self.tls_cert)

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS of a socket; None: plain TCP."""
        if self.tls_ca is None:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context
