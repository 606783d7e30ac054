"""Helpers shared by the tests that run the command line in child processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

from albert_scale.engine import SHARED_BUFFER_DIR

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# `preprocess` of the tiny test dataset (the Lee corpus): seq 64, shards of 300 rows, 5% validation.
TINY_PREPROCESS = (
    "--config",
    "tiny",
    "--quiet",
    "preprocess.shard_rows=300",
    "preprocess.validation_fraction=0.05",
)
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: no launcher variables (a test may itself run under one), one
    thread per process, offline, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    # PYTHONFAULTHANDLER: a process killed by a signal (an abort in native code) prints its Python stacks.
    fixed = {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "PYTHONFAULTHANDLER": "1",
    }
    return env | fixed | extra


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(ranks: int, script: str | Path, *args: str) -> list[str]:
    """``deepspeed --num_gpus RANKS --master_port FREE SCRIPT ARGS``: RANKS ranks (CPU ranks over gloo on a
    machine without a GPU) running a Python script or console script."""
    launcher = BIN / "deepspeed"
    if not launcher.exists():
        launcher = Path(shutil.which("deepspeed") or "deepspeed")
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), *args]


# What a rank prints when native code aborts it with no exception in flight. Seen once in many hundreds of
# 2-rank launches, at process-group start-up, and not reproduced in 30 launches under load; the Python
# stacks that PYTHONFAULTHANDLER prints then are kept in the warning.
NATIVE_ABORT = "terminate called without an active exception"


def run_ranks(command: list[str], **run: object) -> subprocess.CompletedProcess:
    """Runs a ``deepspeed_command``, or a command of one process (``subprocess.run`` keywords in RUN).

    After a launch, checks that DeepSpeed's shared-memory all-reduce buffers are not left behind. A
    launch one of whose ranks was aborted by native code with no exception (NATIVE_ABORT) is warned
    about and run once more on a new port; any other failure, or a second abort, is returned as it is."""
    proc = _launch(command, run)
    if proc.returncode != 0 and NATIVE_ABORT in proc.stdout + proc.stderr and "--master_port" in command:
        warnings.warn(
            f"a rank aborted in native code; launching once more:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
            stacklevel=2,
        )
        port = command.index("--master_port") + 1
        proc = _launch([*command[:port], str(free_port()), *command[port + 1 :]], run)
    return proc


def _launch(command: list[str], run: dict[str, object]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, **run)  # type: ignore[call-overload]
    if "--master_port" not in command:  # one process: no launcher, no shared buffers
        return proc
    port = command[command.index("--master_port") + 1]
    left = list(Path(SHARED_BUFFER_DIR).glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"DeepSpeed's shared-memory buffers were left behind: {left}"
    return proc


def cli(*args: str, timeout: float = 280, **env: str) -> subprocess.CompletedProcess:
    """Runs ``albert-scale ARGS`` in a child process and returns it (output captured as text)."""
    return subprocess.run(
        [str(BIN / "albert-scale"), *args],
        capture_output=True,
        text=True,
        env=subprocess_env(**env),
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    """The ``PROG: error: ...`` lines of a command's stderr."""
    return [line for line in stderr.splitlines() if "error:" in line]


def replace_checkpoint_tensor(step: Path, name: str, tensor) -> None:
    """Puts ``tensor`` under ``name`` in the weights of the checkpoint ``step`` and records the file's new
    sha256 in its state, as if the checkpoint had been written so (only a check of shapes can tell)."""
    import json

    from safetensors.torch import load_file, save_file

    from albert_scale import checkpoint
    from albert_scale.fileio import sha256_file

    weights = load_file(step / checkpoint.MODEL_FILE)
    weights[name] = tensor
    save_file(weights, str(step / checkpoint.MODEL_FILE))
    state = json.loads((step / checkpoint.STATE_FILE).read_text())
    state["files"][checkpoint.MODEL_FILE] = sha256_file(step / checkpoint.MODEL_FILE)
    (step / checkpoint.STATE_FILE).write_text(json.dumps(state))
