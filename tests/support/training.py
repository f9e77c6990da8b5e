"""Helpers shared by the integration tests: small models, data, and a
step-by-step comparison of distributed training against local torch."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ps_worker import ClientConfig, DistributedOptimizer, PSClient

# Small pieces force every tensor of the test models to be split across
# servers, and small requests every push into several requests per server.
SPLITTING = ClientConfig(max_piece_bytes=256, push_request_bytes=512, timeout=30, wait_timeout=60)

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]  # type: ignore[type-arg]


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))


def batches(steps: int, batch: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=gen), torch.randn(batch, 4, generator=gen)) for _ in range(steps)]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def train_local(model: nn.Module, optimizer: torch.optim.Optimizer, data, scheduler_factory=None) -> None:  # type: ignore[no-untyped-def]
    scheduler = scheduler_factory(optimizer) if scheduler_factory else None
    for x, y in data:
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        optimizer.step()
        if scheduler:
            scheduler.step()


def train_distributed(  # type: ignore[no-untyped-def]
    addresses, model, optimizer, data, mode="bsp", config=SPLITTING, scheduler_factory=None, **kwargs
) -> None:
    with PSClient(addresses, 0, 1, config) as client:
        dist = DistributedOptimizer(optimizer, client, named_parameters=model.named_parameters(), mode=mode, **kwargs)
        train_local(model, dist, data, scheduler_factory)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
