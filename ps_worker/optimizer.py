"""DistributedOptimizer: wrap a torch optimizer so that step() trains on the servers.

    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), client,
                               named_parameters=model.named_parameters(), mode="bsp")
    opt.zero_grad(); loss.backward(); opt.step()

`step()` pushes the gradients, the servers apply the wrapped optimizer's own
update rule, and the fresh weights are pulled back into the parameters in
place. The wrapper shares `param_groups` with the wrapped optimizer, so an
LR scheduler attached to either keeps working: the current hyperparameters
travel with every push. The wrapped optimizer's own `state` stays empty; the
optimizer state lives on the servers beside its shard.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ps_worker.client import Mode, PSClient
from ps_worker.pruning import PruningConfig, magnitude_threshold


class _HostStaging:
    """Pinned CPU copies of device tensors, so transfers to and from the GPU
    are fast DMA and the client only ever handles CPU memory."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self._params = params
        self._host = {
            name: torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
            for name, p in params.items()
            if p.device.type != "cpu"
        }

    def grads(self) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {}
        for name, param in self._params.items():
            if param.grad is None or name not in self._host:
                out[name] = None if param.grad is None else param.grad.contiguous()
                continue
            self._host[name].copy_(param.grad, non_blocking=True)
            out[name] = self._host[name]
        if self._host:
            torch.cuda.synchronize()
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """Where a pull should write: the parameter itself, or its pinned copy."""
        return {name: self._host.get(name, param.data) for name, param in self._params.items()}

    def upload(self) -> None:
        """Copy pulled weights from the pinned copies into the device parameters."""
        with torch.no_grad():
            for name, host in self._host.items():
                self._params[name].copy_(host, non_blocking=True)


class DistributedOptimizer(torch.optim.Optimizer):
    """Horovod-style wrapper: the training loop stays as it was.

    Args:
        optimizer: the torch.optim optimizer to run on the servers (an
            elementwise one: SGD, Adam, AdamW, Adagrad, RMSprop...).
        client: this worker's PSClient.
        named_parameters: names for the optimizer's parameters, usually
            `model.named_parameters()`; every worker must use the same names.
        mode: "bsp", "asp" or "ssp".
        staleness: SSP only, how many steps a worker may run ahead.
        scale_lr_by_staleness: ASP/SSP, divide a stale push's learning rate by its staleness.
        pruning: gradual magnitude pruning run on the servers (see PruningConfig).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        client: PSClient,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
        mode: Mode = "bsp",
        staleness: int = 0,
        scale_lr_by_staleness: bool = False,
        pruning: PruningConfig | None = None,
    ) -> None:
        in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
        if named_parameters is None:
            names = {id(p): f"param{i}" for i, p in enumerate(in_optimizer)}
        else:
            names = {id(p): name for name, p in named_parameters}
        unnamed = [i for i, p in enumerate(in_optimizer) if id(p) not in names]
        if unnamed:
            raise ValueError(f"named_parameters lacks {len(unnamed)} of the optimizer's parameters")
        # Optimizer.__init__ sets up the hook registries that schedulers and
        # torch utilities expect; the groups and state are then shared, not copied.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.optimizer = optimizer
        self.client = client
        self._params = {names[id(p)]: p for p in in_optimizer}
        self._staging = _HostStaging(self._params)
        self._step = client.init(
            list(self._params.items()),
            optimizer,
            mode=mode,
            staleness=staleness,
            scale_lr_by_staleness=scale_lr_by_staleness,
            pruning=pruning,
        )
        self.pruning = pruning
        self.communication_seconds = 0.0  # spent in push and pull, for metrics
        self._pull()

    @property
    def steps_done(self) -> int:
        """Steps this worker has pushed (a rejoining worker starts above 0)."""
        return self._step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        started = time.perf_counter()
        self.client.push(self._staging.grads(), self._step, self._prune_thresholds())
        self._step += 1
        self._pull()
        self.communication_seconds += time.perf_counter() - started
        return loss

    def _prune_thresholds(self) -> dict[str, float] | None:
        """Worker 0 on a pruning step: thresholds from the weights of this step,
        which it holds whole (each server holds only ranges)."""
        if self.pruning is None or self.client.worker_id != 0:
            return None
        sparsity = self.pruning.sparsity_at(self._step)
        if sparsity is None:
            return None
        thresholds = {name: magnitude_threshold(self._params[name], sparsity) for name in self.client.prunable}
        return {name: t for name, t in thresholds.items() if t is not None}

    def masks(self) -> dict[str, torch.Tensor]:
        """The servers' pruning masks (True = kept), whole tensors by parameter name."""
        return self.client.pull_masks({name: p.shape for name, p in self._params.items()})

    def pull_final(self) -> None:
        """Wait until every worker has pushed as many steps as this one, then pull:
        the model after training, whatever the mode."""
        self._pull(wait_for_all_workers=True)

    def _pull(self, wait_for_all_workers: bool = False) -> None:
        self.client.pull(self._staging.weights(), self._step, wait_for_all_workers)
        self._staging.upload()
