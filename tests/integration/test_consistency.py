"""BSP, ASP and SSP semantics on an in-process cluster, workers as threads."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import torch

from ps_common import assembly, codec, wire
from ps_common.errors import FailedPrecondition, WaitTimeout
from ps_common.proto import ps_pb2 as pb
from ps_server.harness import InProcessCluster
from ps_server.shard import Shard
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from tests.integration.conftest import StartCluster
from tests.support.training import SPLITTING, batches, loss_of, max_difference, small_model, train_local

WORKERS = 4


def _bsp_worker(addresses: list[str], rank: int, model: torch.nn.Module, data, make_opt, config) -> None:  # type: ignore[no-untyped-def]
    with PSClient(addresses, rank, WORKERS, config) as client:
        opt = DistributedOptimizer(make_opt(model), client, named_parameters=model.named_parameters(), mode="bsp")
        for x, y in data:
            quarter = slice(rank * len(x) // WORKERS, (rank + 1) * len(x) // WORKERS)
            opt.zero_grad()
            loss_of(model, x[quarter], y[quarter]).backward()
            opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    ],
    ids=["adam", "sgd-momentum"],
)
@pytest.mark.parametrize("pull_while_pushing", [True, False], ids=["pull-while-pushing", "push-then-pull"])
def test_bsp_four_workers_equal_single_process_on_the_whole_batch(
    start_cluster: StartCluster, make_opt, pull_while_pushing: bool
) -> None:  # type: ignore[no-untyped-def]
    data = batches(60, batch=32)
    oracle = small_model()
    train_local(oracle, make_opt(oracle), data)
    replicas = [small_model() for _ in range(WORKERS)]
    cluster = start_cluster(num_servers=2)
    with ThreadPoolExecutor(WORKERS) as pool:
        config = dataclasses.replace(SPLITTING, pull_while_pushing=pull_while_pushing)
        jobs = [
            pool.submit(_bsp_worker, cluster.addresses, r, replicas[r], data, make_opt, config) for r in range(WORKERS)
        ]
        for job in jobs:
            job.result(timeout=120)
    for replica in replicas:
        assert max_difference(oracle, replica) <= 1e-5


Workers = tuple[torch.nn.Module, DistributedOptimizer, torch.nn.Module, DistributedOptimizer]


@contextmanager
def _two_workers(servers: int, mode: str, **kw) -> Iterator[Workers]:  # type: ignore[no-untyped-def]
    """Workers 0 and 1 of a 2-worker SGD job (lr 0.1) on a fresh cluster; waits are short."""
    config = ClientConfig(timeout=10, wait_timeout=1.0, wait_log_interval=0.2)
    with InProcessCluster(num_servers=servers) as cluster, ExitStack() as clients:
        pairs = []
        for rank in range(2):
            model = torch.nn.Linear(2, 1)
            client = clients.enter_context(PSClient(cluster.addresses, rank, 2, config))
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), client,
                                       named_parameters=model.named_parameters(), mode=mode, **kw)  # fmt: skip
            pairs.append((model, opt))
        yield pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1]


def _step(model: torch.nn.Module, opt: DistributedOptimizer, grad_value: float) -> None:
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.full_like(p, grad_value)
    opt.step()


def test_bsp_worker_cannot_read_the_next_step_before_everyone_pushed() -> None:
    with _two_workers(2, "bsp") as (a, opt_a, b, opt_b):
        with pytest.raises(WaitTimeout, match=r"waiting for workers \[1\]"):
            _step(a, opt_a, 1.0)
        start = a.weight.detach().clone()
        # Worker 1 pushes: the step completes and worker 0 reads the average.
        _step(b, opt_b, 3.0)
        opt_a.client.pull(dict(a.named_parameters()), 1)
        assert torch.allclose(a.weight.detach(), start - 0.1 * 2.0)


def test_asp_applies_every_push_on_arrival_without_waiting() -> None:
    with _two_workers(1, "asp") as (a, opt_a, b, opt_b):
        start = a.weight.detach().clone()
        for _ in range(3):
            _step(a, opt_a, 1.0)  # worker 1 never pushes; worker 0 is not held back
        assert torch.allclose(a.weight.detach(), start - 0.3)
        _step(b, opt_b, 1.0)
        assert torch.allclose(b.weight.detach(), start - 0.4)
        stats = opt_a.client.stats()[0]
        assert [k.version for k in stats.keys] == [4]  # weight and bias, fused into one key


def test_asp_pull_message_keeps_the_weights_it_was_cut_from_when_an_update_comes_before_it_is_sent(
    start_cluster: StartCluster,
) -> None:
    """In ASP a push may be applied while a Pull answer is still on its way:
    each message is copied when cut (BSP sends views: nothing can change)."""
    cluster = start_cluster()
    with PSClient(cluster.addresses, 0, 1) as client:
        model = torch.nn.Linear(2, 1)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), client,
                                   named_parameters=model.named_parameters(), mode="asp")  # fmt: skip
        service = cluster.servers[0].service
        answer = service.pull(pb.PullRequest(worker_id=0, step=0), None)
        first = next(answer)  # cut, not yet sent (valid until the answer moves on)
        before = _decoded(first)
        _step(model, opt, 1.0)  # applied at once
        assert all(torch.equal(value, before[key]) for key, value in _decoded(first).items())
        answer.close()
        again = service.pull(pb.PullRequest(worker_id=0, step=0), None)
        after = _decoded(next(again))
        again.close()
        assert all(torch.allclose(after[key], before[key] - 0.1) for key in before)


def _decoded(parts: list[Any]) -> dict[str, torch.Tensor]:
    return assembly.receive([wire.decode_pull_strict(b"".join(parts))], assembly.new_tensor_for)


def test_asp_can_scale_a_stale_push_learning_rate_down_by_its_staleness() -> None:
    with _two_workers(1, "asp", scale_lr_by_staleness=True) as (a, opt_a, b, opt_b):
        start = a.weight.detach().clone()
        for _ in range(4):
            _step(a, opt_a, 1.0)  # fresh pushes: staleness 0, full learning rate
        # Worker 1 last read version 0; its push lands on version 4: lr / 4.
        _step(b, opt_b, 1.0)
        assert torch.allclose(b.weight.detach(), start - 0.4 - 0.1 / 4)


def test_ssp_fast_worker_waits_only_beyond_its_staleness_bound() -> None:
    staleness = 2
    with _two_workers(2, "ssp", staleness=staleness) as (fast, opt_f, slow, opt_s):
        for _ in range(staleness):
            _step(fast, opt_f, 1.0)  # up to `staleness` steps ahead: no waiting
        with pytest.raises(WaitTimeout, match=r"waiting for workers \[1\]"):
            _step(fast, opt_f, 1.0)  # one more: must wait for the slow worker
        # Once the slow worker pushes one step, the fast one may read again.
        released = threading.Event()

        def read_when_allowed() -> None:
            opt_f.client.pull(dict(fast.named_parameters()), staleness + 1)
            released.set()

        reader = threading.Thread(target=read_when_allowed)
        reader.start()
        assert not released.wait(0.3)
        _step(slow, opt_s, 1.0)
        reader.join(timeout=10)
        assert released.is_set()


def test_pull_final_waits_for_every_worker_in_asp() -> None:
    with _two_workers(1, "asp") as (a, opt_a, b, opt_b):
        _step(a, opt_a, 1.0)
        with pytest.raises(WaitTimeout):
            opt_a.pull_final()
        _step(b, opt_b, 1.0)
        opt_a.pull_final()
        assert torch.allclose(a.weight.detach(), b.weight.detach())


def test_a_bsp_pull_sends_each_key_as_soon_as_its_step_is_complete() -> None:
    options = pb.OptimizerSpec(name="SGD", groups=[codec.options_to_proto({"lr": 0.1})])
    keys = [pb.KeySpec(key=k, dtype=pb.FLOAT32, shape=[4]) for k in ("a", "b")]
    shard = Shard()
    job = pb.JobSpec(mode=pb.BSP, num_workers=2, optimizer=options, keys=keys)
    shard.init(job, {k.key: torch.zeros(4) for k in keys})
    for worker in (0, 1):
        shard.push(worker, 0, [], {"a": torch.ones(4)})
    reading = shard.pull(0, 1, [], False, timeout=5.0)
    first = next(reading)  # "b" still waits for both workers
    assert [(k.key, k.version) for k in first] == [("a", 1)]
    for worker in (0, 1):
        shard.push(worker, 0, [], {"b": torch.ones(4)})
    assert [(k.key, k.version) for k in next(reading)] == [("b", 1)]
    assert next(reading, None) is None


def test_push_pull_whose_push_is_refused_abandons_its_pull_and_raises_the_push_error(
    start_cluster: StartCluster,
) -> None:
    config = ClientConfig(timeout=10, wait_log_interval=0.2)
    model = torch.nn.Linear(2, 1)
    cluster = start_cluster(num_servers=2)
    with PSClient(cluster.addresses, 0, 2, config) as client:
        client.init(list(model.named_parameters()), torch.optim.SGD(model.parameters(), lr=0.1))
        grads = {name: torch.ones_like(p) for name, p in model.named_parameters()}
        into = {name: torch.full_like(p, 7.0) for name, p in model.named_parameters()}
        started = time.monotonic()
        with pytest.raises(FailedPrecondition, match="in BSP a worker pulls each step's result"):
            client.push_pull(grads, 3, into)  # the servers are at step 0
        assert time.monotonic() - started < 5  # the pull, waiting for step 4, was not waited out
        assert all(bool((t == 7.0).all()) for t in into.values())
        assert [k.version for s in client.stats() for k in s.keys] == [0, 0]
