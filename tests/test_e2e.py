"""Real processes: ps-server subprocesses, ps-train end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ps_worker import DistributedOptimizer, PSClient
from tests.training import batches, loss_of, small_model

pytestmark = pytest.mark.e2e


def _start_server(tmp_path: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp_path / f"{name}.port"
    process = subprocess.Popen(
        [sys.executable, "-m", "ps_server", "--port", "0", "--port-file", str(port_file)],
        env={**os.environ, **env}, stderr=open(tmp_path / f"{name}.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not port_file.exists():
        assert process.poll() is None, (tmp_path / f"{name}.log").read_text()
        assert time.monotonic() < deadline, "server did not report its port"
        time.sleep(0.05)
    return process, f"127.0.0.1:{port_file.read_text()}"


def test_server_processes_train_and_stop_cleanly_on_sigterm(tmp_path: Path) -> None:
    servers = [_start_server(tmp_path, f"s{i}", {"PS_HOST": "127.0.0.1", "PS_GRACE": "2"}) for i in range(2)]
    try:
        model, oracle = small_model(), small_model()
        data = batches(30, batch=8)
        local = torch.optim.SGD(oracle.parameters(), lr=0.05, momentum=0.9)
        with PSClient([a for _, a in servers], 0, 1) as client:
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), client,
                                       named_parameters=model.named_parameters())  # fmt: skip
            for x, y in data:
                for m, o in ((model, opt), (oracle, local)):
                    o.zero_grad()
                    loss_of(m, x, y).backward()
                    o.step()
            stats = client.stats()
        assert sum(len(s.keys) for s in stats) == 4 and all(s.updates == 30 for s in stats)
        torch.testing.assert_close(dict(model.named_parameters()), dict(oracle.named_parameters()), rtol=0, atol=1e-6)
    finally:
        for process, _ in servers:
            process.send_signal(signal.SIGTERM)
    for process, _ in servers:
        assert process.wait(timeout=15) == 0
    assert "shutting down" in (tmp_path / "s0.log").read_text()


@pytest.mark.parametrize("mode", ["bsp", "asp"])
def test_ps_train_reaches_97_percent_on_digits(tmp_path: Path, mode: str) -> None:
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "ps_worker.launch", "--servers", "2", "--workers", "4", "--mode", mode,
         "--summary-json", str(summary_path), "--no-progress"],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["test_accuracy"] >= 0.97
    assert summary["mode"] == mode and summary["workers"] == 4 and summary["servers"] == 2
    assert summary["server_updates"][0] > 0 and "test accuracy" in result.stdout


def test_ps_train_reports_a_failing_worker(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ps_worker.launch", "--servers", "1", "--workers", "1", "--no-progress",
         "--epochs", "1", "--device", "nonexistent"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "worker 0 exited" in result.stderr
