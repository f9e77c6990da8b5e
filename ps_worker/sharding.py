"""Which server holds which part of which parameter, and how a server's
share of a push is cut into requests.

Every worker computes the same placement from the same parameter list and
server count, so nobody has to ask. Each tensor is cut into contiguous
element ranges ("pieces") of at most `max_piece_bytes`, small relative to a
server's share, and pieces go to the least-loaded server, largest first.
A model dominated by one big tensor is thereby spread evenly too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ps_common.codec import DEFAULT_CHUNK_BYTES

# Pieces are at most 1/16 of a server's share, so greedy placement keeps
# every server near the mean (within 10% for a model dominated by one
# tensor, on 1 to 8 servers: tested); but no smaller than 1 MiB: each piece
# costs a chunk's Python on both sides, a fraction of a millisecond, which
# on a small model outweighs its bytes. Measured against 64 KiB (one worker,
# one server, 5 rounds taking turns): a push + pull of 1 MiB in 3 ms
# instead of 7-8, of 4 MiB in 7.5-8 instead of 10-12.5; the digits job
# (`ps-train`, 2 servers, 4 workers) trained in 7.9-8.1 s instead of 8.8-9.0.
PIECES_PER_SERVER = 16
MIN_PIECE_BYTES = 2**20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    numel: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of the flattened parameter `name`, on `server`."""

    key: str
    name: str
    server: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def piece_bytes_for(total_bytes: int, num_servers: int, max_piece_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    share = math.ceil(total_bytes / (num_servers * PIECES_PER_SERVER))
    return max(1, min(max_piece_bytes, max(MIN_PIECE_BYTES, share)))


def plan_placement(
    tensors: Sequence[TensorInfo], num_servers: int, max_piece_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[Piece]:
    """Deterministic placement of `tensors` on `num_servers` servers, in tensor order."""
    if num_servers < 1:
        raise ValueError(f"need at least one server, got {num_servers}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    piece_bytes = piece_bytes_for(sum(t.nbytes for t in tensors), num_servers, max_piece_bytes)
    pieces: list[tuple[TensorInfo, int, int]] = []
    for tensor in tensors:
        count = max(1, math.ceil(tensor.nbytes / piece_bytes))
        bounds = [tensor.numel * i // count for i in range(count + 1)]
        pieces += [(tensor, bounds[i], bounds[i + 1]) for i in range(count)]
    order = sorted(range(len(pieces)), key=lambda i: (-(pieces[i][2] - pieces[i][1]) * pieces[i][0].itemsize, i))
    load = [0] * num_servers
    server_of = [0] * len(pieces)
    for index in order:
        tensor, start, stop = pieces[index]
        server = min(range(num_servers), key=lambda s: (load[s], s))
        server_of[index] = server
        load[server] += (stop - start) * tensor.itemsize
    return [
        Piece(
            key=tensor.name if (start, stop) == (0, tensor.numel) else f"{tensor.name}[{start}:{stop}]",
            name=tensor.name,
            server=server_of[i],
            start=start,
            stop=stop,
        )
        for i, (tensor, start, stop) in enumerate(pieces)
    ]


def cut_requests(pieces: Sequence[Piece], sizes: Mapping[str, int], limit: int) -> list[list[Piece]]:
    """A server's share of a push, in order, as requests of at most `limit`
    bytes (`sizes` by piece key; a piece larger than `limit` goes alone);
    one request at least, so that a server holding nothing still hears of the step."""
    requests: list[list[Piece]] = [[]]
    size = 0
    for piece in pieces:
        if requests[-1] and size + sizes[piece.key] > limit:
            requests.append([])
            size = 0
        requests[-1].append(piece)
        size += sizes[piece.key]
    return requests


def bytes_per_server(pieces: Sequence[Piece], tensors: Sequence[TensorInfo], num_servers: int) -> list[int]:
    itemsize = {t.name: t.itemsize for t in tensors}
    load = [0] * num_servers
    for piece in pieces:
        load[piece.server] += piece.numel * itemsize[piece.name]
    return load
