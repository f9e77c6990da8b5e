"""A push that streams to every server while backward still computes its
gradients (DistributedOptimizer's overlap)."""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from collections.abc import Iterator

import torch

from ps_common.errors import InvalidArgument, PSError
from ps_common.proto import ps_pb2 as pb
from ps_worker.compression import Payload
from ps_worker.pushing import Pusher
from ps_worker.servers import RETRIED_WHILE_WAITING
from ps_worker.sharding import Piece
from ps_worker.transport import PushCall

__all__ = ["PushStream"]


class PushStream:
    """One step's push, streaming to every server while its gradients arrive.

    `add` encodes a gradient (compressing it as the job says) and queues its
    pieces for the servers' streams, which are sent from other threads;
    `finish` marks what was never added as absent, waits for every server's
    answer and, where a server was down, sends the whole push again. A
    fused key is queued once the last of its parameters is added.

    What is sent goes in one request per server, which a server applies
    only when `seal` ends it: a step abandoned before (`cancel`, or a
    gradient with NaN) changes no server. On loopback that request carries
    the whole push, as each request costs the shared cores CPU. Where the
    next pull goes with the push (`pulls_during_push`, over links), a
    request held open holds back the pull of all it carries: there it takes
    at most `push_request_bytes`, and what is left at `seal` follows in
    requests of that size, each applied as it lands, as `PSClient.push`
    sends them. (The queues are SimpleQueues: fed from backward's thread,
    a threading.Condition costs the overlapped step measurably more.)
    """

    def __init__(self, pusher: Pusher, header: pb.PushHeader, bounded: bool) -> None:
        self._pusher = pusher
        self._header = header
        self._payloads: dict[str, Payload | None] = {}  # by piece key
        self._grads: dict[str, torch.Tensor | None] = {}  # those added, checked, by parameter name
        self._unadded: dict[str, int] = {}  # by piece key: how many of its parameters are still to come
        servers = len(pusher.servers)
        self._queues: list[queue.SimpleQueue[Piece | None]] = [queue.SimpleQueue() for _ in range(servers)]
        self._ended = threading.Event()  # sealed or cancelled: a full first request may end
        # Where the next pull goes with the push, a held request holds back
        # the pull of all it carries until it ends: no bigger than any other.
        self._bounded = bounded
        self._held_bytes = pusher.request_bytes if bounded else sys.maxsize
        self._taken = [0] * servers  # bytes of each server's first request
        self._refused: InvalidArgument | None = None
        self._untaken: list[list[Piece]] | None = None  # by server, once sealed
        self._calls: list[PushCall] = []
        for server in range(servers):
            requests = pusher.messages(header, self._arrivals(server), self._payloads, counted=True)
            self._calls.append(pusher.start(server, requests))

    def add(self, name: str, grad: torch.Tensor | None) -> None:
        """This step's gradient of parameter `name` (a CPU tensor; None: no
        gradient). One with NaN or Inf abandons the push (`finish` raises), as
        does a fused key given gradients for some of its parameters only."""
        if self._refused is not None:
            return
        if name in self._grads:
            raise InvalidArgument(f"gradient of {name!r} given twice in the push of step {self._header.step}")
        pusher, step = self._pusher, self._header.step
        self._grads[name] = pusher.checked_grad(name, grad)  # raises for an unknown name
        # A fused key goes once the last of its parameters is added.
        ready = []
        for piece in pusher.layout.pieces_of[name]:
            self._unadded[piece.key] = self._unadded.get(piece.key, len(piece.parts)) - 1
            if self._unadded[piece.key] == 0:
                ready.append(piece)
        try:
            for piece in ready:
                self._payloads[piece.key] = pusher.compress(piece, pusher.gathered(piece, self._grads, step))
        except InvalidArgument as exc:
            self._refused = exc
            self.cancel()
            return
        for piece in ready:
            self._queues[piece.server].put(piece)

    def seal(self) -> None:
        """Mark what was never added as absent and end the first requests;
        raises, with nothing more sent, if a gradient was refused. (`finish`
        seals first: call it alone to refuse bad input before starting a pull.)"""
        if self._untaken is not None:
            return
        for name in self._pusher.layout.pieces_of:
            if name not in self._grads:
                self.add(name, None)
        if self._refused is not None:
            raise self._refused
        self._untaken = self._end(keep_queued=not self._bounded)
        # Kept so that a pull that finds its server restarted can push again.
        self._pusher.remember(self._header, self._payloads)

    def finish(self) -> None:
        """Seal, send the rest and return once every server took the push."""
        self.seal()
        pusher, step, untaken = self._pusher, self._header.step, self._untaken
        if untaken is None:
            raise RuntimeError("a sealed push has its untaken pieces")

        def settle(server: int) -> None:
            try:
                untaken_here = untaken[server]
                rest = pusher.start_requests(server, self._header, untaken_here, self._payloads) if untaken_here else []
                pusher.settle([self._calls[server], *rest])
                return
            except PSError as exc:
                if exc.code not in RETRIED_WHILE_WAITING:
                    raise
            pusher.servers.retry_while_waiting(
                server, f"to take the push of step {step}", lambda: pusher.push_to(server)
            )

        pusher.servers.on_every(settle)

    def cancel(self) -> None:
        """Abandon the push (the servers apply none of it)."""
        for call in self._calls:
            call.cancel()
        self._end(keep_queued=False)

    def _end(self, keep_queued: bool) -> list[list[Piece]]:
        """End the first requests once they took what is queued for them
        (`keep_queued`), or now; the pieces each server's leaves untaken."""
        untaken: list[list[Piece]] = [[] for _ in self._queues]
        self._ended.set()
        if not keep_queued:
            for pending, left in zip(self._queues, untaken, strict=True):
                with contextlib.suppress(queue.Empty):
                    while True:
                        piece = pending.get_nowait()
                        if piece is not None:
                            left.append(piece)
        for pending in self._queues:
            pending.put(None)  # what a first request still waiting for a piece takes as its end
        return untaken

    def _arrivals(self, server: int) -> Iterator[Piece]:
        """The pieces for `server` as they are added, until sealed (or the call ends)."""
        pending = self._queues[server]
        while self._taken[server] < self._held_bytes:
            try:
                piece = pending.get(timeout=1.0)
            except queue.Empty:
                if len(self._calls) > server and self._calls[server].done():
                    return  # abandoned: the call already ended (deadline, error)
                continue
            if piece is None:
                return
            payload = self._payloads[piece.key]
            self._taken[server] += 0 if payload is None else payload.nbytes
            yield piece
        # Full: ending the request would apply it, so it stays open until sealed.
        while not self._ended.wait(timeout=1.0):
            if len(self._calls) > server and self._calls[server].done():
                return
