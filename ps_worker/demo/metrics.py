"""Prometheus metrics of one worker: step time, communication time, samples."""

from __future__ import annotations

from ps_common.metrics import Metrics


class WorkerMetrics(Metrics):
    """samples/s is rate(ps_worker_samples_total)."""

    def __init__(self) -> None:
        super().__init__()
        self.step_seconds = self.histogram("ps_worker_step_duration_seconds", "Wall time of one training step")
        self.communication_seconds = self.counter(
            "ps_worker_communication_seconds", "Time spent pushing gradients and pulling weights"
        )
        self.samples = self.counter("ps_worker_samples", "Training samples processed")
