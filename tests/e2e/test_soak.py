"""Bounded load and soak on loopback: 16 workers against 2 server processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from tests.support.processes import free_port

pytestmark = pytest.mark.e2e

WORKERS = 16
ROUNDS = 160  # per worker: 2,560 push/pull rounds in all


def _resources(pid: int) -> tuple[int, int, int]:
    """(RSS in KiB, threads, open file descriptors) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))


def test_sixteen_workers_for_thousands_of_rounds_without_errors_or_growth(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    logs = [open(tmp_path / f"server{p}.log", "wb") for p in ports]  # noqa: SIM115
    servers = [
        subprocess.Popen([sys.executable, "-m", "ps_server", "--port", str(p)], stderr=log)
        for p, log in zip(ports, logs, strict=True)
    ]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    samples: dict[str, list[tuple[int, int, int]]] = {"warm": [], "end": []}
    try:
        torch.manual_seed(0)
        models = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
                  for _ in range(WORKERS)]  # fmt: skip
        clients = [PSClient(addresses, r, WORKERS, ClientConfig(timeout=30, wait_timeout=60)) for r in range(WORKERS)]

        def run(rank: int) -> int:
            model = models[rank]
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), clients[rank],
                                       named_parameters=model.named_parameters(), mode="asp")  # fmt: skip
            x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
            for round_ in range(ROUNDS):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                if rank == 0 and round_ in (ROUNDS // 3, ROUNDS - 1):
                    samples["warm" if round_ < ROUNDS - 1 else "end"] = [_resources(s.pid) for s in servers]
            return ROUNDS

        with ThreadPoolExecutor(WORKERS) as pool:
            # Worker 0 initializes; the others wait for it inside their constructors.
            assert sum(pool.map(run, range(WORKERS))) == WORKERS * ROUNDS
        for client in clients:
            client.close()
        for (rss0, threads0, fds0), (rss1, threads1, fds1) in zip(samples["warm"], samples["end"], strict=True):
            assert rss1 <= rss0 * 1.05, f"server RSS grew from {rss0} to {rss1} KiB"
            assert threads1 <= threads0 + 2 and fds1 <= fds0 + 2, (threads0, threads1, fds0, fds1)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    for port in ports:
        assert "Traceback" not in (tmp_path / f"server{port}.log").read_text()


def test_dataloader_worker_processes_beside_a_grpc_client_do_not_hang(tmp_path: Path) -> None:
    from ps_server.harness import InProcessCluster

    data = TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
    with InProcessCluster(num_servers=2) as cluster, PSClient(cluster.addresses, 0, 1) as client:
        model = torch.nn.Linear(8, 1)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), client,
                                   named_parameters=model.named_parameters())  # fmt: skip
        started = time.monotonic()
        for _ in range(2):  # new worker processes each epoch, forked after the channels exist
            for x, y in DataLoader(data, batch_size=32, num_workers=2):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        assert opt.steps_done == 16
        assert time.monotonic() - started < 60
