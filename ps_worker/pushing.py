"""How one worker's gradients go up: checked, gathered into the servers'
keys, compressed as the job says, and sent to each server in requests it
applies as they land, all or nothing each."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from ps_common import codec, wire
from ps_common.errors import InvalidArgument, PSError
from ps_common.proto import ps_pb2 as pb
from ps_worker.compression import Compressor, Payload
from ps_worker.layout import Layout, gather
from ps_worker.servers import RETRIED_WHILE_WAITING, Servers
from ps_worker.sharding import Piece, cut_requests
from ps_worker.transport import PushCall

__all__ = ["Pusher"]

Payloads = Mapping[str, Payload | None]


class Pusher:
    """Encodes and sends worker pushes to `servers`, laid out as `layout`,
    in requests of at most `request_bytes`."""

    def __init__(self, servers: Servers, layout: Layout, compressor: Compressor, request_bytes: int) -> None:
        self.servers = servers
        self.layout = layout
        self.compressor = compressor
        self.request_bytes = request_bytes
        self._last: tuple[pb.PushHeader, Payloads] | None = None
        self.bytes_pushed = 0  # gradient bytes sent (after compression), retries included
        self._counting = threading.Lock()

    # -- encoding ---------------------------------------------------------------------

    def checked_grad(self, name: str, grad: torch.Tensor | None) -> torch.Tensor | None:
        """`grad`, once checked to fit parameter `name`."""
        if name not in self.layout.numel:
            raise InvalidArgument(f"push of unknown parameter {name!r}")
        if grad is not None:
            self.layout.check_fits(name, grad, f"gradient of {name!r}")
        return grad

    def gathered(self, piece: Piece, grads: Mapping[str, torch.Tensor | None], step: int) -> torch.Tensor | None:
        """The gradient of `piece` (flat, uncompressed) from the checked gradients
        by name; None: absent. Raises for NaN or Inf, or for a fused key some of
        whose parameters have no gradient."""
        absent = [name for name in piece.names if grads[name] is None]
        if len(absent) == len(piece.parts):
            return None
        if absent:
            raise InvalidArgument(
                f"push of step {step} has gradients for some of the parameters fused into key {piece.key!r} "
                f"but none for {absent}; fused parameters are updated together, so give them gradients in the "
                "same steps, or do not fuse them (fuse_below_bytes=0, --fuse-below-bytes 0)"
            )
        gathered = gather(piece, grads)  # type: ignore[arg-type]  # none absent
        if not codec.all_finite(gathered):
            bad = [name for name in piece.names if not codec.all_finite(grads[name])]  # type: ignore[arg-type]
            raise InvalidArgument(
                f"gradient of {bad[0]!r} contains NaN or Inf; nothing of the push of step {step} was applied"
            )
        return gathered

    def compress(self, piece: Piece, gathered: torch.Tensor | None) -> Payload | None:
        """What travels of a piece's gathered gradient (None: absent), as the job's compression says."""
        if gathered is None:
            return None
        return self.compressor.encode(piece.key, gathered, piece.sizes if piece.fused else ())

    def prepare(self, grads: Mapping[str, torch.Tensor | None], header: pb.PushHeader) -> None:
        """Check and encode a whole push (raising for bad input before
        anything is sent) as the one `send` sends."""
        missing = set(self.layout.pieces_of) - set(grads)
        if missing:
            raise InvalidArgument(f"push has no entry for parameters {sorted(missing)}")
        checked = {name: self.checked_grad(name, grad) for name, grad in grads.items()}
        # Every gradient is checked before any is encoded: top-k's residuals change as it encodes.
        pieces = self.layout.every_piece
        gathered = {p.key: self.gathered(p, checked, header.step) for p in pieces}
        self.remember(header, {p.key: self.compress(p, gathered[p.key]) for p in pieces})

    def remember(self, header: pb.PushHeader, payloads: Payloads) -> None:
        """Make this the push `push_to` sends again (to a server that restarted:
        (worker, step, key) ids make the repeat harmless if it had landed)."""
        self._last = (header, payloads)

    @property
    def has_pushed(self) -> bool:
        return self._last is not None

    # -- sending ----------------------------------------------------------------------

    def send(self) -> None:
        """Send the remembered push to every server, waiting out restarts."""
        header, _ = self._remembered()
        self.servers.on_every(
            lambda s: self.servers.retry_while_waiting(
                s, f"to take the push of step {header.step}", lambda: self.push_to(s)
            )
        )

    def push_to(self, server: int) -> None:
        """Send the remembered push to one server, once."""
        header, payloads = self._remembered()
        self.settle(self.start_requests(server, header, self.layout.pieces[server], payloads))

    def _remembered(self) -> tuple[pb.PushHeader, Payloads]:
        if self._last is None:
            raise RuntimeError("no push to send")
        return self._last

    def start_requests(
        self, server: int, header: pb.PushHeader, pieces: Sequence[Piece], payloads: Payloads
    ) -> list[PushCall]:
        """Start sending `pieces` to `server` in requests of at most request_bytes."""
        sizes = {}  # of these pieces only: `payloads` holds every server's
        for piece in pieces:
            payload = payloads[piece.key]
            sizes[piece.key] = 0 if payload is None else payload.nbytes
        return [
            self.start(server, list(self.messages(header, group, payloads, counted=True)))
            for group in cut_requests(pieces, sizes, self.request_bytes)
        ]

    def start(self, server: int, frames: Iterable[wire.Frame]) -> PushCall:
        return self.servers.transports[server].push(frames, self.servers.config.timeout)

    @staticmethod
    def settle(calls: Sequence[PushCall]) -> None:
        """Wait for every call, then raise a failure if any (one that a retry
        cannot cure first): none is left in flight to race a retry."""
        errors = []
        for call in calls:
            try:
                call.result()
            except PSError as exc:
                errors.append(exc)
        if errors:
            raise min(errors, key=lambda exc: exc.code in RETRIED_WHILE_WAITING)

    def messages(
        self,
        header: pb.InitHeader | pb.PushHeader,
        pieces: Iterable[Piece],
        payloads: Payloads,
        counted: bool = False,
    ) -> Iterator[wire.Frame]:
        """A client stream: the header, then `pieces` as their payloads say
        (None: absent), small chunks batched into one message; `counted`
        bytes add to bytes_pushed."""
        chunk_bytes = self.servers.config.chunk_bytes

        def chunks() -> Iterator[codec.Chunk]:
            for piece in pieces:
                payload = payloads[piece.key]
                if payload is None:
                    yield codec.absent_chunk(piece.key)
                    continue
                for chunk in payload.chunks(piece.key, chunk_bytes):
                    if counted:
                        with self._counting:
                            self.bytes_pushed += len(chunk.data) + len(chunk.indices)
                    yield chunk

        batches = codec.batched(chunks(), chunk_bytes)
        yield wire.Frame(header=header, chunks=next(batches, []))
        for batch in batches:
            yield wire.Frame(chunks=batch)
