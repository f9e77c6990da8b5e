"""`ps-server`: run one parameter-server process (one per shard)."""

from __future__ import annotations

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
from ps_server.service import start_server

log = logging.getLogger("ps_server")


def main(argv: Sequence[str] | None = None) -> int:
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
