"""Gradual magnitude pruning on the servers, against single-process pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ps_common.errors import InvalidArgument
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from ps_worker.export import ExportedModel, apply_masks, export_model
from ps_worker.pruning import PruningConfig, magnitude_mask
from tests.integration.conftest import StartCluster
from tests.support.training import batches, loss_of

# Splits the 64x64 weight (16 KiB) into 4 KiB ranges over 3 servers.
SPLIT = ClientConfig(max_piece_bytes=4096, timeout=30, wait_timeout=60)
SCHEDULE = PruningConfig(final_sparsity=0.8, begin_step=4, end_step=20, frequency=4)
STEPS = 40


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


def _train_local_with_pruning(net: nn.Module, opt: torch.optim.Optimizer, data) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The single-process oracle: prune the whole tensor, mask grads and weights."""
    masks: dict[str, torch.Tensor] = {}
    params = dict(net.named_parameters())
    prunable = [n for n, p in params.items() if SCHEDULE.prunable(n, p)]
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        loss_of(net, x, y).backward()
        with torch.no_grad():
            sparsity = SCHEDULE.sparsity_at(step)
            if sparsity is not None:
                for name in prunable:
                    masks[name] = magnitude_mask(params[name], sparsity)
                    params[name].mul_(masks[name])
            for name, mask in masks.items():
                params[name].grad.mul_(mask)
        opt.step()
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask)
    return masks


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_masks_of_split_tensors_equal_single_process_pruning(start_cluster: StartCluster, make_opt) -> None:  # type: ignore[no-untyped-def]
    data = batches(STEPS, batch=16)
    local, remote = model(), model()
    local_masks = _train_local_with_pruning(local, make_opt(local), data)
    cluster = start_cluster(num_servers=3)
    with PSClient(cluster.addresses, 0, 1, SPLIT) as client:
        opt = DistributedOptimizer(make_opt(remote), client, named_parameters=remote.named_parameters(),
                                   pruning=SCHEDULE)  # fmt: skip
        assert any("[" in p.key for pieces in client.layout.pieces for p in pieces)  # really split
        for x, y in data:
            opt.zero_grad()
            loss_of(remote, x, y).backward()
            opt.step()
        remote_masks = opt.masks()
    assert set(remote_masks) == set(local_masks) == {"2.weight"}
    assert torch.equal(remote_masks["2.weight"], local_masks["2.weight"])
    torch.testing.assert_close(dict(remote.named_parameters()), dict(local.named_parameters()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_pruned_weights_stay_zero_through_optimizer_state(start_cluster: StartCluster, optimizer: str) -> None:
    data = batches(STEPS, batch=16)
    net = model()
    make = {
        "sgd-momentum": lambda: torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        "adam": lambda: torch.optim.Adam(net.parameters(), lr=1e-2),
    }[optimizer]
    cluster = start_cluster(num_servers=2)
    with PSClient(cluster.addresses, 0, 1, SPLIT) as client:
        opt = DistributedOptimizer(make(), client, named_parameters=net.named_parameters(), pruning=SCHEDULE)
        weight = dict(net.named_parameters())["2.weight"]
        for step, (x, y) in enumerate(data):
            opt.zero_grad()
            loss_of(net, x, y).backward()
            opt.step()
            if step > SCHEDULE.end_step:
                mask = opt.masks()["2.weight"]
                # Momentum and Adam moments of pruned weights are not zero, yet they stay pruned.
                assert torch.count_nonzero(weight.detach()[~mask]) == 0
        assert 1 - int(torch.count_nonzero(weight.detach())) / weight.numel() == pytest.approx(0.8, abs=0.01)


def test_sparse_pulls_send_fewer_bytes(start_cluster: StartCluster) -> None:
    net = nn.Linear(256, 256, bias=False)
    schedule = PruningConfig(final_sparsity=0.9, begin_step=0, end_step=0)
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1) as client:
        opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), client,
                                   named_parameters=net.named_parameters(), pruning=schedule)  # fmt: skip
        before = client.stats()[0].bytes_out
        net(torch.randn(4, 256)).sum().backward()
        opt.step()  # prunes to 90%, then pulls sparsely
        sent = client.stats()[0].bytes_out - before
    dense = 256 * 256 * 4
    assert sent <= 0.1 * 256 * 256 * (4 + 4) + 64  # one (index, value) pair per kept weight
    assert sent < 0.25 * dense


def test_export_loads_into_the_original_module_and_keeps_its_masks(start_cluster: StartCluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = batches(STEPS, batch=16)
    net = model()
    cluster = start_cluster(num_servers=2)
    with PSClient(cluster.addresses, 0, 1, SPLIT) as client:
        opt = DistributedOptimizer(torch.optim.Adam(net.parameters(), lr=1e-2), client,
                                   named_parameters=net.named_parameters(), pruning=SCHEDULE)  # fmt: skip
        for x, y in data:
            opt.zero_grad()
            loss_of(net, x, y).backward()
            opt.step()
        export_model(net, opt).save(tmp_path)
    exported = ExportedModel.load(tmp_path)
    fresh = model(seed=123)
    fresh.load_state_dict(exported.state_dict)
    x = torch.randn(32, 8)
    assert torch.equal(fresh(x), net(x))
    assert exported.sparsity()["2.weight"] == pytest.approx(0.8, abs=0.01)
    apply_masks(fresh, exported.masks)  # torch.nn.utils.prune takes over
    assert torch.equal(fresh(x), net(x))
    assert torch.equal(fresh[2].weight_mask.bool(), exported.masks["2.weight"])


def test_only_worker_zero_sends_thresholds(start_cluster: StartCluster) -> None:
    import grpc

    from ps_common.proto import ps_pb2 as pb
    from ps_common.proto import ps_pb2_grpc

    net = model()
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 2) as client:
        DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), client,
                             named_parameters=net.named_parameters(), pruning=SCHEDULE, mode="asp")  # fmt: skip
        with grpc.insecure_channel(cluster.addresses[0]) as channel:
            stub = ps_pb2_grpc.ParameterServerStub(channel)
            header = pb.PushHeader(worker_id=1, step=0, prune_thresholds={"2.weight": 0.1})
            with pytest.raises(grpc.RpcError) as info:
                stub.Push(iter([pb.PushRequest(header=header)]), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "only worker 0" in info.value.details()


def test_a_threshold_for_a_parameter_not_pruned_is_refused_though_it_shares_a_fused_key(
    start_cluster: StartCluster,
) -> None:
    net = model()
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, SPLIT) as client:
        DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), client,
                             named_parameters=net.named_parameters(), pruning=SCHEDULE)  # fmt: skip
        assert any(p.fused and "0.bias" in p.names for p in client.layout.pieces[0])
        before = cluster.servers[0].shard.stats()
        grads = {n: torch.ones_like(p) for n, p in net.named_parameters()}
        with pytest.raises(InvalidArgument, match="'0.bias' is not prunable"):
            client.push(grads, 0, prune_thresholds={"0.bias": 0.5})
        assert cluster.servers[0].shard.stats().keys == before.keys  # nothing applied
