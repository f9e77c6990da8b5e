"""What both sides share about authentication: the shared-token metadata and
reading PEM files. (TLS itself is gRPC's: ssl_server_credentials and
ssl_channel_credentials.)"""

from __future__ import annotations

from pathlib import Path

# gRPC metadata keys are lower-case; the value is "Bearer <token>".
TOKEN_METADATA_KEY = "authorization"


def bearer(token: str) -> str:
    return f"Bearer {token}"


def read_pem(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
