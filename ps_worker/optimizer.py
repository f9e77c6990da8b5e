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

With `overlap=True`, communication hides behind computation: each gradient
is pushed as soon as backward has produced it (backward runs from the last
layer to the first, so the push streams while the earlier layers compute),
and `step()` returns once the push is taken, leaving the pull of the new
weights to a background thread; each module's forward then waits only for
its own parameters. The weights are exactly those of the plain path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ps_common.errors import InvalidArgument
from ps_worker.client import Mode, PSClient, PushStream
from ps_worker.compression import Compression
from ps_worker.pruning import PruningConfig, magnitude_threshold

log = logging.getLogger(__name__)


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

    def grad(self, name: str) -> torch.Tensor | None:
        """One parameter's gradient on the host (waits for its copy)."""
        grad = self._params[name].grad
        if grad is None or name not in self._host:
            return None if grad is None else grad.contiguous()
        return self._host[name].copy_(grad)

    def weights(self) -> dict[str, torch.Tensor]:
        """Where a pull should write: the parameter itself, or its pinned copy."""
        return {name: self._host.get(name, param.data) for name, param in self._params.items()}

    def upload(self, names: Iterable[str] | None = None) -> None:
        """Copy pulled weights from the pinned copies into the device parameters."""
        with torch.no_grad():
            for name in self._host if names is None else names:
                if name in self._host:
                    self._params[name].copy_(self._host[name], non_blocking=True)


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
        compression: how gradients and weights travel (see Compression); default full precision.
        overlap: push during backward and pull in the background (see above).
            Not for gradient accumulation (several backward passes per step).
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
        compression: Compression | None = None,
        overlap: bool = False,
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
        self._names = {id(p): name for name, p in self._params.items()}
        self._staging = _HostStaging(self._params)
        self._step = client.init(
            list(self._params.items()),
            optimizer,
            mode=mode,
            staleness=staleness,
            scale_lr_by_staleness=scale_lr_by_staleness,
            pruning=pruning,
            compression=compression,
        )
        self._joined_at = self._step  # above 0: this worker rejoined a running job
        self.pruning = pruning
        self.communication_seconds = 0.0  # spent in push and pull, for metrics
        self._pull()
        self._push: PushStream | None = None  # overlap: the push backward is feeding
        self._pulling: futures.Future[None] | None = None  # overlap: the background pull
        self._arrived: dict[int, threading.Event] = {}  # overlap: by id(parameter)
        # overlap: each pushed gradient and its fingerprint then, by id(parameter)
        self._pushed: dict[int, tuple[torch.Tensor, tuple[int, torch.Tensor]]] = {}
        self._hooks: list[RemovableHandle] = []
        if overlap:
            self._puller = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ps-pull")
            self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self._params.values()]
            self._hooks.append(torch.nn.modules.module.register_module_forward_pre_hook(self._await_weights))

    def state_dict(self) -> dict[str, Any]:
        """torch's format: the param groups' hyperparameters, and each
        parameter's optimizer state as the servers hold it (read from them)."""
        packed: dict[str, Any] = super().state_dict()
        shapes = {name: param.shape for name, param in self._params.items()}
        states = self.client.optimizer_state(shapes)
        order = self._order()
        packed["state"] = {index: states[name] for index, name in enumerate(order) if name in states}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters and optimizer state saved by `state_dict()`
        (or by the same torch optimizer trained locally), before the first
        step: every worker loads it, worker 0 sends the state to the servers.
        A worker that rejoined a running job (`steps_done` above 0 when it
        joined) keeps the servers' state, which is newer, and says so."""
        self.optimizer.load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        # torch's load replaces the group dicts: share the new ones again.
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
        if self._joined_at > 0:
            # A worker that rejoined a running job: the servers' state is the job's, newer than any snapshot.
            log.warning(
                "worker %d rejoins the job at step %d: the servers hold its optimizer state, which the saved one "
                "would turn back; only the hyperparameters were loaded (resume your loop at steps_done)",
                self.client.worker_id, self._joined_at,
            )  # fmt: skip
            return
        order = self._order()
        self.client.load_optimizer_state({order[int(i)]: fields for i, fields in state_dict["state"].items()})

    def _order(self) -> list[str]:
        """The parameters' names in the order of torch's state_dict indices (through the param groups)."""
        return [self._names[id(p)] for group in self.param_groups for p in group["params"]]

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
        if not self._hooks:
            weights = self._staging.weights()
            self.client.push_pull(self._staging.grads(), self._step, weights, self._prune_thresholds())
            self._step += 1
            self._staging.upload()
        else:
            if self._push is None:
                self.synchronize()
                self.client.push(self._staging.grads(), self._step, self._prune_thresholds())
                self._pull_in_background(self._step + 1)
                self._step += 1
            else:
                push, self._push = self._push, None
                self._refuse_changed_gradients(push)
                self._finish_overlapped(push)
        self.communication_seconds += time.perf_counter() - started
        return loss

    def synchronize(self) -> None:
        """Wait until the weights of the current step are all in place (overlap:
        call it before reading parameters outside a module's forward)."""
        if self._pulling is not None:
            pulling, self._pulling = self._pulling, None
            self._arrived = {}
            pulling.result()

    def close(self) -> None:
        """Finish the background pull, abandon a push that backward started
        but no step() finished, and remove the overlap hooks."""
        if self._push is not None:
            self._push.cancel()
            self._push = None
            self._pushed = {}
        self.synchronize()
        for hook in self._hooks:
            hook.remove()
        if self._hooks:
            self._puller.shutdown()
        self._hooks = []

    def _grad_ready(self, param: torch.Tensor) -> None:
        """Backward hook: push this gradient now, starting the step's push if need be."""
        if self._push is None:
            self.synchronize()
            self._push = self.client.push_stream(self._step, self._prune_thresholds())
        name = self._names[id(param)]
        self._push.add(name, self._staging.grad(name))
        if param.grad is not None:
            self._pushed[id(param)] = (param.grad, _fingerprint(param.grad))

    def _refuse_changed_gradients(self, push: PushStream) -> None:
        """With overlap a gradient goes up as backward produces it: one changed
        afterwards (clip_grad_norm_, GradScaler's unscale_, any in-place
        edit) would be trained on unchanged. Refused, applying nothing."""
        changed = [
            self._names[key] for key, (grad, print_) in self._pushed.items()
            if self._params[self._names[key]].grad is not grad or not _same(_fingerprint(grad), print_)
        ]  # fmt: skip
        self._pushed = {}
        if changed:
            push.cancel()
            raise InvalidArgument(
                f"the gradients of {sorted(changed)} changed after backward pushed them (overlap=True pushes each "
                "gradient as backward produces it): gradient clipping, GradScaler's unscale_ or any other change "
                "between backward() and step() would be silently lost. Nothing of this step was applied; run "
                "without overlap to clip or scale gradients"
            )

    def _finish_overlapped(self, push: PushStream) -> None:
        """Finish the push backward fed and pull the next step in the background;
        where the client pulls during a push, the pull starts first, so that
        keys come back while the rest of the push still goes up."""
        if self.client.pulls_during_push:
            push.seal()  # a refused gradient raises before the pull starts
            self._pull_in_background(self._step + 1, during=push.finish)
        else:
            push.finish()
            self._pull_in_background(self._step + 1)
        self._step += 1

    def _pull_in_background(self, step: int, during: Callable[[], None] | None = None) -> None:
        """Pull `step` into the staging, each parameter's event set as it lands;
        with `during`, the push to send meanwhile (PSClient.pull_during)."""
        arrived = {id(p): threading.Event() for p in self._params.values()}

        def landed(name: str) -> None:
            self._staging.upload([name])
            arrived[id(self._params[name])].set()

        weights = self._staging.weights()
        if during is None:
            self._pulling = self._puller.submit(self.client.pull, weights, step, False, landed)
        else:
            self._pulling = self.client.pull_during(during, weights, step, landed)
        self._arrived = arrived

    def _await_weights(self, module: torch.nn.Module, args: Any) -> None:
        """Forward pre-hook on every module: wait for this module's own weights."""
        pulling = self._pulling
        if pulling is None:
            return
        for param in module.parameters(recurse=False):
            event = self._arrived.get(id(param))
            while event is not None and not event.wait(1.0):
                if pulling.done():
                    self.synchronize()  # raises the pull's error, if it failed
                    return

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
        self.synchronize()
        return self.client.pull_masks({name: p.shape for name, p in self._params.items()})

    def pull_final(self) -> None:
        """Wait until every worker has pushed as many steps as this one, then pull:
        the model after training, whatever the mode."""
        self.synchronize()
        self._pull(final=True)

    def _pull(self, final: bool = False) -> None:
        # The final model is read exactly, even where weights travel in bf16.
        self.client.pull(self._staging.weights(), self._step, wait_for_all_workers=final, full_precision=final)
        self._staging.upload()


_SAMPLES = 16


def _fingerprint(grad: torch.Tensor) -> tuple[int, torch.Tensor]:
    """What shows a gradient changed in place: its version counter, which
    in-place operations bump (clip_grad_norm_'s mul_), and a few of its
    elements, spread over it, which a foreach kernel that bypasses the
    counter changes all of (GradScaler's unscale_)."""
    flat = grad.detach().reshape(-1)
    return grad._version, flat[:: max(1, flat.numel() // _SAMPLES)].clone()


def _same(a: tuple[int, torch.Tensor], b: tuple[int, torch.Tensor]) -> bool:
    """Bit for bit (a NaN left alone is unchanged, though NaN != NaN)."""
    return a[0] == b[0] and torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))
