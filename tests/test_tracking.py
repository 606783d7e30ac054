"""MLflow tracking of ``albert-scale train`` against a real ``mlflow server``: the run's params, tags,
metrics and artifacts, and training that goes on while the server is down (at start, or killed mid-run
and restarted), with the missed records sent afterwards."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, subprocess_env

pytestmark = pytest.mark.multiprocess


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _start_training(data: Path, run: Path, uri: str, *extra: str) -> subprocess.Popen:
    args = [str(BIN / "albert-scale"), "train", "--config", "tiny", "--data", str(data), "--output", str(run)]
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    return subprocess.Popen(
        [*args, "tracking.system_metrics_interval=1", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _logged_steps(run: Path, key: str = "train/loss") -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r.get(key) is not None]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_a_run_is_tracked_with_params_tags_metrics_and_artifacts(mlflow_server, tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc = _start_training(tiny_shards, run, mlflow_server.uri, "--quiet")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "not reachable" not in err
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    client = _client(mlflow_server.uri)
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    assert info.data.params["model.hidden_size"] == "32" and info.data.params["optim.name"] == "lamb"
    assert len(info.data.params) > 60
    tags = info.data.tags
    assert tags["albert_scale.world_size"] == "1" and tags["albert_scale.precision"] == "fp32"
    assert len(tags["albert_scale.data_manifest_sha256"]) == 64 and tags["albert_scale.device"] == "cpu"
    assert tags["albert_scale.code"]
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20]
    assert [m.step for m in client.get_metric_history(run_id, "eval/mlm_accuracy")] == [0, 10, 20]
    assert any(key.startswith("system/") for key in info.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "data")
    }
    assert {
        "config.yaml",
        "deepspeed_config.json",
        "metrics.png",
        "data/manifest.json",
        "data/spiece.model",
    } <= artifacts
    # A rerun of a finished job changes nothing and logs into the same run.
    again = subprocess.run(
        [
            str(BIN / "albert-scale"),
            "train",
            "--config",
            "tiny",
            "--data",
            str(tiny_shards),
            "--output",
            str(run),
        ],
        env=subprocess_env(MLFLOW_TRACKING_URI=mlflow_server.uri),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert json.loads((run / "mlflow_run.json").read_text())["run_id"] == run_id
    assert len(client.search_runs([info.info.experiment_id])) == 1


def test_a_server_that_is_down_at_start_gets_the_records_when_it_comes_up(
    stopped_mlflow_server, tiny_shards, tmp_path
):
    server = stopped_mlflow_server
    run = tmp_path / "run"
    proc = _start_training(
        tiny_shards, run, server.uri, "schedule.total_steps=300", "train.log_every=10", "train.eval_every=100"
    )
    try:
        _wait(lambda: len(_logged_steps(run)) >= 2, 120, "the first logs")
        assert not (run / "mlflow_run.json").exists()
        server.start()
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert err.count("is not reachable") == 1 and "answers again" in err, err
        run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
        steps = sorted(m.step for m in _client(server.uri).get_metric_history(run_id, "train/loss"))
        assert steps == list(range(10, 301, 10))
    finally:
        proc.kill()


@pytest.mark.reliability
@pytest.mark.slow
def test_a_server_killed_mid_run_and_restarted_misses_nothing(mlflow_server, tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc = _start_training(
        tiny_shards,
        run,
        mlflow_server.uri,
        "schedule.total_steps=400",
        "train.log_every=10",
        "train.eval_every=100",
        "train.checkpoint_every=50",
        "train.keep_checkpoints=20",
        "tracking.flush_seconds=0",  # each record is sent at once: the outage is met while training
    )
    try:
        _wait(
            lambda: (run / "mlflow_run.json").exists() and len(_logged_steps(run)) >= 3, 120, "tracked logs"
        )
        mlflow_server.kill()
        killed_at = max(_logged_steps(run))
        # Training goes on without the server: more steps and a new checkpoint.
        _wait(lambda: max(_logged_steps(run)) >= killed_at + 60, 120, "training during the outage")
        assert any((run / "checkpoints").glob("step-*"))
        mlflow_server.start()
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert err.count("is not reachable") == 1 and "answers again" in err, err
        run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
        client = _client(mlflow_server.uri)
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == list(range(10, 401, 10))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        proc.kill()
