"""The Slurm batch script, run as Slurm would run it on a two-node allocation.

Slurm itself is not on this machine, so its two commands that the script uses are stood in for by
minimal shell scripts: ``scontrol show hostnames`` (the node list, one per line) and ``srun`` (one task per
node, with SLURM_NODEID). The two "nodes" are this machine under two names (localhost and 127.0.0.1);
everything else is real: the script, the hostfile it builds, the deepspeed launcher on each node in its
no-ssh mode, and 2 training ranks meeting over gloo.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import BIN, REPO, free_port, subprocess_env

from albert_scale import checkpoint

pytestmark = pytest.mark.multiprocess

SCRIPT = REPO / "cluster" / "slurm" / "train.sbatch"

SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || { echo "scontrol: unsupported: $*" >&2; exit 1; }
tr ',' '\\n' <<< "$3"
"""

# One task per node of SLURM_JOB_NODELIST, each with its SLURM_NODEID; fails if any task fails.
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.fixture
def slurm_bin(tmp_path) -> Path:
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_batch_script_trains_across_two_nodes_with_the_deepspeed_launcher(slurm_bin, tiny_shards, tmp_path):
    run = tmp_path / "run"
    env = subprocess_env(
        PATH=f"{slurm_bin}:{BIN}:/usr/bin:/bin",
        SLURM_JOB_NODELIST="localhost,127.0.0.1",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="1",
        ALBERT_SCALE_VENV=str(BIN.parent),
        MASTER_PORT=str(free_port()),
        TMPDIR=str(tmp_path),
    )
    args = ["--config", "tiny", "--data", str(tiny_shards), "--output", str(run)]
    result = subprocess.run(
        ["bash", str(SCRIPT), *args, "schedule.total_steps=4", "tracking.enabled=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "data-parallel size" in result.stdout  # the plan printed first
    assert "training 4 steps on 2 rank(s)" in result.stdout
    (step, path), *_ = reversed(checkpoint.list_checkpoints(run))
    assert step == 4 and checkpoint.read_state(path)["world_size"] == 2
    assert not list(tmp_path.glob("albert-scale-hosts.*"))  # each node removed its hostfile


def test_batch_script_stops_with_one_line_when_the_config_does_not_fit_the_allocation(slurm_bin, tmp_path):
    env = subprocess_env(
        PATH=f"{slurm_bin}:{BIN}:/usr/bin:/bin",
        SLURM_JOB_NODELIST="a,b,c",
        SLURM_JOB_NUM_NODES="3",
        SLURM_GPUS_ON_NODE="gpu:1",
        ALBERT_SCALE_VENV=str(BIN.parent),
    )
    result = subprocess.run(
        ["bash", str(SCRIPT), "--config", "tiny", "--data", "d", "--output", "r"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert (
        "train.global_batch_size=8: not divisible" in result.stderr
        and "data-parallel size 3" in result.stderr
    )
    assert "Traceback" not in result.stderr
