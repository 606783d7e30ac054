"""``albert-scale quickstart`` end to end on a small budget (the tiny preset on the Lee corpus): every stage
for real (Ray preprocessing, DeepSpeed training, export, the MLflow registry in DIR/mlflow.db, fine-tuning
Rotten Tomatoes from ``models:/NAME@ALIAS``), interrupted with Ctrl-C during training and run again."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import mlflow
import pytest
from helpers import BIN, cli, error_lines, subprocess_env

pytestmark = pytest.mark.multiprocess

ARGS = ("quickstart", "--config", "tiny", "--corpus", "lee", "--minutes", "1", "--name", "albert-smoke")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_quickstart_runs_every_stage_and_continues_after_an_interruption(tmp_path):
    root = tmp_path / "qs"
    command = [str(BIN / "albert-scale"), *ARGS, "--output", str(root)]
    first = subprocess.Popen(
        command,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Ctrl-C reaches Python as KeyboardInterrupt only when SIGINT is not ignored at its start, and a
        # test run started in the background (nohup, `&` in a script) passes SIGINT on ignored.
        preexec_fn=_default_sigint,
    )
    checkpoints = root / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
            first.send_signal(signal.SIGINT)  # Ctrl-C during pretraining
            break
        time.sleep(0.05)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 130, output.decode()[-3000:]
    state = json.loads((root / "quickstart.json").read_text())
    steps = state["total_steps"]
    assert steps >= 50 and not (root / "export").exists()
    assert state["seconds_per_step"] > 0 and state["finetune_seconds"] > 0  # both stages were timed

    second = cli(*ARGS, "--output", str(root), timeout=280)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout
    assert "already complete" in second.stderr  # the dataset was kept
    assert f"{steps} steps (chosen by the first run" in out and "resumed from" in out
    assert "MLM accuracy" in out and "SOP accuracy" in out and "majority" in out and "random init" in out
    assert "models:/albert-smoke@candidate (version 1)" in out and "mlflow ui --backend-store-uri" in out

    results = json.loads((root / "finetune" / "results.json").read_text())
    assert results["model"] == "models:/albert-smoke@candidate" and results["model_version"] == "1"
    assert {"pretrained", "random_init", "majority", "margin"} <= results.keys()
    assert "95% interval" in out
    assert results["config"]["epochs"] == 1 and results["config"]["reinit_pooler"] is True
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version_by_alias("albert-smoke", "candidate")
    assert (
        str(version.version) == "1"
        and version.run_id == json.loads((root / "run" / "mlflow_run.json").read_text())["run_id"]
    )

    # A third run finds everything done: nothing is trained, exported, registered or fine-tuned again.
    third = cli(*ARGS, "--output", str(root), timeout=280)
    assert third.returncode == 0, third.stderr[-3000:]
    for line in ("nothing to do", "already exported", "already registered", "already fine-tuned"):
        assert line in third.stdout
    assert len(client.search_model_versions("name='albert-smoke'")) == 1


def test_quickstart_user_errors_are_one_line(tmp_path):
    for args, message in (
        (("--minutes", "0"), "--minutes=0.0: must be a positive number"),
        (("--corpus", "nope"), "unknown corpus 'nope'"),
        (("--config", "no-such-preset"), "no-such-preset"),
    ):
        result = cli("quickstart", "--output", str(tmp_path / "x"), *args)
        assert result.returncode == 2, result.stderr
        (line,) = error_lines(result.stderr)
        assert message in line
    # Another config in an existing quickstart directory is refused, naming the directory.
    root = tmp_path / "qs"
    root.mkdir()
    (root / "quickstart.json").write_text(json.dumps({"job": {"config": {}, "corpora": ["lee"]}}))
    result = cli("quickstart", "--config", "tiny", "--corpus", "lee", "--output", str(root))
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert str(root) in line and "another config or corpora" in line
