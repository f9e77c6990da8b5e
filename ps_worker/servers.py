"""A job's servers as one worker reaches them: a transport each, work done
on all of them at once, the waits that ride out a server's restart or other
workers' progress, and the heartbeats that say this worker lives."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import TypeVar

from ps_common import PROTOCOL_VERSION
from ps_common.errors import Code, PSError, WaitTimeout
from ps_common.proto import ps_pb2 as pb
from ps_worker.client_config import ClientConfig
from ps_worker.transport import HELLO_TIMEOUT, Transport, connect

__all__ = ["RETRIED_WHILE_WAITING", "Servers"]

log = logging.getLogger("ps_worker.client")

T = TypeVar("T")

# The statuses of a call that may go through if tried again: the server is
# (re)starting, or it answered that what the call waits for is not there yet.
RETRIED_WHILE_WAITING = (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)


class Servers:
    """Worker `worker_id` (of `num_workers`)'s transports to the servers at `addresses`."""

    def __init__(self, addresses: Sequence[str], worker_id: int, num_workers: int, config: ClientConfig) -> None:
        self.addresses = list(addresses)
        self.worker_id = worker_id
        self.config = config
        self.hello = pb.HelloRequest(protocol_version=PROTOCOL_VERSION, worker_id=worker_id, num_workers=num_workers)
        self.transports: list[Transport] = [
            connect(address, config.security(), config.transport_options(), self.hello) for address in addresses
        ]
        # A job per server for a push and one for a pull at once (push_pull).
        self._pool = futures.ThreadPoolExecutor(max_workers=2 * len(self.addresses), thread_name_prefix="ps-client")
        self._closing = threading.Event()
        self._heartbeat = threading.Thread(target=self._send_heartbeats, name="ps-client-heartbeat", daemon=True)

    def __len__(self) -> int:
        return len(self.addresses)

    def on_every(self, work: Callable[[int], T]) -> list[T]:
        """`work(server)` for every server, at once; their results in server order."""
        if len(self.addresses) == 1:
            return [work(0)]
        jobs = [self._pool.submit(work, s) for s in range(len(self.addresses))]
        return [job.result() for job in jobs]

    def wait_for(self, server: int, initialized: bool) -> pb.HelloResponse:
        """Hello until the server answers (and, if asked, until it is initialized)."""

        def hello() -> pb.HelloResponse:
            response = self.transports[server].hello(self.hello, min(self.config.timeout, HELLO_TIMEOUT))
            if initialized and not response.initialized:
                raise WaitTimeout("worker 0 has not initialized it yet")
            return response

        what = "to be initialized by worker 0" if initialized else "to come up"
        return self.retry_while_waiting(server, what, hello, pause=0.2)

    def retry_while_waiting(
        self,
        server: int,
        what: str,
        call: Callable[[], T],
        pause: float = 0.1,
        abandoned: threading.Event | None = None,
    ) -> T:
        """Repeat `call` while it fails because it is waiting, logging, up to
        wait_timeout, or until `abandoned` is set."""
        address = self.addresses[server]
        start = time.monotonic()
        next_log = start + self.config.wait_log_interval
        while True:
            try:
                return call()
            except PSError as exc:
                if exc.code not in RETRIED_WHILE_WAITING or (abandoned is not None and abandoned.is_set()):
                    raise
                now = time.monotonic()
                if now - start >= self.config.wait_timeout:
                    raise WaitTimeout(
                        f"worker {self.worker_id} gave up waiting for {address} {what} "
                        f"after {self.config.wait_timeout:.0f}s: {exc}"
                    ) from None
                if now >= next_log:
                    # WARNING: shown even where the script configured no logging.
                    log.warning(
                        "worker %d still waiting for %s %s (%.0fs): %s", self.worker_id, address, what, now - start, exc
                    )
                    next_log = now + self.config.wait_log_interval
                time.sleep(pause)

    def start_heartbeats(self) -> None:
        if not self._heartbeat.is_alive():
            self._heartbeat.start()

    def _send_heartbeats(self) -> None:
        """Hello every heartbeat_interval: the servers' sign that this worker lives."""
        while not self._closing.wait(self.config.heartbeat_interval):
            for transport in self.transports:
                try:
                    transport.hello(self.hello, min(self.config.timeout, HELLO_TIMEOUT))
                except PSError as exc:
                    log.debug("heartbeat failed: %s", exc)

    def close(self, leave: bool) -> None:
        """End every connection; with `leave` (the job was joined), tell each
        server first that this worker left, so that nobody waits for it. The
        heartbeats stop before: one after the Leave would rejoin it."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()
        if leave:
            request = pb.LeaveRequest(worker_id=self.worker_id)

            def tell(server: int) -> None:
                try:
                    self.transports[server].leave(request, min(self.config.timeout, HELLO_TIMEOUT))
                except PSError as exc:  # it will give up on this worker after its worker timeout instead
                    log.warning("worker %d could not tell %s that it leaves: %s",
                                self.worker_id, self.addresses[server], exc)  # fmt: skip

            self.on_every(tell)
        self._pool.shutdown(wait=True)
        for transport in self.transports:
            transport.close()
