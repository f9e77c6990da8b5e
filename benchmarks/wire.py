"""Push + pull of a whole fp32 model through our servers, against:

- a plain socket echoing the same bytes over loopback (from another
  process, in the same 4 MiB messages, through buffers that stay in cache
  and, in the full run, through model-sized ones);
- bare gRPC Python streaming the same bytes between two processes (the
  transport's own ceiling), served from a thread pool as ours is and, for
  comparison, from grpc.aio;
- a minimal parameter server on a raw socket (`_minimal_ps`), which does
  only the work a push + pull must and keeps the promises ours keeps: its
  own ratio to the echo shows how much room that work leaves on this
  machine.

Ours goes over loopback TCP against the TCP echo, and over the servers'
Unix socket (what a worker on their host takes, pulling from their shared
weights) against a Unix socket echo. One more row weighs the CPU time
(client and server processes, user and system) of a push + pull against
the echo's: on one machine the cores, not the socket, set both paces."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any

import grpc
import torch

from benchmarks.common import (
    Row,
    interleaved,
    median_seconds,
    process_context,
    process_cpu_seconds,
    server_processes,
    wait_for,
)
from ps_common import codec, data_channel
from ps_common.codec import DEFAULT_CHUNK_BYTES
from ps_worker import ClientConfig, DistributedOptimizer, PSClient

TARGET = 0.7  # the issue's, against the echo; the same bar serves ours against the minimal server
# One round trip through a transport, and the pids of the processes doing its work.
RoundTrip = tuple[Callable[[], None], list[int]]


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view` from `sock`; False if the peer closed the connection first."""
    received = 0
    while received < len(view):
        got = sock.recv_into(view[received:])
        if not got:
            return False
        received += got
    return True


def _messages(nbytes: int, model_sized: bool) -> list[memoryview]:
    """The buffers one side of an echo sends or receives `nbytes` in, 4 MiB
    messages as our transfers cut them: one reused 4 MiB buffer, which stays
    in cache, or (`model_sized`) the consecutive pieces of one `nbytes`
    buffer, as a model's bytes leave and land."""
    if model_sized:
        return _pieces(memoryview(bytearray(nbytes)))
    buffer = memoryview(bytearray(DEFAULT_CHUNK_BYTES))  # every message in the same place
    return [buffer[: min(DEFAULT_CHUNK_BYTES, nbytes - start)] for start in range(0, nbytes, DEFAULT_CHUNK_BYTES)]


def _pieces(data: memoryview) -> list[memoryview]:
    """`data` in consecutive 4 MiB messages."""
    return [data[start : start + DEFAULT_CHUNK_BYTES] for start in range(0, len(data), DEFAULT_CHUNK_BYTES)]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.numpy().data).cast("B")


def _listener(unix: bool) -> socket.socket:
    if not unix:
        return socket.create_server(("127.0.0.1", 0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"\0ps-bench-echo-{os.getpid()}")
    listener.listen(1)
    return listener


def _raw_echo(nbytes: int, unix: bool, model_sized: bool, addresses: Any) -> None:
    """Take `nbytes` and send them back (see `_messages`) until the client leaves."""
    with _listener(unix) as listener:
        addresses.put(listener.getsockname())
        conn, _ = listener.accept()
        if unix:
            data_channel.tune(conn)  # the send buffer our Unix sockets get
        messages = _messages(nbytes, model_sized)
        with conn:
            while all(_recv_exactly(conn, message) for message in messages):
                for message in messages:
                    conn.sendall(message)


@contextmanager
def _connected_process(
    target: Callable[..., None], args: tuple[Any, ...], unix: bool, what: str
) -> Iterator[tuple[socket.socket, int]]:
    """A process running `target(*args, addresses)`, which listens, puts its
    address in the queue `addresses` and serves one connection until the
    client leaves; yields a socket connected to it, and its pid."""
    context = process_context()
    addresses = context.Queue()
    process = context.Process(target=target, args=(*args, addresses))
    process.start()
    assert process.pid is not None
    try:
        address = wait_for(addresses, [process], what)
        with socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.connect(address)
            if unix:
                data_channel.tune(sock)
            yield sock, process.pid
    finally:
        process.join(timeout=30)


@contextmanager
def _echo(nbytes: int, unix: bool, model_sized: bool = False) -> Iterator[RoundTrip]:
    """An echo process; yields one round trip of `nbytes` through it, in 4 MiB
    messages, and the pids that do the work. By default through reused 4 MiB
    buffers, which stay in cache (the strictest floor: measured here, up to
    1.5x faster than one 64 MiB buffer); `model_sized`: from one buffer of
    `nbytes` into another and back, as a push + pull must, whose model no
    cache holds. `unix`: through a Unix socket instead of loopback TCP."""
    payload, back = _messages(nbytes, model_sized), _messages(nbytes, model_sized)
    with _connected_process(_raw_echo, (nbytes, unix, model_sized), unix, "the echo's address") as (sock, pid):

        def round_trip() -> None:
            for message in payload:
                sock.sendall(message)
            for message in back:
                if not _recv_exactly(sock, message):
                    raise ConnectionError("the echo process closed the connection")

        yield round_trip, [os.getpid(), pid]


def _minimal_server(nbytes: int, addresses: Any) -> None:
    """The least a server can do for a push + pull of an fp32 model of
    `nbytes` over loopback TCP, in 4 MiB messages: take each into one reused
    buffer, check it is finite as ours does (a server trusts no client),
    apply SGD's update without momentum (what ours applies in the wire rows)
    to its range of the weights, and send that range straight back, so the
    weights come down while the gradients still go up."""
    torch.set_num_threads(1)  # as ps-server's default
    weights, grad = torch.zeros(nbytes // 4), torch.empty(DEFAULT_CHUNK_BYTES // 4)
    received = _bytes_of(grad)
    with _listener(unix=False) as listener:
        addresses.put(listener.getsockname())
        conn, _ = listener.accept()
        with conn:
            while True:
                for weights_range in torch.split(weights, len(grad)):
                    size = len(weights_range)
                    if not _recv_exactly(conn, received[: 4 * size]):
                        return  # the client left
                    if not codec.all_finite(grad[:size]):
                        raise ValueError("gradient with NaN or Inf")
                    weights_range.add_(grad[:size], alpha=-0.0)  # SGD at lr 0, as ours
                    conn.sendall(_bytes_of(weights_range))


@contextmanager
def _minimal_ps(nbytes: int) -> Iterator[RoundTrip]:
    """A minimal parameter server over loopback TCP (`_minimal_server`), and
    a client that does what ours must with a push + pull: check the whole
    gradient before sending any of it (ours' promise that a push with NaN
    changes no server), send it, and take the weights back into the model's
    buffer on a second thread as they come. No protocol, no keys, no
    consistency: the fastest of the minimal designs we measured that keep
    those promises (benchmarks/HISTORY.md, 2026-12-07, has the others)."""
    grad, weights = torch.ones(nbytes // 4), torch.zeros(nbytes // 4)
    payload, back = _pieces(_bytes_of(grad)), _pieces(_bytes_of(weights))
    receiving = futures.ThreadPoolExecutor(1)
    server = _connected_process(_minimal_server, (nbytes,), False, "the minimal server's address")
    with receiving, server as (sock, pid):

        def receive() -> None:
            for message in back:
                if not _recv_exactly(sock, message):
                    raise ConnectionError("the minimal server closed the connection")

        def round_trip() -> None:
            if not codec.all_finite(grad):
                raise ValueError("gradient with NaN or Inf")
            weights_back = receiving.submit(receive)
            for message in payload:
                sock.sendall(message)
            weights_back.result()

        yield round_trip, [os.getpid(), pid]


def raw_echo_seconds(nbytes: int, repeats: int, unix: bool = False, model_sized: bool = False) -> float:
    """Send `nbytes` to an echo process and read them back: the floor for moving the bytes of a push + pull."""
    with _echo(nbytes, unix, model_sized) as (round_trip, _):
        return median_seconds(round_trip, repeats)


def minimal_ps_seconds(nbytes: int, repeats: int) -> float:
    """A push + pull through `_minimal_ps`: the floor for doing its work."""
    with _minimal_ps(nbytes) as (round_trip, _):
        return median_seconds(round_trip, repeats)


def _bare_handlers(take: Any, give: Any) -> grpc.GenericRpcHandler:
    handlers = {"Take": grpc.stream_unary_rpc_method_handler(take), "Give": grpc.unary_stream_rpc_method_handler(give)}
    return grpc.method_handlers_generic_handler("bare", handlers)


def _bare_grpc_server(nbytes: int, ports: Any, stop: Any, use_aio: bool) -> None:
    """A gRPC server that takes a stream of bytes messages and streams `nbytes`
    back: on a thread pool, as ours is, or on grpc.aio's event loop."""
    payload = b"x" * DEFAULT_CHUNK_BYTES
    count = -(-nbytes // DEFAULT_CHUNK_BYTES)
    if use_aio:
        asyncio.run(_bare_aio_server(payload, count, ports, stop))
        return

    def take(requests: Any, context: Any) -> bytes:
        for _ in requests:
            pass
        return b""

    def give(request: Any, context: Any) -> Any:
        for _ in range(count):
            yield payload

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((_bare_handlers(take, give),))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop.wait(600)
    server.stop(0)


async def _bare_aio_server(payload: bytes, count: int, ports: Any, stop: Any) -> None:
    async def take(requests: Any, context: Any) -> bytes:
        async for _ in requests:
            pass
        return b""

    async def give(request: Any, context: Any) -> Any:
        for _ in range(count):
            yield payload

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_bare_handlers(take, give),))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    while not stop.is_set():
        await asyncio.sleep(0.05)
    await server.stop(0)


@contextmanager
def _bare_grpc(nbytes: int, use_aio: bool) -> Iterator[Callable[[], None]]:
    """A bare gRPC server process; yields one round trip of `nbytes` up and
    back through it in 4 MiB messages, no tensors, no protobuf."""
    context = process_context()
    ports, stop = context.Queue(), context.Event()
    process = context.Process(target=_bare_grpc_server, args=(nbytes, ports, stop, use_aio))
    process.start()
    try:
        port = wait_for(ports, [process], "the bare server's port")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            take, give = channel.stream_unary("/bare/Take"), channel.unary_stream("/bare/Give")
            payload = b"x" * DEFAULT_CHUNK_BYTES
            count = -(-nbytes // DEFAULT_CHUNK_BYTES)

            def round_trip() -> None:
                take(iter([payload] * count), timeout=120)
                for _ in give(b"", timeout=120):
                    pass

            yield round_trip
    finally:
        stop.set()
        process.join(timeout=30)


def bare_grpc_seconds(nbytes: int, repeats: int, use_aio: bool = False) -> float:
    with _bare_grpc(nbytes, use_aio) as round_trip:
        return median_seconds(round_trip, repeats)


@contextmanager
def _ours(nbytes: int, servers: int, unix: bool) -> Iterator[RoundTrip]:
    """Server processes holding `nbytes` of weights; yields one push + pull
    of them in BSP (the default mode), over loopback TCP or (`unix`) the
    servers' Unix sockets, where the pull reads the servers' shared weights,
    and the pids that do the work."""
    with _push_pull([nbytes // 4], servers, ClientConfig(timeout=120, data_socket=unix)) as round_trip:
        yield round_trip


@contextmanager
def _push_pull(numels: list[int], servers: int, config: ClientConfig) -> Iterator[RoundTrip]:
    """A push + pull of fp32 parameters of `numels` elements, and the pids that do its work."""
    params = [torch.nn.Parameter(torch.zeros(n)) for n in numels]
    with server_processes(servers) as (addresses, pids), PSClient(addresses, 0, 1, config) as client:
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        opt = DistributedOptimizer(torch.optim.SGD(params, lr=0.0), client, named_parameters=named)
        for param in params:
            param.grad = torch.ones_like(param)
        yield opt.step, [os.getpid(), *pids]


def small_tensors_seconds(count: int, numel: int, fuse_below_bytes: int, repeats: int) -> float:
    config = ClientConfig(timeout=120, fuse_below_bytes=fuse_below_bytes)
    with _push_pull([numel] * count, 1, config) as (step, _):
        return median_seconds(step, repeats)


def ours_seconds(nbytes: int, servers: int, repeats: int, unix: bool = False) -> float:
    with _ours(nbytes, servers, unix) as (step, _):
        return median_seconds(step, repeats)


def cpu_seconds(transfer: AbstractContextManager[RoundTrip], repeats: int) -> float:
    """CPU seconds (user and system, every process that takes part) per run of `transfer`'s round trip."""
    with transfer as (round_trip, pids):
        round_trip()  # warm-up
        before = sum(process_cpu_seconds(pid) for pid in pids)
        for _ in range(repeats):
            round_trip()
        return (sum(process_cpu_seconds(pid) for pid in pids) - before) / repeats


def _row(name: str, nbytes: int, ours: float, baseline: float, target: float = TARGET) -> Row:
    """Seconds for `nbytes` up and back, as GB/s moved."""
    return Row(name=name, ours=round(2 * nbytes / ours / 1e9, 3), baseline=round(2 * nbytes / baseline / 1e9, 3),
               unit="GB/s", ratio=round(baseline / ours, 3), target=target)  # fmt: skip


def _cpu_row(mib: int, repeats: int) -> Row:
    """CPU time per push + pull, one server over loopback TCP, against the
    echo's: where client and server share the cores, wall time follows it."""
    nbytes = mib * 2**20
    ours, echo = cpu_seconds(_ours(nbytes, 1, unix=False), repeats), cpu_seconds(_echo(nbytes, unix=False), repeats)
    return Row(name=f"wire: push+pull {mib} MiB fp32, 1 server: CPU time of client and server vs raw TCP echo's",
               ours=round(ours * 1e3, 1), baseline=round(echo * 1e3, 1), unit="CPU ms", ratio=round(echo / ours, 3),
               target=TARGET)  # fmt: skip


def _all_seconds(nbytes: int, repeats: int, rounds: int, model_sized_echo: bool) -> dict[str, float]:
    measures: dict[str, Callable[[], float]] = {
        "raw": lambda: raw_echo_seconds(nbytes, repeats),
        "raw unix": lambda: raw_echo_seconds(nbytes, repeats, unix=True),
        "minimal": partial(minimal_ps_seconds, nbytes, repeats),
        "bare": lambda: bare_grpc_seconds(nbytes, repeats),
        "aio": lambda: bare_grpc_seconds(nbytes, repeats, use_aio=True),
        **{f"{s} server(s)": partial(ours_seconds, nbytes, s, repeats) for s in (1, 2)},
        "unix": partial(ours_seconds, nbytes, 1, repeats, unix=True),
    }
    if model_sized_echo:
        measures["raw model-sized"] = partial(raw_echo_seconds, nbytes, repeats, model_sized=True)
    return interleaved(measures, rounds)


def run(quick: bool) -> list[Row]:
    sizes = [64] if quick else [64, 256]
    repeats = 3 if quick else 5
    rows = []
    for mib in sizes:
        nbytes = mib * 2**20
        seconds = _all_seconds(nbytes, repeats, rounds=2 if quick else 3, model_sized_echo=not quick)
        raw, bare = seconds["raw"], seconds["bare"]
        # Our servers run handlers on a thread pool rather than grpc.aio: this row is why.
        rows.append(_row(f"wire: bare gRPC Python, {mib} MiB up and back, thread-pool server (ours) vs grpc.aio server",
                         nbytes, bare, seconds["aio"], target=1.0))  # fmt: skip
        rows.append(_row(f"wire: bare gRPC Python, {mib} MiB up and back in 4 MiB messages vs raw TCP echo",
                         nbytes, bare, raw))  # fmt: skip
        minimal = seconds["minimal"]
        rows.append(_row(f"wire: a minimal parameter server on a raw socket (checks, SGD, weights back as they "
                         f"update), {mib} MiB, 1 server vs raw TCP echo", nbytes, minimal, raw))  # fmt: skip
        for servers in (1, 2):
            ours = seconds[f"{servers} server(s)"]
            rows.append(_row(f"wire: push+pull {mib} MiB fp32, {servers} server(s) vs raw TCP echo", nbytes, ours, raw))
            rows.append(_row(f"wire: push+pull {mib} MiB fp32, {servers} server(s) vs a minimal parameter server on "
                             "a raw socket", nbytes, ours, minimal))  # fmt: skip
            rows.append(_row(f"wire: push+pull {mib} MiB fp32, {servers} server(s) vs bare gRPC", nbytes, ours, bare))
            if not quick:
                rows.append(_row(f"wire: push+pull {mib} MiB fp32, {servers} server(s) vs raw TCP echo through "
                                 "model-sized buffers", nbytes, ours, seconds["raw model-sized"]))  # fmt: skip
        unix = f"wire: push+pull {mib} MiB fp32, 1 server, Unix socket and shared weights (the servers' host)"
        rows.append(_row(f"{unix} vs raw Unix socket echo", nbytes, seconds["unix"], seconds["raw unix"]))
        rows.append(_row(f"{unix} vs loopback TCP", nbytes, seconds["unix"], seconds["1 server(s)"], target=1.0))
    if not quick:  # each of these starts servers of its own: 12 s in the quick run, which has no room for it
        rows.append(_small_tensors_row(256, 1024, repeats=30, rounds=3))
        rows.append(_cpu_row(sizes[0], repeats=30))  # a clock tick is 10 ms: enough runs to add up
    return rows


def _small_tensors_row(count: int, numel: int, repeats: int, rounds: int) -> Row:
    """A model's biases and norms: many tensors, a few bytes each."""
    seconds = interleaved(
        {
            "fused": partial(small_tensors_seconds, count, numel, ClientConfig().fuse_below_bytes, repeats),
            "apart": partial(small_tensors_seconds, count, numel, 0, repeats),
        },
        rounds,
    )
    fused, apart = seconds["fused"], seconds["apart"]
    return Row(name=f"wire: push+pull of {count} tensors of {numel * 4 // 1024} KiB, 1 server: fused into shared "
               "keys (the default) vs a key each", ours=round(fused * 1e3, 2), baseline=round(apart * 1e3, 2),
               unit="ms", ratio=round(apart / fused, 3), target=1.0)  # fmt: skip
