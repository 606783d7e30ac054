"""``albert-scale train`` end to end on real shards: the run directory, exact resume (also at another world
size and ZeRO stage), non-finite losses, damaged checkpoints and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    BIN,
    deepspeed_command,
    error_lines,
    free_port,
    replace_checkpoint_tensor,
    run_ranks,
    subprocess_env,
)
from safetensors.torch import load_file

from albert_scale import checkpoint
from albert_scale.fileio import sha256_file
from albert_scale.schedule import lr_at

TESTS = Path(__file__).resolve().parent
# Gradients summed over two ranks differ from one process's in the last bits (see test_optim).
RTOL, ATOL = 1e-5, 1e-7


def train(
    *args: str,
    ranks: int = 1,
    launcher: str = "deepspeed",
    worker: list[str] | None = None,
    check: bool = True,
):
    """Runs ``albert-scale train ARGS``: in a world of one, or on ``ranks`` CPU ranks under ``deepspeed``
    (the console script) or ``torchrun`` (``-m albert_scale.train``)."""
    entry = [str(BIN / "albert-scale"), "train"]
    if worker is not None:  # the same command with a fault injected (tests/train_worker.py)
        entry = [sys.executable, str(TESTS / "train_worker.py"), *worker, "--"]
    if ranks > 1 and launcher == "torchrun":
        assert worker is None
        entry = [
            str(BIN / "torchrun"),
            f"--nproc-per-node={ranks}",
            f"--master-port={free_port()}",
            "-m",
            "albert_scale.train",
        ]
    elif ranks > 1:
        script, rest = (entry[1], entry[2:]) if worker is not None else (entry[0], entry[1:])
        entry = deepspeed_command(ranks, script, *rest)
    proc = run_ranks([*entry, *args], env=subprocess_env(), timeout=280)
    if check and proc.returncode != 0:
        pytest.fail(f"train failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def tensors(run: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    path = run / checkpoint.CHECKPOINTS / checkpoint.checkpoint_name(step)
    return load_file(path / checkpoint.MODEL_FILE), load_file(path / checkpoint.OPTIMIZER_FILE)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- checkpoint files, without training -------------------------------------------------------------------


def _write(run: Path, step: int, value: float, keep: int = 2) -> Path:
    weights = {"w": torch.full((3, 2), value)}
    moments = {"exp_avg": {"w": torch.full((3, 2), value / 10)}, "exp_avg_sq": {"w": torch.ones(3, 2)}}
    return checkpoint.write(run, step, weights=weights, moments=moments, state={"note": value}, keep=keep)


@pytest.mark.unit
def test_checkpoints_are_complete_pruned_and_leftovers_removed(tmp_path):
    leftover = tmp_path / checkpoint.CHECKPOINTS / ".tmp-step-00000001-999"
    leftover.mkdir(parents=True)
    (leftover / checkpoint.MODEL_FILE).write_bytes(b"half")
    for step in (10, 20, 30):
        _write(tmp_path, step, float(step))
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [20, 30]
    assert not leftover.exists()
    loaded = checkpoint.load_latest(tmp_path, warn=pytest.fail)
    assert loaded.step == 30 and loaded.state["note"] == 30.0
    torch.testing.assert_close(loaded.weights["w"], torch.full((3, 2), 30.0))
    torch.testing.assert_close(loaded.moments["exp_avg"]["w"], torch.full((3, 2), 3.0))


@pytest.mark.unit
@pytest.mark.reliability
@pytest.mark.parametrize("damage", ["flip", "truncate", "state"])
def test_a_damaged_checkpoint_is_reported_and_skipped(tmp_path, damage):
    _write(tmp_path, 10, 1.0)
    newest = _write(tmp_path, 20, 2.0)
    target = newest / (checkpoint.STATE_FILE if damage == "state" else checkpoint.MODEL_FILE)
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01
    else:
        data = data[: len(data) // 2]
    target.write_bytes(bytes(data))
    warnings: list[str] = []
    loaded = checkpoint.load_latest(tmp_path, warn=warnings.append)
    assert loaded.step == 10
    assert len(warnings) == 1 and str(newest) in warnings[0]


@pytest.mark.unit
def test_dry_run_prints_the_plan_for_a_cluster_size():
    proc = subprocess.run(
        [str(BIN / "albert-scale"), "train", "--config", "tiny", "--dry-run", "--world-size", "2"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "data-parallel size        2" in out and "gradient accumulation     1 = 8 / (4 x 2)" in out
    ds = json.loads(out[out.index("# deepspeed config") + len("# deepspeed config") :])
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "tiny"], "--data is required"),
        (["--config", "tiny", "--data", "/nonexistent/data", "--output", "/tmp/x"], "/nonexistent/data"),
        (["--config", "tiny", "--data", "d", "--output", "o", "--world-size", "2"], "--world-size"),
        (["--config", "tiny", "--data", "d", "--output", "o", "--stop-at-step", "0"], "--stop-at-step=0"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    proc = subprocess.run(
        [str(BIN / "albert-scale"), "train", *args], capture_output=True, text=True, env=subprocess_env()
    )
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- training runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tiny_shards, tmp_path_factory) -> Path:
    """20 steps of the tiny config in one process, without stopping."""
    run = tmp_path_factory.mktemp("straight")
    train("--config", "tiny", "--data", str(tiny_shards), "--output", str(run), "--quiet")
    return run


@pytest.mark.multiprocess
def test_run_directory(straight):
    assert (straight / "config.yaml").is_file()
    assert json.loads((straight / "deepspeed_config.json").read_text())["train_batch_size"] == 8
    assert [s for s, _ in checkpoint.list_checkpoints(straight)] == [10, 20]  # keep_checkpoints: 2
    logged = records(straight)
    evals = [r for r in logged if "eval/mlm_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["eval/mlm_loss"] < evals[0]["eval/mlm_loss"] - 0.2  # it learns
    steps = [r for r in logged if "train/loss" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    for key in (
        "train/mlm_loss",
        "train/mlm_accuracy",
        "train/sop_loss",
        "train/sop_accuracy",
        "train/lr",
        "train/grad_norm",
        "train/loss_scale",
        "perf/tokens_per_s",
        "perf/sequences_per_s",
        "perf/tflops_per_device",
        "perf/memory_gb",
    ):
        assert all(r[key] is not None for r in steps), key
    assert steps[0]["train/lr"] == pytest.approx(0.01 * (1 - 3 / 18))  # update 5: linear decay after 2 warmup
    state = json.loads(
        (straight / checkpoint.CHECKPOINTS / "step-00000020" / checkpoint.STATE_FILE).read_text()
    )
    assert state["data"]["cursor"] == {"epoch": 0, "consumed": 160}
    assert state["engine"]["lr_scheduler"] == {"step": 20} and state["world_size"] == 1
    assert len(state["manifest_sha256"]) == 64 and state["config"]["model"]["hidden_size"] == 32


@pytest.mark.multiprocess
def test_ten_then_ten_more_equal_twenty_straight_to_the_byte(straight, tiny_shards, tmp_path):
    common = ("--config", "tiny", "--data", str(tiny_shards), "--output", str(tmp_path), "--quiet")
    train(*common, "--stop-at-step", "10")
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [10]
    proc = train(*common[:-1])  # the same command again, not quiet
    assert "resumed from" in proc.stdout and "step 10" in proc.stdout
    for name in (checkpoint.MODEL_FILE, checkpoint.OPTIMIZER_FILE):
        done = tmp_path / checkpoint.CHECKPOINTS / "step-00000020" / name
        assert sha256_file(done) == sha256_file(straight / checkpoint.CHECKPOINTS / "step-00000020" / name)
    # metrics.jsonl continues: every step logged once
    assert [r["step"] for r in records(tmp_path) if "train/loss" in r] == [5, 10, 15, 20]


@pytest.mark.multiprocess
def test_the_python_api_trains_twice_in_one_process(straight, tiny_shards, tmp_path):
    """train() ends the process group it started (and DeepSpeed's cached groups), so a second call in
    the same process starts afresh; it resumes the first run to the same bytes as the command line."""
    script = f"""
from pathlib import Path
from albert_scale.config import load_config
from albert_scale.train import train
config = load_config("tiny")
for stop in (10, None):
    train(config, data=Path({str(tiny_shards)!r}), output=Path({str(tmp_path)!r}), stop_at_step=stop, quiet=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = tmp_path / checkpoint.CHECKPOINTS / "step-00000020" / checkpoint.MODEL_FILE
    assert sha256_file(done) == sha256_file(
        straight / checkpoint.CHECKPOINTS / "step-00000020" / checkpoint.MODEL_FILE
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize(("stage", "launcher"), [(2, "deepspeed"), (3, "torchrun")])
def test_resume_at_another_world_size(straight, tiny_shards, tmp_path, stage, launcher):
    """2 ranks under ZeRO for 10 steps, then 1 process for 10 more: the weights and moments of 20 steps
    in one process without ZeRO."""
    common = ("--config", "tiny", "--data", str(tiny_shards), "--output", str(tmp_path), "--quiet")
    train(*common, "--stop-at-step", "10", f"zero.stage={stage}", ranks=2, launcher=launcher)
    state = checkpoint.read_state(tmp_path / checkpoint.CHECKPOINTS / "step-00000010")
    assert state["world_size"] == 2
    train(*common, f"zero.stage={stage}")
    got, want = tensors(tmp_path, 20), tensors(straight, 20)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.multiprocess
def test_a_nonfinite_loss_stops_the_run_naming_the_step(tiny_shards, tmp_path):
    proc = train(
        "--config",
        "tiny",
        "--data",
        str(tiny_shards),
        "--output",
        str(tmp_path),
        "--quiet",
        "train.checkpoint_every=2",
        worker=["--nan-steps", "3", "--micro-batches", "2"],
        check=False,
    )
    assert proc.returncode == 2
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "step 3: the loss is not finite" in errors[0], proc.stderr
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2]  # nothing after the good step


@pytest.mark.multiprocess
def test_skipped_steps_leave_weights_moments_and_schedule_alone(tiny_shards, tmp_path):
    """Steps 3 and 4 get a NaN loss and are skipped: the schedule does not advance, and the checkpoint
    after step 4 holds exactly the weights and moments after step 2."""
    proc = train(
        "--config",
        "tiny",
        "--data",
        str(tiny_shards),
        "--output",
        str(tmp_path),
        "train.nonfinite=skip",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=5",
        "train.log_every=1",
        "--stop-at-step",
        "6",
        worker=["--nan-steps", "3,4", "--micro-batches", "2"],
    )
    assert "step 3: the loss is not finite" in proc.stdout and "skipping its update" in proc.stdout
    for before, after in zip(tensors(tmp_path, 2), tensors(tmp_path, 4), strict=True):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    logged = {r["step"]: r for r in records(tmp_path) if "train/lr" in r}
    assert logged[4]["train/skipped_steps"] == 2 and logged[4]["train/loss"] is None
    tiny_schedule = _tiny_schedule()
    assert logged[5]["train/lr"] == pytest.approx(lr_at(2, lr=0.01, schedule=tiny_schedule))  # update 3
    state = checkpoint.read_state(tmp_path / checkpoint.CHECKPOINTS / "step-00000006")
    assert state["engine"]["lr_scheduler"] == {"step": 4} and state["engine"]["skipped_steps"] == 2


def _tiny_schedule():
    from albert_scale.config import load_config

    return load_config("tiny").schedule


@pytest.mark.multiprocess
def test_bad_input_is_one_line(straight, tiny_shards, tmp_path):
    def fails(*args: str) -> str:
        proc = train("--data", str(tiny_shards), "--quiet", *args, check=False)
        assert proc.returncode == 2, proc.stderr
        errors = error_lines(proc.stderr)
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        return errors[0]

    out = str(tmp_path / "run")
    assert "model.vocab_size=2000" in fails("--config", "tiny", "--output", out, "model.vocab_size=2000")
    assert "data.max_seq_length=128" in fails(
        "--config", "tiny", "--output", out, "data.max_seq_length=128", "model.max_position_embeddings=128"
    )
    # resuming a run with another model
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    assert "model.hidden_size=64" in fails("--config", "tiny", "--output", str(copy), "model.hidden_size=64")
    # a checkpoint whose tensors do not fit (same config, tensors from elsewhere)
    replace_checkpoint_tensor(
        copy / checkpoint.CHECKPOINTS / "step-00000020", "albert.pooler.bias", torch.zeros(7)
    )
    assert "albert.pooler.bias" in fails("--config", "tiny", "--output", str(copy), "schedule.total_steps=30")


@pytest.mark.multiprocess
def test_sigterm_finishes_the_step_checkpoints_and_the_rerun_continues(tiny_shards, tmp_path):
    import signal
    import time

    args = [
        str(BIN / "albert-scale"),
        "train",
        "--config",
        "tiny",
        "--data",
        str(tiny_shards),
        "--output",
        str(tmp_path),
        "schedule.total_steps=100000",
        "train.log_every=1",
        "train.eval_every=100000",
    ]
    proc = subprocess.Popen(
        args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and "train/loss" in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM" in out and "stopped at step" in out
    (step, path), *_ = checkpoint.list_checkpoints(tmp_path)
    assert 1 <= step < 100000 and [r["step"] for r in records(tmp_path) if "train/loss" in r][-1] == step
    again = train(*args[2:], "--stop-at-step", str(step + 2))
    assert f"resumed from {path}" in again.stdout
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)][-1] == step + 2
