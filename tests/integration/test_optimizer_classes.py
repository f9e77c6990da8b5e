"""Which optimizer classes the servers can run: torch.optim's own, and
subclasses that leave the update alone; anything else is refused, never
quietly replaced by torch's update."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ps_common.errors import InvalidArgument
from tests.integration.conftest import StartCluster
from tests.support.training import batches, max_difference, small_model, train_distributed, train_local


class AdamWithReport(torch.optim.Adam):
    """A subclass that only adds a method, as training frameworks do."""

    def learning_rates(self) -> list[float]:
        return [group["lr"] for group in self.param_groups]


class ClippingAdam(torch.optim.Adam):
    """A subclass that changes the update."""

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], 0.1)
        return super().step(closure)


class Adam(torch.optim.Optimizer):
    """A user's own optimizer that happens to be named like torch's."""

    def __init__(self, params: Any, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad.sign(), alpha=group["lr"])


def test_a_subclass_that_only_adds_methods_trains_as_its_torch_class(start_cluster: StartCluster) -> None:
    local, remote = small_model(), small_model()
    data = batches(50, batch=16)
    train_local(local, torch.optim.Adam(local.parameters(), lr=1e-2), data)
    cluster = start_cluster(num_servers=2)
    train_distributed(cluster.addresses, remote, AdamWithReport(remote.parameters(), lr=1e-2), data)
    assert max_difference(local, remote) <= 1e-6


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: ClippingAdam(p, lr=1e-2), r"ClippingAdam overrides step\(\) of torch.optim.Adam"),
        (lambda p: Adam(p, lr=1e-2), r"test_optimizer_classes.Adam is not a torch.optim optimizer"),
    ],
    ids=["overrides-step", "named-like-torch"],
)
def test_an_optimizer_whose_update_the_servers_cannot_run_is_refused_before_init(
    start_cluster: StartCluster, make: Any, message: str
) -> None:
    cluster = start_cluster(num_servers=1)
    model = small_model()
    with pytest.raises(InvalidArgument, match=message):
        train_distributed(cluster.addresses, model, make(model.parameters()), batches(1, batch=4))
    assert not cluster.servers[0].shard.stats().initialized
