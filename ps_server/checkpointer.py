"""Writes a shard's checkpoints: periodically (every K updates or T seconds),
right after Init, on request, and once more on shutdown."""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from pathlib import Path

from ps_common.errors import FailedPrecondition
from ps_server.shard import Shard, updates_taken
from ps_server.storage import latest_checkpoint, write_checkpoint

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, shard: Shard, directory: Path, every_updates: int, every_seconds: float, keep: int) -> None:
        self._shard = shard
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        # Two servers writing one directory would restore each other's shards.
        self._lock_file = open(directory / ".lock", "w")  # noqa: SIM115 - held for the server's lifetime
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise OSError(f"checkpoint directory {directory} is in use by another server") from None
        self._every_updates = every_updates
        self._every_seconds = every_seconds
        self._keep = keep
        self._write_lock = threading.Lock()
        self._last_updates: int | None = None  # the shard's progress at the last checkpoint; None: none yet
        self._last_time = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ps-checkpointer", daemon=True)

    def restore(self) -> bool:
        """Load the newest valid checkpoint into the shard; False if there is none."""
        found = latest_checkpoint(self.directory)
        if found is None:
            log.info("no checkpoint in %s: starting empty", self.directory)
            return False
        path, state = found
        self._shard.restore(state)
        self._last_updates = self._shard.progress()
        log.info("restored %s (%d updates applied before)", path, self._last_updates)
        return True

    def start(self) -> None:
        self._thread.start()

    def write_now(self) -> tuple[Path, int]:
        """Write a checkpoint; returns its path and the shard's lowest key version."""
        with self._write_lock:
            state = self._shard.snapshot()
            if state is None:
                raise FailedPrecondition("nothing to checkpoint: the server has not been initialized")
            path = write_checkpoint(self.directory, state, self._keep)
            versions = [s["version"] for s in state.meta["slots"].values()]
            self._last_updates = updates_taken(versions)
            self._last_time = time.monotonic()
        version = min(versions, default=0)
        log.info("checkpoint %s written at version %d", path, version)
        return path, version

    def stop(self) -> None:
        """Stop the periodic writer and write a last checkpoint if anything changed."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._due(final=True):
            self.write_now()
        self._lock_file.close()

    def _due(self, final: bool = False) -> bool:
        if self._shard.job is None:
            return False
        updates = self._shard.progress()
        if self._last_updates is None:
            return True  # just initialized: the job itself must survive a crash
        if updates == self._last_updates:
            return False
        if final:
            return True
        by_count = self._every_updates > 0 and updates - self._last_updates >= self._every_updates
        by_time = self._every_seconds > 0 and time.monotonic() - self._last_time >= self._every_seconds
        return by_count or by_time

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if self._due():
                try:
                    self.write_now()
                except OSError:
                    log.exception("checkpoint failed; will retry")
