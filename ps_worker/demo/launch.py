"""`ps-train`: a whole job on this machine, one process per server and per worker.

Starts the servers (`python -m ps_server`, port 0, each reporting its port
through a file), then the workers (`python -m ps_worker`, progress as JSON
lines on stdout), shows live progress, and ends with a summary table and,
if asked, a JSON file of final metrics.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ps_common.config import cli_args, parse_config
from ps_common.errors import PSError, WaitTimeout
from ps_common.log import setup_logging
from ps_worker.client import PSClient
from ps_worker.demo.config import TrainConfig
from ps_worker.demo.job import DEFAULT_LR, load_digits, steps_per_epoch
from ps_worker.local_servers import start_servers, stop_processes

log = logging.getLogger("ps_train")


class LocalCluster:
    """The server and worker processes of one ps-train run; `stop()` ends them all."""

    def __init__(self, config: TrainConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.servers: list[subprocess.Popen[Any]] = []
        self.workers: list[subprocess.Popen[str]] = []
        self.addresses: list[str] = []

    def start_servers(self) -> None:
        self.servers, self.addresses = start_servers(
            self.config.servers, self.workdir, lambda i: self._log_file(f"server{i}"),
            ["--log-level", self.config.log_level], lambda i: self.tail(f"server{i}"),
        )  # fmt: skip
        log.info("servers up at %s", self.addresses)

    def start_workers(self) -> None:
        threads = max(1, (os.cpu_count() or 1) // self.config.workers)
        for i in range(self.config.workers):
            command = [sys.executable, "-m", "ps_worker", "--servers", ",".join(self.addresses),
                       "--worker-id", str(i), "--num-workers", str(self.config.workers), "--report", "json",
                       "--torch-threads", str(threads), "--log-level", self.config.log_level,
                       *(["--export-dir", self.config.export_dir] if self.config.export_dir else []),
                       *cli_args(self.config.job)]  # fmt: skip
            self.workers.append(
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log_file(f"worker{i}"), text=True)
            )

    def stop(self) -> None:
        stop_processes([*self.workers, *self.servers])

    def tail(self, name: str, lines: int = 15) -> str:
        return "\n".join((self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def _log_file(self, name: str) -> IO[bytes]:
        return open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child process owns it


def _read_events(worker: int, stream: IO[str], events: queue.Queue[dict[str, Any]]) -> None:
    for line in stream:
        try:
            events.put(json.loads(line))
        except json.JSONDecodeError:
            log.debug("worker %d printed: %s", worker, line.rstrip())
    events.put({"event": "exit", "worker": worker})


def run(config: TrainConfig, console: Console) -> dict[str, Any]:
    """Train the built-in job on a local cluster; returns the summary metrics."""
    data = load_digits(config.job.seed)
    total_steps = steps_per_epoch(len(data.train_y), config.workers, config.job.batch_size) * config.job.epochs
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ps-train-") as tmp:
        cluster = LocalCluster(config, Path(tmp))
        try:
            cluster.start_servers()
            cluster.start_workers()
            events: queue.Queue[dict[str, Any]] = queue.Queue()
            for i, worker in enumerate(cluster.workers):
                assert worker.stdout is not None
                threading.Thread(target=_read_events, args=(i, worker.stdout, events), daemon=True).start()
            latest, done = _follow_progress(config, total_steps, events, cluster, console, started)
            with PSClient(cluster.addresses, 0, config.workers) as client:
                server_stats = client.stats()
        finally:
            cluster.stop()
    wall = time.monotonic() - started
    samples = sum(d["samples"] for d in done.values())
    train_seconds = max(d["seconds"] for d in done.values())
    return {
        "servers": config.servers,
        "workers": config.workers,
        "mode": config.job.mode,
        "optimizer": config.job.optimizer,
        "lr": config.job.lr if config.job.lr is not None else DEFAULT_LR[config.job.optimizer],
        "model": config.job.model,
        "epochs": config.job.epochs,
        "steps_per_worker": total_steps,
        "samples": samples,
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "samples_per_second": round(samples / train_seconds, 1),
        "final_loss": round(sum(e["loss"] for e in latest.values()) / len(latest), 5),
        "train_accuracy": done[0]["train_accuracy"],
        "test_accuracy": done[0]["test_accuracy"],
        "sparsity": done[0]["sparsity"],
        "sparsity_per_parameter": done[0]["sparsity_per_parameter"],
        "model_bytes": done[0]["model_bytes"],
        "push_bytes_per_step": round(sum(d["push_bytes_per_step"] for d in done.values()) / config.workers),
        "pull_bytes_per_step": round(sum(s.bytes_out for s in server_stats) / (config.workers * total_steps)),
        "server_bytes": [s.total_bytes for s in server_stats],
        "server_keys": [len(s.keys) for s in server_stats],
        "server_updates": [s.updates for s in server_stats],
        "job": asdict(config.job),
    }


def _follow_progress(
    config: TrainConfig,
    total_steps: int,
    events: queue.Queue[dict[str, Any]],
    cluster: LocalCluster,
    console: Console,
    started: float,
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Show progress until every worker has exited; raise if one failed."""
    latest: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    exited = 0
    columns = (TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=not config.progress, transient=False) as progress:
        task = progress.add_task("train", total=total_steps * config.workers, info="starting")
        while exited < config.workers:
            if time.monotonic() - started > config.timeout:
                raise WaitTimeout(f"training did not finish within {config.timeout:.0f}s")
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                continue
            worker = event["worker"]
            if event["event"] == "progress":
                latest[worker] = event
                loss = sum(e["loss"] for e in latest.values()) / len(latest)
                accuracy = sum(e["accuracy"] for e in latest.values()) / len(latest)
                rate = sum(e["samples"] for e in latest.values()) / max(
                    1e-9, max(e["seconds"] for e in latest.values())
                )
                epoch = min(e["epoch"] for e in latest.values())
                progress.update(task, completed=sum(e["step"] for e in latest.values()),
                                info=f"epoch {epoch}/{config.job.epochs} loss {loss:.4f} acc {accuracy:.3f} "
                                     f"{rate:,.0f} samples/s")  # fmt: skip
            elif event["event"] == "done":
                done[worker] = event
            elif event["event"] == "exit":
                exited += 1
                code = cluster.workers[worker].wait()
                if code != 0 or worker not in done:
                    raise RuntimeError(f"worker {worker} exited with {code}:\n{cluster.tail(f'worker{worker}')}")
    return latest, done


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="ps-train summary", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    rows = [
        ("cluster", f"{summary['servers']} servers, {summary['workers']} workers"),
        ("job", f"{summary['model']} / {summary['optimizer']} lr {summary['lr']} / {summary['mode'].upper()}"),
        ("steps per worker", f"{summary['steps_per_worker']} ({summary['epochs']} epochs)"),
        ("samples/s", f"{summary['samples_per_second']:,.0f}"),
        ("training time", f"{summary['train_seconds']:.1f} s (wall {summary['wall_seconds']:.1f} s)"),
        ("final loss", f"{summary['final_loss']:.4f}"),
        ("train accuracy", f"{summary['train_accuracy']:.4f}"),
        ("test accuracy", f"[bold green]{summary['test_accuracy']:.4f}"),
        ("sparsity", f"{summary['sparsity']:.3f} (model {summary['model_bytes']:,} bytes)"),
        ("push bytes per step", f"{summary['push_bytes_per_step']:,} ({summary['job']['compression']})"),
        ("pull bytes per step", f"{summary['pull_bytes_per_step']:,} ({summary['job']['pull_compression']})"),
        ("bytes per server", ", ".join(f"{b:,}" for b in summary["server_bytes"])),
        ("updates per server", ", ".join(str(u) for u in summary["server_updates"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(TrainConfig, "Train the built-in digits job on a local cluster of processes.", argv)
    setup_logging(config.log_level)
    console = Console(stderr=True)
    try:
        summary = run(config, console)
    except (PSError, RuntimeError) as exc:
        console.print(f"[bold red]ps-train failed:[/] {exc}")
        return 1
    Console().print(_summary_table(summary))
    if config.summary_json:
        Path(config.summary_json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
