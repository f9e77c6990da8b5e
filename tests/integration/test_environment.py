"""A worker's script takes its place in the job from the environment a
launcher sets (ps-run, the deployment files, torchrun's names)."""

from __future__ import annotations

import pytest
import torch

from ps_common.config import config_from_env
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from ps_worker.environment import WorkerPlace
from tests.integration.conftest import StartCluster
from tests.support.training import batches, loss_of, small_model


def test_a_client_with_no_arguments_reads_the_launchers_environment(
    start_cluster: StartCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = start_cluster(num_servers=2)
    monkeypatch.setenv("PS_SERVERS", ",".join(cluster.addresses))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("PS_TIMEOUT", "7.5")
    monkeypatch.setenv("PS_FUSE_BELOW_BYTES", "0")
    model = small_model()
    with PSClient() as client:
        assert (client.addresses, client.worker_id, client.num_workers) == (cluster.addresses, 0, 1)
        assert client.config.timeout == 7.5 and client.config.fuse_below_bytes == 0
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), client,
                                   named_parameters=model.named_parameters())  # fmt: skip
        for x, y in batches(3, batch=4):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        assert all(stats.updates == 3 for stats in client.stats())
    with PSClient.from_env(ClientConfig(timeout=3.0)) as client:
        assert client.config.timeout == 3.0 and client.addresses == cluster.addresses


def test_our_names_and_torchruns_must_agree() -> None:
    env = {"PS_SERVERS": "a:1, b:2", "PS_WORKER_ID": "1", "RANK": "1", "WORLD_SIZE": "3"}
    assert WorkerPlace.from_env(env) == WorkerPlace(["a:1", "b:2"], 1, 3)
    with pytest.raises(ValueError, match="PS_WORKER_ID and RANK disagree"):
        WorkerPlace.from_env({**env, "RANK": "2"})
    with pytest.raises(ValueError, match="PS_SERVERS is not set"):
        WorkerPlace.from_env({"RANK": "0", "WORLD_SIZE": "1"})
    with pytest.raises(ValueError, match="neither PS_NUM_WORKERS nor WORLD_SIZE is set"):
        WorkerPlace.from_env({"PS_SERVERS": "a:1", "RANK": "0"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a whole number"):
        WorkerPlace.from_env({"PS_SERVERS": "a:1", "RANK": "0", "WORLD_SIZE": "two"})


def test_a_bad_setting_in_the_environment_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="PS_TIMEOUT='soon'"):
        config_from_env(ClientConfig, {"PS_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="PS_DATA_CHANNEL='maybe'"):
        config_from_env(ClientConfig, {"PS_DATA_CHANNEL": "maybe"})
    assert config_from_env(ClientConfig, {"PS_DATA_CHANNEL": "off"}).data_channel is False
