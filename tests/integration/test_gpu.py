"""CUDA workers: gradients and weights staged through pinned host memory."""

import pytest
import torch

from ps_server.harness import InProcessCluster
from tests.support.training import batches, max_difference, small_model, train_distributed, train_local

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none"),
]


def test_cuda_worker_reproduces_local_cpu_training() -> None:
    data = batches(50, batch=16)
    local = small_model()
    train_local(local, torch.optim.Adam(local.parameters(), lr=1e-2), data)
    remote = small_model().cuda()
    cuda_data = [(x.cuda(), y.cuda()) for x, y in data]
    with InProcessCluster(num_servers=2) as cluster:
        train_distributed(cluster.addresses, remote, torch.optim.Adam(remote.parameters(), lr=1e-2), cuda_data)
    assert all(p.is_cuda for p in remote.parameters())
    assert max_difference(local, remote.cpu()) <= 1e-5
