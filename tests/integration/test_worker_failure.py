"""A worker that vanishes does not hang BSP; a restarted one rejoins."""

from __future__ import annotations

import dataclasses

import torch

from ps_server.config import ServerConfig
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from tests.integration.conftest import StartCluster

TIMEOUT = 1.0
SERVER = dataclasses.replace(ServerConfig(), worker_timeout=TIMEOUT)
CLIENT = ClientConfig(timeout=10, wait_timeout=30, wait_log_interval=0.5, heartbeat_interval=0.2)
LR = 0.1


def _worker(addresses: list[str], rank: int) -> tuple[torch.nn.Linear, PSClient, DistributedOptimizer]:
    model = torch.nn.Linear(2, 1, bias=False)
    client = PSClient(addresses, rank, 3, CLIENT)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), client,
                               named_parameters=model.named_parameters())  # fmt: skip
    return model, client, opt


def _step(model: torch.nn.Linear, opt: DistributedOptimizer, grad: float) -> None:
    model.weight.grad = torch.full_like(model.weight, grad)
    opt.step()


def test_bsp_completes_without_a_vanished_worker_and_takes_it_back(start_cluster: StartCluster) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cluster = start_cluster(num_servers=2, config=SERVER)
    with ThreadPoolExecutor(3) as pool:
        workers = [_worker(cluster.addresses, r) for r in range(3)]
        for _ in range(3):  # everyone: gradients 1, 2, 3 average to 2
            list(pool.map(lambda r: _step(workers[r][0], workers[r][2], float(r + 1)), range(3)))
        start = workers[0][0].weight.detach().clone()
        workers[2][1].close(leave=False)  # worker 2 vanishes: no pushes, no heartbeats, no goodbye

        # Workers 0 and 1 go on; their steps complete once worker 2 is given up,
        # averaging over the two who contributed: (1 + 2) / 2.
        for _ in range(4):
            list(pool.map(lambda r: _step(workers[r][0], workers[r][2], float(r + 1)), range(2)))
        assert torch.allclose(workers[0][0].weight.detach(), start - 4 * LR * 1.5)
        stats = workers[0][1].stats()
        assert [s.updates for s in stats if s.keys] == [7]

        # Worker 2 restarts: it resumes at the step the others reached and counts again.
        model2, client2, opt2 = _worker(cluster.addresses, 2)
        assert opt2.steps_done == 7
        assert torch.equal(model2.weight.detach(), workers[0][0].weight.detach())
        before = model2.weight.detach().clone()
        everyone = [workers[0], workers[1], (model2, client2, opt2)]
        list(pool.map(lambda r: _step(everyone[r][0], everyone[r][2], float(r + 1)), range(3)))
        assert torch.allclose(model2.weight.detach(), before - LR * 2.0)
        counters = next(s.shard.counters for s in cluster.servers if s.shard.slots)
        assert counters["workers_departed"] == 1 and counters["workers_rejoined"] == 1
        for _, client, _ in everyone[:2]:
            client.close()
        client2.close()


def test_a_worker_that_closes_tells_the_servers_which_stop_waiting_for_it_at_once(start_cluster: StartCluster) -> None:
    """The worker timeout is a minute; the others' steps go on at once,
    averaging only their own gradients from then on."""
    from concurrent.futures import ThreadPoolExecutor

    cluster = start_cluster(num_servers=2, config=dataclasses.replace(ServerConfig(), worker_timeout=60.0))
    impatient = dataclasses.replace(CLIENT, wait_timeout=5.0)
    workers = []
    for rank in range(3):
        model = torch.nn.Linear(2, 1, bias=False)
        client = PSClient(cluster.addresses, rank, 3, impatient)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), client,
                                   named_parameters=model.named_parameters())  # fmt: skip
        workers.append((model, client, opt))
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda r: _step(workers[r][0], workers[r][2], float(r + 1)), range(3)))  # average 2
        start = workers[0][0].weight.detach().clone()
        workers[2][1].close()
        for _ in range(3):  # a WaitTimeout after 5 s if the servers still waited for worker 2
            list(pool.map(lambda r: _step(workers[r][0], workers[r][2], float(r + 1)), range(2)))
    assert torch.allclose(workers[0][0].weight.detach(), start - 3 * LR * 1.5)
    counters = next(s.shard.counters for s in cluster.servers if s.shard.slots)
    assert counters["workers_left"] == 1 and counters["workers_departed"] == 0
    for _, client, _ in workers[:2]:
        client.close()


def test_a_bsp_step_waits_for_every_live_worker_not_for_a_count() -> None:
    """Worker 0 pushes step 0 and leaves: worker 1's push alone must not
    complete the step, which still waits for worker 2; the average is over
    the three who contributed."""
    from ps_common import codec
    from ps_common.proto import ps_pb2 as pb
    from ps_server.shard import Shard

    job = pb.JobSpec(mode=pb.BSP, num_workers=3, optimizer=pb.OptimizerSpec(
        name="SGD", groups=[codec.options_to_proto({"lr": 1.0})]),
        keys=[pb.KeySpec(key="w", dtype=pb.FLOAT32, shape=[1])])  # fmt: skip
    shard = Shard(worker_timeout=60.0)
    shard.init(job, {"w": torch.zeros(1)})
    for worker in range(3):
        shard.hello(worker, 3)
    shard.push(0, 0, [], {"w": torch.full((1,), 3.0)})
    shard.leave(0)
    shard.push(1, 0, [], {"w": torch.full((1,), 6.0)})
    assert shard.slots["w"].version == 0  # worker 2 has not pushed
    shard.push(2, 0, [], {"w": torch.full((1,), 9.0)})
    assert shard.slots["w"].version == 1 and torch.equal(shard.slots["w"].value, torch.full((1,), -6.0))
    shard.close()
