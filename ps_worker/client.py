"""PSClient: a worker's connection to every parameter server of a job.

Three verbs, like ps-lite's Push/Pull: `init` declares the parameters and the
optimizer (worker 0 uploads the initial values, the others wait for that),
`push` sends one step's gradients (`push_stream` the same, fed gradient by
gradient while backward runs), `pull` reads the weights the job's
consistency mode allows into the given tensors; `push_pull` does a push
and the next step's pull, at once where the mode allows. Calls to different servers
run concurrently; every call has a deadline, and every wait logs what it
waits for.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TypeVar

import grpc
import torch
from torch._utils import _flatten_dense_tensors

from ps_common import PROTOCOL_VERSION, codec, wire
from ps_common.config import setting
from ps_common.errors import FailedPrecondition, InvalidArgument, PSError, Unavailable, WaitTimeout, from_rpc_error
from ps_common.proto import ps_pb2 as pb
from ps_worker.channel import open_channel, tls_context
from ps_worker.compression import Compression, Compressor, Payload
from ps_worker.data_client import PushCall, ServerStub, is_loopback
from ps_worker.pruning import PruningConfig
from ps_worker.sharding import Piece, TensorInfo, cut_requests, plan_placement

log = logging.getLogger(__name__)

Mode = Literal["bsp", "asp", "ssp"]
_MODES = {"bsp": pb.BSP, "asp": pb.ASP, "ssp": pb.SSP}
_RETRY_WHILE_WAITING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

T = TypeVar("T")


@dataclass(frozen=True)
class ClientConfig:
    timeout: float = setting(60.0, "deadline in seconds of a call that waits for nobody (push, the transfer of a pull)")
    wait_timeout: float = setting(600.0, "longest wait for servers to come up, for initialization or for other workers")
    wait_log_interval: float = setting(10.0, "seconds between log lines while waiting")
    pull_while_pushing: bool | None = setting(
        None,
        "BSP: pull the next step's weights while pushing, each key as soon as its step is complete (using a "
        "link both ways at once); default: on, unless every server is at a loopback address, where there is no "
        "link and the two transfers only compete for this machine's cores",
    )
    chunk_bytes: int = setting(codec.DEFAULT_CHUNK_BYTES, "largest tensor chunk a worker sends")
    max_piece_bytes: int = setting(codec.DEFAULT_CHUNK_BYTES, "largest range of a tensor kept on one server")
    # From about 256 KiB, gathering a tensor into a shared key and copying it
    # out again cost as much as a key of its own (benchmarks/HISTORY.md).
    fuse_below_bytes: int = setting(
        256 * 1024,
        "parameters smaller than this share keys, laid end to end (0: each its own key); fused parameters "
        "must get their gradients in the same steps, as torch.optim would otherwise update them apart",
    )
    push_request_bytes: int | None = setting(
        None,
        "most gradient bytes in one push request: a server applies each request as it lands, all or nothing; "
        "default: 1 MiB, so that over a link a key's update and pull follow its push closely, unless every "
        "server is at a loopback address, where each request costs CPU the cores lack: 4 MiB",
    )
    heartbeat_interval: float = setting(5.0, "seconds between heartbeats, so a long step is not taken for a crash")
    auth_token: str | None = setting(None, "shared token the servers require")
    tls_ca: str | None = setting(None, "PEM CA that signed the servers' certificates: connect with TLS")
    tls_cert: str | None = setting(None, "PEM client certificate, for servers that require mutual TLS")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    data_channel: bool = setting(
        True, "init, push and pull over the servers' data channel (a TCP port beside gRPC) where offered"
    )
    data_socket: bool = setting(
        True,
        "reach the data channel of a server on this host (in this network namespace) through its Unix socket, "
        "which costs less CPU than loopback TCP",
    )
    shared_weights: bool = setting(
        True,
        "BSP, through a server's Unix socket without TLS: read pulled weights straight from the server's memory, "
        "which it shares read-only, instead of having them sent",
    )

    def channel(self, address: str) -> grpc.Channel:
        return open_channel(address, self.auth_token, self.tls_ca, self.tls_cert, self.tls_key)


class PSClient:
    """Connection of worker `worker_id` (of `num_workers`) to the servers at `addresses`."""

    def __init__(
        self, addresses: Sequence[str], worker_id: int, num_workers: int, config: ClientConfig | None = None
    ) -> None:
        if not addresses:
            raise ValueError("PSClient needs at least one server address")
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id {worker_id} is out of range for {num_workers} workers")
        self.addresses = list(addresses)
        self.worker_id = worker_id
        self.num_workers = num_workers
        self.config = config or ClientConfig()
        self._channels = [self.config.channel(a) for a in self.addresses]
        self._stubs = [
            self._stub(address, channel) for address, channel in zip(self.addresses, self._channels, strict=True)
        ]
        # A job per server for a push and one for a pull at once (push_pull).
        self._pool = futures.ThreadPoolExecutor(max_workers=2 * len(self.addresses), thread_name_prefix="ps-client")
        self._puller = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ps-push-pull")
        self._mode: Mode = "bsp"
        self._pull_while_pushing = pulls_while_pushing(self.config.pull_while_pushing, self.addresses)
        self._push_request_bytes = push_request_bytes(self.config.push_request_bytes, self.addresses)
        self._pieces: list[list[Piece]] = []  # per server
        self._pieces_of: dict[str, list[Piece]] = {}  # per parameter name
        self._compressor = Compressor(None)
        self._pull_as: torch.dtype | None = None  # the half precision weights travel in, if any
        self._optimizer: torch.optim.Optimizer | None = None
        self.prunable: set[str] = set()  # names of the parameters pruning applies to
        self._last_push: tuple[pb.PushHeader, dict[str, Payload | None]] | None = None
        self._closing = threading.Event()
        self.bytes_pushed = 0  # gradient bytes sent (after compression), retries included
        self._counting = threading.Lock()
        self._heartbeat = threading.Thread(target=self._send_heartbeats, name="ps-client-heartbeat", daemon=True)

    # -- the three verbs ------------------------------------------------------------

    def init(
        self,
        named_parameters: Sequence[tuple[str, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        mode: Mode = "bsp",
        staleness: int = 0,
        scale_lr_by_staleness: bool = False,
        pruning: PruningConfig | None = None,
        compression: Compression | None = None,
    ) -> int:
        """Declare the job; worker 0 uploads the values of `named_parameters`
        (the optimizer's parameters, on any device). With `pruning`, the
        servers keep masks for the parameters it selects; `compression` is how
        this worker's pushes and pulls travel.

        The others wait (up to `wait_timeout`, logging) until worker 0 has
        done so and check that they declare the same job. Returns the step
        to start from: 0 for a new job, more for a worker that rejoins.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        self._mode = mode
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        params = dict(named_parameters)
        for name, param in named_parameters:
            if id(param) not in group_of:
                raise ValueError(f"parameter {name!r} is not in the optimizer's param groups")
        self.prunable = {n for n, p in named_parameters if pruning is not None and pruning.prunable(n, p)}

        def fuses_with(name: str, param: torch.Tensor) -> tuple[str, int] | None:
            # A frozen parameter never has a gradient; a pruned one is pruned by the server per key.
            frozen = isinstance(param, torch.nn.Parameter) and not param.requires_grad
            return None if frozen or name in self.prunable else (str(param.dtype), group_of[id(param)])

        tensors = [TensorInfo(n, p.numel(), p.element_size(), fuses_with(n, p)) for n, p in named_parameters]
        placement = plan_placement(
            tensors, len(self.addresses), self.config.max_piece_bytes, self.config.fuse_below_bytes
        )
        self._pieces = [[p for p in placement if p.server == s] for s in range(len(self.addresses))]
        self._pieces_of = {t.name: [p for p in placement if t.name in p.names] for t in tensors}
        self._numel = {t.name: t.numel for t in tensors}
        self._compressor = Compressor(compression)
        self._pull_as = self._compressor.pull_dtype
        self._optimizer = optimizer
        optimizer_spec = pb.OptimizerSpec(name=type(optimizer).__name__, groups=self._group_options())

        def key_spec(piece: Piece) -> pb.KeySpec:
            first = params[piece.parts[0].name]
            spec = pb.KeySpec(
                key=piece.key, dtype=codec.dtype_to_proto(first.dtype), shape=[piece.numel], group=group_of[id(first)]
            )
            if piece.fused:
                spec.parts.extend(pb.KeyPart(tensor=n, tensor_shape=list(params[n].shape)) for n in piece.names)
            else:
                part = piece.parts[0]
                spec.tensor, spec.offset, spec.prunable = part.name, part.start, part.name in self.prunable
                spec.tensor_shape.extend(first.shape)
            return spec

        jobs = [
            pb.JobSpec(
                mode=_MODES[mode],
                num_workers=self.num_workers,
                staleness=staleness,
                scale_lr_by_staleness=scale_lr_by_staleness,
                optimizer=optimizer_spec,
                pruning=pruning.to_proto() if pruning else None,
                keys=[key_spec(p) for p in pieces],
            )
            for pieces in self._pieces
        ]

        def init_server(server: int) -> int:
            hello = self._wait_for_server(server, initialized=self.worker_id != 0)
            if self.worker_id == 0:
                values = {name: _checked(tensor.detach().cpu(), name) for name, tensor in named_parameters}
                payloads = {p.key: Payload(_gather(p, values)) for p in self._pieces[server]}
                header = pb.InitHeader(protocol_version=PROTOCOL_VERSION, worker_id=self.worker_id, job=jobs[server])
                stream = self._messages(header, self._pieces[server], payloads)
                self._call(server, lambda stub: stub.init(stream, timeout=self.config.timeout))
            elif hello.job != jobs[server]:
                raise FailedPrecondition(
                    f"{self.addresses[server]}: worker 0 initialized a different job (parameters, optimizer, "
                    "mode or worker count differ); all workers must run the same model and optimizer settings"
                )
            return hello.clock

        clocks = self._on_every_server(init_server)
        if not self._heartbeat.is_alive():
            self._heartbeat.start()
        # A server holding none of the keys cannot know where the job is.
        return min((c for c, pieces in zip(clocks, self._pieces, strict=True) if pieces), default=0)

    def push(
        self,
        grads: Mapping[str, torch.Tensor | None],
        step: int,
        prune_thresholds: Mapping[str, float] | None = None,
    ) -> None:
        """Send this worker's gradients of `step` (None: no gradient) to every server.

        Each server's share travels in requests of at most `push_request_bytes`,
        which it applies as they land, so that neither the update waits for the
        whole transfer nor the server holds a whole gradient per push. A
        gradient with NaN or Inf is refused here, before anything is sent, as
        is a push with gradients for only some of a fused key's parameters.

        `prune_thresholds` (worker 0, on pruning steps): per parameter, the
        magnitude at or below which the servers prune this step's weights.
        """
        self._prepare_push(grads, step, prune_thresholds)
        self._send_push(step)

    def _prepare_push(
        self, grads: Mapping[str, torch.Tensor | None], step: int, prune_thresholds: Mapping[str, float] | None
    ) -> None:
        """Check and encode a push (raising for bad input before anything is sent) as the one to send."""
        missing = set(self._pieces_of) - set(grads)
        if missing:
            raise InvalidArgument(f"push has no entry for parameters {sorted(missing)}")
        checked = {name: self._checked_grad(name, grad) for name, grad in grads.items()}
        # Every gradient is checked before any is encoded: top-k's residuals change as it encodes.
        gathered = {p.key: self._gathered(p, checked, step) for pieces in self._pieces for p in pieces}
        payloads = {p.key: self._compress(p, gathered[p.key]) for pieces in self._pieces for p in pieces}
        self._last_push = (self._push_header(step, prune_thresholds), payloads)

    def _send_push(self, step: int) -> None:
        self._on_every_server(
            lambda s: self._retry_while_waiting(s, f"to take the push of step {step}", lambda: self._push_to(s))
        )

    def push_stream(self, step: int, prune_thresholds: Mapping[str, float] | None = None) -> PushStream:
        """Start the push of `step` now and feed it gradients as they are ready
        (`add`), e.g. from backward hooks; `finish` sends the rest as absent."""
        return PushStream(self, self._push_header(step, prune_thresholds))

    def _push_header(self, step: int, prune_thresholds: Mapping[str, float] | None) -> pb.PushHeader:
        return pb.PushHeader(
            worker_id=self.worker_id, step=step, groups=self._group_options(), prune_thresholds=prune_thresholds
        )

    def _checked_grad(self, name: str, grad: torch.Tensor | None) -> torch.Tensor | None:
        """`grad`, once checked to fit parameter `name`."""
        if name not in self._numel:
            raise InvalidArgument(f"push of unknown parameter {name!r}")
        if grad is not None:
            self._check_fits(name, grad, f"gradient of {name!r}")
        return grad

    def _check_fits(self, name: str, tensor: torch.Tensor, what: str) -> None:
        """Raise unless `tensor` is a CPU tensor PSClient can use for parameter `name`, of its size."""
        if _checked(tensor, name).numel() != self._numel[name]:
            raise InvalidArgument(f"{what} has {tensor.numel()} elements, expected {self._numel[name]}")

    def _gathered(self, piece: Piece, grads: Mapping[str, torch.Tensor | None], step: int) -> torch.Tensor | None:
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
        gathered = _gather(piece, grads)  # type: ignore[arg-type]  # none absent
        if not codec.all_finite(gathered):
            bad = [name for name in piece.names if not codec.all_finite(grads[name])]  # type: ignore[arg-type]
            raise InvalidArgument(
                f"gradient of {bad[0]!r} contains NaN or Inf; nothing of the push of step {step} was applied"
            )
        return gathered

    def _compress(self, piece: Piece, gathered: torch.Tensor | None) -> Payload | None:
        """What travels of a piece's gathered gradient (None: absent), as the job's compression says."""
        if gathered is None:
            return None
        return self._compressor.encode(piece.key, gathered, piece.sizes if piece.fused else ())

    def _push_to(self, server: int) -> None:
        """Send the last push to one server, once."""
        header, payloads = self._last_push  # type: ignore[misc]
        self._settle(server, self._start_requests(server, header, self._pieces[server], payloads))

    def _start_requests(
        self, server: int, header: pb.PushHeader, pieces: Sequence[Piece], payloads: Mapping[str, Payload | None]
    ) -> list[PushCall]:
        """Start sending `pieces` to `server` in requests of at most push_request_bytes."""
        sizes = {}  # of these pieces only: `payloads` holds every server's
        for piece in pieces:
            payload = payloads[piece.key]
            sizes[piece.key] = 0 if payload is None else payload.nbytes
        return [
            self._start_push(server, list(self._messages(header, group, payloads, counted=True)))
            for group in cut_requests(pieces, sizes, self._push_request_bytes)
        ]

    def _start_push(self, server: int, frames: Iterable[wire.Frame]) -> PushCall:
        # Finding the server's data channel may take a call (Hello), which may fail.
        return self._call(server, lambda stub: stub.push_future(frames, timeout=self.config.timeout))

    def _settle(self, server: int, calls: Sequence[PushCall]) -> None:
        """Wait for every call, then raise a failure if any (one that a retry
        cannot cure first): none is left in flight to race a retry."""
        errors = []
        for call in calls:
            try:
                self._call(server, lambda _: call.result())  # noqa: B023 (called at once)
            except PSError as exc:
                errors.append(exc)
        if errors:
            raise min(errors, key=lambda exc: exc.code in _RETRY_WHILE_WAITING)

    def _messages(
        self,
        header: pb.InitHeader | pb.PushHeader,
        pieces: Iterable[Piece],
        payloads: Mapping[str, Payload | None],
        counted: bool = False,
    ) -> Iterator[wire.Frame]:
        """A client stream: the header, then `pieces` as their payloads say
        (None: absent), small chunks batched into one message; `counted`
        bytes add to bytes_pushed."""

        def chunks() -> Iterator[codec.Chunk]:
            for piece in pieces:
                payload = payloads[piece.key]
                if payload is None:
                    yield codec.absent_chunk(piece.key)
                    continue
                for chunk in payload.chunks(piece.key, self.config.chunk_bytes):
                    if counted:
                        with self._counting:
                            self.bytes_pushed += len(chunk.data) + len(chunk.indices)
                    yield chunk

        batches = codec.batched(chunks(), self.config.chunk_bytes)
        yield wire.Frame(header=header, chunks=next(batches, []))
        for batch in batches:
            yield wire.Frame(chunks=batch)

    def push_pull(
        self,
        grads: Mapping[str, torch.Tensor | None],
        step: int,
        into: Mapping[str, torch.Tensor],
        prune_thresholds: Mapping[str, float] | None = None,
    ) -> None:
        """`push(grads, step)`, then `pull(into, step + 1)`; in BSP, with
        `pull_while_pushing` (by default, unless the servers are on loopback), both at once.

        A BSP server sends each key back as soon as its step is complete, so
        weights come down while gradients still go up: over a network, one
        transfer each way at the same time instead of one after the other,
        as an all-reduce moves them. (In ASP and SSP a pull started with the
        push could read weights without this worker's update.) If the push
        fails, the pull is abandoned (within `wait_log_interval`) and the
        push's error raised.
        """
        if not self.pulls_during_push:
            self.push(grads, step, prune_thresholds)
            self.pull(into, step + 1)
            return
        self._prepare_push(grads, step, prune_thresholds)  # bad input is refused before the pull starts
        self.pull_during(lambda: self._send_push(step), into, step + 1).result()

    def pull_during(
        self,
        send: Callable[[], None],
        into: Mapping[str, torch.Tensor],
        step: int,
        on_arrival: Callable[[str], None] | None = None,
    ) -> futures.Future[None]:
        """Start `pull(into, step, on_arrival=on_arrival)` in the background,
        then call `send` (the push it follows, e.g. `PushStream.finish`) and
        return the pull's future. If `send` raises, the pull is abandoned
        (within `wait_log_interval`) and waited for, and `send`'s error raised."""
        abandoned = threading.Event()
        pulling = self._puller.submit(self.pull, into, step, False, on_arrival, abandoned)
        try:
            send()
        except BaseException:
            abandoned.set()
            futures.wait([pulling])
            raise
        return pulling

    @property
    def pulls_during_push(self) -> bool:
        """Whether the next step's pull goes with the push (BSP, `pull_while_pushing`)."""
        return self._mode == "bsp" and self._pull_while_pushing

    def pull(
        self,
        into: Mapping[str, torch.Tensor],
        step: int,
        wait_for_all_workers: bool = False,
        on_arrival: Callable[[str], None] | None = None,
        abandoned: threading.Event | None = None,
        full_precision: bool = False,
    ) -> None:
        """Read the weights for `step` into the CPU tensors `into` (one for
        every parameter, by name), in place.

        Waits, logging, while the mode makes this worker wait for others
        (or, with `wait_for_all_workers`, until every worker pushed `step` steps).
        `on_arrival(name)` is called (from a client thread) as soon as one
        tensor has arrived whole, before the others. Once `abandoned` is set
        (the push it waits for failed), the pull stops at its next wait.
        Weights travel as the job's compression says (`Compression.pull`),
        unless `full_precision` (to read the final model exactly).
        """
        half = None if full_precision else self._pull_as
        if into.keys() != self._numel.keys():
            missing, unknown = sorted(self._numel.keys() - into.keys()), sorted(into.keys() - self._numel.keys())
            raise InvalidArgument(f"pull needs a tensor for every parameter: missing {missing}, unknown {unknown}")
        for name, tensor in into.items():
            self._check_fits(name, tensor, repr(name))
        # By piece key, not a count: an attempt cut off midway is repeated whole.
        missing_pieces = {name: {p.key for p in self._pieces_of[name]} for name in into}
        counting = threading.Lock()

        def arrived(piece: Piece) -> None:
            whole = []
            with counting:
                for name in piece.names:
                    missing = missing_pieces[name]
                    if piece.key in missing and len(missing) == 1:
                        whole.append(name)
                    missing.discard(piece.key)
            if on_arrival is not None:
                for name in whole:
                    on_arrival(name)

        def pull_server(server: int) -> None:
            pieces = {p.key: p for p in self._pieces[server]}
            fused: dict[str, torch.Tensor] = {}  # what fused keys are received into, then copied out of

            def destination(chunk: codec.ChunkLike) -> torch.Tensor:
                piece = pieces.get(chunk.key)
                if piece is None:
                    raise InvalidArgument(f"{self.addresses[server]} sent unknown key {chunk.key!r}")
                dtype = into[piece.parts[0].name].dtype
                expected = codec.dtype_to_proto(codec.wire_dtype(dtype, half))
                if chunk.dtype != expected or list(chunk.shape) != [piece.numel]:
                    raise InvalidArgument(
                        f"{self.addresses[server]} sent key {chunk.key!r} with another dtype or shape"
                    )
                if piece.fused:
                    return fused.setdefault(piece.key, torch.empty(piece.numel, dtype=dtype))
                part = piece.parts[0]
                return _flat(into[part.name])[part.start : part.stop]

            def complete(key: str) -> None:
                piece = pieces[key]
                if piece.fused:
                    _scatter(piece, fused[key], into)
                arrived(piece)

            dense_bytes = sum(
                p.numel * codec.wire_dtype(into[p.names[0]].dtype, half).itemsize for p in pieces.values()
            )
            fits_one_message = dense_bytes <= codec.DEFAULT_CHUNK_BYTES  # what PullOne answers at most
            request = pb.PullRequest(
                worker_id=self.worker_id,
                step=step,
                wait_for_all_workers=wait_for_all_workers,
                wait_seconds=self.config.wait_log_interval,
                dtype=pb.DTYPE_UNSPECIFIED if half is None else codec.dtype_to_proto(half),
            )
            deadline = self.config.wait_log_interval + self.config.timeout

            def attempt(stub: ServerStub) -> None:
                stub.pull(request, deadline, destination, complete, one_message=fits_one_message)

            server_was_down = False

            def attempt_after_recovery() -> None:
                # A server that went down may have restarted from a checkpoint
                # older than our last push: push it again before reading.
                nonlocal server_was_down
                if server_was_down and self._last_push is not None:
                    self._push_to(server)
                try:
                    self._call(server, attempt)
                except Unavailable:
                    server_was_down = True
                    raise
                server_was_down = False

            self._retry_while_waiting(server, f"to read step {step}", attempt_after_recovery, abandoned=abandoned)

        self._on_every_server(pull_server)

    def pull_masks(self, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The pruning masks (True = kept) of the prunable parameters among `shapes`."""
        masks = {name: torch.ones(shape, dtype=torch.bool) for name, shape in shapes.items() if name in self.prunable}

        def pull_server(server: int) -> None:
            pieces = {p.key: p for p in self._pieces[server]}

            def destination(chunk: codec.ChunkLike) -> torch.Tensor:
                piece = pieces.get(chunk.key)
                if piece is None or piece.fused or piece.parts[0].name not in masks or chunk.dtype != pb.BOOL:
                    raise InvalidArgument(f"{self.addresses[server]} sent an unexpected mask for {chunk.key!r}")
                part = piece.parts[0]
                return masks[part.name].view(-1)[part.start : part.stop]

            request = pb.PullRequest(worker_id=self.worker_id, masks=True)
            self._call(server, lambda stub: stub.pull(request, self.config.timeout, destination))

        self._on_every_server(pull_server)
        return masks

    def stats(self) -> list[pb.StatsResponse]:
        """Each server's keys, bytes, versions and worker clocks, in server order."""
        return self._on_every_server(
            lambda s: self._call(s, lambda stub: stub.Stats(pb.StatsRequest(), timeout=self.config.timeout))
        )

    def close(self) -> None:
        self._closing.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()
        self._puller.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        for stub in self._stubs:
            stub.close()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------

    def _stub(self, address: str, channel: grpc.Channel) -> ServerStub:
        """The server's stub: init, push and pull on its data channel if it has one."""
        host = _host_of(address) if self.config.data_channel else None
        tls = tls_context(self.config.tls_ca, self.config.tls_cert, self.config.tls_key)
        return ServerStub(
            channel, host, self._hello_request(), self.config.auth_token, tls, self.config.data_socket,
            self.config.shared_weights,
        )  # fmt: skip

    def _group_options(self) -> list[pb.ParamGroup]:
        """The optimizer's current hyperparameters, only those torch declares as defaults
        (an LR scheduler's own bookkeeping such as `initial_lr` stays local)."""
        if self._optimizer is None:
            raise FailedPrecondition("call init() before push()")
        defaults = self._optimizer.defaults
        return [codec.options_to_proto({k: g[k] for k in defaults if k in g}) for g in self._optimizer.param_groups]

    def _hello_request(self) -> pb.HelloRequest:
        return pb.HelloRequest(
            protocol_version=PROTOCOL_VERSION, worker_id=self.worker_id, num_workers=self.num_workers
        )

    def _send_heartbeats(self) -> None:
        """Hello every heartbeat_interval: the servers' sign that this worker lives."""
        request = self._hello_request()
        while not self._closing.wait(self.config.heartbeat_interval):
            for stub in self._stubs:
                try:
                    stub.Hello(request, timeout=min(self.config.timeout, 5.0))
                except grpc.RpcError as exc:
                    log.debug("heartbeat failed: %s", exc)

    def _wait_for_server(self, server: int, initialized: bool) -> pb.HelloResponse:
        """Hello until the server answers (and, if asked, until it is initialized)."""
        request = self._hello_request()

        def hello() -> pb.HelloResponse:
            response: pb.HelloResponse = self._call(
                server, lambda stub: stub.Hello(request, timeout=min(self.config.timeout, 5.0))
            )
            if initialized and not response.initialized:
                raise WaitTimeout("worker 0 has not initialized it yet")
            return response

        what = "to be initialized by worker 0" if initialized else "to come up"
        return self._retry_while_waiting(server, what, hello, pause=0.2)

    def _retry_while_waiting(
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
                if exc.code not in _RETRY_WHILE_WAITING or (abandoned is not None and abandoned.is_set()):
                    raise
                now = time.monotonic()
                if now - start >= self.config.wait_timeout:
                    raise WaitTimeout(
                        f"worker {self.worker_id} gave up waiting for {address} {what} "
                        f"after {self.config.wait_timeout:.0f}s: {exc}"
                    ) from None
                if now >= next_log:
                    log.info(
                        "worker %d still waiting for %s %s (%.0fs): %s", self.worker_id, address, what, now - start, exc
                    )
                    next_log = now + self.config.wait_log_interval
                time.sleep(pause)

    def _call(self, server: int, call: Callable[[ServerStub], T]) -> T:
        try:
            return call(self._stubs[server])
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.addresses[server]) from None

    def _on_every_server(self, work: Callable[[int], T]) -> list[T]:
        if len(self.addresses) == 1:
            return [work(0)]
        jobs = [self._pool.submit(work, s) for s in range(len(self.addresses))]
        return [job.result() for job in jobs]


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
    sends them. Over emulated 1 Gbit/s links (2 workers, 2 servers, 9.4M
    parameters) a first request taking all it could had 7-14 of each
    server's 19 MB when backward ended, and a step took 504 ms, against 436
    ms bounded and 430 ms without overlap. On loopback, what was left split
    off in requests of their own took 100 ms a step, against 83-87 ms in one.
    (The queues are SimpleQueues: fed from backward's thread through a
    threading.Condition, the overlapped step took 8 ms longer.)
    """

    def __init__(self, client: PSClient, header: pb.PushHeader) -> None:
        self._client = client
        self._header = header
        self._payloads: dict[str, Payload | None] = {}  # by piece key
        self._grads: dict[str, torch.Tensor | None] = {}  # those added, checked, by parameter name
        self._unadded: dict[str, int] = {}  # by piece key: how many of its parameters are still to come
        self._queues: list[queue.SimpleQueue[Piece | None]] = [queue.SimpleQueue() for _ in client.addresses]
        self._ended = threading.Event()  # sealed or cancelled: a full first request may end
        # Where the next pull goes with the push, a held request holds back
        # the pull of all it carries until it ends: no bigger than any other.
        self._bounded = client.pulls_during_push
        self._held_bytes = client._push_request_bytes if self._bounded else sys.maxsize
        self._taken = [0] * len(client.addresses)  # bytes of each server's first request
        self._refused: InvalidArgument | None = None
        self._untaken: list[list[Piece]] | None = None  # by server, once sealed
        self._calls: list[PushCall] = []
        for server in range(len(client.addresses)):
            requests = client._messages(header, self._arrivals(server), self._payloads, counted=True)
            self._calls.append(client._start_push(server, requests))

    def add(self, name: str, grad: torch.Tensor | None) -> None:
        """This step's gradient of parameter `name` (a CPU tensor; None: no
        gradient). One with NaN or Inf abandons the push (`finish` raises), as
        does a fused key given gradients for some of its parameters only."""
        if self._refused is not None:
            return
        if name in self._grads:
            raise InvalidArgument(f"gradient of {name!r} given twice in the push of step {self._header.step}")
        client, step = self._client, self._header.step
        self._grads[name] = client._checked_grad(name, grad)  # raises for an unknown name
        # A fused key goes once the last of its parameters is added.
        ready = []
        for piece in client._pieces_of[name]:
            self._unadded[piece.key] = self._unadded.get(piece.key, len(piece.parts)) - 1
            if self._unadded[piece.key] == 0:
                ready.append(piece)
        try:
            for piece in ready:
                self._payloads[piece.key] = client._compress(piece, client._gathered(piece, self._grads, step))
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
        client = self._client
        for name in client._pieces_of:
            if name not in self._grads:
                self.add(name, None)
        if self._refused is not None:
            raise self._refused
        self._untaken = self._end(keep_queued=not self._bounded)
        # Kept so that a pull that finds its server restarted can push again:
        # (worker, step, key) ids make the repeat harmless if the push had landed.
        client._last_push = (self._header, self._payloads)

    def finish(self) -> None:
        """Seal, send the rest and return once every server took the push."""
        self.seal()
        client, step, untaken = self._client, self._header.step, self._untaken
        assert untaken is not None

        def settle(server: int) -> None:
            try:
                untaken_here = untaken[server]
                rest = (
                    client._start_requests(server, self._header, untaken_here, self._payloads) if untaken_here else []
                )
                client._settle(server, [self._calls[server], *rest])
                return
            except PSError as exc:
                if exc.code not in _RETRY_WHILE_WAITING:
                    raise
            client._retry_while_waiting(server, f"to take the push of step {step}", lambda: client._push_to(server))

        client._on_every_server(settle)

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


def _gather(piece: Piece, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The elements of `piece` from the tensors by parameter name: a view of
    one parameter's, or a fused key's parameters end to end (a copy)."""
    if not piece.fused:
        part = piece.parts[0]
        return _flat(tensors[part.name])[part.start : part.stop]
    # One call for all: half the time of concatenating their flat views.
    with torch.no_grad():
        gathered: torch.Tensor = _flatten_dense_tensors([tensors[name] for name in piece.names])  # type: ignore[no-untyped-call]
    return gathered


def _scatter(piece: Piece, elements: torch.Tensor, into: Mapping[str, torch.Tensor]) -> None:
    """Copy a fused key's `elements` into those of its parameters in `into`."""
    for name, values in zip(piece.names, torch.split(elements, piece.sizes), strict=True):
        _flat(into[name]).copy_(values)


def pulls_while_pushing(setting: bool | None, addresses: Sequence[str]) -> bool:
    """`setting` (ClientConfig.pull_while_pushing), or when it is None, whether
    any server is reached over a link."""
    return _over_links(addresses) if setting is None else setting


# Over emulated 1 Gbit/s links (2 workers, 2 servers, 9.4M parameters), 1 MiB
# requests took 409-412 ms a step against 484-499 ms with 4 MiB (DDP: 342).
_LINK_REQUEST_BYTES = 2**20
# On loopback exactly 4 MiB, not a chunk's 4 MiB less 64 KiB (sized for gRPC's
# message limit; a request of more chunks streams): two of the 2 MiB pieces
# that power-of-two tensors are often cut into fill one request, where the
# chunk's size took them one at a time. 64 MiB through 2 servers (2 MiB
# pieces, 5 rounds taking turns): the CPU of client and servers 135-149 ms a
# push + pull against 152-175, less in every round; the wall time within the
# noise (71-93 ms against 73-89).
_LOOPBACK_REQUEST_BYTES = 2**22


def push_request_bytes(setting: int | None, addresses: Sequence[str]) -> int:
    """`setting` (ClientConfig.push_request_bytes), or when it is None, 1 MiB
    if any server is reached over a link, else 4 MiB."""
    if setting is not None:
        return setting
    return _LINK_REQUEST_BYTES if _over_links(addresses) else _LOOPBACK_REQUEST_BYTES


def _over_links(addresses: Sequence[str]) -> bool:
    """Whether any server is reached over a link rather than loopback."""
    return not all(is_loopback(_host_of(address)) for address in addresses)


def _host_of(address: str) -> str | None:
    """The host of a "host:port" address ("[v6]:port" too); None for other
    gRPC targets (dns:///..., unix:...), which get no data channel."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in host or host.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        return None
    return host.strip("[]")


def _checked(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """`tensor`, once checked to be one PSClient can read and write in place."""
    if not tensor.is_cpu:
        raise InvalidArgument(
            f"{name!r} is on {tensor.device}; PSClient moves CPU tensors (stage device tensors first)"
        )
    if not tensor.is_contiguous():
        raise InvalidArgument(f"{name!r} is not contiguous")
    return tensor


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view of a checked tensor, detached from autograd. A 1-D tensor is
    its own: a view costs 2 us, which every small tensor pays on every step."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor if tensor.dim() == 1 else tensor.view(-1)
