"""The built-in example job: a small CNN on scikit-learn's handwritten digits,
run by `ps-train` (servers and workers on this machine, `make demo`) or by
one `ps-worker` process per worker against running servers.

It is an example, not the library: its dependencies (scikit-learn for the
data, rich for the progress display) come with the `demo` extra,
`pip install 'torch-ps[demo]'`, and nothing else imports this package.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["train_main", "worker_main"]

_EXTRAS = {"sklearn": "scikit-learn", "rich": "rich"}


def _require_extras() -> None:
    missing = [package for module, package in _EXTRAS.items() if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(
            f"the built-in digits job needs {', '.join(missing)}: pip install 'torch-ps[demo]' "
            "(your own training script needs neither)"
        )


def train_main() -> int:
    """`ps-train`: the digits job with its servers and workers on this machine."""
    _require_extras()
    from ps_worker.demo.launch import main

    return main()


def worker_main() -> int:
    """`ps-worker`: one worker of the digits job."""
    _require_extras()
    from ps_worker.demo.worker_cli import main

    return main()
