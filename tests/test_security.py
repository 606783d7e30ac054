"""Security: secrets never reach MLflow or the terminal, nothing is unpickled from a file someone else may
have written, and a config cannot carry a password into the files a run writes and logs.

The registry's sha256 record (``register`` writes it, ``finetune`` checks it after download) is tested
against a real server in tests/test_registry.py; the export's own sums in tests/test_export.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import BIN, REPO, cli, error_lines, subprocess_env

from albert_scale import checkpoint
from albert_scale.config import ConfigError, load_config
from albert_scale.redact import (
    REDACTED,
    environment_secrets,
    is_secret_name,
    redact_params,
    redact_text,
    redact_uri,
)

pytestmark = pytest.mark.reliability


# --- what counts as a secret ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "name",
    [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "HF_TOKEN",
        "RAY_AUTH_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "storage.api_key",
        "hub.token",
        "db.password",
        "apiKey",
        "AZURE_STORAGE_SAS_SIG",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "private_key",
    ],
)
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name",
    [
        "model.pad_token_id",
        "preprocess.tokenizer_threads",
        "preprocess.tokenizer_sample_bytes",
        "data.max_predictions_per_seq",
        "zero.reduce_bucket_size",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "HOME",
        "keyboard",
    ],
)
def test_ordinary_names(name):
    assert not is_secret_name(name)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:s3cr3t@mlflow:5000/api", f"http://alice:{REDACTED}@mlflow:5000/api"),
        ("at https://u:p%40ss@host/x: refused", f"at https://u:{REDACTED}@host/x: refused"),
        ("s3://bucket/key?sig=abc123&x=1", f"s3://bucket/key?sig={REDACTED}&x=1"),
        ("ray://h:10001/?token=abcdef", f"ray://h:10001/?token={REDACTED}"),
        ("http://127.0.0.1:5000/path?page=2", "http://127.0.0.1:5000/path?page=2"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("http://alice@host:8265", "http://alice@host:8265"),
    ],
)
def test_uri_passwords_and_secret_query_values_are_redacted(text, expected):
    assert redact_uri(text) == expected


@pytest.mark.unit
def test_environment_secret_values_are_redacted_wherever_they_appear():
    environ = {
        "HF_TOKEN": "hf_abcdefgh",
        "MY_PASSWORD": "correct-horse",
        "SHORT_TOKEN": "abc",
        "HOME": "/root",
    }
    assert environment_secrets(environ) == ["correct-horse", "hf_abcdefgh"]
    text = "failed with hf_abcdefgh and correct-horse in /root (abc)"
    assert redact_text(text, environ) == f"failed with {REDACTED} and {REDACTED} in /root (abc)"


@pytest.mark.unit
def test_params_with_secret_names_or_uri_passwords_are_redacted():
    params = redact_params(
        {
            "optim.lr": 0.1,
            "storage.api_key": "abc",
            "hub.token": "t",
            "db.password": "p",
            "model.pad_token_id": 0,
            "preprocess.tokenizer_threads": 4,
            "where": "http://bob:pw@host",
        }
    )
    assert params == {
        "optim.lr": "0.1",
        "storage.api_key": REDACTED,
        "hub.token": REDACTED,
        "db.password": REDACTED,
        "model.pad_token_id": "0",
        "preprocess.tokenizer_threads": "4",
        "where": f"http://bob:{REDACTED}@host",
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    ("override", "shown"),
    [
        (
            "tracking.uri=https://bob:hunter22@mlflow.example:443",
            f"https://bob:{REDACTED}@mlflow.example:443",
        ),
        ("cluster.address=ray://head:10001/?token=abcdef", f"ray://head:10001/?token={REDACTED}"),
    ],
)
def test_a_config_refuses_a_password_in_a_uri_without_printing_it(override, shown):
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", [override])
    message = str(raised.value)
    assert shown in message and "which would be logged" in message
    assert "hunter22" not in message and "abcdef" not in message


@pytest.mark.multiprocess
def test_error_lines_of_the_commands_redact_secrets():
    """Every command's error line goes through the redaction (here: a URI with a password in a path)."""
    unreachable = cli("jobs", "list", "--address", "http://bob:hunter22@127.0.0.1:1")
    assert unreachable.returncode == 2 and len(error_lines(unreachable.stderr)) == 1, unreachable.stderr
    assert "hunter22" not in unreachable.stderr and f"http://bob:{REDACTED}@127.0.0.1:1" in unreachable.stderr
    token = "tok-1234567"
    proc = cli("export", "--checkpoint", f"/nonexistent/{token}/run", "--output", "/x", MY_API_TOKEN=token)
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert token not in proc.stderr and f"/nonexistent/{REDACTED}/run" in proc.stderr


# --- nothing is unpickled ---------------------------------------------------------------------------------


class _Payload:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def _pickle(path: Path, marker: Path) -> None:
    torch.save({"w": _Payload(marker)}, path)


def _write_checkpoint(run: Path, step: int) -> Path:
    """A small complete checkpoint (one tensor and its moments) at ``step`` of ``run``."""
    weights = {"w": torch.ones(3, 2)}
    moments = {"exp_avg": {"w": torch.zeros(3, 2)}, "exp_avg_sq": {"w": torch.ones(3, 2)}}
    return checkpoint.write(run, step, weights=weights, moments=moments, state={}, keep=3)


@pytest.mark.unit
def test_no_code_path_unpickles():
    """The package, pipeline and cluster code never calls a loader that unpickles."""
    patterns = re.compile(
        r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True|joblib\.load\("
    )
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("albert_scale", "data_pipeline", "cluster", "bench")
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if patterns.search(line)
    ]
    assert offenders == []


@pytest.mark.unit
def test_a_checkpoint_holding_a_pickle_is_skipped_not_loaded(tmp_path):
    _write_checkpoint(tmp_path, 10)
    newest = _write_checkpoint(tmp_path, 20)
    marker = tmp_path / "unpickled.txt"
    _pickle(newest / checkpoint.MODEL_FILE, marker)
    warnings: list[str] = []
    loaded = checkpoint.load_latest(tmp_path, warn=warnings.append)
    assert loaded.step == 10 and len(warnings) == 1 and str(newest) in warnings[0]
    assert not marker.exists()


@pytest.mark.multiprocess
def test_export_refuses_a_checkpoint_holding_a_pickle(tmp_path):
    only = _write_checkpoint(tmp_path / "run", 10)
    marker = tmp_path / "unpickled.txt"
    _pickle(only / checkpoint.MODEL_FILE, marker)
    proc = cli("export", "--checkpoint", str(only), "--output", str(tmp_path / "export"))
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "export").exists()


@pytest.mark.multiprocess
def test_finetune_refuses_pickled_weights_in_a_model_directory(tiny_shards, tmp_path):
    """An export whose weights were replaced by a pickle (its sha256 record rewritten to match) is refused
    by the safetensors-only loading, and the pickle is never run."""
    import transformers

    from albert_scale.export import EXPORT_FILE
    from albert_scale.fileio import file_sums

    model = tmp_path / "model"
    config = transformers.AlbertConfig(
        vocab_size=1000, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    config.save_pretrained(model)
    transformers.AlbertTokenizer(vocab_file=str(tiny_shards / "spiece.model")).save_pretrained(model)
    marker = tmp_path / "unpickled.txt"
    _pickle(model / "pytorch_model.bin", marker)
    (model / EXPORT_FILE).write_text(json.dumps({"format": 1, "files": file_sums(model)}))
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": str(i % 2)}) + "\n" for i in range(40)))
    proc = subprocess.run(
        [str(BIN / "albert-scale"), "finetune", "--model", str(model), "--data", str(data), "epochs=1"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=240,
    )
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


# --- secrets in the environment, end to end ----------------------------------------------------------------

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-8f2k1q9z",
    "HF_TOKEN": "hf_tokenvalue7731",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-password-5520",
    "RAY_AUTH_TOKEN": "ray-token-19e0ab",
    "SERVICE_API_KEY": "service-key-0042xx",
}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_secrets_in_the_environment_reach_neither_mlflow_nor_the_terminal(
    mlflow_server, tiny_shards, tmp_path
):
    """A training run with secrets in its environment and a password in its tracking URI: no secret value
    is in the run's params, tags, metrics names or artifacts, in the run directory, or in its output."""
    password = "uri-password-3141"
    uri = mlflow_server.uri.replace("http://", f"http://alice:{password}@")
    run = tmp_path / "run"
    proc = cli(
        "train", "--config", "tiny", "--data", str(tiny_shards), "--output", str(run),
        "schedule.total_steps=6", "schedule.warmup_steps=1", "train.log_every=2",
        MLFLOW_TRACKING_URI=uri, **SECRETS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    secrets = [*SECRETS.values(), password]
    output = proc.stdout + proc.stderr
    assert not [s for s in secrets if s in output]

    import mlflow

    client = mlflow.MlflowClient(mlflow_server.uri)
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    data = client.get_run(run_id).data
    assert data.params["preprocess.tokenizer_threads"] != REDACTED  # an ordinary name is kept
    logged = json.dumps([data.params, data.tags, sorted(data.metrics)])
    assert not [s for s in secrets if s in logged]
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, dst_path=str(tmp_path / "a"), tracking_uri=mlflow_server.uri
        )
    )
    for folder in (downloaded, run):
        leaked = [
            str(path)
            for path in folder.rglob("*")
            if path.is_file() and any(s.encode() in path.read_bytes() for s in secrets)
        ]
        assert leaked == []
