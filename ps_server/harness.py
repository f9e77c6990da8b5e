"""A whole cluster of parameter servers inside one process, for tests.

    with InProcessCluster(num_servers=3) as cluster:
        client = PSClient(cluster.addresses, worker_id=0, num_workers=1)

The servers are real servers on free loopback ports; workers connect to
them exactly as they would to remote ones. Leaving the block stops them and
frees their ports and threads. With `config.checkpoint_dir`, server i keeps
its checkpoints in `<checkpoint_dir>/server-<i>`, so a new cluster on the
same directory resumes where the last one stopped.
"""

from __future__ import annotations

import dataclasses
from types import TracebackType

from ps_server.config import ServerConfig
from ps_server.server import RunningServer, start_server


class InProcessCluster:
    def __init__(self, num_servers: int = 1, config: ServerConfig | None = None) -> None:
        if num_servers < 1:
            raise ValueError(f"a cluster needs at least one server, got {num_servers}")
        self._config = dataclasses.replace(config or ServerConfig(), host="127.0.0.1", port=0)
        self._num_servers = num_servers
        self.servers: list[RunningServer] = []

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def start(self) -> InProcessCluster:
        try:
            for index in range(self._num_servers):
                self.servers.append(start_server(self._server_config(index)))
        except BaseException:
            self.stop()
            raise
        return self

    def _server_config(self, index: int) -> ServerConfig:
        """Each server checkpoints into its own subdirectory, found again on restart."""
        if self._config.checkpoint_dir is None:
            return self._config
        return dataclasses.replace(self._config, checkpoint_dir=f"{self._config.checkpoint_dir}/server-{index}")

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=0)
        self.servers.clear()

    def __enter__(self) -> InProcessCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
