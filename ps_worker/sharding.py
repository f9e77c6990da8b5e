"""Which server holds which part of which parameter, and how a server's
share of a push is cut into requests.

Every worker computes the same placement from the same parameter list and
server count, so nobody has to ask. Each tensor is cut into contiguous
element ranges ("pieces") of at most `max_piece_bytes`, small relative to a
server's share, and pieces go to the least-loaded server, largest first.
A model dominated by one big tensor is thereby spread evenly too.

Small tensors go the other way: those that may (`TensorInfo.fuses_with`)
are laid end to end into one key, as Horovod and BytePS fuse them, since
every key costs a fraction of a millisecond of Python on both sides of each
push and pull, whatever its size.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

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
    # Tensors with equal, non-None values may share a key (same dtype, same
    # optimizer hyperparameters, updated together); None: a key of its own.
    fuses_with: Hashable = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Part:
    """Elements [start, stop) of the flattened parameter `name`."""

    name: str
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Piece:
    """A key on `server`: its elements are `parts` end to end, in order
    (one range of one parameter, or several whole small parameters)."""

    key: str
    server: int
    parts: tuple[Part, ...]

    # Cached: every push and pull asks, and a fused key may have hundreds of parts.
    @cached_property
    def sizes(self) -> list[int]:
        """Elements of each part, in order."""
        return [part.numel for part in self.parts]

    @cached_property
    def numel(self) -> int:
        return sum(self.sizes)

    @cached_property
    def names(self) -> list[str]:
        return [part.name for part in self.parts]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def piece_bytes_for(total_bytes: int, num_servers: int, max_piece_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    share = math.ceil(total_bytes / (num_servers * PIECES_PER_SERVER))
    return max(1, min(max_piece_bytes, max(MIN_PIECE_BYTES, share)))


def plan_placement(
    tensors: Sequence[TensorInfo],
    num_servers: int,
    max_piece_bytes: int = DEFAULT_CHUNK_BYTES,
    fuse_below_bytes: int = 0,
) -> list[Piece]:
    """Deterministic placement of `tensors` on `num_servers` servers, in
    tensor order; tensors under `fuse_below_bytes` are fused as they allow."""
    if num_servers < 1:
        raise ValueError(f"need at least one server, got {num_servers}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    piece_bytes = piece_bytes_for(sum(t.nbytes for t in tensors), num_servers, max_piece_bytes)
    fused = _fuse(tensors, fuse_below_bytes, piece_bytes, num_servers)
    pieces: list[tuple[Part, ...]] = []
    for tensor in tensors:
        if tensor.name in fused:
            if fused[tensor.name][0].name == tensor.name:  # a fused key stands where its first parameter does
                pieces.append(fused[tensor.name])
            continue
        count = max(1, math.ceil(tensor.nbytes / piece_bytes))
        bounds = [tensor.numel * i // count for i in range(count + 1)]
        pieces += [(Part(tensor.name, bounds[i], bounds[i + 1]),) for i in range(count)]
    itemsize = {t.name: t.itemsize for t in tensors}
    size = [_nbytes(parts, itemsize) for parts in pieces]
    load = [0] * num_servers
    server_of = [0] * len(pieces)
    for index in sorted(range(len(pieces)), key=lambda i: (-size[i], i)):
        server = min(range(num_servers), key=lambda s: (load[s], s))
        server_of[index] = server
        load[server] += size[index]
    numel = {t.name: t.numel for t in tensors}
    placement = [Piece(_key(parts, numel), server_of[i], parts) for i, parts in enumerate(pieces)]
    if len({p.key for p in placement}) != len(placement):
        raise ValueError("a parameter's name equals the key of another one's piece or fused key; rename it")
    return placement


def _fuse(
    tensors: Sequence[TensorInfo], below_bytes: int, piece_bytes: int, num_servers: int
) -> dict[str, tuple[Part, ...]]:
    """The fused keys, as their parts by the name of each member: in tensor
    order, tensors that may fuse fill keys of at most `piece_bytes`, and of
    no more than an even share of them per server, so that a small model
    still keeps every server busy. A key left with one member is no key."""
    small = [t for t in tensors if t.fuses_with is not None and t.nbytes < below_bytes]
    groups: dict[Hashable, list[TensorInfo]] = {}
    for tensor in small:
        groups.setdefault(tensor.fuses_with, []).append(tensor)
    fused: dict[str, tuple[Part, ...]] = {}
    for members in groups.values():
        limit = min(piece_bytes, math.ceil(sum(t.nbytes for t in members) / num_servers))
        keys: list[list[TensorInfo]] = [[]]
        size = 0
        for tensor in members:
            if keys[-1] and size + tensor.nbytes > limit:
                keys.append([])
                size = 0
            keys[-1].append(tensor)
            size += tensor.nbytes
        for key in keys:
            if len(key) > 1:
                parts = tuple(Part(t.name, 0, t.numel) for t in key)
                fused.update((t.name, parts) for t in key)
    return fused


def _nbytes(parts: Sequence[Part], itemsize: Mapping[str, int]) -> int:
    return sum(part.numel * itemsize[part.name] for part in parts)


def _key(parts: tuple[Part, ...], numel: Mapping[str, int]) -> str:
    if len(parts) > 1:
        return f"{parts[0].name}+{len(parts) - 1}"  # a tensor is in one key only: its first names it
    part = parts[0]
    return part.name if (part.start, part.stop) == (0, numel[part.name]) else f"{part.name}[{part.start}:{part.stop}]"


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
        load[piece.server] += _nbytes(piece.parts, itemsize)
    return load
