"""Real processes: ps-server subprocesses, ps-train end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ps_worker import DistributedOptimizer, PSClient
from ps_worker.export import ExportedModel
from tests.support.training import batches, loss_of, small_model

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
        held = [part.tensor for s in stats for k in s.job.keys for part in k.parts or [k]]
        assert sorted(held) == sorted(dict(model.named_parameters())) and all(s.updates == 30 for s in stats)
        torch.testing.assert_close(dict(model.named_parameters()), dict(oracle.named_parameters()), rtol=0, atol=1e-6)
    finally:
        for process, _ in servers:
            process.send_signal(signal.SIGTERM)
    for process, _ in servers:
        assert process.wait(timeout=15) == 0
    assert "shutting down" in (tmp_path / "s0.log").read_text()


# Pulls as they would cross a network: on the servers' host, BSP pulls would
# read the shared weights and send (and count) no bytes.
WEIGHTS_SENT = {"PS_SHARED_WEIGHTS": "false"}


def _ps_train(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "ps_worker.demo.launch", "--servers", "2", "--workers", "4",
         "--summary-json", str(summary_path), "--no-progress", *args],
        capture_output=True, text=True, timeout=150, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(summary_path.read_text()), result.stdout


@pytest.fixture(scope="module")
def dense_bsp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _ps_train(tmp_path_factory.mktemp("dense"), "--mode", "bsp", env=WEIGHTS_SENT)[0]


def test_ps_train_bsp_reaches_97_percent_on_digits(dense_bsp: dict[str, Any]) -> None:
    assert dense_bsp["test_accuracy"] >= 0.97
    assert dense_bsp["mode"] == "bsp" and dense_bsp["workers"] == 4 and dense_bsp["servers"] == 2
    assert dense_bsp["server_updates"] == [dense_bsp["steps_per_worker"]] * 2


def test_ps_train_asp_reaches_97_percent_on_digits(tmp_path: Path) -> None:
    summary, stdout = _ps_train(tmp_path, "--mode", "asp")
    assert summary["test_accuracy"] >= 0.97
    assert "test accuracy" in stdout
    # ASP applies every push on arrival: one update per worker step.
    assert summary["server_updates"] == [4 * summary["steps_per_worker"]] * 2


def test_ps_train_prunes_to_90_percent_within_1_5_points_of_dense(tmp_path: Path, dense_bsp: dict[str, Any]) -> None:
    export = tmp_path / "export"
    summary, _ = _ps_train(
        tmp_path, "--mode", "bsp", "--prune-sparsity", "0.9", "--export-dir", str(export), env=WEIGHTS_SENT
    )
    assert summary["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert summary["test_accuracy"] >= dense_bsp["test_accuracy"] - 0.015
    assert summary["pull_bytes_per_step"] < dense_bsp["pull_bytes_per_step"]
    exported = ExportedModel.load(export)
    assert exported.overall_sparsity() == pytest.approx(summary["sparsity"])


def test_ps_train_reports_a_failing_worker(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ps_worker.demo.launch", "--servers", "1", "--workers", "1", "--no-progress",
         "--epochs", "1", "--device", "nonexistent"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "worker 0 exited" in result.stderr
