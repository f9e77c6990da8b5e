"""The examples run as their docstrings say, and compute what one process
training on whole batches computes."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.e2e.test_e2e import _start_server

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _single_process_checksum(quickstart: ModuleType) -> float:
    """The quickstart's loop in one process on whole batches: the oracle."""
    torch.manual_seed(0)
    true_weights = torch.randn(quickstart.FEATURES, 1)
    model = torch.nn.Linear(quickstart.FEATURES, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(quickstart.STEPS):
        x = torch.randn(quickstart.BATCH, quickstart.FEATURES)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x @ true_weights).backward()
        opt.step()
    return sum(float(p.detach().double().sum()) for p in model.parameters())


def test_quickstart_on_two_servers_and_two_workers_equals_one_process_on_whole_batches(tmp_path: Path) -> None:
    servers = [_start_server(tmp_path, f"s{i}", {"PS_GRACE": "2"}) for i in range(2)]
    try:
        env = {**os.environ, "PS_SERVERS": ",".join(address for _, address in servers), "WORLD_SIZE": "2"}
        workers = [
            subprocess.Popen(
                [sys.executable, str(EXAMPLES / "quickstart.py")],
                env={**env, "RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            for rank in range(2)
        ]
        outputs = [worker.communicate(timeout=120)[0] for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], outputs
    finally:
        for process, _ in servers:
            process.send_signal(signal.SIGTERM)
        for process, _ in servers:
            process.wait(timeout=15)
    checksums = [float(re.findall(r"weights checksum (\S+)", output)[0]) for output in outputs]
    losses = [[float(v) for v in re.findall(r"loss (\S+)", output)] for output in outputs]
    expected = _single_process_checksum(_load("quickstart"))
    assert checksums[0] == checksums[1]  # both workers hold the servers' weights
    assert checksums[0] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert all(trace[-1] < trace[0] / 100 for trace in losses)  # it learned
