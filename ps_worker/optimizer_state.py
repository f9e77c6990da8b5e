"""The optimizer state the servers keep, in torch's per-parameter form: each
server's keys' state (ranges of parameters, or several whole small ones)
joined into whole tensors by parameter, and cut back into keys to load."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ps_common import codec
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb
from ps_worker.layout import Layout, flat
from ps_worker.servers import Servers
from ps_worker.sharding import Piece

__all__ = ["read_state", "write_state"]

State = dict[str, torch.Tensor]  # torch's state of one parameter: field -> tensor


def read_state(servers: Servers, layout: Layout, shapes: Mapping[str, torch.Size]) -> dict[str, State]:
    """Every parameter's state, by name (a parameter not yet updated has none)."""
    request = pb.StateRequest(worker_id=servers.worker_id)

    def read(server: int) -> dict[str, torch.Tensor]:
        received: dict[str, torch.Tensor] = {}

        def into(chunk: codec.ChunkLike) -> torch.Tensor:
            tensor = torch.empty(tuple(chunk.shape), dtype=codec.dtype_from_proto(chunk.dtype))
            received[chunk.key] = tensor
            return tensor.view(-1)

        servers.transports[server].get_state(request, servers.config.timeout, into)
        return received

    by_key: dict[str, State] = {}
    for received in servers.on_every(read):
        for name, tensor in received.items():
            key, _, field = name.rpartition("/")
            by_key.setdefault(key, {})[field] = tensor
    return {name: state for name in layout.pieces_of if (state := _joined(name, layout, by_key, shapes[name]))}


def _joined(name: str, layout: Layout, by_key: Mapping[str, State], shape: torch.Size) -> State:
    """Parameter `name`'s state from the states of the keys it lies in."""
    pieces = layout.pieces_of[name]
    states = [by_key.get(piece.key, {}) for piece in pieces]
    whole: State = {}
    for field in _common_fields(states, f"the servers hold optimizer state for only some of the ranges of {name!r}"):
        values = [state[field] for state in states]
        if values[0].dim() == 0:  # a count, such as Adam's step: one for the parameter
            whole[field] = _one(
                values,
                f"the ranges of {name!r} hold different {field!r}, which torch's "
                "per-parameter state cannot express (some were updated without the others)",
            )
            continue
        tensor = torch.empty(shape, dtype=values[0].dtype)
        for piece, value in zip(pieces, values, strict=True):
            part = next(p for p in piece.parts if p.name == name)
            offset = sum(p.numel for p in piece.parts[: piece.parts.index(part)])
            flat(tensor)[part.start : part.stop] = value.view(-1)[offset : offset + part.numel]
        whole[field] = tensor
    return whole


def write_state(servers: Servers, layout: Layout, states: Mapping[str, State]) -> None:
    """Set the servers' optimizer state from `states` (by parameter name, in
    torch's form): checked by every server first, then set on every one, so
    that a state one server refuses changes none."""
    by_server = [[(piece, _cut(piece, states)) for piece in pieces] for pieces in layout.pieces]

    def write(server: int, check_only: bool) -> None:
        messages = _messages(servers.worker_id, by_server[server], servers.config.chunk_bytes, check_only)
        servers.transports[server].set_state(messages, servers.config.timeout)

    servers.on_every(lambda server: write(server, check_only=True))
    servers.on_every(lambda server: write(server, check_only=False))


def _cut(piece: Piece, states: Mapping[str, State]) -> State:
    """The state of key `piece`, from its parameters' (empty if none has any)."""
    parts = [states.get(name, {}) for name in piece.names]
    cut: State = {}
    for field in _common_fields(parts, f"parameters {piece.names} share a key: all must have optimizer state, or none"):
        values = [state[field] for state in parts]
        if values[0].dim() == 0:
            cut[field] = _one(values, f"parameters {piece.names} share a key but not the same {field!r}")
        else:
            cut[field] = torch.cat([flat(value.contiguous())[part.start : part.stop]
                                    for value, part in zip(values, piece.parts, strict=True)])  # fmt: skip
    return cut


def _messages(
    worker_id: int, states: list[tuple[Piece, State]], chunk_bytes: int, check_only: bool
) -> Iterator[pb.SetStateRequest]:
    chunks = (
        chunk
        for piece, state in states
        for field, value in sorted(state.items())
        for chunk in codec.tensor_to_chunks(f"{piece.key}/{field}", value.detach().cpu(), chunk_bytes)
    )
    sent = False
    for batch in codec.batched(chunks, chunk_bytes):
        sent = True
        yield pb.SetStateRequest(worker_id=worker_id, chunks=[c.to_proto() for c in batch], check_only=check_only)
    if not sent:
        yield pb.SetStateRequest(worker_id=worker_id, check_only=check_only)


def _common_fields(states: list[State], mismatch: str) -> list[str]:
    """The fields every one of `states` has (none if none has any); InvalidArgument(`mismatch`) if they differ."""
    if not any(states):
        return []
    fields = set(states[0])
    if any(set(state) != fields for state in states):
        raise InvalidArgument(mismatch)
    return sorted(fields)


def _one(values: list[torch.Tensor], mismatch: str) -> torch.Tensor:
    """The value all of `values` hold (a count such as a step); InvalidArgument(`mismatch`) if they differ."""
    if any(not torch.equal(value, values[0]) for value in values):
        raise InvalidArgument(mismatch)
    return values[0].clone()
