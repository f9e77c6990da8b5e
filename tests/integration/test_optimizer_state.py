"""The optimizer's state_dict holds the servers' state in torch's own form,
and loading it on a fresh cluster resumes exactly (local torch.optim is the
oracle)."""

from __future__ import annotations

import io

import pytest
import torch

from ps_common.errors import FailedPrecondition, InvalidArgument
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from tests.integration.conftest import StartCluster
from tests.support.training import SPLITTING, batches, max_difference, small_model, train_local

CONFIGS = {"split-ranges": SPLITTING, "fused-keys": ClientConfig()}
OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
}


def _distributed(addresses: list[str], model: torch.nn.Module, make, config: ClientConfig):  # type: ignore[no-untyped-def]
    client = PSClient(addresses, 0, 1, config)
    return client, DistributedOptimizer(make(model.parameters()), client, named_parameters=model.named_parameters())


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_is_torchs_own_for_the_same_training(start_cluster: StartCluster, name: str, config: str) -> None:
    make = OPTIMIZERS[name]
    local, remote = small_model(), small_model()
    data = batches(15, batch=8)
    local_opt = make(local.parameters())
    train_local(local, local_opt, data)
    cluster = start_cluster(num_servers=2)
    client, opt = _distributed(cluster.addresses, remote, make, CONFIGS[config])
    with client:
        train_local(remote, opt, data)
        ours, torchs = opt.state_dict(), local_opt.state_dict()
    assert ours["param_groups"] == torchs["param_groups"]
    assert ours["state"].keys() == torchs["state"].keys()
    torch.testing.assert_close(ours["state"], torchs["state"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_saved_state_dict_resumes_exactly_on_a_fresh_cluster(start_cluster: StartCluster, name: str) -> None:
    make = OPTIMIZERS[name]
    oracle, remote = small_model(), small_model()
    first, second = batches(10, batch=8), batches(10, batch=8, seed=2)
    oracle_opt = make(oracle.parameters())
    train_local(oracle, oracle_opt, first + second)

    client, opt = _distributed(start_cluster(num_servers=2).addresses, remote, make, SPLITTING)
    with client:
        train_local(remote, opt, first)
        saved = io.BytesIO()
        torch.save({"model": remote.state_dict(), "optimizer": opt.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)

    resumed = small_model(seed=5)  # other weights, to be sure they come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    client, opt = _distributed(start_cluster(num_servers=3).addresses, resumed, make, SPLITTING)
    with client:
        opt.load_state_dict(checkpoint["optimizer"])
        train_local(resumed, opt, second)
    assert max_difference(oracle, resumed) <= 1e-6


def test_a_local_torch_optimizers_state_loads_and_a_late_or_wrong_one_is_refused(start_cluster: StartCluster) -> None:
    local, remote = small_model(), small_model()
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2)
    train_local(local, local_opt, batches(3, batch=8))
    remote.load_state_dict(local.state_dict())
    cluster = start_cluster(num_servers=2)
    client, opt = _distributed(cluster.addresses, remote, OPTIMIZERS["adam"], SPLITTING)
    with client:
        wrong = local_opt.state_dict()
        wrong["state"] = {i: {k: v for k, v in s.items() if k != "exp_avg_sq"} for i, s in wrong["state"].items()}
        with pytest.raises(InvalidArgument, match="keeps \\['exp_avg', 'exp_avg_sq', 'step'\\]"):
            opt.load_state_dict(wrong)
        assert opt.state_dict()["state"] == {}  # nothing was set
        opt.load_state_dict(local_opt.state_dict())
        torch.testing.assert_close(opt.state_dict()["state"], local_opt.state_dict()["state"], rtol=0, atol=0)
        train_local(remote, opt, batches(1, batch=8))
        with pytest.raises(FailedPrecondition, match="before the first step"):
            opt.load_state_dict(local_opt.state_dict())


def test_a_worker_rejoining_a_running_job_keeps_the_servers_newer_state(
    start_cluster: StartCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The usual resume code of a restarted worker loads its last snapshot:
    the servers' state, which the whole job has moved on with, stays; the
    worker learns where the job is from steps_done, and says so."""
    from concurrent.futures import ThreadPoolExecutor

    cluster = start_cluster(num_servers=2)
    models = [small_model(), small_model()]
    clients = [PSClient(cluster.addresses, rank, 2, SPLITTING) for rank in range(2)]
    opts = [DistributedOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2), c, named_parameters=m.named_parameters())
            for m, c in zip(models, clients, strict=True)]  # fmt: skip
    data = batches(4, batch=8)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda r: train_local(models[r], opts[r], [(x[r::2], y[r::2]) for x, y in data[:2]]), range(2)))
        snapshot = opts[1].state_dict()
        list(pool.map(lambda r: train_local(models[r], opts[r], [(x[r::2], y[r::2]) for x, y in data[2:3]]), range(2)))
        clients[1].close(leave=False)  # worker 1 restarts
        current = opts[0].state_dict()
        models[1] = small_model(seed=7)
        clients[1] = PSClient(cluster.addresses, 1, 2, SPLITTING)
        opts[1] = DistributedOptimizer(torch.optim.Adam(models[1].parameters(), lr=1e-2), clients[1],
                                       named_parameters=models[1].named_parameters())  # fmt: skip
        assert opts[1].steps_done == 3
        with caplog.at_level("WARNING"):
            opts[1].load_state_dict(snapshot)
        assert "rejoins the job at step 3" in caplog.text
        torch.testing.assert_close(opts[0].state_dict()["state"], current["state"], rtol=0, atol=0)
        list(pool.map(lambda r: train_local(models[r], opts[r], [(x[r::2], y[r::2]) for x, y in data[3:]]), range(2)))
    assert max_difference(models[0], models[1]) == 0.0
    for client in clients:
        client.close()


def test_a_state_one_server_refuses_changes_no_server(start_cluster: StartCluster) -> None:
    local, remote = small_model(), small_model()
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2)
    train_local(local, local_opt, batches(3, batch=8))
    client, opt = _distributed(start_cluster(num_servers=2).addresses, remote, OPTIMIZERS["adam"], SPLITTING)
    with client:
        holders = {piece.server for pieces in client.layout.pieces for piece in pieces}
        assert holders == {0, 1}  # both servers hold keys whose state is fine
        broken = local_opt.state_dict()
        broken["state"][3]["exp_avg"] = torch.zeros(2)  # 2.bias, 4 elements: one key, on one server
        with pytest.raises(InvalidArgument, match=r"2\.bias/exp_avg has shape \[2\]"):
            opt.load_state_dict(broken)
        assert opt.state_dict()["state"] == {}
