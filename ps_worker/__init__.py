"""Workers: compute gradients with torch, push them to the parameter servers
and pull fresh weights. Users need two names:

    from ps_worker import PSClient, DistributedOptimizer
"""

from ps_worker.client import PSClient
from ps_worker.client_config import ClientConfig
from ps_worker.optimizer import DistributedOptimizer

__all__ = ["ClientConfig", "DistributedOptimizer", "PSClient"]
