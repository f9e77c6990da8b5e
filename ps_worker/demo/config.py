"""Settings of the worker CLIs (flags and PS_* variables): the built-in job,
one worker process (`ps-worker`) and the local launcher (`ps-train`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ps_common.config import setting
from ps_worker.client_config import ClientConfig

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


@dataclass(frozen=True)
class JobConfig:
    """The built-in training job: digits classification."""

    model: Literal["mlp", "cnn"] = setting("cnn", "model to train")
    optimizer: Literal["sgd", "adam", "adamw", "adagrad", "rmsprop"] = setting("adam", "torch.optim optimizer")
    lr: float | None = setting(None, "learning rate (default: tuned per optimizer for this job)")
    momentum: float = setting(0.9, "momentum for sgd and rmsprop")
    weight_decay: float = setting(0.0, "weight decay")
    epochs: int = setting(20, "passes over the training set")
    batch_size: int = setting(32, "samples per worker per step")
    mode: Literal["bsp", "asp", "ssp"] = setting("bsp", "consistency: synchronous, asynchronous, bounded staleness")
    staleness: int = setting(2, "ssp: steps a worker may run ahead of the slowest")
    scale_lr_by_staleness: bool = setting(False, "asp/ssp: divide a stale push's learning rate by its staleness")
    prune_sparsity: float = setting(0.0, "final fraction of zeros in the prunable weights (0: no pruning)")
    prune_begin: float = setting(0.1, "start pruning at this fraction of the training steps")
    prune_end: float = setting(0.6, "reach the final sparsity at this fraction of the training steps")
    prune_frequency: int = setting(0, "steps between pruning steps (0: ten pruning steps from begin to end)")
    compression: Literal["none", "fp16", "bf16", "topk"] = setting("none", "how pushed gradients travel")
    topk_ratio: float = setting(0.01, "topk compression: fraction of each gradient's elements sent")
    pull_compression: Literal["none", "bf16"] = setting(
        "none", "how pulled weights travel: bf16 halves the bytes (servers keep full precision; the final model too)"
    )
    overlap: bool = setting(False, "push during backward and pull the next weights in the background")
    seed: int = setting(0, "seed of the model initialization, data split and shuffling")
    device: str = setting("cpu", "torch device of the worker: cpu, cuda, cuda:1...")


@dataclass(frozen=True)
class WorkerConfig:
    servers: str = setting("127.0.0.1:50051", "comma-separated server addresses, the same order on every worker")
    worker_id: int = setting(0, "this worker's id, 0..num_workers-1 (worker 0 initializes the servers)")
    num_workers: int = setting(1, "number of workers in the job")
    report: Literal["text", "json"] = setting("text", "progress as log lines or JSON lines on stdout")
    export_dir: str | None = setting(None, "worker 0 saves the trained model and masks there (safetensors)")
    metrics_port: int | None = setting(None, "serve Prometheus metrics on this port (0: a free one)")
    torch_threads: int = setting(0, "torch intra-op threads (0: torch's default)", tuning=True)
    log_level: LogLevel = setting("INFO", "log level")
    log_json: bool = setting(False, "log one JSON object a line")
    job: JobConfig = field(default_factory=JobConfig)
    client: ClientConfig = field(default_factory=ClientConfig)

    @property
    def server_list(self) -> list[str]:
        return [s.strip() for s in self.servers.split(",") if s.strip()]


@dataclass(frozen=True)
class TrainConfig:
    servers: int = setting(2, "parameter-server processes to start")
    workers: int = setting(4, "worker processes to start")
    summary_json: str | None = setting(None, "write the final metrics to this JSON file")
    export_dir: str | None = setting(None, "save the trained model and pruning masks there (safetensors)")
    progress: bool = setting(True, "show a live progress bar")
    timeout: float = setting(900.0, "give up on the whole run after this many seconds")
    log_level: LogLevel = setting("WARNING", "log level of the servers and workers")
    job: JobConfig = field(default_factory=JobConfig)
