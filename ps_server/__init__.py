"""Parameter servers: processes that hold shards of a model and apply
torch.optim updates to them. Run one process per shard with `ps-server`;
tests use `ps_server.harness.InProcessCluster`."""

from ps_server.config import ServerConfig
from ps_server.harness import InProcessCluster
from ps_server.server import RunningServer, start_server

__all__ = ["InProcessCluster", "RunningServer", "ServerConfig", "start_server"]
