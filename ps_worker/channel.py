"""Opening a channel to a server: TLS or not, with the shared token or not."""

from __future__ import annotations

import collections
import ssl
from typing import Any

import grpc

from ps_common.security import TOKEN_METADATA_KEY, bearer, read_pem

# gRPC's reconnect backoff grows to 120 s by default: far too long to notice
# that a crashed server is back. Retry connecting every 2 s at most.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the shared token to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._metadata = (TOKEN_METADATA_KEY, bearer(token))

    def _details(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._metadata]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)  # fmt: skip

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def open_channel(
    address: str,
    auth_token: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> grpc.Channel:
    """A channel to `address`: TLS when `tls_ca` is given (with a client
    certificate for mutual TLS), carrying `auth_token` on every call."""
    if tls_ca is None:
        if tls_cert or tls_key:
            raise ValueError("a client certificate needs --tls-ca too")
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=read_pem(tls_ca), private_key=read_pem(tls_key), certificate_chain=read_pem(tls_cert)
        )
        channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    if auth_token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(auth_token))
    return channel


def tls_context(tls_ca: str | None, tls_cert: str | None = None, tls_key: str | None = None) -> ssl.SSLContext | None:
    """The same TLS for the data channel as `open_channel` gives gRPC; None: plain TCP."""
    if tls_ca is None:
        return None
    context = ssl.create_default_context(cafile=tls_ca)
    if tls_cert is not None:
        context.load_cert_chain(tls_cert, tls_key)
    return context
