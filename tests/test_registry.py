"""Train -> export -> register against a real ``mlflow server``: the model version is linked to the
training run, carries the alias and a description, and loads by alias (pipeline and download)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import cli, error_lines

pytestmark = pytest.mark.multiprocess


def _cli(uri: str, *args: str) -> subprocess.CompletedProcess:
    return cli(*args, MLFLOW_TRACKING_URI=uri)


def test_register_links_the_training_run_and_loads_by_alias(
    mlflow_server, tiny_shards, tmp_path, monkeypatch
):
    uri = mlflow_server.uri
    run, export = tmp_path / "run", tmp_path / "export"
    trained = _cli(
        uri, "train", "--config", "tiny", "--data", str(tiny_shards), "--output", str(run), "--quiet"
    )
    assert trained.returncode == 0, trained.stderr
    exported = _cli(uri, "export", "--checkpoint", str(run), "--output", str(export))
    assert exported.returncode == 0, exported.stderr
    done = _cli(uri, "register", "--export", str(export), "--name", "tiny-albert", "--alias", "champion")
    assert done.returncode == 0, done.stderr
    assert "registered tiny-albert version 1 as models:/tiny-albert@champion" in done.stdout
    training_run = json.loads((run / "mlflow_run.json").read_text())["run_id"]

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("tiny-albert", "champion")
    assert version.version == "1" and version.run_id == training_run  # linked to the training run
    assert "step 20 of 20" in version.description and "Final evaluation: eval/loss" in version.description
    assert (
        json.loads((export / "albert_scale_export.json").read_text())["data_manifest_sha256"]
        in version.description
    )

    pipeline = mlflow.transformers.load_model("models:/tiny-albert@champion")
    predictions = pipeline("the [MASK] of the state.")
    assert len(predictions) == 5 and all("sequence" in p for p in predictions)
    local = Path(
        mlflow.artifacts.download_artifacts("models:/tiny-albert@champion", dst_path=str(tmp_path / "dl"))
    )
    assert list(local.rglob("config.json")) and list(local.rglob("model.safetensors"))
    # The registered weights are the export's, the [CLS] pooler included (a classifier fine-tuned from the
    # registry starts from it); only the sentence-order head stays behind.
    import torch
    from safetensors.torch import load_file

    exported = load_file(export / "model.safetensors")
    (registered_file,) = local.rglob("model.safetensors")
    registered = load_file(registered_file)
    assert "albert.pooler.weight" in registered
    assert set(exported) - set(registered) == {
        "sop_classifier.classifier.weight",
        "sop_classifier.classifier.bias",
    }
    assert all(torch.equal(registered[key], exported[key]) for key in registered)

    # A second registration makes version 2 and moves the alias.
    again = _cli(uri, "register", "--export", str(export), "--name", "tiny-albert", "--alias", "champion")
    assert again.returncode == 0, again.stderr
    assert client.get_model_version_by_alias("tiny-albert", "champion").version == "2"

    for args, message in (
        (["--export", str(export), "--name", "tiny-albert", "--alias", "latest"], "reserved by MLflow"),
        (["--export", str(tmp_path / "nope"), "--name", "x"], "no such directory"),
        (["--export", str(run), "--name", "x"], "not an albert-scale export"),
        (["--export", str(export), "--name", "bad name"], "--name 'bad name'"),
        (
            ["--export", str(export), "--name", "x", "--run-id", "0123456789abcdef"],
            "--run-id 0123456789abcdef",
        ),
    ):
        result = _cli(uri, "register", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(error_lines(result.stderr)) == 1

    # Fine-tuning consumes the registered model by alias and logs its own run, linked to the version.
    tuned = _cli(
        uri,
        "finetune",
        "--model",
        "models:/tiny-albert@champion",
        "--task",
        "rotten-tomatoes",
        "--output",
        str(tmp_path / "tuned"),
        "epochs=1",
        "max_train_examples=600",
        "batch_size=64",
    )
    assert tuned.returncode == 0, tuned.stderr
    assert "pretraining margin over random init" in tuned.stdout and "majority label (fresh)" in tuned.stdout
    results = json.loads((tmp_path / "tuned" / "results.json").read_text())
    assert results["model_version"] == "2" and results["source_run_id"] == training_run
    assert results["train_examples"] == 600 and results["test_examples"] > 1000
    for name in ("pretrained", "random_init", "majority"):
        assert 0.0 <= results[name]["test_accuracy"] <= 1.0
    margin = results["margin"]  # paired on the same test examples
    assert margin["points"] == pytest.approx(
        results["pretrained"]["test_accuracy"] - results["random_init"]["test_accuracy"]
    )
    assert margin["ci95"][0] <= margin["points"] <= margin["ci95"][1]
    assert "95% interval" in tuned.stdout
    tuned_run = client.get_run(results["mlflow_run_id"])
    assert tuned_run.data.tags["albert_scale.source_model"] == "models:/tiny-albert@champion"
    assert tuned_run.data.tags["albert_scale.source_version"] == "2"
    assert tuned_run.data.tags["albert_scale.source_run_id"] == training_run
    assert tuned_run.data.metrics["pretrained/final_test_accuracy"] == results["pretrained"]["test_accuracy"]
    assert tuned_run.data.metrics["margin/ci95_low"] == pytest.approx(margin["ci95"][0])
    import transformers

    assert (
        transformers.AlbertForSequenceClassification.from_pretrained(tmp_path / "tuned" / "model").num_labels
        == 2
    )
    missing = _cli(uri, "finetune", "--model", "models:/no-such-model@champion", "--task", "rotten-tomatoes")
    assert missing.returncode == 2 and "not found in the registry" in missing.stderr, missing.stderr

    # Registration recorded the sha256 of every logged file; a file changed in the artifact store is refused.
    version = client.get_model_version_by_alias("tiny-albert", "champion")
    sums = json.loads(version.tags["albert_scale.sha256"])
    assert "model/model.safetensors" in sums and "MLmodel" in sums
    model_id = version.source.removeprefix("models:/")
    (stored,) = [p for p in mlflow_server.root.rglob("model.safetensors") if model_id in p.parts]
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    tampered = _cli(uri, "finetune", "--model", "models:/tiny-albert@champion", "--task", "rotten-tomatoes")
    assert tampered.returncode == 2, tampered.stderr
    assert error_lines(tampered.stderr) == [
        "albert-scale finetune: error: --model models:/tiny-albert@champion: model/model.safetensors does not "
        "match the sha256 recorded at registration (changed or damaged in the artifact store)"
    ]


def test_training_registers_its_model_at_the_end_when_configured(tiny_shards, tmp_path, mlflow_store):
    run = tmp_path / "run"
    done = _cli(
        mlflow_store,
        "train",
        "--config",
        "tiny",
        "--data",
        str(tiny_shards),
        "--output",
        str(run),
        "tracking.register_name=tiny-auto",
        "tracking.register_alias=champion",
        "schedule.total_steps=6",
        "schedule.warmup_steps=1",
    )
    assert done.returncode == 0, done.stderr
    assert "registered models:/tiny-auto@champion" in done.stdout
    import mlflow

    version = mlflow.MlflowClient(mlflow_store).get_model_version_by_alias("tiny-auto", "champion")
    assert version.run_id == json.loads((run / "mlflow_run.json").read_text())["run_id"]
    assert json.loads((run / "export" / "albert_scale_export.json").read_text())["step"] == 6
