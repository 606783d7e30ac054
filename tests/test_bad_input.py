"""The bad-input battery: what the commands reject, as one table.

Every case runs a command in this process (its ``main(argv, prog)``, as the console script does) and
must: exit 2, print exactly one line on stderr, ``albert-scale COMMAND: error: ...``, naming what is wrong
(the key, the path, the value), with no traceback (an unexpected exception would reach pytest), and leave
the files it was given and the outputs it was pointed at as they were: no file is created or changed, so
nothing half-written can look complete (no manifest.json in a dataset directory, no config.yaml or
checkpoint in a run directory, no config.json or model.safetensors in an export, no registered version).
Two cases also go through the real console script in a child process.

Nothing here starts Ray or trains: the cases that need a dataset use the session's ``tiny_shards``, and a
run directory with a checkpoint is written directly with :mod:`albert_scale.checkpoint`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import cli, error_lines, free_port, replace_checkpoint_tensor

from albert_scale.cli import COMMANDS

pytestmark = pytest.mark.reliability

UNREACHABLE = "http://127.0.0.1:1"  # nothing listens on port 1: the connection is refused at once


class Place(dict):
    """``{name}`` placeholders of a case's arguments: ``tmp`` (the test's directory), ``shards`` (the
    session's tiny dataset) and ``run`` (a copy, in ``tmp``, of a run directory with a checkpoint).
    The fixtures behind ``shards`` and ``run`` are made only for the cases that use them."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path):
        super().__init__(tmp=str(tmp))
        self.request = request
        self.tmp = tmp

    def __missing__(self, key: str) -> str:
        if key == "shards":
            value = self.request.getfixturevalue("tiny_shards")
        elif key == "run":
            value = self.tmp / "run"
            shutil.copytree(self.request.getfixturevalue("checkpointed_run"), value)
        else:
            raise KeyError(key)
        self[key] = str(value)
        return self[key]

    def path(self, key: str) -> Path:
        return Path(self[key])

    def checkpoint(self) -> Path:
        """The checkpoint directory in the copied run."""
        from albert_scale import checkpoint

        return self.path("run") / checkpoint.CHECKPOINTS / checkpoint.checkpoint_name(10)


Setup = Callable[[Place], None]


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    argv: tuple[str, ...]
    message: str
    """A part of the one error line (after ``PROG: error: ``); ``{...}`` placeholders are filled in."""
    setup: Setup | None = None
    unregistered: str | None = None
    """A registered model name that must still have no version afterwards."""
    within: float | None = None
    """Seconds the command may take at most (it must fail fast)."""


# --- setups -----------------------------------------------------------------------------------------------


def write(name: str, content: str | bytes) -> Setup:
    def setup(place: Place) -> None:
        path = place.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return setup


def mkdir(name: str) -> Setup:
    return lambda place: (place.tmp / name).mkdir(parents=True)


def both(*setups: Setup) -> Setup:
    def setup(place: Place) -> None:
        for step in setups:
            step(place)

    return setup


def labelled(name: str) -> Setup:
    """A valid fine-tuning file with two labels, so that the case fails on the model, not the data."""
    lines = [
        json.dumps({"text": f"review number {i} is {'good' if i % 2 else 'bad'}", "label": i % 2})
        for i in range(40)
    ]
    return write(name, "\n".join(lines) + "\n")


def manifest_of_another_dataset(place: Place) -> None:
    out = place.tmp / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"fingerprint": "another dataset", "schema_version": 1}))


def dataset_copy_with_another_tokenizer(place: Place) -> None:
    copy = place.tmp / "data"
    shutil.copytree(place.path("shards"), copy)
    model = copy / "spiece.model"
    model.write_bytes(model.read_bytes() + b"\n")  # not the file the shards were made with


def damage_model_file(place: Place) -> None:
    from albert_scale import checkpoint

    target = place.checkpoint() / checkpoint.MODEL_FILE
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))


def state_with_embedding_size(size: int) -> Setup:
    """Edits the checkpoint's recorded config so that it no longer matches its weights."""

    def setup(place: Place) -> None:
        from albert_scale import checkpoint

        path = place.checkpoint() / checkpoint.STATE_FILE
        state = json.loads(path.read_text())
        state["config"]["model"]["embedding_size"] = size
        path.write_text(json.dumps(state))

    return setup


def weights_of_another_shape(place: Place) -> None:
    """Same config, but one tensor of another shape, with matching checksums (tensors from elsewhere)."""
    import torch

    replace_checkpoint_tensor(place.checkpoint(), "albert.pooler.bias", torch.zeros(7))


def use_run(place: Place) -> None:
    place["run"]  # copies the run directory into the test's directory before the snapshot


TEXT = "The first sentence of a document. And the second one.\n"
NOT_UTF8 = "café au lait\nnaïve idée\nsouvent déjà vu\n".encode("latin-1")
BINARY = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4
PREPROCESS = ("--config", "tiny", "--quiet")
TRAIN = ("--config", "tiny", "--quiet")

CASES = [
    # --- configuration: files, keys, types, values, arithmetic ---
    Case(
        "config-unknown-key-in-yaml",
        "plan",
        ("--config", "{tmp}/cfg.yaml"),
        "unknown key model.hiden_size (did you mean model.hidden_size?)",
        write("cfg.yaml", "model:\n  hiden_size: 64\n"),
    ),
    Case(
        "config-unknown-override-key",
        "train",
        (*TRAIN, "--data", "{shards}", "--output", "{tmp}/run", "optim.lrr=0.1"),
        "unknown key optim.lrr (did you mean optim.lr?)",
    ),
    Case(
        "config-wrong-type",
        "train",
        (*TRAIN, "--data", "{shards}", "--output", "{tmp}/run", "train.global_batch_size=abc"),
        "train.global_batch_size='abc': expected an integer",
    ),
    Case(
        "config-wrong-type-bool",
        "plan",
        ("--config", "tiny", "train.activation_checkpointing=maybe"),
        "train.activation_checkpointing='maybe': expected true or false",
    ),
    Case(
        "config-value-not-a-choice",
        "plan",
        ("--config", "tiny", "zero.stage=5"),
        "zero.stage=5: expected one of 0, 1, 2, 3",
    ),
    Case(
        "config-out-of-range",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/a.txt", "optim.lr=-1", "--output", "{tmp}/out"),
        "optim.lr=-1.0: must be > 0",
        write("a.txt", TEXT),
    ),
    Case(
        "config-override-not-key-value",
        "plan",
        ("--config", "tiny", "lr"),
        "override 'lr': expected key=value",
    ),
    Case(
        "config-yaml-not-a-mapping",
        "plan",
        ("--config", "{tmp}/list.yaml"),
        "list.yaml': expected a mapping of sections, got list",
        write("list.yaml", "- model\n- data\n"),
    ),
    Case(
        "config-section-not-a-mapping",
        "plan",
        ("--config", "{tmp}/section.yaml"),
        "model: expected a mapping, got 3",
        write("section.yaml", "model: 3\n"),
    ),
    Case(
        "config-invalid-yaml",
        "plan",
        ("--config", "{tmp}/bad.yaml"),
        "bad.yaml' line 2: not valid YAML",
        write("bad.yaml", "model: [1, 2\n"),
    ),
    Case(
        "config-binary-file",
        "plan",
        ("--config", "{tmp}/image.yaml"),
        "image.yaml': not a YAML text file (invalid UTF-8 at byte 0)",
        write("image.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    ),
    Case(
        "config-missing-file",
        "train",
        ("--config", "{tmp}/missing.yaml", "--data", "{tmp}/d", "--output", "{tmp}/run"),
        "config '{tmp}/missing.yaml': no such file and no such preset",
    ),
    Case(
        "config-is-a-directory",
        "plan",
        ("--config", "{tmp}/configs"),
        "config '{tmp}/configs': is a directory, not a YAML file",
        mkdir("configs"),
    ),
    Case(
        "config-sequence-longer-than-positions",
        "plan",
        ("--config", "tiny", "data.max_seq_length=128"),
        "data.max_seq_length=128: longer than model.max_position_embeddings=64",
    ),
    Case(
        "batch-not-divisible-by-micro-batch-x-world",
        "train",
        (*TRAIN, "--data", "{shards}", "--output", "{tmp}/run", "train.global_batch_size=6"),
        "train.global_batch_size=6: not divisible by train.micro_batch_size=4 x data-parallel size 1 = 4",
    ),
    Case(
        "batch-not-divisible-at-planned-world-size",
        "plan",
        ("--config", "tiny", "--world-size", "3"),
        "train.global_batch_size=8: not divisible by train.micro_batch_size=4 x data-parallel size 3 = 12",
    ),
    # --- preprocess: inputs, tokenizer, output directory ---
    Case(
        "preprocess-missing-input",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/corpus.txt", "--output", "{tmp}/out"),
        "input '{tmp}/corpus.txt': no such file or directory",
    ),
    Case(
        "preprocess-unreachable-ray-address",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/a.txt", "--output", "{tmp}/out", "--ray-address", "127.0.0.1:1"),
        "--ray-address='127.0.0.1:1': cannot reach the Ray cluster (connection refused)",
        write("a.txt", TEXT),
        within=10,
    ),
    Case(
        "preprocess-unsupported-extension",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/corpus.docx", "--output", "{tmp}/out"),
        "input '{tmp}/corpus.docx': unsupported file type",
        write("corpus.docx", b"PK\x03\x04"),
    ),
    Case(
        "preprocess-empty-input",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/empty.txt", "--output", "{tmp}/out"),
        "input '{tmp}/empty.txt': empty file",
        write("empty.txt", b""),
    ),
    Case(
        "preprocess-empty-after-decompression",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/empty.txt.gz", "--output", "{tmp}/out"),
        "input '{tmp}/empty.txt.gz': empty file (after decompression)",
        write("empty.txt.gz", gzip.compress(b"")),
    ),
    Case(
        "preprocess-blank-lines-only",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/blank.jsonl", "--output", "{tmp}/out"),
        "input '{tmp}/blank.jsonl': holds only blank lines, no text",
        write("blank.jsonl", "\n  \n\n"),
    ),
    Case(
        "preprocess-binary-input",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/program.txt", "--output", "{tmp}/out"),
        "input '{tmp}/program.txt': a binary file (NUL bytes",
        write("program.txt", BINARY),
    ),
    Case(
        "preprocess-input-not-utf8",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/latin1.txt", "--output", "{tmp}/out"),
        "input '{tmp}/latin1.txt': not UTF-8 text",
        write("latin1.txt", NOT_UTF8),
    ),
    Case(
        "preprocess-corrupt-gzip",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/corpus.txt.gz", "--output", "{tmp}/out"),
        "input '{tmp}/corpus.txt.gz': unreadable as gzip-compressed txt",
        write("corpus.txt.gz", gzip.compress(TEXT.encode())[:12] + b"garbage, not deflate"),
    ),
    Case(
        "preprocess-corrupt-parquet",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/corpus.parquet", "--output", "{tmp}/out"),
        "input '{tmp}/corpus.parquet': unreadable as parquet",
        write("corpus.parquet", b"PAR1 this is not a parquet file"),
    ),
    Case(
        "preprocess-directory-without-readable-input",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/docs", "--output", "{tmp}/out"),
        "no readable input among ['{tmp}/docs'] ({tmp}/docs/notes.pdf: unsupported file type)",
        write("docs/notes.pdf", b"%PDF-1.4"),
    ),
    Case(
        "preprocess-unknown-uri-scheme",
        "preprocess",
        (*PREPROCESS, "--input", "nosuchfs://bucket/corpus.txt", "--output", "{tmp}/out"),
        "input 'nosuchfs://bucket/corpus.txt': Unrecognized filesystem type",
    ),
    Case(
        "preprocess-glob-matches-nothing",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/*.jsonl", "--output", "{tmp}/out"),
        "input '{tmp}/*.jsonl': the pattern matches no file",
    ),
    Case(
        "preprocess-output-holds-another-dataset",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/a.txt", "--output", "{tmp}/out"),
        "--output '{tmp}/out' already holds a different dataset",
        both(write("a.txt", TEXT), manifest_of_another_dataset),
    ),
    Case(
        "preprocess-output-is-a-file",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/a.txt", "--output", "{tmp}/a.txt"),
        "--output '{tmp}/a.txt': exists and is not a directory",
        write("a.txt", TEXT),
    ),
    Case(
        "preprocess-tokenizer-not-sentencepiece",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/a.txt", "--output", "{tmp}/out", "--tokenizer", "{tmp}/a.txt"),
        "tokenizer '{tmp}/a.txt': not a SentencePiece model",
        write("a.txt", TEXT),
    ),
    Case(
        "preprocess-tokenizer-vocab-differs-from-config",
        "preprocess",
        (
            *PREPROCESS,
            "--input",
            "{tmp}/a.txt",
            "--output",
            "{tmp}/out",
            "--tokenizer",
            "{shards}/spiece.model",
            "model.vocab_size=2000",
        ),
        "has 1000 pieces but model.vocab_size=2000; set model.vocab_size=1000",
        write("a.txt", TEXT),
    ),
    Case(
        "preprocess-zero-workers",
        "preprocess",
        (*PREPROCESS, "--input", "{tmp}/a.txt", "--output", "{tmp}/out", "--num-workers", "0"),
        "--num-workers=0: must be >= 1",
        write("a.txt", TEXT),
    ),
    # --- train: the dataset, the tokenizer, the run directory ---
    Case(
        "train-data-not-a-dataset",
        "train",
        (*TRAIN, "--data", "{tmp}/corpus", "--output", "{tmp}/run"),
        "dataset '{tmp}/corpus': no manifest.json (not a preprocessed dataset",
        write("corpus/a.txt", TEXT),
    ),
    Case(
        "train-data-is-the-raw-corpus",
        "train",
        (*TRAIN, "--data", "{tmp}/corpus.jsonl", "--output", "{tmp}/run"),
        "dataset '{tmp}/corpus.jsonl': no manifest.json",
        write("corpus.jsonl", json.dumps({"text": TEXT}) + "\n"),
    ),
    Case(
        "train-manifest-not-json",
        "train",
        (*TRAIN, "--data", "{tmp}/data", "--output", "{tmp}/run"),
        "dataset '{tmp}/data': manifest.json is not valid JSON",
        write("data/manifest.json", '{"schema_version": 1, '),
    ),
    Case(
        "train-manifest-not-an-object",
        "train",
        (*TRAIN, "--data", "{tmp}/data", "--output", "{tmp}/run"),
        "dataset '{tmp}/data': manifest.json is not a JSON object",
        write("data/manifest.json", "[]"),
    ),
    Case(
        "train-manifest-incomplete",
        "train",
        (*TRAIN, "--data", "{tmp}/data", "--output", "{tmp}/run"),
        "dataset '{tmp}/data': manifest.json has no 'tokenizer'",
        write("data/manifest.json", '{"schema_version": 1}'),
    ),
    Case(
        "train-vocab-differs-from-the-data",
        "train",
        (*TRAIN, "--data", "{shards}", "--output", "{tmp}/run", "model.vocab_size=500"),
        "model.vocab_size=500: the dataset '{shards}' was tokenized with 1000 pieces; set model.vocab_size=1000",
    ),
    Case(
        "train-tokenizer-replaced-in-the-data",
        "train",
        (*TRAIN, "--data", "{tmp}/data", "--output", "{tmp}/run"),
        "dataset '{tmp}/data': spiece.model is not the tokenizer the shards were made with",
        dataset_copy_with_another_tokenizer,
    ),
    Case(
        "train-sequence-longer-than-the-data",
        "train",
        (
            *TRAIN,
            "--data",
            "{shards}",
            "--output",
            "{tmp}/run",
            "data.max_seq_length=128",
            "model.max_position_embeddings=128",
        ),
        "data.max_seq_length=128: the dataset '{shards}' holds instances of at most 64 tokens",
    ),
    Case(
        "train-unreachable-ray-address",
        "train",
        (
            *TRAIN,
            "--data",
            "{shards}",
            "--output",
            "{tmp}/run",
            "cluster.backend=ray",
            "cluster.address=127.0.0.1:1",
        ),
        "cluster.address='127.0.0.1:1': cannot reach the Ray cluster (connection refused)",
        within=10,
    ),
    Case(
        "train-resume-with-another-model-config",
        "train",
        (*TRAIN, "--data", "{shards}", "--output", "{run}", "model.hidden_size=64"),
        "model.hidden_size=64: the checkpoint '{run}/checkpoints/step-00000010' was trained with model.hidden_size=32",
    ),
    Case(
        "train-resume-checkpoint-does-not-fit-the-model",
        "train",
        (*TRAIN, "--data", "{shards}", "--output", "{run}"),
        "albert.pooler.bias has shape (7,), the model (32,)",
        weights_of_another_shape,
    ),
    Case(
        "train-output-is-a-file",
        "train",
        (*TRAIN, "--data", "{shards}", "--output", "{tmp}/a.txt"),
        "--output '{tmp}/a.txt': exists and is not a directory",
        write("a.txt", TEXT),
    ),
    # --- export ---
    Case(
        "export-missing-checkpoint",
        "export",
        ("--checkpoint", "{tmp}/runs/nope", "--output", "{tmp}/export"),
        "--checkpoint '{tmp}/runs/nope': no such directory",
    ),
    Case(
        "export-not-a-run-directory",
        "export",
        ("--checkpoint", "{tmp}/corpus", "--output", "{tmp}/export"),
        "--checkpoint '{tmp}/corpus': neither a checkpoint nor a run directory with checkpoints",
        write("corpus/a.txt", TEXT),
    ),
    Case(
        "export-damaged-checkpoint",
        "export",
        ("--checkpoint", "{run}/checkpoints/step-00000010", "--output", "{tmp}/export"),
        "model.safetensors does not match its sha256 (damaged file)",
        damage_model_file,
    ),
    Case(
        "export-every-checkpoint-damaged",
        "export",
        ("--checkpoint", "{run}", "--output", "{tmp}/export"),
        "--checkpoint '{run}': no intact checkpoint in the run; the newest: checkpoint "
        "'{run}/checkpoints/step-00000010': model.safetensors does not match its sha256",
        damage_model_file,
    ),
    Case(
        "export-checkpoint-state-unreadable",
        "export",
        ("--checkpoint", "{tmp}/step", "--output", "{tmp}/export"),
        "checkpoint '{tmp}/step': state.json unreadable",
        write("step/state.json", "{truncated"),
    ),
    Case(
        "export-checkpoint-state-incomplete",
        "export",
        ("--checkpoint", "{tmp}/step", "--output", "{tmp}/export"),
        "checkpoint '{tmp}/step': state.json lacks its step or its files' sha256",
        write("step/state.json", '{"format": 1, "step": 3}'),
    ),
    Case(
        "export-weights-do-not-match-the-checkpoint-config",
        "export",
        ("--checkpoint", "{run}", "--output", "{tmp}/export"),
        "albert.embeddings.word_embeddings.weight has shape (1000, 16), but the model of its config",
        state_with_embedding_size(24),
    ),
    Case(
        "export-output-not-empty",
        "export",
        ("--checkpoint", "{run}", "--output", "{tmp}/corpus"),
        "--output '{tmp}/corpus': exists and is not empty",
        write("corpus/a.txt", TEXT),
    ),
    # --- register ---
    Case(
        "register-not-an-export",
        "register",
        ("--export", "{run}", "--name", "bad-input-a"),
        "'{run}': not an albert-scale export (albert_scale_export.json is missing)",
        use_run,
        unregistered="bad-input-a",
    ),
    Case(
        "register-missing-directory",
        "register",
        ("--export", "{tmp}/export", "--name", "bad-input-b"),
        "--export '{tmp}/export': no such directory",
        unregistered="bad-input-b",
    ),
    Case(
        "register-invalid-name",
        "register",
        ("--export", "{tmp}/export", "--name", "my model!"),
        "--name 'my model!': use letters, digits",
        mkdir("export"),
    ),
    # --- finetune: the model URI and the labelled data ---
    Case(
        "finetune-malformed-model-uri",
        "finetune",
        ("--model", "models:/", "--data", "{tmp}/reviews.jsonl", "--output", "{tmp}/tuned"),
        "--model 'models:/': expected models:/NAME@ALIAS or models:/NAME/VERSION",
        labelled("reviews.jsonl"),
    ),
    Case(
        "finetune-model-not-in-the-registry",
        "finetune",
        (
            "--model",
            "models:/bad-input-nope@champion",
            "--data",
            "{tmp}/reviews.jsonl",
            "--output",
            "{tmp}/tuned",
        ),
        "--model models:/bad-input-nope@champion: not found in the registry",
        labelled("reviews.jsonl"),
        unregistered="bad-input-nope",
    ),
    Case(
        "finetune-model-directory-not-an-export",
        "finetune",
        ("--model", "{run}", "--data", "{tmp}/reviews.jsonl", "--output", "{tmp}/tuned"),
        "'{run}': not an albert-scale export",
        labelled("reviews.jsonl"),
    ),
    Case(
        "finetune-data-without-labels",
        "finetune",
        ("--model", "models:/x@y", "--data", "{tmp}/texts.jsonl", "--output", "{tmp}/tuned"),
        "'{tmp}/texts.jsonl' line 1: expected a JSON object with text and label (no 'label' field)",
        write("texts.jsonl", '{"text": "a good film"}\n{"text": "a bad film"}\n'),
    ),
    Case(
        "finetune-data-not-utf8",
        "finetune",
        ("--model", "models:/x@y", "--data", "{tmp}/reviews.jsonl"),
        "'{tmp}/reviews.jsonl' line 2: not UTF-8 text",
        write("reviews.jsonl", b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n'),
    ),
    Case(
        "finetune-data-one-label",
        "finetune",
        ("--model", "models:/x@y", "--data", "{tmp}/reviews.jsonl"),
        "'{tmp}/reviews.jsonl': needs at least two distinct labels, found ['1']",
        write("reviews.jsonl", '{"text": "good", "label": 1}\n{"text": "fine", "label": 1}\n'),
    ),
    Case(
        "finetune-missing-data",
        "finetune",
        ("--model", "models:/x@y", "--data", "{tmp}/reviews.jsonl"),
        "--data '{tmp}/reviews.jsonl': no such file",
    ),
    Case(
        "finetune-unknown-setting",
        "finetune",
        ("--model", "models:/x@y", "--data", "{tmp}/reviews.jsonl", "epoch=2"),
        "unknown key epoch (did you mean epochs?)",
    ),
    # --- the cluster, the corpora, the dataset inspector, the quickstart ---
    Case(
        "submit-unreachable-address",
        "submit",
        ("--address", UNREACHABLE, "--", "corpus", "list"),
        f"cannot reach the Ray dashboard at {UNREACHABLE}: connection refused",
        within=10,
    ),
    Case(
        "jobs-unreachable-address",
        "jobs",
        ("status", "raysubmit_123", "--address", UNREACHABLE),
        f"cannot reach the Ray dashboard at {UNREACHABLE}: connection refused",
        within=10,
    ),
    Case(
        "jobs-address-not-a-dashboard",
        "jobs",
        ("list", "--address", "127.0.0.1:6379"),
        "--address='127.0.0.1:6379' is not a Ray dashboard address",
    ),
    Case(
        "corpus-unknown-name",
        "corpus",
        ("fetch", "brown", "--output", "{tmp}/corpora"),
        "unknown corpus 'brown' (available: ",
    ),
    Case(
        "data-stats-not-a-dataset",
        "data",
        ("stats", "{tmp}/corpus"),
        "dataset '{tmp}/corpus': no manifest.json",
        write("corpus/a.txt", TEXT),
    ),
    Case(
        "quickstart-unknown-corpus",
        "quickstart",
        ("--corpus", "brown", "--output", "{tmp}/qs"),
        "unknown corpus 'brown'",
    ),
]
BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES), "case ids must be distinct"


# --- fixtures and checks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed_run(tiny_shards, tmp_path_factory) -> Path:
    """A run directory of the tiny preset with one checkpoint (step 10), as training writes it (weights
    and moments of the tiny model, the resolved config, the dataset's fingerprint and tokenizer), written
    directly rather than trained."""
    import torch

    from albert_scale import checkpoint
    from albert_scale.config import load_config
    from albert_scale.fileio import sha256_file
    from albert_scale.model import AlbertForPreTraining

    config = load_config("tiny")
    torch.manual_seed(config.train.seed)
    weights = {name: p.detach() for name, p in AlbertForPreTraining(config.model).named_parameters()}
    moments = {
        kind: {name: torch.zeros_like(t) for name, t in weights.items()} for kind in ("exp_avg", "exp_avg_sq")
    }
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    state = {
        "world_size": 1,
        "data": {
            "cursor": {"epoch": 0, "consumed": 80},
            "dataset": manifest["fingerprint"],
            "seed": config.train.seed,
        },
        "engine": {
            "global_steps": 10,
            "global_samples": 80,
            "skipped_steps": 0,
            "lr_scheduler": {"step": 10},
            "loss_scaler": {},
        },
        "config": config.to_dict(),
        "manifest_sha256": sha256_file(tiny_shards / "manifest.json"),
    }
    run = tmp_path_factory.mktemp("bad_input") / "run"
    checkpoint.write(
        run,
        10,
        weights=weights,
        moments=moments,
        state=state,
        keep=2,
        files={"spiece.model": (tiny_shards / "spiece.model").read_bytes()},
    )
    return run


@pytest.fixture(autouse=True)
def mlflow_global_uri_restored(monkeypatch):
    """Commands run in this process point mlflow's global tracking URI (and MLFLOW_TRACKING_URI) at the
    session's store; both are put back, so that later tests that choose another store get it."""
    from mlflow.tracking._tracking_service import utils

    saved = utils._tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])  # restored at teardown
    yield
    utils._tracking_uri = saved


def files_under(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (an empty directory holds nothing that looks complete)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def registered_versions(name: str) -> list:
    import mlflow

    from albert_scale.tracking import connect

    client = mlflow.MlflowClient(connect())
    return client.search_model_versions(f"name='{name}'")


def prepare(case: Case, request: pytest.FixtureRequest, tmp: Path, monkeypatch) -> tuple[list[str], Place]:
    place = Place(request, tmp)
    if case.setup is not None:
        case.setup(place)
    argv = [word.format_map(place) for word in case.argv]
    if case.command == "train":  # a world of one in this process, its variables undone after the test
        for name, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    return argv, place


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, request, tmp_path, monkeypatch, capsys):
    argv, place = prepare(case, request, tmp_path, monkeypatch)
    roots = [tmp_path] + ([place.path("shards")] if "shards" in place else [])
    before = files_under(*roots)
    capsys.readouterr()

    module = importlib.import_module(COMMANDS[case.command][0])
    started = time.monotonic()
    code = module.main(argv, prog=f"albert-scale {case.command}")
    elapsed = time.monotonic() - started

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"albert-scale {case.command}: error: "), err
    assert case.message.format_map(place) in lines[0], err
    assert files_under(*roots) == before, "the failed command created or changed files"
    if case.within is not None:
        assert elapsed < case.within, f"took {elapsed:.1f} s"
    if case.unregistered is not None:
        assert registered_versions(case.unregistered) == []


@pytest.mark.parametrize("case_id", ["config-unknown-key-in-yaml", "preprocess-binary-input"])
def test_the_console_script_prints_one_line_and_exits_2(case_id, request, tmp_path, monkeypatch):
    case = BY_ID[case_id]
    argv, place = prepare(case, request, tmp_path, monkeypatch)
    result = cli(case.command, *argv, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines == error_lines(result.stderr), result.stderr
    assert (
        lines[0].startswith(f"albert-scale {case.command}: error: ")
        and case.message.format_map(place) in lines[0]
    )
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()
