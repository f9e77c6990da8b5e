"""Prometheus metrics of one server, on its own registry (an in-process
cluster runs several servers in one process).

Counters and gauges are read from the shard at scrape time, so the hot path
pays nothing for them; the two histograms are observed as updates happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ps_common.metrics import Metrics

if TYPE_CHECKING:
    from ps_server.shard import Shard

# A worker counts as connected while it pushed within this many seconds.
CONNECTED_WITHIN_SECONDS = 60.0


class ServerMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.update_seconds = self.histogram(
            "ps_update_duration_seconds", "Time to apply one optimizer update to the shard"
        )
        staleness_buckets = (0, 1, 2, 4, 8, 16, 32, 64)
        self.push_staleness = self.histogram(
            "ps_push_staleness_updates", "Updates a push missed since its worker last read (ASP/SSP)",
            buckets=staleness_buckets,
        )  # fmt: skip

    def watch(self, shard: Shard) -> None:
        self.registry.register(_ShardCollector(shard))

    def watch_data_channel(self, calls: Callable[[], Mapping[str, int]]) -> None:
        """Export `calls()`, the data channel's calls by socket kind."""
        self.registry.register(_CallsCollector(calls))


class _CallsCollector(Collector):
    def __init__(self, calls: Callable[[], Mapping[str, int]]) -> None:
        self._calls = calls

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("ps_data_channel_calls", "Calls served on the data channel", labels=["socket"])
        for socket, count in sorted(self._calls().items()):
            family.add_metric([socket], count)
        yield family


class _ShardCollector(Collector):
    def __init__(self, shard: Shard) -> None:
        self._shard = shard

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        snapshot = self._shard.metrics_snapshot()
        counters = snapshot["counters"]
        for name, help_text, counter in (
            ("ps_pushes", "Push requests accepted (a worker's push may take several)", "pushes"),
            ("ps_pulls", "Pull calls answered", "pulls"),
            ("ps_updates", "Optimizer updates applied (one per push request)", "updates"),
            ("ps_received_bytes", "Gradient bytes received", "bytes_in"),
            ("ps_sent_bytes", "Weight bytes sent", "bytes_out"),
            ("ps_shared_bytes", "Weight bytes workers on this host read from shared memory instead", "bytes_shared"),
            ("ps_duplicate_keys", "Pushed keys ignored as retries of an applied push", "duplicate_keys"),
        ):
            yield CounterMetricFamily(name, help_text, value=counters.get(counter, 0))
        rejected = CounterMetricFamily("ps_rejected_requests", "Requests refused, by status", labels=["reason"])
        for name, value in counters.items():
            if name.startswith("rejected_"):
                rejected.add_metric([name.removeprefix("rejected_")], value)
        yield rejected
        yield GaugeMetricFamily(
            "ps_shard_version", "Lowest update count over the shard's keys", value=snapshot["version"]
        )
        yield GaugeMetricFamily("ps_shard_bytes", "Bytes of weights held", value=snapshot["bytes"])
        yield GaugeMetricFamily("ps_shard_keys", "Keys held", value=snapshot["keys"])
        yield GaugeMetricFamily(
            "ps_buffer_pool_idle_bytes", "Bytes of push and pull buffers waiting to be reused",
            value=snapshot["buffer_pool_bytes"],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "ps_pull_cast_bytes", "Bytes of the bf16 copies of the weights kept for half-precision pulls",
            value=snapshot["pull_cast_bytes"],
        )  # fmt: skip
        now = time.time()
        connected = sum(1 for t in snapshot["last_push"].values() if now - t < CONNECTED_WITHIN_SECONDS)
        yield GaugeMetricFamily("ps_connected_workers", "Workers that pushed in the last minute", value=connected)
