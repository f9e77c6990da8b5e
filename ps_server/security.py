"""Server-side security: TLS or mutual TLS credentials, and a shared-token check."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from collections.abc import Callable
from typing import Any

import grpc

from ps_common.security import TOKEN_METADATA_KEY, bearer, read_pem
from ps_server.config import ServerConfig

log = logging.getLogger(__name__)

# Probes (Kubernetes, docker healthchecks) cannot present a token.
_OPEN_METHODS = ("/grpc.health.v1.Health/",)


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Answer UNAUTHENTICATED unless the call carries the shared token."""

    def __init__(self, token: str) -> None:
        self._expected = bearer(token).encode()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(_OPEN_METHODS):
            return continuation(details)
        presented = dict(details.invocation_metadata).get(TOKEN_METADATA_KEY, "")
        if isinstance(presented, str):
            presented = presented.encode()
        if hmac.compare_digest(presented, self._expected):
            return continuation(details)
        return _refusal(continuation(details))


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """A handler of the same streaming kind that only says UNAUTHENTICATED."""
    if handler is None:
        return None

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (set PS_AUTH_TOKEN on the client)")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config (mutual TLS with a client CA); None: insecure."""
    if config.tls_cert is None:
        if config.tls_key or config.tls_client_ca:
            raise ValueError("--tls-key and --tls-client-ca need --tls-cert")
        if not _is_loopback(config.host):
            log.warning(
                "SERVING WITHOUT TLS ON %s: anyone who can reach this address can read and change the model. "
                "Use --tls-cert/--tls-key (and --tls-client-ca) or keep the server on a private network.",
                config.host,
            )
        return None
    key = read_pem(config.tls_key)
    cert = read_pem(config.tls_cert)
    if key is None or cert is None:
        raise ValueError("--tls-cert needs --tls-key")
    client_ca = read_pem(config.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The same TLS for the data channel as `credentials` gives gRPC; None: plain TCP."""
    if config.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls_client_ca)
    return context


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
