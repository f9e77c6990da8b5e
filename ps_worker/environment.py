"""A worker's place in a job, from the environment a launcher sets: ps-run,
the deployment files, or torchrun's names where they mean the same."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["WorkerPlace"]

# Ours first, then torchrun's name for the same thing.
SERVERS = "PS_SERVERS"
WORKER_ID = ("PS_WORKER_ID", "RANK")
NUM_WORKERS = ("PS_NUM_WORKERS", "WORLD_SIZE")


@dataclass(frozen=True)
class WorkerPlace:
    """The servers' addresses, this worker's id and the number of workers."""

    servers: list[str]
    worker_id: int
    num_workers: int

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> WorkerPlace:
        """Read PS_SERVERS, PS_WORKER_ID (or RANK) and PS_NUM_WORKERS (or
        WORLD_SIZE); ValueError saying what is missing or inconsistent."""
        env = os.environ if env is None else env
        servers = [address.strip() for address in env.get(SERVERS, "").split(",") if address.strip()]
        if not servers:
            raise ValueError(
                f"{SERVERS} is not set: the comma-separated server addresses (ps-run sets it, with the "
                f"worker's {WORKER_ID[0]} and {NUM_WORKERS[0]}; or pass them to PSClient)"
            )
        return WorkerPlace(servers, _number(env, WORKER_ID), _number(env, NUM_WORKERS))


def _number(env: Mapping[str, str], names: tuple[str, str]) -> int:
    values = {}
    for name in names:
        if name in env:
            try:
                values[name] = int(env[name])
            except ValueError:
                raise ValueError(f"{name}={env[name]!r} is not a whole number") from None
    if not values:
        raise ValueError(f"neither {names[0]} nor {names[1]} is set")
    if len(set(values.values())) > 1:
        raise ValueError(f"{names[0]} and {names[1]} disagree: {values}; set one of them")
    return next(iter(values.values()))
