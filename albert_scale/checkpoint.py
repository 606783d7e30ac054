"""Checkpoints of a training run: whole tensors in safetensors, the loop's state in JSON, written atomically.

Layout::

    RUN_DIR/checkpoints/step-00000120/
        model.safetensors       fp32 master weights, one whole tensor per parameter (transformers' names)
        optimizer.safetensors   the optimizer moments, ``exp_avg/NAME`` and ``exp_avg_sq/NAME``
        spiece.model            the tokenizer of the training data (so that a checkpoint exports alone)
        state.json              step, data cursor, DeepSpeed's counters and schedule, fp16 loss scaler,
                                resolved config, dataset fingerprint, world size, sha256 of both files

The tensors are what one process would hold, whatever the ZeRO stage and the number of ranks that wrote
them (gathered by :func:`albert_scale.engine.gather_state`), so a run resumes at any world size and any
ZeRO stage with no conversion step, and nothing is unpickled on load. A checkpoint is written into a
hidden temporary directory, synced, then renamed: a directory named ``step-*`` is complete. On resume the
newest one whose files match their sha256 is used; a damaged one is reported and skipped for the one
before it. Rank 0 writes; every rank reads, so RUN_DIR must be on a file system all nodes share (as for
DeepSpeed's own checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from albert_scale.fileio import sha256_file

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-step-"


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete-looking checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def write(
    run_dir: Path,
    step: int,
    *,
    weights: Mapping[str, torch.Tensor],
    moments: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any],
    keep: int,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Writes the checkpoint of ``step`` atomically and keeps the newest ``keep``; returns its path.

    ``files`` are small files stored alongside (the tokenizer), checksummed like the tensors. Called on
    rank 0 only. A leftover temporary directory (a write that was killed) is removed.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / f"{_TMP_PREFIX}{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file({name: t.contiguous() for name, t in weights.items()}, str(tmp / MODEL_FILE))
        flat = {
            f"{key}/{name}": t.contiguous() for key, tensors in moments.items() for name, t in tensors.items()
        }
        save_file(flat, str(tmp / OPTIMIZER_FILE))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        record = {
            "format": FORMAT_VERSION,
            "step": step,
            **state,
            "files": {name: sha256_file(tmp / name) for name in (MODEL_FILE, OPTIMIZER_FILE, *(files or {}))},
        }
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _fsync_tree(tmp)
        final = root / checkpoint_name(step)
        if final.exists():  # the same step written again (a rerun after a crash that followed the write)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint; ValueError naming the file when it is unreadable."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_bytes())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"checkpoint {str(path)!r}: {STATE_FILE} unreadable ({err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r}: {STATE_FILE} is not a JSON object")
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r}: format {state.get('format')!r}, expected {FORMAT_VERSION}"
        )
    if not isinstance(state.get("step"), int) or not isinstance(state.get("files"), dict):
        raise ValueError(f"checkpoint {str(path)!r}: {STATE_FILE} lacks its step or its files' sha256")
    return state


def load(path: Path, *, verify: bool = True) -> Checkpoint:
    """Reads one checkpoint; ValueError naming what is wrong. ``verify`` first checks the sha256 of every
    file (a reader that another process has already verified the checkpoint for may skip it)."""
    path = Path(path)
    state = read_state(path)
    for name, digest in state["files"].items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {str(path)!r}: {name} is missing")
        if verify and sha256_file(file) != digest:
            raise ValueError(f"checkpoint {str(path)!r}: {name} does not match its sha256 (damaged file)")
    try:
        weights = load_file(str(path / MODEL_FILE))
        flat = load_file(str(path / OPTIMIZER_FILE))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {str(path)!r}: unreadable tensors ({err})") from None
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        kind, _, name = key.partition("/")
        moments.setdefault(kind, {})[name] = tensor
    return Checkpoint(path=path, step=int(state["step"]), weights=weights, moments=moments, state=state)


def load_latest(run_dir: Path, *, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest good checkpoint of a run (None if there is none). A damaged one is skipped for the one
    before it, after ``warn`` is given what is wrong with it (one line naming it)."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return load(path)
        except ValueError as err:
            warn(str(err))
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for file in directory.iterdir():
        _fsync(file)
    _fsync(directory)
