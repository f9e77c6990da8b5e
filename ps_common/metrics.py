"""A process's Prometheus metrics on a registry of its own (an in-process
cluster runs several servers in one process), served over HTTP on demand."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

__all__ = ["Metrics"]


class Metrics:
    """`registry` holds the metrics; `serve` exposes /metrics until `close`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: Any = None

    def histogram(self, name: str, documentation: str, **options: Any) -> Histogram:
        return Histogram(name, documentation, registry=self.registry, **options)

    def counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, registry=self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics on `host:port` (0: a free port); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
