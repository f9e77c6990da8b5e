"""What a shard knows of its workers: each one's clock (the steps it has
pushed for every key), when it was last heard from, and which ones have
stopped holding the others back."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from ps_server.keys import Slot

__all__ = ["Workers"]


class Workers:
    """Workers of a job; one that sends nothing for `timeout` seconds departs
    (BSP steps complete without it, SSP stops waiting for it) until it calls
    again. Not thread-safe: the shard calls it under its lock."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.departed: set[int] = set()
        self.last_push_time: dict[int, float] = {}  # wall-clock time of each worker's last push
        self._last_seen: dict[int, float] = {}
        self._started = time.monotonic()
        self._clock: dict[int, int] = {}
        self._stale: set[int] = set()  # workers that pushed since their clock was computed

    def restart(self) -> None:
        """A job starts (or resumes): nobody has been silent yet."""
        self._started = time.monotonic()

    def seen(self, worker: int) -> bool:
        """Note that `worker` lives; True if it had departed and rejoins."""
        self._last_seen[worker] = time.monotonic()
        if worker in self.departed:
            self.departed.discard(worker)
            return True
        return False

    def expire(self, num_workers: int) -> list[int]:
        """The workers silent for longer than `timeout` that depart now."""
        now = time.monotonic()
        expired = [
            w for w in range(num_workers)
            if w not in self.departed and now - self._last_seen.get(w, self._started) > self.timeout
        ]  # fmt: skip
        self.departed.update(expired)
        return expired

    def leave(self, worker: int) -> bool:
        """`worker` left on purpose; False if it had already departed."""
        if worker in self.departed:
            return False
        self.departed.add(worker)
        return True

    def live(self, num_workers: int) -> list[int]:
        return [w for w in range(num_workers) if w not in self.departed]

    def pushed(self, worker: int, step: int, slots: Iterable[Slot]) -> None:
        """`worker` pushed `step` for some keys: its clock moves once every key has it."""
        self.last_push_time[worker] = time.time()
        if any(True for _ in slots):
            self._stale.add(worker)
        else:
            self._clock[worker] = max(self._clock.get(worker, 0), step + 1)

    def clocks(self, slots: Iterable[Slot]) -> dict[int, int]:
        """Each worker's clock: the steps it has pushed for every key of the
        shard. Computed when read, for the workers that pushed since: on each
        push request it would be a pass over every key (a model cut into many
        pieces sends many requests per step)."""
        if self._stale:
            held = list(slots)
            for worker in self._stale:
                self._clock[worker] = min(s.last_push.get(worker, -1) for s in held) + 1
            self._stale.clear()
        return self._clock

    def restore(self, clocks: Mapping[int, int]) -> None:
        self._clock = dict(clocks)
        self._stale.clear()
        self.restart()
