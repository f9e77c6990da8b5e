"""Checkpoints of a shard on disk: safetensors for tensors, JSON for the rest.

Layout: `<dir>/ckpt-<seq>/tensors.safetensors` and `meta.json`. A checkpoint
is written into a temporary directory, its files fsynced, then renamed into
place (and the parent directory fsynced), so a crash while writing leaves the
previous checkpoint as the newest complete one. meta.json records the SHA-256
of the tensor file; on load a checkpoint that does not match is skipped.
Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
PREFIX = "ckpt-"


@dataclass
class ShardState:
    """What a checkpoint holds: named tensors and JSON-able metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sequence(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def _complete(directory: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    found = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and p.name.removeprefix(PREFIX).isdigit()]
    return sorted(found, key=_sequence, reverse=True)


def write_checkpoint(directory: Path, state: ShardState, keep: int = 2) -> Path:
    """Write atomically; keep the newest `keep` checkpoints. Returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = _complete(directory)
    sequence = _sequence(existing[0]) + 1 if existing else 1
    final = directory / f"{PREFIX}{sequence:08d}"
    tmp = directory / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.contiguous() for k, v in state.tensors.items()}
    save_file(tensors, str(tmp / TENSORS_FILE))
    meta = {**state.meta, "tensors_sha256": _sha256(tmp / TENSORS_FILE)}
    (tmp / META_FILE).write_text(json.dumps(meta))
    for name in (TENSORS_FILE, META_FILE):
        _fsync(tmp / name)
    _fsync(tmp)
    tmp.rename(final)
    _fsync(directory)
    for old in _complete(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> ShardState:
    """Load one checkpoint, verifying its checksum (ValueError if it fails)."""
    meta = json.loads((path / META_FILE).read_text())
    if _sha256(path / TENSORS_FILE) != meta.get("tensors_sha256"):
        raise ValueError(f"{path}: tensor file does not match its checksum")
    return ShardState(load_file(str(path / TENSORS_FILE)), meta)


def latest_checkpoint(directory: Path) -> tuple[Path, ShardState] | None:
    """The newest checkpoint that loads and verifies, skipping damaged ones."""
    if not directory.is_dir():
        return None
    for path in _complete(directory):
        try:
            return path, read_checkpoint(path)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("skipping damaged checkpoint %s: %s", path, exc)
    return None
