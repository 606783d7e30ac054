"""Register an export in the MLflow model registry, linked to its training run, under an alias.

Usage:
    albert-scale register --export DIR --name NAME [--alias ALIAS] [--run-id ID]

Checks the export's sha256 sums, logs it as an MLflow model (the transformers flavor, as a fill-mask
model: the pretrained encoder with its MLM head, and the tokenizer; the encoder keeps its pretrained
[CLS] pooler, which ``AlbertForMaskedLM`` alone would drop, so that a sequence classifier fine-tuned
from the registry starts from the same weights as one fine-tuned from the export) into the training
run (``--run-id``, else the run recorded in the run directory the checkpoint came from, else a new run),
registers a new version of NAME, points ALIAS at it (default ``candidate``), describes it with the data
and the final evaluation, and records the sha256 of every file of the logged model in the version's tag
``albert_scale.sha256`` (``finetune`` checks them after download). Then
``mlflow.transformers.load_model("models:/NAME@ALIAS")`` gives a fill-mask pipeline, and
``albert-scale finetune --model models:/NAME@ALIAS`` fine-tunes it. The tracking URI is
``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory (as for training).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from albert_scale.cli import stage_main
from albert_scale.export import EXPORT_FILE, verify
from albert_scale.fileio import file_sums
from albert_scale.redact import redact_uri
from albert_scale.tracking import RUN_FILE, connect, first_line

DEFAULT_ALIAS = "candidate"
MODEL_ARTIFACT = "model"
SHA256_TAG = "albert_scale.sha256"
"""Model version tag: the sha256 of every file of the logged model, which ``finetune`` checks on download."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Log an 'albert-scale export' directory as an MLflow model linked to its training run, "
        "register a new version of NAME and point an alias at it.",
        epilog="example: albert-scale register --export exports/quickstart --name albert-quickstart --alias candidate",
    )
    parser.add_argument(
        "--export", required=True, metavar="DIR", help="a directory written by 'albert-scale export'"
    )
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument(
        "--alias", default=DEFAULT_ALIAS, help=f"alias of the new version (default {DEFAULT_ALIAS!r})"
    )
    parser.add_argument(
        "--run-id", metavar="ID", help="MLflow run to log the model into (default: the training run)"
    )
    return parser


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str
    run_id: str
    uri: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def run(args: argparse.Namespace) -> int:
    done = register(Path(args.export), name=args.name, alias=args.alias, run_id=args.run_id)
    print(
        f"registered {done.name} version {done.version} as {done.model_uri} (run {done.run_id}, {done.uri})"
    )
    return 0


def register(
    export: Path, *, name: str, alias: str = DEFAULT_ALIAS, run_id: str | None = None, uri: str | None = None
) -> Registered:
    """Logs, registers and aliases the export (see the module docstring); ``uri`` defaults to
    :func:`~albert_scale.tracking.tracking_uri`."""
    for key, value in (("--name", name), ("--alias", alias)):
        if not _NAME.match(value):
            raise ValueError(f"{key} {value!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"--alias {alias!r}: reserved by MLflow ('latest' and v<number> name versions)")
    if not export.is_dir():
        raise FileNotFoundError(f"--export {str(export)!r}: no such directory")
    record = verify(export)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; MLflow would look for a model card
    import mlflow
    import transformers

    # ERROR: not even MLflow's warning that a local model has no license information.
    uri = connect(uri, timeout_seconds=30, log_level=logging.ERROR)
    client = mlflow.MlflowClient(uri)
    run_id = run_id or _training_run(record, uri)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception as err:
            raise ValueError(
                f"--run-id {run_id}: no such run at {uri} ({first_line(err) or type(err).__name__})"
            ) from None
    transformers.logging.set_verbosity_error()  # no report of the pretraining heads the MLM model leaves out
    model = fill_mask_model(export)
    tokenizer = transformers.AlbertTokenizer.from_pretrained(export)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"register-{name}") as active:
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name=MODEL_ARTIFACT,
            task="fill-mask",
            pip_requirements=_requirements(),
            metadata={"albert_scale_export": {k: v for k, v in record.items() if k != "config"}},
        )
        mlflow.log_dict(record, f"{MODEL_ARTIFACT}-export/{EXPORT_FILE}")
        run_id = active.info.run_id
    version_ = mlflow.register_model(info.model_uri, name).version
    client.set_model_version_tag(name, version_, SHA256_TAG, json.dumps(_logged_sums(mlflow, info.model_uri)))
    client.set_registered_model_alias(name, alias, version_)
    client.update_model_version(name, version_, description=_description(record, client, run_id))
    return Registered(name=name, version=str(version_), alias=alias, run_id=run_id, uri=uri)


def fill_mask_model(export: Path):
    """``AlbertForMaskedLM`` of the export whose encoder also holds the pretrained pooler.

    transformers builds the MLM model's encoder without a pooler, so saving it would leave the pooler
    out and every classifier fine-tuned from the registered model would start from a random one. With
    the full encoder in its place, the saved weights are the encoder (pooler included) and the MLM head;
    the fill-mask pipeline ignores the pooler, ``AlbertForSequenceClassification`` loads it.
    """
    import transformers

    model = transformers.AlbertForMaskedLM.from_pretrained(export, use_safetensors=True)
    model.albert = transformers.AlbertModel.from_pretrained(export, use_safetensors=True)
    model.tie_weights()  # the decoder shares the new encoder's word embeddings
    return model


def _logged_sums(mlflow, model_uri: str) -> dict[str, str]:
    """The sha256 of every file of the model as the artifact store holds it (read back once), without
    the note MLflow adds to a download (``registered_model_meta``, which differs by how it is addressed)."""
    with tempfile.TemporaryDirectory(prefix="albert-scale-register-") as tmp:
        sums = file_sums(Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)))
    return {name: digest for name, digest in sums.items() if name != "registered_model_meta"}


def _training_run(record: dict, uri: str) -> str | None:
    """The MLflow run of the training job that wrote the exported checkpoint, when it logged to ``uri``."""
    run_dir = Path(record["checkpoint"]).parent.parent
    saved = run_dir / RUN_FILE
    if not saved.is_file():
        return None
    data = json.loads(saved.read_text())
    return data["run_id"] if data.get("tracking_uri") == redact_uri(uri) else None


def _description(record: dict, client, run_id: str) -> str:
    config = record["config"]
    model = config["model"]
    lines = [
        f"ALBERT pretrained by albert-scale: {model['num_hidden_layers']} layers x {model['hidden_size']} "
        f"({model['num_hidden_groups']} shared group(s)), vocabulary {model['vocab_size']}, step {record['step']} "
        f"of {config['schedule']['total_steps']}, global batch {config['train']['global_batch_size']}, "
        f"sequence length {config['data']['max_seq_length']}.",
        f"Data manifest sha256 {record['data_manifest_sha256']}; checkpoint {record['checkpoint']}.",
    ]
    metrics = client.get_run(run_id).data.metrics
    evaluation = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    if evaluation:
        lines.append(
            "Final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(evaluation.items())) + "."
        )
    return "\n".join(lines)


def _requirements() -> list[str]:
    # Explicit: MLflow's inference would add packages (torchvision) that need not exist on the target.
    return [
        f"{package}=={version(package)}"
        for package in ("torch", "transformers", "tokenizers", "sentencepiece")
    ]


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
