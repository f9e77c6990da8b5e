"""Prometheus metrics of one worker: step time, communication time, samples."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram(
            "ps_worker_step_duration_seconds", "Wall time of one training step", registry=self.registry
        )
        self.communication_seconds = Counter(
            "ps_worker_communication_seconds",
            "Time spent pushing gradients and pulling weights",
            registry=self.registry,
        )
        self.samples = Counter("ps_worker_samples", "Training samples processed", registry=self.registry)
        self._http: Any = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics; returns the bound port. samples/s is rate(ps_worker_samples_total)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
