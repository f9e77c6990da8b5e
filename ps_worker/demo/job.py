"""The built-in job: scikit-learn's handwritten digits (1797 real 8x8 images,
shipped inside scikit-learn, no download) with an MLP or a small CNN.

Each worker trains on its own share of every epoch's shuffled training set,
like torch's DistributedSampler, with the same number of steps per worker so
that BSP barriers line up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ps_worker.client import PSClient
from ps_worker.compression import Compression
from ps_worker.demo.config import JobConfig, WorkerConfig
from ps_worker.demo.metrics import WorkerMetrics
from ps_worker.export import export_model
from ps_worker.optimizer import DistributedOptimizer
from ps_worker.pruning import PruningConfig

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]

# Learning rates that train this job well, per optimizer, when --lr is not given.
DEFAULT_LR = {"sgd": 0.05, "adam": 4e-3, "adamw": 4e-3, "adagrad": 0.05, "rmsprop": 1e-3}


@dataclass(frozen=True)
class Digits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """The digits, scaled to [0, 1], as (N, 1, 8, 8) images; a stratified split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        list(range(len(y))), test_size=test_fraction, random_state=seed, stratify=data.target
    )
    return Digits(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def build_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip
    raise ValueError(f"unknown model {name!r}; choose mlp or cnn")


def build_optimizer(model: nn.Module, job: JobConfig) -> torch.optim.Optimizer:
    lr = job.lr if job.lr is not None else DEFAULT_LR[job.optimizer]
    params, wd = model.parameters(), job.weight_decay
    if job.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=job.momentum, weight_decay=wd)
    if job.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if job.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if job.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    if job.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=job.momentum, weight_decay=wd)
    raise ValueError(f"unknown optimizer {job.optimizer!r}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = int((model(x).argmax(dim=1) == y).sum().item())
    model.train()
    return correct / len(y)


def steps_per_epoch(num_train: int, num_workers: int, batch_size: int) -> int:
    """Equal for every worker (the smallest share decides), so BSP barriers line up."""
    return max(1, (num_train // num_workers) // batch_size)


def pruning_for(job: JobConfig, total_steps: int) -> PruningConfig | None:
    """The job's pruning schedule, its steps placed as fractions of training."""
    if job.prune_sparsity <= 0:
        return None
    begin, end = int(job.prune_begin * total_steps), int(job.prune_end * total_steps)
    frequency = job.prune_frequency or max(1, (end - begin) // 10)
    return PruningConfig(final_sparsity=job.prune_sparsity, begin_step=begin, end_step=end, frequency=frequency)


def run_worker(config: WorkerConfig, report: Report) -> dict[str, Any]:
    """Train as one worker of the job; worker 0 also returns the test accuracy."""
    job, rank, world = config.job, config.worker_id, config.num_workers
    device = torch.device(job.device)
    data = load_digits(job.seed)
    torch.manual_seed(job.seed)
    model = build_model(job.model).to(device)
    per_epoch = steps_per_epoch(len(data.train_y), world, job.batch_size)
    total = per_epoch * job.epochs
    client = PSClient(config.server_list, rank, world, config.client)
    try:
        opt = DistributedOptimizer(
            build_optimizer(model, job), client, named_parameters=model.named_parameters(),
            mode=job.mode, staleness=job.staleness, scale_lr_by_staleness=job.scale_lr_by_staleness,
            pruning=pruning_for(job, total), overlap=job.overlap,
            compression=Compression(job.compression, job.topk_ratio, job.pull_compression),
        )  # fmt: skip
        loss_fn = nn.CrossEntropyLoss()
        metrics = WorkerMetrics()
        if config.metrics_port is not None:
            log.info("worker %d metrics on port %d", rank, metrics.serve(config.metrics_port))
        started, last_report, samples = time.monotonic(), 0.0, 0
        first_step = opt.steps_done
        for step in range(first_step, total):
            step_started, comm_before = time.perf_counter(), opt.communication_seconds
            epoch, index = divmod(step, per_epoch)
            if index == 0 or step == opt.steps_done:
                shuffle = torch.Generator().manual_seed(job.seed * 1000 + epoch)
                mine = torch.randperm(len(data.train_y), generator=shuffle)[rank::world]
            batch = mine[index * job.batch_size : (index + 1) * job.batch_size]
            x, y = data.train_x[batch].to(device), data.train_y[batch].to(device)
            opt.zero_grad()
            output = model(x)
            loss = loss_fn(output, y)
            loss.backward()
            opt.step()
            samples += len(batch)
            metrics.step_seconds.observe(time.perf_counter() - step_started)
            metrics.communication_seconds.inc(opt.communication_seconds - comm_before)
            metrics.samples.inc(len(batch))
            now = time.monotonic()
            if now - last_report > 0.25 or step + 1 == total:
                last_report = now
                report({
                    "event": "progress", "worker": rank, "step": step + 1, "steps": total, "epoch": epoch + 1,
                    "epochs": job.epochs, "loss": loss.item(),
                    "accuracy": (output.argmax(1) == y).float().mean().item(),
                    "samples": samples, "seconds": now - started, "communication_seconds": opt.communication_seconds,
                })  # fmt: skip
        opt.close()
        pushed_steps = max(1, total - first_step)
        result: dict[str, Any] = {"event": "done", "worker": rank, "steps": total, "samples": samples,
                                  "seconds": time.monotonic() - started,
                                  "push_bytes_per_step": client.bytes_pushed // pushed_steps}  # fmt: skip
        if rank == 0:
            exported = export_model(model, opt)
            if config.export_dir:
                exported.save(config.export_dir)
            # Evaluate the export, loaded into a fresh model: what a user gets.
            fresh = build_model(job.model)
            fresh.load_state_dict(exported.state_dict)
            result["test_accuracy"] = accuracy(fresh, data.test_x, data.test_y)
            result["train_accuracy"] = accuracy(fresh, data.train_x, data.train_y)
            result["sparsity"] = exported.overall_sparsity()
            result["sparsity_per_parameter"] = exported.sparsity()
            result["model_bytes"] = exported.nbytes()
        report(result)
        return result
    finally:
        client.close()
