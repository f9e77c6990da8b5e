"""Server-side optimizers against torch.optim trained locally (the oracle):
one BSP worker must reproduce local training to 1e-6 after 500 steps."""

from collections.abc import Callable

import pytest
import torch

from ps_common import codec
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb
from ps_server.harness import InProcessCluster
from ps_server.optimizer import ShardOptimizer
from tests.support.training import batches, max_difference, small_model, train_distributed, train_local

OPTIMIZERS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "sgd-momentum-dampening-wd": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.02, momentum=0.9, dampening=0.1, weight_decay=1e-3
    ),
    "sgd-nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, nesterov=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "adamw-amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05, amsgrad=True),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05, lr_decay=1e-3, weight_decay=1e-4),
    "rmsprop-centered-momentum": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, momentum=0.5, centered=True),
    # Two param groups with their own learning rates.
    "adam-param-groups": lambda m: torch.optim.Adam(
        [{"params": m[0].parameters(), "lr": 3e-3}, {"params": m[2].parameters()}], lr=1e-3
    ),
}

STEPS = 500


@pytest.mark.parametrize("servers", [1, 3])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_bsp_worker_reproduces_local_torch_optim(name: str, servers: int) -> None:
    local, remote = small_model(), small_model()
    data = batches(STEPS, batch=16)
    train_local(local, OPTIMIZERS[name](local), data)
    with InProcessCluster(num_servers=servers) as cluster:
        train_distributed(cluster.addresses, remote, OPTIMIZERS[name](remote), data)
    assert max_difference(local, remote) <= 1e-6


def test_lr_scheduler_on_the_wrapped_optimizer_keeps_working() -> None:
    local, remote = small_model(), small_model()
    data = batches(60, batch=16)
    schedule = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)  # noqa: E731
    train_local(local, torch.optim.SGD(local.parameters(), lr=0.1), data, schedule)
    with InProcessCluster(num_servers=2) as cluster:
        train_distributed(cluster.addresses, remote, torch.optim.SGD(remote.parameters(), lr=0.1), data,
                          scheduler_factory=schedule)  # fmt: skip
    # Without the scheduler the weights would differ by far more than this.
    assert max_difference(local, remote) <= 1e-6


def test_parameter_without_gradient_is_left_alone_like_torch_does() -> None:
    local, remote = small_model(), small_model()
    extra_local, extra_remote = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    local.register_parameter("unused", extra_local)
    remote.register_parameter("unused", extra_remote)
    data = batches(20, batch=8)
    train_local(local, torch.optim.Adam(local.parameters(), lr=1e-2, weight_decay=0.1), data)
    with InProcessCluster(num_servers=2) as cluster:
        train_distributed(
            cluster.addresses, remote, torch.optim.Adam(remote.parameters(), lr=1e-2, weight_decay=0.1), data
        )
    assert torch.equal(extra_remote.detach(), torch.ones(3))
    assert max_difference(local, remote) <= 1e-6


def test_a_step_of_some_keys_updates_those_and_keeps_every_key_in_the_optimizer() -> None:
    """The shard's optimizer steps only the keys of a request; the others keep
    their weights and state, and its groups still hold every key afterwards."""
    params = [torch.zeros(4), torch.zeros(4), torch.zeros(4)]
    spec = pb.OptimizerSpec(name="Adam", groups=[codec.options_to_proto({"lr": 0.1})] * 2)
    optimizer = ShardOptimizer(spec, params, groups=[0, 1, 0], fused=True)
    params[2].grad = torch.ones(4)
    optimizer.step([params[2]], None)
    params[2].grad = None
    assert torch.equal(params[0], torch.zeros(4)) and torch.equal(params[1], torch.zeros(4))
    assert torch.all(params[2] < 0)
    state, _ = optimizer.state_parts()  # indexed in group order: group 0 holds keys 0 and 2
    assert sorted(state) == ["1/exp_avg", "1/exp_avg_sq", "1/step"]
    assert [len(g["params"]) for g in optimizer._torch.param_groups] == [2, 1]  # noqa: SLF001


@pytest.mark.parametrize(
    ("name", "options", "fused"),
    [
        ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, True),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, False),
        ("Adam", {"lr": 0.01, "amsgrad": True}, True),
        ("Adagrad", {"lr": 0.1}, True),
        ("RMSprop", {"lr": 0.01}, True),  # no fused kernel: divided first
    ],
)
def test_a_step_of_summed_gradients_applies_their_mean_bit_for_bit(
    name: str, options: dict[str, float], fused: bool
) -> None:
    """BSP hands the optimizer the sum of the workers' gradients and their
    count; the step must be torch's step on the mean, whichever kernel runs."""
    torch.manual_seed(0)
    start = torch.randn(1000)
    ours, local = start.clone(), start.clone().requires_grad_()
    spec = pb.OptimizerSpec(name=name, groups=[codec.options_to_proto(options)])
    optimizer = ShardOptimizer(spec, [ours], groups=[0], fused=fused)
    oracle = getattr(torch.optim, name)([local], **options, **({"fused": True} if fused and name != "RMSprop" else {}))
    for _ in range(3):
        summed = torch.randn(3, 1000).sum(dim=0)
        ours.grad = summed.clone()
        optimizer.step([ours], None, contributions=3)
        local.grad = summed / 3
        oracle.step()
    assert torch.equal(ours, local.detach())


def test_hyperparameters_checked_once_are_checked_again_when_they_change() -> None:
    """check_options remembers the last hyperparameters it accepted: the same
    ones again decode the same, new ones are checked, bad ones refused."""
    spec = pb.OptimizerSpec(name="SGD", groups=[codec.options_to_proto({"lr": 0.1, "momentum": 0.9})])
    optimizer = ShardOptimizer(spec, [torch.zeros(2)], groups=[0])

    def groups(**options: float) -> list[pb.ParamGroup]:
        return list(pb.PushHeader(groups=[codec.options_to_proto({"lr": 0.1, "momentum": 0.9, **options})]).groups)

    assert optimizer.check_options(groups()) == [{"lr": 0.1, "momentum": 0.9}]
    assert optimizer.check_options(groups()) == [{"lr": 0.1, "momentum": 0.9}]
    assert optimizer.check_options(groups(lr=0.05)) == [{"lr": 0.05, "momentum": 0.9}]
    with pytest.raises(InvalidArgument, match="refused its hyperparameters"):
        optimizer.check_options(groups(lr=-1.0))
    with pytest.raises(InvalidArgument, match="refused its hyperparameters"):
        optimizer.check_options(groups(lr=-1.0))  # a refusal is not remembered as accepted
    assert optimizer.check_options(groups(lr=0.05)) == [{"lr": 0.05, "momentum": 0.9}]
    with pytest.raises(InvalidArgument, match="param groups"):
        optimizer.check_options(groups() * 2)
