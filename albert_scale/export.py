"""Export a training checkpoint as a Hugging Face model directory.

Usage:
    albert-scale export --checkpoint RUN_DIR|CHECKPOINT_DIR --output DIR

``--checkpoint`` is a run directory (its newest good checkpoint is used) or one ``step-*`` directory.
Checkpoints hold whole fp32 tensors whatever the ZeRO stage and world size that wrote them
(:mod:`albert_scale.checkpoint`), so there is nothing to consolidate: the export is a conversion.

The output directory holds ``config.json`` and ``model.safetensors`` (``transformers.AlbertForPreTraining``;
``AlbertModel`` and ``AlbertForSequenceClassification`` load it too), ``spiece.model`` with
``tokenizer.json`` and ``tokenizer_config.json`` (``AlbertTokenizer``/``AlbertTokenizerFast``), and
``albert_scale_export.json``: where it came from (checkpoint, step, data manifest) and the sha256 of every
file. It is written under a temporary name and renamed when complete. Nothing is unpickled.

The tokenizer: transformers converts ``spiece.model`` into a ``tokenizers`` Unigram, but it turns the
model's user-defined symbols (Google's ALBERT model has ``( ) " - . – £ €``) into added tokens, around
which its pre-tokenizer inserts word boundaries that SentencePiece does not: the ids then differ from
SentencePiece's, the ids the model was trained on. The export keeps them in the Unigram vocabulary and
isolates them with a split after the word boundaries, as SentencePiece does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from albert_scale import checkpoint
from albert_scale.cli import stage_main
from albert_scale.config import Config, ConfigError, build
from albert_scale.fileio import sha256_file

EXPORT_FILE = "albert_scale_export.json"
SPIECE = "spiece.model"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a training checkpoint into a Hugging Face model directory (config.json, "
        "model.safetensors, spiece.model and tokenizer files) that transformers loads with from_pretrained.",
        epilog="example: albert-scale export --checkpoint runs/quickstart --output exports/quickstart",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a run directory (its newest good checkpoint) or one checkpoints/step-* directory",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="the directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def run(args: argparse.Namespace) -> int:
    out = export(Path(args.checkpoint), Path(args.output), overwrite=args.overwrite, say=print)
    print(f"exported to {out}")
    return 0


def find_checkpoint(path: Path, *, say=print) -> checkpoint.Checkpoint:
    """The checkpoint at ``path`` (a step directory), or the newest good one of the run at ``path``."""
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {str(path)!r}: no such directory")
    if (path / checkpoint.STATE_FILE).exists():
        return checkpoint.load(path)
    damaged: list[str] = []
    found = checkpoint.load_latest(path, warn=damaged.append)
    if found is None and damaged:
        raise ValueError(
            f"--checkpoint {str(path)!r}: no intact checkpoint in the run; the newest: {damaged[0]}"
        )
    if found is None:
        raise ValueError(
            f"--checkpoint {str(path)!r}: neither a checkpoint nor a run directory with checkpoints"
        )
    for message in damaged:
        say(f"warning: {message}; exporting an earlier checkpoint")
    return found


def export(source: Path, output: Path, *, overwrite: bool = False, say=print) -> Path:
    """Writes the Hugging Face directory of the checkpoint at ``source`` to ``output``; returns it."""
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--output {str(output)!r}: exists and is not empty (use --overwrite to replace it)"
        )
    found = find_checkpoint(source, say=say)
    if SPIECE not in found.state["files"]:
        raise ValueError(f"checkpoint {str(found.path)!r}: holds no {SPIECE} (written by an older version)")
    if not isinstance(found.state.get("config"), dict) or not isinstance(found.state.get("data"), dict):
        raise ValueError(f"checkpoint {str(found.path)!r}: {checkpoint.STATE_FILE} lacks its config or data")
    try:
        config: Config = build(Config, found.state["config"], prefix="")
    except ConfigError as err:
        raise ValueError(f"checkpoint {str(found.path)!r}: its config is not valid here: {err}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_model(tmp, config, found.weights, source=found.path)
        shutil.copyfile(found.path / SPIECE, tmp / SPIECE)
        write_tokenizer(tmp)
        record = {
            "format": 1,
            "checkpoint": str(found.path.resolve()),
            "step": found.step,
            "data_manifest_sha256": found.state.get("manifest_sha256"),
            "data_fingerprint": found.state["data"].get("dataset"),
            "config": found.state["config"],
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def verify(directory: Path) -> dict[str, Any]:
    """Checks every file of an export against the sha256 in its ``albert_scale_export.json``."""
    record_file = directory / EXPORT_FILE
    if not record_file.is_file():
        raise ValueError(f"{str(directory)!r}: not an albert-scale export ({EXPORT_FILE} is missing)")
    record = json.loads(record_file.read_text())
    for name, digest in record["files"].items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"export {str(directory)!r}: {name} is missing")
        if sha256_file(path) != digest:
            raise ValueError(
                f"export {str(directory)!r}: {name} does not match its sha256 (changed or damaged)"
            )
    return record


def _write_model(directory: Path, config: Config, weights: dict[str, Any], *, source: Path) -> None:
    import transformers

    hf_config = transformers.AlbertConfig(**config.model.to_hf_dict())
    model = transformers.AlbertForPreTraining(hf_config)
    for name, param in model.state_dict().items():
        if name in weights and tuple(weights[name].shape) != tuple(param.shape):
            raise ValueError(
                f"checkpoint {str(source)!r}: {name} has shape {tuple(weights[name].shape)}, but the model of "
                f"its config (model.hidden_size={config.model.hidden_size}, model.embedding_size="
                f"{config.model.embedding_size}) needs {tuple(param.shape)}: its weights and config do not match"
            )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"predictions.decoder.weight", "predictions.decoder.bias"}  # tied to the embeddings and the bias
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"checkpoint {str(source)!r} does not match transformers' AlbertForPreTraining: missing "
            f"{sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    model.save_pretrained(directory, safe_serialization=True)


def write_tokenizer(directory: Path) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` for ``directory/spiece.model`` that give
    SentencePiece's ids (see the module docstring)."""
    import transformers
    from tokenizers import Tokenizer

    from data_pipeline.tokenizer import user_defined_pieces

    symbols = user_defined_pieces((directory / SPIECE).read_bytes())
    tokenizer = transformers.AlbertTokenizer.from_pretrained(str(directory))
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if symbols:
        spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in symbols]
        pattern = "|".join(re.escape(s) for s in sorted(symbols, key=len, reverse=True))
        split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
        pre = spec["pre_tokenizer"]
        spec["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [*(pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]), split],
        }
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.save_pretrained(str(directory))
    config_file = directory / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    # transformers lists the user-defined symbols as extra special tokens, which would make them added
    # tokens again on load (and drop them when decoding).
    settings["extra_special_tokens"] = [
        t for t in settings.get("extra_special_tokens", []) if t not in symbols
    ]
    settings.pop("is_local", None)
    # Segment ids, as in pretraining (A = 0, B = 1), for sentence-pair inputs.
    settings["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    config_file.write_text(json.dumps(settings, indent=2) + "\n")


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
