"""Helpers for the tests that run real server and worker processes."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_result(log: Path) -> dict[str, Any]:
    """The final result a `ps-worker` logs as `finished: {json}`."""
    line = next(line for line in log.read_text().splitlines() if "finished: " in line)
    return json.loads(line.split("finished: ", 1)[1])  # type: ignore[no-any-return]
