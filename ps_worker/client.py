"""PSClient: a worker's connection to every parameter server of a job.

Three verbs, like ps-lite's Push/Pull: `init` declares the parameters and the
optimizer (worker 0 uploads the initial values, the others wait for that),
`push` sends one step's gradients (`push_stream` the same, fed gradient by
gradient while backward runs), `pull` reads the weights the job's
consistency mode allows into the given tensors; `push_pull` does a push
and the next step's pull, at once where the mode allows. Calls to different
servers run concurrently; every call has a deadline, and every wait logs
what it waits for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from types import TracebackType
from typing import Literal

import torch

from ps_common import PROTOCOL_VERSION, codec
from ps_common.config import config_from_env
from ps_common.errors import FailedPrecondition, InvalidArgument, Unavailable
from ps_common.proto import ps_pb2 as pb
from ps_worker.client_config import ClientConfig
from ps_worker.compression import Compression, Compressor, Payload
from ps_worker.environment import WorkerPlace
from ps_worker.job_spec import group_options, key_spec, torch_optimizer_class, with_keys
from ps_worker.layout import Layout, checked, flat, gather, scatter
from ps_worker.links import pulls_while_pushing, push_request_bytes
from ps_worker.optimizer_state import read_state, write_state
from ps_worker.pruning import PruningConfig, read_masks
from ps_worker.push_stream import PushStream
from ps_worker.pushing import Pusher
from ps_worker.servers import Servers
from ps_worker.sharding import Piece, TensorInfo, plan_placement

__all__ = ["ClientConfig", "Mode", "PSClient", "PushStream"]

Mode = Literal["bsp", "asp", "ssp"]
_MODES = {"bsp": pb.BSP, "asp": pb.ASP, "ssp": pb.SSP}


class PSClient:
    """Connection of worker `worker_id` (of `num_workers`) to the servers at
    `addresses`. Left out, they come from the environment a launcher sets,
    and so does the config (see `from_env`)."""

    def __init__(
        self,
        addresses: Sequence[str] | None = None,
        worker_id: int | None = None,
        num_workers: int | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        if addresses is None or worker_id is None or num_workers is None:
            place = WorkerPlace.from_env()
            addresses = place.servers if addresses is None else addresses
            worker_id = place.worker_id if worker_id is None else worker_id
            num_workers = place.num_workers if num_workers is None else num_workers
            config = config_from_env(ClientConfig) if config is None else config
        if not addresses:
            raise ValueError("PSClient needs at least one server address")
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id {worker_id} is out of range for {num_workers} workers")
        self.addresses = list(addresses)
        self.worker_id = worker_id
        self.num_workers = num_workers
        self.config = config or ClientConfig()
        self._servers = Servers(self.addresses, worker_id, num_workers, self.config)
        self._puller = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ps-push-pull")
        self._mode: Mode = "bsp"
        self._pull_while_pushing = pulls_while_pushing(self.config.pull_while_pushing, self.addresses)
        request_bytes = push_request_bytes(self.config.push_request_bytes, self.addresses)
        no_layout = Layout([[] for _ in self.addresses], {}, {})
        self._pusher = Pusher(self._servers, no_layout, Compressor(None), request_bytes)
        self._pull_as: torch.dtype | None = None  # the half precision weights travel in, if any
        self._optimizer: torch.optim.Optimizer | None = None
        self.prunable: set[str] = set()  # names of the parameters pruning applies to

    @classmethod
    def from_env(cls, config: ClientConfig | None = None) -> PSClient:
        """The client the environment describes, as ps-run, the deployment
        files and torchrun-style launchers set it: the servers from
        PS_SERVERS, this worker's id from PS_WORKER_ID (or RANK), the worker
        count from PS_NUM_WORKERS (or WORLD_SIZE), and every ClientConfig
        field from its PS_* variable unless `config` is given."""
        return cls(None, None, None, config)

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
        layout = Layout.of(placement, {t.name: t.numel for t in tensors}, len(self.addresses))
        compressor = Compressor(compression)
        self._pusher = Pusher(self._servers, layout, compressor, self._pusher.request_bytes)
        self._pull_as = compressor.pull_dtype
        self._optimizer = optimizer
        optimizer_spec = pb.OptimizerSpec(name=torch_optimizer_class(optimizer).__name__, groups=self._group_options())

        job = pb.JobSpec(
            mode=_MODES[mode], num_workers=self.num_workers, staleness=staleness,
            scale_lr_by_staleness=scale_lr_by_staleness, optimizer=optimizer_spec,
            pruning=pruning.to_proto() if pruning else None,
        )  # fmt: skip
        jobs = [
            with_keys(job, [key_spec(p, params, group_of, self.prunable) for p in pieces]) for pieces in layout.pieces
        ]

        def init_server(server: int) -> int:
            hello = self._servers.wait_for(server, initialized=self.worker_id != 0)
            if self.worker_id == 0:
                values = {name: checked(tensor.detach().cpu(), name) for name, tensor in named_parameters}
                payloads = {p.key: Payload(gather(p, values)) for p in layout.pieces[server]}
                header = pb.InitHeader(protocol_version=PROTOCOL_VERSION, worker_id=self.worker_id, job=jobs[server])
                stream = self._pusher.messages(header, layout.pieces[server], payloads)
                self._servers.transports[server].init(stream, self.config.timeout)
            elif hello.job != jobs[server]:
                raise FailedPrecondition(
                    f"{self.addresses[server]}: worker 0 initialized a different job (parameters, optimizer, "
                    "mode or worker count differ); all workers must run the same model and optimizer settings"
                )
            return hello.clock

        clocks = self._servers.on_every(init_server)
        self._servers.start_heartbeats()
        # A server holding none of the keys cannot know where the job is.
        return min((c for c, pieces in zip(clocks, layout.pieces, strict=True) if pieces), default=0)

    @property
    def layout(self) -> Layout:
        """Which server holds which range of which parameter (after init)."""
        return self._pusher.layout

    @property
    def bytes_pushed(self) -> int:
        """Gradient bytes sent (after compression), retries included."""
        return self._pusher.bytes_pushed

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
        self._pusher.prepare(grads, self._push_header(step, prune_thresholds))
        self._pusher.send()

    def push_stream(self, step: int, prune_thresholds: Mapping[str, float] | None = None) -> PushStream:
        """Start the push of `step` now and feed it gradients as they are ready
        (`add`), e.g. from backward hooks; `finish` sends the rest as absent."""
        return PushStream(self._pusher, self._push_header(step, prune_thresholds), self.pulls_during_push)

    def _push_header(self, step: int, prune_thresholds: Mapping[str, float] | None) -> pb.PushHeader:
        return pb.PushHeader(
            worker_id=self.worker_id, step=step, groups=self._group_options(), prune_thresholds=prune_thresholds
        )

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
        # Bad input is refused before the pull starts.
        self._pusher.prepare(grads, self._push_header(step, prune_thresholds))
        self.pull_during(self._pusher.send, into, step + 1).result()

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
        layout = self.layout
        if into.keys() != layout.numel.keys():
            missing, unknown = sorted(layout.numel.keys() - into.keys()), sorted(into.keys() - layout.numel.keys())
            raise InvalidArgument(f"pull needs a tensor for every parameter: missing {missing}, unknown {unknown}")
        for name, tensor in into.items():
            layout.check_fits(name, tensor, repr(name))
        # By piece key, not a count: an attempt cut off midway is repeated whole.
        missing_pieces = {name: {p.key for p in layout.pieces_of[name]} for name in into}
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
            pieces = {p.key: p for p in layout.pieces[server]}
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
                return flat(into[part.name])[part.start : part.stop]

            def complete(key: str) -> None:
                piece = pieces[key]
                if piece.fused:
                    scatter(piece, fused[key], into)
                arrived(piece)

            request = pb.PullRequest(
                worker_id=self.worker_id,
                step=step,
                wait_for_all_workers=wait_for_all_workers,
                wait_seconds=self.config.wait_log_interval,
                dtype=pb.DTYPE_UNSPECIFIED if half is None else codec.dtype_to_proto(half),
            )
            deadline = self.config.wait_log_interval + self.config.timeout
            transport = self._servers.transports[server]
            server_was_down = False

            def attempt_after_recovery() -> None:
                # A server that went down may have restarted from a checkpoint
                # older than our last push: push it again before reading.
                nonlocal server_was_down
                if server_was_down and self._pusher.has_pushed:
                    self._pusher.push_to(server)
                try:
                    transport.pull(request, deadline, destination, complete)
                except Unavailable:
                    server_was_down = True
                    raise
                server_was_down = False

            self._servers.retry_while_waiting(
                server, f"to read step {step}", attempt_after_recovery, abandoned=abandoned
            )

        self._servers.on_every(pull_server)

    def pull_masks(self, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The pruning masks (True = kept) of the prunable parameters among `shapes`."""
        return read_masks(self._servers, self.layout, {n: s for n, s in shapes.items() if n in self.prunable})

    def optimizer_state(self, shapes: Mapping[str, torch.Size]) -> dict[str, dict[str, torch.Tensor]]:
        """The servers' optimizer state of every parameter (by name, with
        `shapes` by name), in torch's per-parameter form; none for a
        parameter not updated yet."""
        return read_state(self._servers, self.layout, shapes)

    def load_optimizer_state(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Worker 0 sets the servers' optimizer state from `states` (by
        parameter name, torch's form), before the job's first update; the
        other workers' servers are the same ones, so they send nothing."""
        if self.worker_id == 0:
            write_state(self._servers, self.layout, {name: dict(fields) for name, fields in states.items()})

    def stats(self) -> list[pb.StatsResponse]:
        """Each server's keys, bytes, versions and worker clocks, in server order."""
        return self._servers.on_every(lambda s: self._servers.transports[s].stats(self.config.timeout))

    def checkpoint(self) -> list[pb.CheckpointResponse]:
        """Make every server write a checkpoint now; where each did, in server order."""
        return self._servers.on_every(lambda s: self._servers.transports[s].checkpoint(self.config.timeout))

    def close(self, leave: bool = True) -> None:
        """End every connection. A worker that joined the job tells the
        servers it leaves, so that the others go on without waiting for it;
        with `leave=False` they wait for it up to their worker timeout, as
        for a crash, which suits a worker about to restart and resume."""
        self._puller.shutdown(wait=True)
        self._servers.close(leave=leave and self._optimizer is not None)

    def __enter__(self) -> PSClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------

    def _group_options(self) -> list[pb.ParamGroup]:
        if self._optimizer is None:
            raise FailedPrecondition("call init() before push()")
        return group_options(self._optimizer)
