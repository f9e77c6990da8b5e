"""Fixtures of every level: tests/unit (no server), tests/integration
(InProcessCluster in this process, via tests/integration/conftest.py) and
tests/e2e (real processes)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """End any child process a test left running, and fail that test."""
    before = _children(os.getpid())
    yield
    leftover = _children(os.getpid()) - before
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert not leftover, f"test left child processes running: {sorted(leftover)}"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is marked e2e. Under pytest-xdist (`make
    test`), the end-to-end tests run one after another in one worker: each
    loads every core, and two at once would only stretch both past their
    deadlines."""
    for item in items:
        if "e2e" in item.path.relative_to(Path(__file__).parent).parts[:1]:
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.xdist_group("e2e"))
