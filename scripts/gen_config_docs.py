"""Write docs/configuration.md from the config dataclasses, the one source of
every flag, environment variable and default.

Run with --check to fail (exit 1) when the committed page differs from what
the dataclasses generate, as `make check` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from ps_common.config import Setting, settings_of
from ps_server.config import ServerConfig
from ps_worker.client_config import ClientConfig
from ps_worker.ctl import CtlConfig
from ps_worker.demo.config import JobConfig, TrainConfig, WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"

SECTIONS: list[tuple[str, type, str]] = [
    ("ps-server", ServerConfig, "One parameter-server process (`ServerConfig`)."),
    (
        "Client settings",
        ClientConfig,
        "A worker's connection to the servers: `PSClient(..., config=ClientConfig(...))`, and the flags of "
        "`ps-worker` and `ps-ctl`.",
    ),
    ("ps-worker", WorkerConfig, "One worker process of the built-in digits job (`pip install 'torch-ps[demo]'`)."),
    ("The digits job", JobConfig, "What `ps-worker` and `ps-train` train."),
    ("ps-train", TrainConfig, "The digits job's servers and workers on this machine (`make demo`)."),
    ("ps-ctl", CtlConfig, "Looking at and operating a running cluster."),
]

HEADER = """# Configuration reference

Generated from the config dataclasses by `scripts/gen_config_docs.py`; `make
check` fails when this page is out of date. Do not edit it by hand.

Every setting is a field of its dataclass, an environment variable
(`PS_` and the field's name in capitals) and, for those an operator sets, a
command-line flag. Precedence: flag, then environment, then default.
Tuning settings (marked *tuning*) are not shown by `--help`: set them by
environment variable or config field (their flags are still accepted).
"""


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def _row(setting: Setting) -> str:
    flag = f"`{setting.flag}`" if not setting.tuning else "*tuning*"
    help_text = setting.help.replace("|", "\\|")
    return f"| `{setting.name}` | {flag} | `{setting.env}` | {_default(setting.default)} | {help_text} |"


def _nested(cls: type) -> list[type]:
    hints = typing.get_type_hints(cls)
    return [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]


def render() -> str:
    parts = [HEADER]
    for title, cls, text in SECTIONS:
        nested = _nested(cls)
        inherited = {s.name for other in nested for s in settings_of(other)}
        parts.append(f"\n## {title}\n\n{text}\n")
        if nested:
            names = ", ".join(f"`{other.__name__}`" for other in nested)
            parts.append(f"\nIt also takes every setting of {names}, listed in its own section.\n")
        parts.append("\n| field | flag | environment | default | meaning |\n|---|---|---|---|---|\n")
        parts.append("\n".join(_row(s) for s in settings_of(cls) if s.name not in inherited) + "\n")
    return "".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if docs/configuration.md is out of date")
    args = parser.parse_args()
    page = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != page:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run make docs", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
