"""Small parameters fused into shared keys: trained exactly as torch.optim
trains them locally, with or without overlap; a step that would update
only some of a key's parameters is refused, not approximated."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from ps_common.errors import InvalidArgument
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from tests.integration.conftest import StartCluster
from tests.support.training import batches, loss_of, max_difference, train_local

CONFIG = ClientConfig(timeout=30, wait_timeout=60)


def layered_model(seed: int = 0) -> nn.Module:
    """Ten parameters of 16 to 256 elements, as layer norms and biases make them."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4)
    )


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on the matrices only, as transformers are usually trained: two groups."""
    matrices = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": matrices}, {"params": others, "weight_decay": 0.0}], lr=1e-2)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize("pull_while_pushing", [False, True])
def test_fused_parameters_train_what_local_torch_optim_trains(
    start_cluster: StartCluster, overlap: bool, pull_while_pushing: bool
) -> None:
    local, remote = layered_model(), layered_model()
    data = batches(40, batch=16)
    train_local(local, adamw(local), data)
    config = dataclasses.replace(CONFIG, pull_while_pushing=pull_while_pushing)
    cluster = start_cluster(num_servers=2)
    with PSClient(cluster.addresses, 0, 1, config) as client:
        opt = DistributedOptimizer(adamw(remote), client, named_parameters=remote.named_parameters(), overlap=overlap)
        train_local(remote, opt, data)
        opt.synchronize()
        pieces = [p for server in client.layout.pieces for p in server]
        opt.close()
    group_of = {name: int(p.dim() <= 1) for name, p in remote.named_parameters()}
    fused = [p for p in pieces if p.fused]
    assert fused and len(pieces) < len(group_of)  # fewer keys than parameters
    assert all(len({group_of[n] for n in p.names}) == 1 for p in fused)  # one param group a key
    assert {p.server for p in pieces} == {0, 1}
    assert max_difference(local, remote) <= 1e-6


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_two_bsp_workers_on_fused_keys_equal_one_process_on_the_whole_batch(
    start_cluster: StartCluster, overlap: bool
) -> None:
    data = batches(30, batch=16)
    oracle = layered_model()
    train_local(oracle, adamw(oracle), data)
    replicas = [layered_model(), layered_model()]

    def work(rank: int) -> None:
        model = replicas[rank]
        with PSClient(cluster.addresses, rank, 2, CONFIG) as client:
            opt = DistributedOptimizer(adamw(model), client, named_parameters=model.named_parameters(), overlap=overlap)
            assert any(p.fused for server in client.layout.pieces for p in server)
            train_local(model, opt, [(x[rank::2], y[rank::2]) for x, y in data])
            opt.pull_final()
            opt.close()

    cluster = start_cluster(num_servers=2)
    with ThreadPoolExecutor(2) as pool:
        for job in [pool.submit(work, rank) for rank in range(2)]:
            job.result(timeout=120)
    for replica in replicas:
        assert max_difference(oracle, replica) <= 1e-5


def _with_unused(model: nn.Module) -> nn.Module:
    model[3].register_parameter("unused", nn.Parameter(torch.ones(3)))
    return model


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_a_step_without_gradients_for_some_of_a_keys_parameters_is_refused(
    start_cluster: StartCluster, overlap: bool
) -> None:
    model = _with_unused(layered_model())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batches(1, batch=8)[0]
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, CONFIG) as client:
        opt = DistributedOptimizer(adamw(model), client, named_parameters=model.named_parameters(), overlap=overlap)
        assert any(p.fused and "3.unused" in p.names for p in client.layout.pieces[0])
        loss_of(model, x, y).backward()
        with pytest.raises(InvalidArgument, match=r"none for \['3.unused'\].*fuse_below_bytes=0"):
            opt.step()
        opt.close()
        stored = {n: torch.empty_like(t) for n, t in start.items()}
        client.pull(stored, step=0)
    for name, tensor in start.items():
        assert torch.equal(stored[name], tensor), name  # the servers applied nothing


def test_without_fusion_a_parameter_without_gradient_is_left_alone_like_torch_does(start_cluster: StartCluster) -> None:
    local, remote = _with_unused(layered_model()), _with_unused(layered_model())
    data = batches(10, batch=8)
    train_local(local, adamw(local), data)
    config = dataclasses.replace(CONFIG, fuse_below_bytes=0)
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, config) as client:
        opt = DistributedOptimizer(adamw(remote), client, named_parameters=remote.named_parameters())
        assert not any(p.fused for p in client.layout.pieces[0])
        train_local(remote, opt, data)
    assert torch.equal(remote[3].unused.detach(), torch.ones(3))
    assert max_difference(local, remote) <= 1e-6


def test_a_frozen_parameter_keeps_a_key_of_its_own_and_its_value(start_cluster: StartCluster) -> None:
    local, remote = layered_model(), layered_model()
    for model in (local, remote):
        model[1].weight.requires_grad_(False)  # in the optimizer, never with a gradient
    data = batches(10, batch=8)
    train_local(local, adamw(local), data)
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, CONFIG) as client:
        opt = DistributedOptimizer(adamw(remote), client, named_parameters=remote.named_parameters())
        assert [p.fused for p in client.layout.pieces_of["1.weight"]] == [False]
        assert any(p.fused for p in client.layout.pieces[0])
        train_local(remote, opt, data)
    assert torch.equal(remote[1].weight.detach(), torch.ones(16))
    assert max_difference(local, remote) <= 1e-6
