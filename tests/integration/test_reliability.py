"""Checkpoints, restarts and retries: nothing lost beyond the checkpoint policy."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grpc
import pytest
import torch

from ps_common import codec
from ps_common.proto import ps_pb2 as pb
from ps_common.proto import ps_pb2_grpc
from ps_server.checkpointer import Checkpointer
from ps_server.config import ServerConfig
from ps_server.harness import InProcessCluster
from ps_server.shard import Shard
from ps_server.storage import ShardState, latest_checkpoint, write_checkpoint
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from ps_worker.ctl import main as ctl_main
from ps_worker.export import ExportedModel
from tests.integration.conftest import StartCluster
from tests.support.training import batches, loss_of, max_difference, small_model, train_distributed, train_local

QUICK = ClientConfig(timeout=10, wait_timeout=30, wait_log_interval=1)


def _state(value: float) -> ShardState:
    return ShardState({"w": torch.full((4,), value)}, {"note": value})


def test_checkpoints_are_atomic_and_a_damaged_newest_falls_back_to_the_previous(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, _state(1.0))
    newest = write_checkpoint(tmp_path, _state(2.0))
    (tmp_path / ".ckpt-00000003.tmp").mkdir()  # a writer killed half-way leaves only this
    path, state = latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert path == newest and state.meta["note"] == 2.0
    with open(newest / "tensors.safetensors", "r+b") as f:  # a torn or flipped write
        f.seek(-2, 2)
        f.write(b"\xff\xff")
    path, state = latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert state.meta["note"] == 1.0 and torch.equal(state.tensors["w"], torch.full((4,), 1.0))


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    for value in range(5):
        write_checkpoint(tmp_path, _state(float(value)), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004", "ckpt-00000005"]
    assert "pickle" not in json.dumps(json.loads((tmp_path / "ckpt-00000005" / "meta.json").read_text()))


def _config(directory: Path) -> ServerConfig:
    return dataclasses.replace(ServerConfig(), checkpoint_dir=str(directory), checkpoint_every_updates=0,
                               checkpoint_every_seconds=0)  # fmt: skip


@pytest.mark.parametrize("make_opt", [
    lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True),
], ids=["adam", "sgd-nesterov"])  # fmt: skip
def test_restart_from_checkpoint_continues_exactly(tmp_path: Path, make_opt) -> None:  # type: ignore[no-untyped-def]
    """Stop after 20 steps (a checkpoint is written on shutdown), restart from it,
    train 20 more: identical to 40 uninterrupted local steps, so weights,
    optimizer state and versions all survived."""
    data = batches(40, batch=8)
    oracle = small_model()
    train_local(oracle, make_opt(oracle), data)
    model = small_model()
    for resumed_at, part in ((0, data[:20]), (20, data[20:])):
        with (
            InProcessCluster(num_servers=2, config=_config(tmp_path)) as cluster,
            PSClient(cluster.addresses, 0, 1, QUICK) as client,
        ):
            opt = DistributedOptimizer(make_opt(model), client, named_parameters=model.named_parameters())
            assert opt.steps_done == resumed_at
            for x, y in part:
                opt.zero_grad()
                loss_of(model, x, y).backward()
                opt.step()
    assert max_difference(oracle, model) <= 1e-6


def test_checkpoint_on_request_and_export_of_the_whole_model(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = small_model()
    with InProcessCluster(num_servers=2, config=_config(tmp_path / "ckpt")) as cluster:
        train_distributed(
            cluster.addresses, model, torch.optim.SGD(model.parameters(), lr=0.1), batches(5, 4), config=QUICK
        )
        servers = ",".join(cluster.addresses)
        assert ctl_main(["checkpoint", "--servers", servers]) == 0
        assert "version 5" in capsys.readouterr().out
        assert ctl_main(["export", "--servers", servers, "--out", str(tmp_path / "export")]) == 0
    exported = ExportedModel.load(tmp_path / "export")
    fresh = small_model(seed=7)
    fresh.load_state_dict(exported.state_dict)
    assert max_difference(fresh, model) == 0


def test_push_retried_after_a_lost_response_is_applied_once(start_cluster: StartCluster) -> None:
    """The server applied the push, the answer never arrived, the client sends it again."""
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, QUICK) as client:
        model = torch.nn.Linear(3, 1)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), client,
                                   named_parameters=model.named_parameters())  # fmt: skip
        start = model.weight.detach().clone()
        model(torch.ones(1, 3)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        client.push(grads, step=0)  # applied; pretend the response was lost
        client.push(grads, step=0)  # the retry
        client.pull(dict(model.named_parameters()), step=1)
        assert torch.equal(model.weight.detach(), start - 0.1 * torch.ones(1, 3))
        stats = client.stats()[0]
        assert stats.updates == 1 and [k.version for k in stats.keys] == [1]  # weight and bias fused
        del opt


def test_ssp_push_older_than_the_bound_is_refused_and_changes_nothing(start_cluster: StartCluster) -> None:
    cluster = start_cluster(num_servers=1)
    fast, slow = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    client_f = PSClient(cluster.addresses, 0, 2, QUICK)
    opt_f = DistributedOptimizer(torch.optim.SGD(fast.parameters(), lr=0.1), client_f,
                                 named_parameters=fast.named_parameters(), mode="ssp", staleness=1)  # fmt: skip
    client_s = PSClient(cluster.addresses, 1, 2, QUICK)
    DistributedOptimizer(torch.optim.SGD(slow.parameters(), lr=0.1), client_s,
                         named_parameters=slow.named_parameters(), mode="ssp", staleness=1)  # fmt: skip
    grads = {n: torch.ones_like(p) for n, p in fast.named_parameters()}
    for step in range(3):
        client_s.push(grads, step)  # the "slow" worker races ahead without reading
    before = client_f.stats()[0]
    with grpc.insecure_channel(cluster.addresses[0]) as channel:
        header = pb.PushRequest(header=pb.PushHeader(worker_id=0, step=0))
        with pytest.raises(grpc.RpcError) as info:
            ps_pb2_grpc.ParameterServerStub(channel).Push(iter([header]), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "staleness bound" in info.value.details()
    after = client_f.stats()[0]
    assert [k.version for k in after.keys] == [k.version for k in before.keys] and after.updates == before.updates
    del opt_f
    client_f.close()
    client_s.close()


def test_bsp_shard_restored_while_workers_were_a_step_apart_resumes_at_the_latest_step() -> None:
    """The server died after step 2 completed: worker 0 had not read it yet and
    pushes step 2 again, worker 1 had and pushes step 3. Both must be taken."""
    options = pb.OptimizerSpec(name="SGD", groups=[codec.options_to_proto({"lr": 0.1})])
    job = pb.JobSpec(mode=pb.BSP, num_workers=2, optimizer=options,
                     keys=[pb.KeySpec(key="w", dtype=pb.FLOAT32, shape=[4])])  # fmt: skip
    shard = Shard()
    shard.init(job, {"w": torch.zeros(4)})
    for worker in (0, 1):
        shard.push(worker, 0, [], {"w": torch.ones(4)})
    state = shard.snapshot()
    assert state is not None
    restarted = Shard()
    restarted.restore(state)  # at version 1: steps 1 and 2 are lost
    restarted.push(0, 2, [], {"w": torch.ones(4)})
    restarted.push(1, 3, [], {"w": torch.ones(4)})  # refused before: "which is at step 2"
    assert next(restarted.pull(0, 3, [], False, timeout=1.0))[0].version == 3  # worker 0 may read step 3
    restarted.push(0, 3, [], {"w": torch.ones(4)})
    assert restarted.stats().keys[0].version == 4


def test_checkpoints_by_count_follow_steps_however_many_requests_a_push_takes(tmp_path: Path) -> None:
    options = pb.OptimizerSpec(name="SGD", groups=[codec.options_to_proto({"lr": 0.1})])
    keys = [pb.KeySpec(key=k, dtype=pb.FLOAT32, shape=[4]) for k in ("a", "b")]
    shard = Shard()
    shard.init(
        pb.JobSpec(mode=pb.ASP, num_workers=1, optimizer=options, keys=keys), {k.key: torch.zeros(4) for k in keys}
    )
    checkpointer = Checkpointer(shard, tmp_path, every_updates=2, every_seconds=0, keep=10)
    checkpointer.write_now()  # the job itself
    for step in range(3):
        for key in ("a", "b"):  # each step's push in two requests: two optimizer updates
            shard.push(0, step, [], {key: torch.ones(4)})
        assert checkpointer._due() == (step == 1)  # noqa: SLF001
        if checkpointer._due():  # noqa: SLF001
            checkpointer.write_now()
    checkpointer.stop()  # step 2 is not in a checkpoint yet: a last one on the way out
    assert len(list(tmp_path.glob("ckpt-*"))) == 3
