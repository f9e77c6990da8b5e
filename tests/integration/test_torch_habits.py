"""Habits of ordinary torch training code between backward() and step():
kept where the result is torch's, refused loudly where it could not be."""

from __future__ import annotations

import pytest
import torch

from ps_common.errors import InvalidArgument
from ps_worker import DistributedOptimizer, PSClient
from tests.integration.conftest import StartCluster
from tests.support.training import SPLITTING, batches, loss_of, max_difference, small_model


def _overlapped(addresses: list[str], model: torch.nn.Module) -> tuple[PSClient, DistributedOptimizer]:
    client = PSClient(addresses, 0, 1, SPLITTING)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), client,
                               named_parameters=model.named_parameters(), overlap=True)  # fmt: skip
    return client, opt


def test_clipping_after_an_overlapped_backward_is_refused_and_applies_nothing(start_cluster: StartCluster) -> None:
    cluster = start_cluster(num_servers=2)
    model = small_model()
    client, opt = _overlapped(cluster.addresses, model)
    with client:
        (x, y), = batches(1, batch=8)  # fmt: skip
        opt.zero_grad()
        loss_of(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        with pytest.raises(InvalidArgument, match="changed after backward pushed them.*clipping"):
            opt.step()
        assert all(stats.updates == 0 for stats in client.stats())
        opt.close()


def test_a_grad_scaler_after_an_overlapped_backward_is_refused(start_cluster: StartCluster) -> None:
    cluster = start_cluster(num_servers=1)
    model = small_model()
    client, opt = _overlapped(cluster.addresses, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with client:
        (x, y), = batches(1, batch=8)  # fmt: skip
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        with pytest.raises(InvalidArgument, match="GradScaler's unscale_"):
            scaler.step(opt)
        assert all(stats.updates == 0 for stats in client.stats())
        opt.close()


def test_a_grad_scaler_without_overlap_trains_as_local_torch(start_cluster: StartCluster) -> None:
    local, remote = small_model(), small_model()
    data = batches(20, batch=8)
    cluster = start_cluster(num_servers=2)
    with PSClient(cluster.addresses, 0, 1, SPLITTING) as client:
        dist = DistributedOptimizer(torch.optim.Adam(remote.parameters(), lr=1e-2), client,
                                    named_parameters=remote.named_parameters())  # fmt: skip
        local_opt = torch.optim.Adam(local.parameters(), lr=1e-2)
        for model, opt in ((local, local_opt), (remote, dist)):
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            for x, y in data:
                opt.zero_grad()
                scaler.scale(loss_of(model, x, y)).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)  # one worker: its own is the average
                scaler.step(opt)
                scaler.update()
    assert max_difference(local, remote) <= 1e-6
