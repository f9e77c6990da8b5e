"""Integration tests: real servers in this process (InProcessCluster), reached
by real clients over loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ps_server import InProcessCluster, ServerConfig

StartCluster = Callable[..., InProcessCluster]


@pytest.fixture
def start_cluster() -> Iterator[StartCluster]:
    """`start_cluster(num_servers=1, config=None)`: a started cluster of free
    loopback ports, stopped (ports and threads freed) once the test ends."""
    started: list[InProcessCluster] = []

    def start(num_servers: int = 1, config: ServerConfig | None = None) -> InProcessCluster:
        cluster = InProcessCluster(num_servers, config).start()
        started.append(cluster)
        return cluster

    yield start
    for cluster in reversed(started):
        cluster.stop()
