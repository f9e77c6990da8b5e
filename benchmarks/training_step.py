"""Data-parallel training step time with 2 workers: ours (1 server, BSP)
against torch DDP over gloo and against a torch.distributed.rpc parameter
server, same model (about 10M parameters), batch, data and optimizer, each
run in this process tree one after the other. Also: scaling over workers
and servers, and the server's peak memory against the bytes it must hold."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc
from torch import nn

from benchmarks.common import Row, free_port, interleaved, process_context, server_processes, wait_for
from benchmarks.hosts import Host, available, emulated_hosts
from ps_common import codec
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from ps_worker.client import Mode
from ps_worker.compression import Compression

BATCH = 32
LR, MOMENTUM = 0.01, 0.9
DDP_TARGET = 1 / 1.25  # at most 1.25x DDP's step time in fp32
COMPRESSED_TARGET = 1.0  # at most DDP's (and the RPC server's) step time compressed
MEMORY_TARGET = 1 / 1.3  # server peak memory at most 1.3x weights + optimizer state


def build_model(width: int = 2048) -> nn.Module:
    """An MLP of about 10M parameters at the default width."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1024, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 1024), nn.ReLU(), nn.Linear(1024, 1000),
    )  # fmt: skip


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return torch.randn(BATCH, 1024, generator=gen), torch.randint(0, 1000, (BATCH,), generator=gen)


def _step_seconds(model: nn.Module, step: Callable[[], None], rank: int, steps: int) -> list[float]:
    """Seconds of each training step: zero_grad, forward, backward, `step`."""
    x, y = _data(rank)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        step()
        times.append(time.perf_counter() - started)
    return times


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR / 10)


# Each optimizer with the fp32 state it keeps per parameter, in tensors the parameter's size.
OPTIMIZERS = {"SGD-momentum": (_sgd, 1), "Adam": (_adam, 2)}


# -- the three systems, one worker process each ------------------------------------


def _ddp_worker(rank: int, world: int, master: str, steps: int, width: int, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(build_model(width))
    opt = _sgd(model)
    out.put(_step_seconds(model, opt.step, rank, steps))
    dist.destroy_process_group()


def _our_worker(
    rank: int, world: int, addresses: list[str], steps: int, width: int, out: Any,
    optimizer: str = "SGD-momentum", mode: Mode = "bsp", client: dict[str, Any] | None = None, **options: Any,
) -> None:  # fmt: skip
    """`client`: ClientConfig settings; `options`: DistributedOptimizer's."""
    torch.set_num_threads(1)
    model = build_model(width)
    with PSClient(addresses, rank, world, ClientConfig(timeout=120, **(client or {}))) as ps:
        make_optimizer, _ = OPTIMIZERS[optimizer]
        opt = DistributedOptimizer(make_optimizer(model), ps, named_parameters=model.named_parameters(),
                                   mode=mode, **options)  # fmt: skip
        out.put(_step_seconds(model, opt.step, rank, steps))
        opt.close()


class _RPCParameterServer:
    """The design of PyTorch's batch-updating parameter-server tutorial: the
    server sums the workers' gradients, steps once all have arrived, and
    answers every worker's pending call with the new weights."""

    def __init__(self, workers: int, width: int) -> None:
        self.model = build_model(width)
        self.opt = _sgd(self.model)
        self.workers = workers
        self.lock = threading.Lock()
        self.arrived = 0
        self.answer: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()

    def push_and_pull(self, grads: list[torch.Tensor]) -> torch.futures.Future[list[torch.Tensor]]:
        with self.lock:
            for param, grad in zip(self.model.parameters(), grads, strict=True):
                param.grad = grad if param.grad is None else param.grad.add_(grad)
            self.arrived += 1
            answer = self.answer
            if self.arrived == self.workers:
                for param in self.model.parameters():
                    param.grad.div_(self.workers)  # type: ignore[union-attr]
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.arrived = 0
                self.answer = torch.futures.Future()
                answer.set_result([p.detach().clone() for p in self.model.parameters()])
        return answer


_RPC_SERVER: _RPCParameterServer | None = None


@rpc.functions.async_execution  # type: ignore[untyped-decorator]
def _rpc_push_and_pull(grads: list[torch.Tensor]) -> torch.futures.Future[list[torch.Tensor]]:
    assert _RPC_SERVER is not None
    return _RPC_SERVER.push_and_pull(grads)


def _rpc_process(rank: int, world: int, master: str, steps: int, width: int, out: Any, tcp: bool = False) -> None:
    """Rank 0 is the server, ranks 1.. the workers. `tcp`: TensorPipe over TCP
    only; otherwise it finds the processes on one machine and uses shared memory."""
    global _RPC_SERVER
    torch.set_num_threads(1)
    if rank == 0:
        _RPC_SERVER = _RPCParameterServer(world - 1, width)
    transports: dict[str, Any] = {"_transports": ["uv"], "_channels": ["basic"]} if tcp else {}
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://{master}", rpc_timeout=120, **transports)
    rpc.init_rpc(  # type: ignore[no-untyped-call]
        "ps" if rank == 0 else f"worker{rank}", rank=rank, world_size=world, rpc_backend_options=options
    )
    if rank > 0:
        model = build_model(width)
        params = list(model.parameters())

        def step() -> None:
            fresh = rpc.rpc_sync("ps", _rpc_push_and_pull, args=([p.grad for p in params],))
            with torch.no_grad():
                for param, value in zip(params, fresh, strict=True):
                    param.copy_(value)

        out.put(_step_seconds(model, step, rank - 1, steps))
    try:
        rpc.shutdown()
    except RuntimeError as exc:  # torch.distributed.DistNetworkError among them
        # TensorPipe's shutdown can race a peer's ("Connection reset by peer",
        # as in pytorch/pytorch#61670); the step times were reported before.
        print(f"rpc rank {rank}: shutdown failed after the measurement: {exc}", file=sys.stderr)


def _run_processes(
    target: Callable[..., None], world: int, *args: Any, hosts: Sequence[Host] | None = None, **kwargs: Any
) -> list[list[float]]:
    """Run `target(rank, world, *args, out, **kwargs)` in `world` processes,
    rank r on `hosts[r]` if given; their reports."""
    context = process_context()
    out = context.Queue()
    processes = [
        context.Process(target=_on_host, args=(hosts[rank] if hosts else None, target, rank, world, *args, out),
                        kwargs=kwargs)
        for rank in range(world)
    ]  # fmt: skip
    for process in processes:
        process.start()
    reports = []
    try:
        reporters = world - 1 if target is _rpc_process else world  # the RPC server reports nothing
        reports = [wait_for(out, processes, f"the step times of {target.__name__}") for _ in range(reporters)]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    if any(p.exitcode for p in processes):
        raise RuntimeError(f"{target.__name__}: a process failed: exit codes {[p.exitcode for p in processes]}")
    return reports


def _on_host(host: Host | None, target: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    if host is not None:
        host.enter()
        # gloo and TensorPipe pick an interface from the hostname, which names no address here.
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["TP_SOCKET_IFNAME"] = host.interface
    target(*args, **kwargs)


def _median_step(reports: list[list[float]], warmup: int) -> float:
    """The slowest worker's median step (in BSP all wait for it)."""
    return max(statistics.median(times[warmup:]) for times in reports)


def _master(hosts: Sequence[Host] | None) -> str:
    """Rank 0's address for torch.distributed's rendezvous (a fresh host has every port free)."""
    return f"{hosts[0].address}:29500" if hosts else f"127.0.0.1:{free_port()}"


def ddp_seconds(workers: int, steps: int, warmup: int, width: int = 2048, hosts: Sequence[Host] | None = None) -> float:
    """`hosts`: one per worker."""
    return _median_step(_run_processes(_ddp_worker, workers, _master(hosts), steps, width, hosts=hosts), warmup)


def rpc_seconds(workers: int, steps: int, warmup: int, width: int = 2048, hosts: Sequence[Host] | None = None) -> float:
    """`hosts`: the server's, then one per worker."""
    reports = _run_processes(_rpc_process, workers + 1, _master(hosts), steps, width, hosts=hosts, tcp=bool(hosts))
    return _median_step(reports, warmup)


def our_seconds(workers: int, servers: int, steps: int, warmup: int, width: int = 2048, **options: Any) -> float:
    return our_run(workers, servers, steps, warmup, width, **options)[0]


def our_run(
    workers: int, servers: int, steps: int, warmup: int, width: int = 2048,
    server_hosts: Sequence[Host] | None = None, worker_hosts: Sequence[Host] | None = None,
    fresh_servers: bool = False, **options: Any,
) -> tuple[float, list[int]]:  # fmt: skip
    """Median step and each server's peak RSS growth over its idle RSS, in
    bytes (`fresh_servers` for the growth of servers started as users do)."""
    with server_processes(servers, hosts=server_hosts, fresh=fresh_servers) as (addresses, pids):
        idle = [_rss(pid, "VmRSS") for pid in pids]
        reports = _run_processes(_our_worker, workers, addresses, steps, width, hosts=worker_hosts, **options)
        growth = [_rss(pid, "VmHWM") - before for pid, before in zip(pids, idle, strict=True)]
    return _median_step(reports, warmup), growth


def _rss(pid: int, field: str) -> int:
    """Bytes of VmRSS (now) or VmHWM (peak) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp32 + overlap": {"overlap": True},
    "bf16": {"compression": Compression("bf16")},
    "bf16 + overlap": {"overlap": True, "compression": Compression("bf16")},
    "top-1%": {"compression": Compression("topk", 0.01)},
    "bf16 both ways": {"compression": Compression("bf16", pull="bf16")},  # weights pulled in bf16 too
    "fp32, pull while pushing": {"client": {"pull_while_pushing": True}},  # off by default on loopback
    # Workers on the servers' host reach them through a Unix socket by default; here, as from another host, by TCP.
    "fp32 over loopback TCP": {"client": {"data_socket": False}},
    # On the Unix socket, BSP pulls read the servers' shared weights by default; here they are sent.
    "fp32, weights sent": {"client": {"shared_weights": False}},
}
QUICK_VARIANTS = ["fp32", "fp32 + overlap", "bf16", "bf16 + overlap"]


def run(quick: bool) -> list[Row]:
    steps, warmup = (10, 3) if quick else (25, 5)
    numel = sum(p.numel() for p in build_model().parameters())
    size = f"{numel / 1e6:.1f}M-param MLP, batch {BATCH}/worker, 2 workers"
    variants = QUICK_VARIANTS if quick else list(VARIANTS)
    # Five rounds in the full run: with three, the compressed rows' verdicts
    # (within a few percent of DDP) flipped from run to run on the same code.
    seconds = interleaved({
        "ddp": lambda: ddp_seconds(2, steps, warmup),
        "rpc": lambda: rpc_seconds(2, steps, warmup),
        **{name: partial(our_seconds, 2, 1, steps, warmup, **VARIANTS[name]) for name in variants},
    }, rounds=2 if quick else 5)  # fmt: skip
    ddp, rpc_ps = seconds["ddp"], seconds["rpc"]
    ours = {name: seconds[name] for name in variants}
    rows = [
        _step_row(f"training step, {size}, 1 server, {variant} vs DDP over gloo", ours[variant], ddp,
                  DDP_TARGET if variant.startswith("fp32") else COMPRESSED_TARGET)
        for variant in ours
        if "pull" not in variant
    ]  # fmt: skip
    step = f"training step, {size}"
    rows.append(_step_row(f"{step}: overlap on vs off (fp32)", ours["fp32 + overlap"], ours["fp32"], 1.0))
    if "fp32 over loopback TCP" in ours:
        tcp = ours["fp32 over loopback TCP"]
        rows.append(_step_row(f"{step}: Unix socket vs loopback TCP (fp32)", ours["fp32"], tcp, 1.0))
    if "fp32, weights sent" in ours:
        sent = ours["fp32, weights sent"]
        rows.append(_step_row(f"{step}: shared weights vs sent (fp32, Unix socket)", ours["fp32"], sent, 1.0))
    if "fp32, pull while pushing" in ours:
        rows.append(_step_row(f"{step}: pull while pushing off (the default on loopback) vs on (fp32)", ours["fp32"],
                              ours["fp32, pull while pushing"], 1.0))  # fmt: skip
    rows.append(_step_row(f"{step}, fp32 vs torch.distributed.rpc parameter server", ours["fp32"], rpc_ps, 1.0))
    rows.append(_step_row(f"{step}, bf16 vs torch.distributed.rpc parameter server", ours["bf16"], rpc_ps, 1.0))
    return rows


NETWORK_MBIT = 1000
# Our runs over the emulated network: name -> (servers, DistributedOptimizer options).
NETWORK_RUNS: dict[str, tuple[int, dict[str, Any]]] = {
    "fp32, 1 server": (1, VARIANTS["fp32"]),
    "bf16, 1 server": (1, VARIANTS["bf16"]),
    "top-1%, 1 server": (1, VARIANTS["top-1%"]),
    "bf16 both ways, 1 server": (1, VARIANTS["bf16 both ways"]),
    "fp32, 2 servers": (2, VARIANTS["fp32"]),
    "bf16 both ways, 2 servers": (2, VARIANTS["bf16 both ways"]),
    # Pieces (and requests) of 0.5 MiB instead of 4: a pull streams behind the push in finer steps.
    "fp32, 0.5 MiB pieces, 2 servers": (2, {"client": {"max_piece_bytes": 2**19, "push_request_bytes": 2**19}}),
    "fp32, push then pull, 2 servers": (2, {"client": {"pull_while_pushing": False}}),
    # The default on loopback (push requests of 1 MiB are the default over links).
    "fp32, 4 MiB requests, 2 servers": (2, {"client": {"push_request_bytes": codec.DEFAULT_CHUNK_BYTES}}),
    "fp32 + overlap, 2 servers": (2, VARIANTS["fp32 + overlap"]),
}


def run_network(quick: bool) -> list[Row]:
    """The training step with every process on a host of its own and every
    link carrying NETWORK_MBIT each way (benchmarks/hosts.py). On loopback
    the 2 cores set the pace and bytes cost little; here the network does,
    as on a cluster, so what compression, overlap and servers save shows."""
    unavailable = "--quick" if quick else available()
    if unavailable:
        print(f"network rows skipped: {unavailable}")
        return []
    steps, warmup = 8, 2
    numel = sum(p.numel() for p in build_model().parameters())
    size = f"{numel / 1e6:.1f}M-param MLP, 2 workers"
    with emulated_hosts(["worker0", "worker1", "server0", "server1"], NETWORK_MBIT) as on:
        workers, servers = [on["worker0"], on["worker1"]], [on["server0"], on["server1"]]
        seconds = interleaved({
            "ddp": lambda: ddp_seconds(2, steps, warmup, hosts=workers),
            "rpc": lambda: rpc_seconds(2, steps, warmup, hosts=[servers[0], *workers]),
            **{name: partial(our_seconds, 2, count, steps, warmup, server_hosts=servers[:count], worker_hosts=workers,
                             **options)
               for name, (count, options) in NETWORK_RUNS.items()},
        }, rounds=1)  # fmt: skip

    def row(what: str, ours: str, baseline: str, target: float) -> Row:
        return _step_row(f"{NETWORK_MBIT} Mbit/s links, {size}: {what}", seconds[ours], seconds[baseline], target)

    rows = [row(f"{name} vs DDP over gloo", name, "ddp", DDP_TARGET if name.startswith("fp32") else COMPRESSED_TARGET)
            for name in NETWORK_RUNS if "push then pull" not in name and "4 MiB" not in name]  # fmt: skip
    rows += [row(f"{name} vs torch.distributed.rpc parameter server", name, "rpc", 1.0)
             for name in ("fp32, 1 server", "bf16, 1 server")]  # fmt: skip
    rows += [
        row("compression: bf16 vs fp32, 1 server", "bf16, 1 server", "fp32, 1 server", 1.0),
        row("compression: top-1% vs fp32, 1 server", "top-1%, 1 server", "fp32, 1 server", 1.0),
        row(
            "compression: bf16 both ways vs bf16 pushes only, 1 server",
            "bf16 both ways, 1 server",
            "bf16, 1 server",
            1.0,
        ),
        row(
            "the defaults vs 0.5 MiB pieces and requests, fp32, 2 servers",
            "fp32, 2 servers",
            "fp32, 0.5 MiB pieces, 2 servers",
            1.0,
        ),
        row(
            "1 MiB push requests (the default over links) vs 4 MiB, fp32, 2 servers",
            "fp32, 2 servers",
            "fp32, 4 MiB requests, 2 servers",
            1.0,
        ),
        row("overlap on vs off, fp32, 2 servers", "fp32 + overlap, 2 servers", "fp32, 2 servers", 1.0),
        row("2 servers vs 1, fp32", "fp32, 2 servers", "fp32, 1 server", 1.0),
        row("pull while pushing on vs off, fp32, 2 servers", "fp32, 2 servers", "fp32, push then pull, 2 servers", 1.0),
    ]
    return rows


def _step_row(name: str, ours: float, baseline: float, target: float) -> Row:
    """Seconds per step, as ms/step; faster than the baseline is a ratio above 1."""
    return Row(name=name, ours=round(ours * 1000, 1), baseline=round(baseline * 1000, 1), unit="ms/step",
               ratio=round(baseline / ours, 3), target=target)  # fmt: skip


def run_scaling(quick: bool) -> list[Row]:
    """Samples/s over workers and servers against one worker on one server."""
    width = 1024  # about 4M parameters: four workers fit two cores
    steps, warmup = (10, 3) if quick else (30, 6)
    grid = [(2, 1)] if quick else [(2, 1), (4, 1), (1, 2), (2, 2), (4, 2)]
    cores = os.cpu_count() or 1
    numel = sum(p.numel() for p in build_model(width).parameters())
    seconds = interleaved({
        f"{w}x{s}": partial(our_seconds, w, s, steps, warmup, width) for w, s in [(1, 1), *grid]
    }, rounds=1 if quick else 2)  # fmt: skip
    single = seconds["1x1"]
    rows = []
    for workers, servers in grid:
        # BSP: every worker does one batch per step.
        ours, baseline = workers * BATCH / seconds[f"{workers}x{servers}"], BATCH / single
        rows.append(Row(
            name=f"scaling: {workers} workers x {servers} servers vs 1 x 1 ({numel / 1e6:.1f}M params); "
                 f"target: half of min(workers, {cores} cores)",
            ours=round(ours, 1), baseline=round(baseline, 1), unit="samples/s", ratio=round(ours / baseline, 3),
            target=0.5 * min(workers, cores),
        ))  # fmt: skip
    return rows


# (optimizer, mode, workers) of each memory row: one worker as the issue
# asks, and four ASP workers pushing at once, each push in flight at the server.
MEMORY_RUNS: list[tuple[str, Mode, int]] = [("SGD-momentum", "bsp", 1), ("Adam", "bsp", 1), ("SGD-momentum", "asp", 4)]


def run_memory(quick: bool) -> list[Row]:
    """The server's peak RSS growth against the bytes it must hold (fp32
    weights + optimizer state), on a model large enough (26M parameters,
    105 MB) that the few MiB any process allocates do not set the ratio."""
    width = 2048 if quick else 4096
    steps = 6 if quick else 20
    numel = sum(p.numel() for p in build_model(width).parameters())
    rows = []
    for optimizer, mode, workers in MEMORY_RUNS:
        _, growth = our_run(workers, 1, steps, 1, width, fresh_servers=True, optimizer=optimizer, mode=mode)
        theoretical = (1 + OPTIMIZERS[optimizer][1]) * 4 * numel
        rows.append(Row(
            name=f"server memory, {optimizer}, {mode.upper()}, {workers} worker(s), {numel / 1e6:.1f}M params: "
                 "weights + optimizer state vs peak RSS growth",
            ours=round(growth[0] / 2**20, 1), baseline=round(theoretical / 2**20, 1), unit="MiB",
            ratio=round(theoretical / growth[0], 3), target=round(MEMORY_TARGET, 3),
        ))  # fmt: skip
    return rows
