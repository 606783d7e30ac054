"""The console script: every listed command has working --help; user errors are one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from albert_scale.cli import COMMANDS

pytestmark = pytest.mark.unit


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)


def test_root_help_lists_exactly_the_built_commands(cli_path):
    result = run(str(cli_path), "--help")
    assert result.returncode == 0, result.stderr
    for name, (_, summary) in COMMANDS.items():
        assert f"  {name}" in result.stdout and summary in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(cli_path, command):
    result = run(str(cli_path), command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: albert-scale {command}")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_runs_as_a_module(command):
    module, _ = COMMANDS[command]
    result = run(sys.executable, "-m", module, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_unknown_command(cli_path):
    result = run(str(cli_path), "trian")
    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "tiny", "optim.lrr=1"], "unknown key optim.lrr (did you mean optim.lr?)"),
        (["--config", "tiny", "train.global_batch_size=6"], "train.global_batch_size=6: not divisible"),
        (
            ["--config", "no-such-config.yaml"],
            "config 'no-such-config.yaml': no such file and no such preset",
        ),
        (["--config", "tiny", "--world-size", "0"], "--world-size=0: must be >= 1"),
    ],
)
def test_user_errors_are_one_line(cli_path, args, message):
    result = run(str(cli_path), "plan", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


def test_plan_prints_the_config_and_batch_arithmetic(cli_path):
    result = run(str(cli_path), "plan", "--config", "albert-xxlarge", "cluster.num_workers=64")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "hidden_size: 4096" in out and "num_workers: 64" in out
    assert "gradient accumulation     4 = 4096 / (16 x 64)" in out
    assert "train FLOPs per sequence  7.58 TFLOP" in out


def test_plan_json_and_rescaling_note(cli_path):
    result = run(
        str(cli_path),
        "plan",
        "--config",
        "albert-base",
        "train.global_batch_size=1024",
        "--world-size",
        "8",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    plan = data["plan"]
    assert plan["gradient_accumulation_steps"] == 2 and plan["data_parallel_size"] == 8
    assert data["config"]["train"]["global_batch_size"] == 1024
    assert any("optim.lr=0.00088 schedule.warmup_steps=12500" in note for note in plan["notes"])
