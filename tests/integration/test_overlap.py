"""Overlap (push during backward, pull in the background) trains exactly the
weights the plain path does."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ps_common.errors import InvalidArgument
from ps_server.harness import InProcessCluster
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from ps_worker.compression import Compression
from tests.integration.conftest import StartCluster
from tests.support.training import SPLITTING, batches, loss_of, small_model

WORKERS = 2
# As over links: the next step's pull goes with the push.
PULL_DURING_PUSH = dataclasses.replace(SPLITTING, pull_while_pushing=True)


def _train(
    addresses: list[str], rank: int, model: torch.nn.Module, overlap: bool, data, compression, config: ClientConfig
) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    with PSClient(addresses, rank, WORKERS, config) as client:
        opt = DistributedOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2), client,
            named_parameters=model.named_parameters(), mode="bsp", overlap=overlap, compression=compression,
        )  # fmt: skip
        for x, y in data:
            half = slice(rank * len(x) // WORKERS, (rank + 1) * len(x) // WORKERS)
            opt.zero_grad()
            loss_of(model, x[half], y[half]).backward()
            opt.step()
        opt.pull_final()
        opt.close()
    return model


def _bsp(overlap: bool, data, compression: Compression, config: ClientConfig) -> list[torch.nn.Module]:  # type: ignore[no-untyped-def]
    models = [small_model() for _ in range(WORKERS)]  # here: small_model seeds torch's global generator
    with InProcessCluster(num_servers=2) as cluster, ThreadPoolExecutor(WORKERS) as pool:
        jobs = [
            pool.submit(_train, cluster.addresses, r, models[r], overlap, data, compression, config)
            for r in range(WORKERS)
        ]
        return [job.result(timeout=120) for job in jobs]


@pytest.mark.parametrize(
    ("compression", "config"),
    [(Compression(), SPLITTING), (Compression(pull="bf16"), SPLITTING), (Compression(), PULL_DURING_PUSH)],
    ids=["fp32", "bf16-pulls", "pull-during-push"],
)
def test_overlap_gives_the_same_weights_as_the_plain_path_in_bsp(
    compression: Compression, config: ClientConfig
) -> None:
    data = batches(40, batch=16)
    plain = _bsp(False, data, compression, config)
    overlapped = _bsp(True, data, compression, config)
    for a, b in zip(plain, overlapped, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
    assert not torch.equal(plain[0][0].weight, small_model()[0].weight)  # it did train


def _overlapped_sgd(model: torch.nn.Module, client: PSClient) -> DistributedOptimizer:
    return DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), client,
                                named_parameters=model.named_parameters(), overlap=True)  # fmt: skip


def test_overlap_refuses_gradient_accumulation_with_a_clear_error(start_cluster: StartCluster) -> None:
    model = small_model()
    (x, y), = batches(1, batch=4)  # fmt: skip
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, SPLITTING) as client:
        opt = _overlapped_sgd(model, client)
        loss_of(model, x, y).backward()
        with pytest.raises(InvalidArgument, match="given twice"):
            loss_of(model, x, y).backward()
        opt.close()


def test_close_removes_the_hooks(start_cluster: StartCluster) -> None:
    model = small_model()
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, SPLITTING) as client:
        opt = _overlapped_sgd(model, client)
        opt.close()
        (x, y), = batches(1, batch=4)  # fmt: skip
        loss_of(model, x, y).backward()  # no hook left to push
        assert opt._push is None


def _push_during_backward(config: ClientConfig, until: int) -> tuple[int, int, int]:
    """Gradient bytes the push had sent once backward's hooks fed it and it
    sent `until` bytes (or 10 s passed), and half a second more; all it sent
    by the end of step(); the requests applied."""
    model = small_model()
    (x, y), = batches(1, batch=4)  # fmt: skip
    with InProcessCluster(num_servers=1) as cluster, PSClient(cluster.addresses, 0, 1, config) as client:
        opt = _overlapped_sgd(model, client)
        loss_of(model, x, y).backward()
        deadline = time.monotonic() + 10
        while client.bytes_pushed < until and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        sent = client.bytes_pushed
        assert cluster.servers[0].shard.counters["pushes"] == 0  # held until step()
        opt.step()
        requests = cluster.servers[0].shard.counters["pushes"]
        opt.close()
        return sent, client.bytes_pushed, requests


def test_with_the_pull_during_the_push_backward_sends_at_most_one_request_before_step() -> None:
    limit, piece = PULL_DURING_PUSH.push_request_bytes, PULL_DURING_PUSH.max_piece_bytes
    assert limit is not None
    sent, total, requests = _push_during_backward(PULL_DURING_PUSH, until=1)
    assert 0 < sent < limit + piece
    assert requests >= total / limit  # the rest follows in requests of at most `limit`
    # On loopback (no pull during the push), backward's hooks send all they have at once.
    model_bytes = sum(p.numel() * p.element_size() for p in small_model().parameters())
    sent, total, requests = _push_during_backward(SPLITTING, until=model_bytes)
    assert (sent, requests) == (total, 1)


@pytest.mark.parametrize("refused_by", ["worker", "servers"])
def test_a_refused_push_with_the_pull_during_the_push_raises_at_step_and_training_goes_on(
    start_cluster: StartCluster, refused_by: str
) -> None:
    """The worker refuses a NaN gradient before the pull starts; the servers
    refuse a negative learning rate once the pull has started, which is then
    abandoned. Either way step() raises promptly and no server changes."""
    model, reference = small_model(), small_model()
    data = batches(3, batch=4)
    config = dataclasses.replace(PULL_DURING_PUSH, wait_log_interval=1.0)  # how soon an abandoned pull stops
    cluster = start_cluster(num_servers=2)
    with PSClient(cluster.addresses, 0, 1, config) as client:
        opt = _overlapped_sgd(model, client)
        before = [s.shard.snapshot() for s in cluster.servers]
        (x, y) = data[0]
        scale = float("nan") if refused_by == "worker" else 1.0
        if refused_by == "servers":
            opt.param_groups[0]["lr"] = -1.0
        (loss_of(model, x, y) * scale).backward()
        started = time.monotonic()
        with pytest.raises(InvalidArgument, match="NaN" if refused_by == "worker" else "refused its hyperparameters"):
            opt.step()
        assert time.monotonic() - started < 10
        opt.param_groups[0]["lr"] = 0.1
        after = [s.shard.snapshot() for s in cluster.servers]
        for old, new in zip(before, after, strict=True):
            assert old is not None and new is not None
            assert all(torch.equal(old.tensors[k], new.tensors[k]) for k in old.tensors)
        for x, y in data[1:]:
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        opt.pull_final()
        opt.close()
    local = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in data[1:]:
        local.zero_grad()
        loss_of(reference, x, y).backward()
        local.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
