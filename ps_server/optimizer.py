"""Server-side optimizers: torch.optim's own implementations on each shard.

The update rules are torch's, not ours: a shard's slices are the parameters
of a real torch.optim optimizer, we set their `.grad` and call `step()`.
Only elementwise optimizers are allowed, because only for them is updating
a slice of a tensor the same as updating the whole tensor and slicing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ps_common import codec
from ps_common.errors import InvalidArgument, NotFound
from ps_common.proto import ps_pb2 as pb

ELEMENTWISE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    cls.__name__: cls
    for cls in (
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adagrad,
        torch.optim.RMSprop,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.Adadelta,
        torch.optim.Rprop,
        torch.optim.ASGD,
    )
}


def warm_up() -> None:
    """Build each optimizer class once. torch imports its compiler machinery
    lazily on the first optimizer built (seconds, and about 70 MB): better
    before the server reports SERVING than inside the first Init call."""
    param = torch.nn.Parameter(torch.zeros(1))
    for cls in ELEMENTWISE_OPTIMIZERS.values():
        cls([param])


class ShardOptimizer:
    """A torch optimizer over one server's slices, one param group per worker-side group."""

    def __init__(
        self, spec: pb.OptimizerSpec, params: Sequence[torch.Tensor], groups: Sequence[int], fused: bool = False
    ) -> None:
        """`fused`: use torch's fused CPU kernel where the class has one and the
        worker left the choice to torch (fused=None, foreach=None). It differs
        from the for-loop kernel by rounding only (under 1e-6 after 500 steps)."""
        cls = ELEMENTWISE_OPTIMIZERS.get(spec.name)
        if cls is None:
            raise NotFound(
                f"optimizer {spec.name!r} is not supported on the server; "
                f"elementwise torch.optim optimizers are: {sorted(ELEMENTWISE_OPTIMIZERS)}"
            )
        self.name = spec.name
        self.group_options = [codec.options_from_proto(g) for g in spec.groups]
        members: list[list[torch.Tensor]] = [[] for _ in self.group_options]
        self._group_of: dict[int, int] = {}  # id of a parameter -> its group
        for param, group in zip(params, groups, strict=True):
            members[group].append(param)
            self._group_of[id(param)] = group
        self._cls = cls
        self._fused = fused and "fused" in inspect.signature(cls).parameters
        for options in self.group_options:
            self._validate(options)
        param_groups = [{"params": m, **options} for m, options in zip(members, self.group_options, strict=True)]
        self._torch = cls(param_groups)
        self._accepted: tuple[list[bytes] | None, list[dict[str, Any]]] = (None, [])  # see check_options

    def _validate(self, options: Mapping[str, Any]) -> None:
        """Let torch's constructor check the values (it checks only its own arguments,
        not those of param groups, so each group's options are passed as arguments;
        options that are not arguments, such as AdamW's fixed decoupled_weight_decay,
        are left to torch's own bookkeeping)."""
        accepted = inspect.signature(self._cls).parameters
        try:
            self._cls([torch.zeros(1)], **{k: v for k, v in options.items() if k in accepted})
        except (ValueError, TypeError, RuntimeError) as exc:
            raise InvalidArgument(f"{self.name} refused its hyperparameters: {exc}") from None

    def check_options(self, groups: Sequence[pb.ParamGroup]) -> list[dict[str, Any]]:
        """Decode a push's hyperparameters, refusing any change of structure
        (the list returned is shared: not to be changed)."""
        # Every request carries them, and they rarely change: the same bytes
        # as the last ones accepted decode and check the same way.
        encoded = [group.SerializeToString(deterministic=True) for group in groups]
        if encoded == self._accepted[0]:
            return self._accepted[1]
        if len(groups) != len(self.group_options):
            raise InvalidArgument(f"push has {len(groups)} param groups, the job has {len(self.group_options)}")
        decoded = [codec.options_from_proto(g) for g in groups]
        for index, (new, old) in enumerate(zip(decoded, self.group_options, strict=True)):
            if new.keys() != old.keys():
                raise InvalidArgument(f"param group {index}: options {sorted(new)} differ from the job's {sorted(old)}")
            for name, value in new.items():
                if _kind(value) != _kind(old[name]):
                    raise InvalidArgument(
                        f"param group {index}: {name} changed type from {type(old[name]).__name__} "
                        f"to {type(value).__name__}"
                    )
            if new != old:
                self._validate(new)
        self._accepted = (encoded, decoded)
        return decoded

    def step(
        self,
        params: Sequence[torch.Tensor],
        options: Sequence[Mapping[str, Any]] | None,
        lr_scale: float = 1.0,
        contributions: int = 1,
    ) -> None:
        """Apply one update to `params` (some of this shard's, `.grad` set).

        `options` are the worker's current hyperparameters (already checked);
        `lr_scale` shrinks the learning rate for this step only;
        `contributions`: each `.grad` is the sum of that many gradients, and
        the update applies their mean (the gradients may be divided in place).
        """
        if options is not None:
            self.group_options = [dict(o) for o in options]
        # torch steps every parameter of its groups that has a gradient and
        # looks at each to find out; a request may update a few keys of
        # hundreds, so the groups hold only those for this step.
        stepped: list[list[torch.Tensor]] = [[] for _ in self.group_options]
        for param in params:
            stepped[self._group_of[id(param)]].append(param)
        held = [torch_group["params"] for torch_group in self._torch.param_groups]
        try:
            for torch_group, group_options, group_params in zip(
                self._torch.param_groups, self.group_options, stepped, strict=True
            ):
                torch_group.update(group_options)
                torch_group["params"] = group_params
                if self._fused and group_options.get("fused") is None and group_options.get("foreach") is None:
                    torch_group["fused"] = True
                if lr_scale != 1.0:
                    torch_group["lr"] = torch_group["lr"] * lr_scale
            if contributions != 1:
                self._average(params, stepped, contributions)
            self._torch.step()
        finally:
            self._torch.grad_scale = None  # type: ignore[attr-defined]
            for torch_group, group_params in zip(self._torch.param_groups, held, strict=True):
                torch_group["params"] = group_params

    def _average(self, params: Sequence[torch.Tensor], stepped: list[list[torch.Tensor]], contributions: int) -> None:
        """Make the coming step apply the mean of `contributions` summed gradients.
        torch's fused kernels divide each gradient by `grad_scale` (the
        attribute GradScaler sets to unscale, bit for bit a `div_`) in the
        pass that updates it, which saves a pass over every gradient; the
        other kernels refuse it, so without fusion the gradients are divided
        first."""
        if all(group.get("fused") for group, members in zip(self._torch.param_groups, stepped, strict=True) if members):
            self._torch.grad_scale = torch.tensor(float(contributions))  # type: ignore[attr-defined]
            return
        for param in params:
            param.grad.div_(contributions)  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer's own state_dict (over the shard's keys, in order)."""
        state: dict[str, Any] = self._torch.state_dict()
        return state

    def state_of(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """A copy of torch's state of one of the shard's parameters (empty
        before its first update; fields torch left None are left out)."""
        state = self._torch.state.get(param, {})
        return {name: value.clone() for name, value in state.items() if isinstance(value, torch.Tensor)}

    def state_fields(self, param: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The fields torch keeps for `param` once it has taken a step, with
        their shapes and dtypes, from one step of a copy of its group on a
        zero gradient (torch creates the state lazily, on the first step)."""
        group = self._torch.param_groups[self._group_of[id(param)]]
        probe = torch.zeros_like(param, requires_grad=True)
        options = {k: v for k, v in group.items() if k != "params"}
        optimizer = self._cls([probe], **options)
        probe.grad = torch.zeros_like(probe)
        optimizer.step()
        return {name: (tuple(v.shape), v.dtype) for name, v in optimizer.state[probe].items()
                if isinstance(v, torch.Tensor)}  # fmt: skip

    def set_state(self, states: Mapping[int, Mapping[str, torch.Tensor]], params: Sequence[torch.Tensor]) -> None:
        """Replace torch's state of `params[i]` by `states[i]`, checked already."""
        for index, fields in states.items():
            self._torch.state[params[index]] = {name: value.clone() for name, value in fields.items()}

    def state_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The torch optimizer's state as named tensors plus JSON-able rest."""
        state = self._torch.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in state["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}/{name}"] = value.clone()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        return tensors, {"scalars": scalars, "group_options": self.group_options}

    def load_state_parts(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Inverse of state_parts(), for a freshly built optimizer of the same job."""
        per_param: dict[int, dict[str, Any]] = {}
        for name, tensor in tensors.items():
            index, _, field = name.partition("/")
            per_param.setdefault(int(index), {})[field] = tensor
        for index, values in meta["scalars"].items():
            per_param.setdefault(int(index), {}).update(values)
        state = self._torch.state_dict()
        state["state"] = per_param
        self._torch.load_state_dict(state)
        self.group_options = [dict(o) for o in meta["group_options"]]


def _kind(value: Any) -> str:
    """Type class of a hyperparameter; int and float interchange (a scheduler may turn 1 into 0.5)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (tuple, list)):  # betas: a tuple on the wire, a list from a checkpoint
        return "sequence"
    return type(value).__name__
