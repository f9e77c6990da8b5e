"""Overlap (push during backward, pull in the background) trains exactly the
weights the plain path does."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ps_common.errors import InvalidArgument
from ps_server.harness import InProcessCluster
from ps_worker import DistributedOptimizer, PSClient
from ps_worker.compression import Compression
from tests.training import SPLITTING, batches, loss_of, small_model

WORKERS = 2


def _train(
    addresses: list[str], rank: int, model: torch.nn.Module, overlap: bool, data, compression
) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    with PSClient(addresses, rank, WORKERS, SPLITTING) as client:
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


def _bsp(overlap: bool, data, compression: Compression) -> list[torch.nn.Module]:  # type: ignore[no-untyped-def]
    models = [small_model() for _ in range(WORKERS)]  # here: small_model seeds torch's global generator
    with InProcessCluster(num_servers=2) as cluster, ThreadPoolExecutor(WORKERS) as pool:
        jobs = [
            pool.submit(_train, cluster.addresses, r, models[r], overlap, data, compression) for r in range(WORKERS)
        ]
        return [job.result(timeout=120) for job in jobs]


@pytest.mark.parametrize("compression", [Compression(), Compression(pull="bf16")], ids=["fp32", "bf16-pulls"])
def test_overlap_gives_the_same_weights_as_the_plain_path_in_bsp(compression: Compression) -> None:
    data = batches(40, batch=16)
    plain = _bsp(False, data, compression)
    overlapped = _bsp(True, data, compression)
    for a, b in zip(plain, overlapped, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
    assert not torch.equal(plain[0][0].weight, small_model()[0].weight)  # it did train


def test_overlap_refuses_gradient_accumulation_with_a_clear_error() -> None:
    model = small_model()
    (x, y), = batches(1, batch=4)  # fmt: skip
    with InProcessCluster(num_servers=1) as cluster, PSClient(cluster.addresses, 0, 1, SPLITTING) as client:
        opt = DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), client, named_parameters=model.named_parameters(),
            overlap=True,
        )  # fmt: skip
        loss_of(model, x, y).backward()
        with pytest.raises(InvalidArgument, match="given twice"):
            loss_of(model, x, y).backward()
        opt.close()


def test_close_removes_the_hooks() -> None:
    model = small_model()
    with InProcessCluster(num_servers=1) as cluster, PSClient(cluster.addresses, 0, 1, SPLITTING) as client:
        opt = DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), client, named_parameters=model.named_parameters(),
            overlap=True,
        )  # fmt: skip
        opt.close()
        (x, y), = batches(1, batch=4)  # fmt: skip
        loss_of(model, x, y).backward()  # no hook left to push
        assert opt._push is None
