"""Training on Ray Train (``cluster.backend=ray``) on a real two-node Ray cluster simulated on this machine
(``ray.cluster_utils.Cluster``: two raylets of one CPU each, so the two workers land on different nodes):
an uninterrupted run, and a run whose worker is killed with SIGKILL mid-run, which Ray Train restarts from
the newest checkpoint and which must end with exactly the same weights."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from helpers import BIN, cli, error_lines, subprocess_env
from safetensors.torch import load_file

from albert_scale import checkpoint

pytestmark = pytest.mark.multiprocess

STEPS = 400
CHECKPOINT_EVERY = 50
TRAIN_ARGS = (
    "--config",
    "tiny",
    f"schedule.total_steps={STEPS}",
    f"train.checkpoint_every={CHECKPOINT_EVERY}",
    "train.log_every=50",
    "train.eval_every=200",
    "zero.stage=2",
    "cluster.backend=ray",
    "cluster.num_workers=2",
    "cluster.max_failures=2",
)


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    """``train --data DATA --output RUN`` with the Ray Train settings above and ``extra`` overrides."""
    return ["train", "--data", str(data), "--output", str(run), *TRAIN_ARGS, *extra]


@pytest.fixture(scope="module")
def two_nodes():
    """A Ray cluster of two nodes with one CPU each, started and stopped here."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def straight_run(two_nodes, tiny_shards, tmp_path_factory):
    """An uninterrupted run on the two nodes."""
    run = tmp_path_factory.mktemp("ray_train") / "straight"
    result = cli(*train_args(tiny_shards, run, f"cluster.address={two_nodes}"))
    return run, result


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(
        str(run / checkpoint.CHECKPOINTS / checkpoint.checkpoint_name(STEPS) / checkpoint.MODEL_FILE)
    )


def test_two_workers_on_two_nodes_train_log_and_checkpoint(straight_run):
    run, result = straight_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Ray Train: 2 worker(s) on 2 node(s)" in result.stdout
    assert f"done: {STEPS} steps" in result.stdout
    # Checkpoints are the same as under any launcher: rank 0 writes them, world-size independent.
    steps = [step for step, _ in checkpoint.list_checkpoints(run)]
    assert steps[-1] == STEPS
    state = checkpoint.read_state(run / checkpoint.CHECKPOINTS / checkpoint.checkpoint_name(STEPS))
    assert state["world_size"] == 2
    # Rank 0 alone logs: one metrics.jsonl and one MLflow run with the world size and the metrics.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(50, STEPS + 1, 50))
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    logged = mlflow.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["albert_scale.world_size"] == "2"
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(50, STEPS + 1, 50))
    # Ray Train knows the checkpoints where they lie: RUN_DIR is its experiment directory.
    snapshot = (run / "checkpoint_manager_snapshot.json").read_text()
    assert checkpoint.checkpoint_name(STEPS) in snapshot


@pytest.mark.reliability
@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_with_the_same_final_weights(
    two_nodes, straight_run, tiny_shards, tmp_path
):
    run = tmp_path / "killed"
    log = tmp_path / "driver.log"
    command = [str(BIN / "albert-scale"), *train_args(tiny_shards, run)]
    with log.open("w") as out:
        driver = subprocess.Popen(
            [*command, f"cluster.address={two_nodes}", "tracking.enabled=false"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )
        try:
            first = run / checkpoint.CHECKPOINTS / checkpoint.checkpoint_name(CHECKPOINT_EVERY)
            deadline = time.monotonic() + 240
            while not first.exists() and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert first.exists(), log.read_text()[-3000:]
            victim = _train_workers()[-1]
            victim.send_signal(signal.SIGKILL)
            code = driver.wait(timeout=280)
        finally:
            if driver.poll() is None:
                driver.kill()
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert "resumed from" in output, output[-4000:]
    assert checkpoint.list_checkpoints(run)[-1][0] == STEPS
    straight, killed = final_weights(straight_run[0]), final_weights(run)
    assert straight.keys() == killed.keys()
    for name in straight:
        assert torch.equal(straight[name], killed[name]), name


def _train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes among this test's descendants (the simulated nodes' raylets)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    assert found, "no Ray Train worker process found"
    return found


def test_driver_finds_config_and_data_mistakes_before_starting_ray(tiny_shards, tmp_path):
    result = cli(*train_args(tiny_shards, tmp_path / "run", "cluster.num_workers=3"))
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "train.global_batch_size=8: not divisible" in line and "data-parallel size 3" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # found in the driver: nothing was started or written

    missing = cli(*train_args(tmp_path / "nope", tmp_path / "run"))
    assert missing.returncode == 2
    (line,) = error_lines(missing.stderr)
    assert str(tmp_path / "nope") in line


def test_a_local_ray_too_small_for_the_workers_is_one_line(tiny_shards, tmp_path):
    result = cli(*train_args(tiny_shards, tmp_path / "run", "cluster.cpus_per_worker=64"), RAY_ADDRESS="")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "the local Ray is too small" in line and "128 CPU needed" in line
