"""`ps-server`: run one parameter-server process (one per shard)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from ps_common.config import parse_config
from ps_common.log import setup_logging
from ps_server.config import ServerConfig
from ps_server.server import start_server

log = logging.getLogger("ps_server")


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def _tune_malloc() -> None:
    """Keep what the server allocates per step in malloc between steps.

    The buffers it tracks (pushed gradients, their casts, ASP pull copies)
    are reused by ps_server.buffers; this is for the rest, such as the bf16
    casts of weights a pull sends. Left to glibc, they were given back to
    the kernel and faulted in again: 4,600-4,750 faults a step against
    1,235 with this, with bf16 pulls (benchmarks/training_step.py);
    before the buffers were reused, 11,000 a step and a quarter of the
    server's CPU with bf16 pushes.

    - Two arenas: glibc gives each handler thread its own arena, and memory
      freed into one is not reused by the others.
    - No returning freed memory to the kernel (trim threshold 1 GiB, and
      allocations up to 32 MiB from the heap rather than mmap). The peak is
      the same; the memory just stays at it.

    Not glibc: no-op."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, 2)
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 2**30)


def main(argv: Sequence[str] | None = None) -> int:
    _tune_malloc()
    config = parse_config(ServerConfig, "Run one parameter server.", argv)
    setup_logging(config.log_level, config.log_json)
    torch.set_num_threads(config.torch_threads)
    server = start_server(config)
    if config.port_file:
        # Written atomically so a launcher polling for it never reads half a number.
        tmp = Path(config.port_file + ".tmp")
        tmp.write_text(str(server.port))
        tmp.rename(config.port_file)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s, shutting down (grace %.1fs)", signal.Signals(signum).name, config.grace)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop(config.grace)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
