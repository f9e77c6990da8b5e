"""`ps-run`: your own training script on parameter servers, in the manner of torchrun.

    ps-run --servers 2 --workers 4 train.py --my-args

starts 2 servers and 4 copies of `train.py` on this host, with live output
prefixed by process, stops everything on Ctrl-C or when a worker fails, and
ends with a line saying who failed and why. Each worker finds its place in
the environment: PS_SERVERS, PS_WORKER_ID and RANK, PS_NUM_WORKERS and
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, and MASTER_ADDR and MASTER_PORT
for a gloo process group of the workers' own (samplers, metrics), as
torchrun sets them. On a cluster the same script runs with `--role
server` on the servers' hosts and `--role worker` on the others.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ps_worker.environment import NUM_WORKERS, SERVERS, WORKER_ID
from ps_worker.local_servers import start_servers, stop_processes

__all__ = ["main"]

_TAIL_LINES = 20


class _Output:
    """Every child's output, line by line, prefixed with its name; the last
    lines of each kept for the summary of a failure."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tails: dict[str, deque[str]] = {}
        self._readers: list[threading.Thread] = []

    def follow(self, name: str, stream: IO[bytes]) -> None:
        tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._tails[name] = tail
        reader = threading.Thread(target=self._copy, args=(name, stream, tail), name=f"ps-run-{name}", daemon=True)
        reader.start()
        self._readers.append(reader)

    def _copy(self, name: str, stream: IO[bytes], tail: deque[str]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            tail.append(line)
            with self._lock:
                print(f"[{name}] {line}", flush=True)

    def tail(self, name: str) -> str:
        return "\n".join(f"    {line}" for line in self._tails.get(name, ()))

    def drain(self, timeout: float = 5.0) -> None:
        """Let the readers print what the children wrote before they ended."""
        for reader in self._readers:
            reader.join(timeout)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ps-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", choices=("all", "server", "worker"), default="all",
                        help="all: servers and workers on this host; server: one ps-server here (the arguments "
                             "after the script position are its flags); worker: this host's workers only")  # fmt: skip
    parser.add_argument("--servers", type=int, default=1, help="role all: server processes to start")
    parser.add_argument("--workers", type=int, default=1, help="worker processes to start on this host")
    parser.add_argument("--nnodes", type=int, default=1, help="role worker: hosts running workers, each as many")
    parser.add_argument("--node-rank", type=int, default=int(os.environ.get("NODE_RANK", "0")),
                        help="role worker: this host's index among them [env NODE_RANK]")  # fmt: skip
    parser.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                        help="host of the workers' own process group (rank 0's) [env MASTER_ADDR]")  # fmt: skip
    parser.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "0")),
                        help="its port; 0: a free one, on one host only [env MASTER_PORT]")  # fmt: skip
    parser.add_argument("-m", "--module", action="store_true", help="run the script as a module (python -m)")
    parser.add_argument("script", nargs="?", help="the training script (role server: after --, ps-server's flags)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.role == "server":
        from ps_server.cli import main as server_main

        return server_main([*([args.script] if args.script else []), *args.args])
    if args.script is None:
        parser.error("name the training script to run")
    if args.workers < 1 or args.servers < 1 or args.nnodes < 1:
        parser.error("--servers, --workers and --nnodes must be at least 1")
    if args.role == "worker" and not os.environ.get(SERVERS):
        parser.error(f"--role worker needs {SERVERS}: the servers' addresses, comma-separated")
    if args.nnodes > 1 and not args.master_port:
        parser.error("--nnodes above 1 needs --master-port (or MASTER_PORT): the same on every host")
    if args.role == "all" and args.nnodes != 1:
        parser.error("--nnodes is for --role worker: with --role all every process runs on this host")
    return _Launch(args).run()


class _Launch:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.output = _Output()
        self.servers: list[subprocess.Popen[Any]] = []
        self.workers: list[subprocess.Popen[Any]] = []
        self.started = time.monotonic()

    def run(self) -> int:
        # Ctrl-C and SIGTERM both stop everything, even where SIGINT came
        # ignored from the parent (a background job, some test runners).
        previous = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with tempfile.TemporaryDirectory(prefix="ps-run-") as workdir:
                addresses = self._servers(Path(workdir))
                self._start_workers(addresses)
                return self._wait()
        except KeyboardInterrupt:
            self._stop_all()
            print("ps-run: interrupted; every process was stopped", file=sys.stderr, flush=True)
            return 130
        except RuntimeError as exc:  # a server that did not start
            self._stop_all()
            print(f"ps-run: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _servers(self, workdir: Path) -> list[str]:
        if self.args.role == "worker":
            return [a.strip() for a in os.environ[SERVERS].split(",") if a.strip()]
        self.servers, addresses = start_servers(
            self.args.servers, workdir, lambda index: subprocess.PIPE,
            tail=lambda index: self.output.tail(f"server {index}"),
        )  # fmt: skip
        for index, server in enumerate(self.servers):
            if server.stdout is not None:
                self.output.follow(f"server {index}", server.stdout)
        print(f"ps-run: {len(addresses)} servers at {','.join(addresses)}", file=sys.stderr, flush=True)
        return addresses

    def _start_workers(self, addresses: list[str]) -> None:
        local, nodes = self.args.workers, self.args.nnodes
        world = local * nodes
        master_port = self.args.master_port or _free_port()
        command = [sys.executable, *(["-m"] if self.args.module else []), self.args.script, *self.args.args]
        threads = str(max(1, (os.cpu_count() or 1) // local))
        for local_rank in range(local):
            rank = self.args.node_rank * local + local_rank
            env = {
                **os.environ,
                SERVERS: ",".join(addresses),
                WORKER_ID[0]: str(rank), WORKER_ID[1]: str(rank),
                NUM_WORKERS[0]: str(world), NUM_WORKERS[1]: str(world),
                "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local), "GROUP_RANK": str(self.args.node_rank),
                "MASTER_ADDR": self.args.master_addr, "MASTER_PORT": str(master_port),
                "PYTHONUNBUFFERED": "1",
            }  # fmt: skip
            env.setdefault("OMP_NUM_THREADS", threads)
            worker = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self.workers.append(worker)
            if worker.stdout is not None:
                self.output.follow(f"worker {rank}", worker.stdout)

    def _wait(self) -> int:
        """Until every worker has ended, one fails or a server dies."""
        ranks = [self.args.node_rank * self.args.workers + i for i in range(len(self.workers))]
        while True:
            codes = [worker.poll() for worker in self.workers]
            failed = [(rank, code) for rank, code in zip(ranks, codes, strict=True) if code not in (None, 0)]
            dead = [(i, s.returncode) for i, s in enumerate(self.servers) if s.poll() is not None]
            if failed or dead or all(code == 0 for code in codes):
                break
            time.sleep(0.1)
        self._stop_all()
        seconds = time.monotonic() - self.started
        if not failed and not dead:
            print(f"ps-run: {len(self.workers)} workers finished in {seconds:.1f} s", file=sys.stderr, flush=True)
            return 0
        for rank, code in failed:
            print(f"ps-run: worker {rank} failed (exit code {code}); its last lines:\n"
                  f"{self.output.tail(f'worker {rank}')}", file=sys.stderr, flush=True)  # fmt: skip
        for index, code in dead:
            print(f"ps-run: server {index} ended (exit code {code}) while workers ran; its last lines:\n"
                  f"{self.output.tail(f'server {index}')}", file=sys.stderr, flush=True)  # fmt: skip
        stopped = [rank for rank, code in zip(ranks, [w.returncode for w in self.workers], strict=True) if code < 0]
        if stopped:
            print(f"ps-run: stopped workers {stopped}", file=sys.stderr, flush=True)
        return 1

    def _stop_all(self) -> None:
        stop_processes(self.workers)
        stop_processes(self.servers)
        self.output.drain()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
