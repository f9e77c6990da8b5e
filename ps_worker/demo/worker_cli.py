"""`ps-worker`: one worker process of the built-in job against given servers."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ps_common.config import parse_config
from ps_common.errors import PSError
from ps_common.log import setup_logging
from ps_worker.demo.config import WorkerConfig
from ps_worker.demo.job import run_worker

log = logging.getLogger("ps_worker")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(WorkerConfig, "Run one worker of the built-in digits job.", argv)
    setup_logging(config.log_level, config.log_json)
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)

    def report(event: dict[str, Any]) -> None:
        if config.report == "json":
            print(json.dumps(event), flush=True)
        elif event["event"] == "done":
            log.info("finished: %s", json.dumps(event))
        else:
            log.info(
                "worker %d epoch %d/%d step %d/%d loss %.4f accuracy %.3f",
                event["worker"], event["epoch"], event["epochs"], event["step"], event["steps"],
                event["loss"], event["accuracy"],
            )  # fmt: skip

    try:
        run_worker(config, report)
    except PSError as exc:
        log.error("worker %d failed: %s", config.worker_id, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
