"""Preprocess raw corpora into a SentencePiece model, Arrow shards of SOP instances and a manifest.

Usage:
    albert-scale preprocess --config CFG --input PATH [PATH ...] --output DIR
                            [--tokenizer SPIECE_MODEL] [--num-workers N] [--ray-address ADDR]
                            [key=value ...]
    python -m data_pipeline.preprocess ...

The Ray Data graph reads whole documents per row (one read task per file), splits and normalizes
sentences, encodes them in an actor pool that loads SentencePiece once per actor, and builds SOP
instances per document. Order is preserved, so the driver streams instances into shards of a fixed row
count that are byte-identical whatever the number of workers or blocks. Without ``--tokenizer`` a
unigram model is first trained on a hash-sampled, bounded set of documents, also drawn through Ray.

Ray runs in process by default; ``--ray-address`` or RAY_ADDRESS joins a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from albert_scale.cli import add_config_arguments, move_overrides, stage_main
from albert_scale.config import Config, check_sequence_length, load_config
from albert_scale.fileio import atomic_write_bytes, atomic_write_text, sha256_file
from albert_scale.ray_address import check_cluster_address
from data_pipeline import tokenizer as tok
from data_pipeline.instances import SCHEMA_VERSION, SHARD_SCHEMA
from data_pipeline.readers import InputFile, ReadLimits, check_named_files, discover, fingerprint_inputs
from data_pipeline.shards import MANIFEST, PROGRESS, ShardWriter
from data_pipeline.stages import (
    DocumentEncoder,
    explode,
    prepare_documents,
    read_rows,
    sample_sentences,
)

# Rows of the read stage are grouped into blocks of about this size, so even a single large input file
# is spread over the actor pool.
BLOCK_BYTES = 1 << 20


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Tokenize raw corpora into sentence-order-prediction instances: a SentencePiece model, "
        "Arrow shards and manifest.json in --output. Inputs: .txt (BERT format: a sentence or paragraph "
        "per line, a blank line between documents), .jsonl, .parquet, datasets save_to_disk directories; "
        ".gz/.zst; files, directories, globs, local paths or pyarrow filesystem URIs (s3://...).",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="input files, dirs or globs"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="dataset directory to write")
    parser.add_argument(
        "--tokenizer",
        metavar="SPIECE_MODEL",
        help="reuse this SentencePiece model (e.g. Google's ALBERT spiece.model) instead of training one",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        metavar="N",
        help="encoding actors (default: every CPU of the Ray cluster, but at most one per "
        f"{BYTES_PER_DEFAULT_WORKER >> 20} MB of input)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",  # unset: ray.init reads RAY_ADDRESS itself, and errors name that variable
        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray in this process)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def fingerprint(files: list[InputFile], config: Config, tokenizer_sha: str | None) -> str:
    """Identifies the dataset a run produces: inputs, the settings that shape the bytes, the tokenizer."""
    payload = {
        "schema_version": SCHEMA_VERSION,
        "inputs": fingerprint_inputs(files),
        "vocab_size": config.model.vocab_size,
        "data": {"max_seq_length": config.data.max_seq_length, "short_seq_prob": config.data.short_seq_prob},
        "preprocess": dataclasses.asdict(config.preprocess),
        "tokenizer": tokenizer_sha or "trained",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepare_output(output: Path, fp: str) -> dict[str, Any] | None:
    """Checks the output directory. Returns the progress of an interrupted run of the same dataset, an
    empty dict for a fresh start, or None when the same dataset is already complete."""
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output {str(output)!r}: exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    manifest = output / MANIFEST
    if manifest.exists():
        try:
            existing = json.loads(manifest.read_text()).get("fingerprint")
        except (json.JSONDecodeError, AttributeError):
            existing = None
        if existing == fp:
            return None
        raise ValueError(
            f"--output {str(output)!r} already holds a different dataset (its manifest.json has other inputs, "
            "settings or tokenizer); choose another directory or remove it"
        )
    progress_path = output / PROGRESS
    if progress_path.exists():
        try:
            progress = json.loads(progress_path.read_text())
        except json.JSONDecodeError:
            progress = {}
        if progress.get("fingerprint") == fp:
            return progress
    if any(output.iterdir()):
        raise ValueError(
            f"--output {str(output)!r} is not empty and holds no run of this dataset; choose an empty or new directory"
        )
    return {}


def _start_ray(address: str | None) -> bool:
    """Connects to Ray; returns whether this call started it (and so must stop it)."""
    # Ray Data's INFO lines, and a core-worker notice printed once for every actor pool, would bury ours;
    # set these variables to see them.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\..*")
    return True


# One read task keeps this many encoding workers busy: parsing is an order of magnitude faster than
# encoding. Each read task is a process of its own (~250 MB), so more of them than needed would only
# raise memory with the number of input files.
ENCODERS_PER_READER = 4
OBJECT_STORE_BASE = 128 << 20
OBJECT_STORE_PER_WORKER = 64 << 20


BYTES_PER_DEFAULT_WORKER = 32 << 20
"""Without --num-workers, each encoding actor gets at least this much input (file sizes as stored). An
actor's start (a worker process importing ray.data, the SentencePiece model loaded) costs about a second
of CPU, against ~0.11 s per MB of encoding, and on a small corpus a second actor finishes later than one
(docs/benchmarks.md, 15.5 MB: 2 workers 0.74-1.05x the speed of 1)."""


def default_workers(cpus: int, input_bytes: int) -> int:
    """The default number of encoding actors: every CPU, but no more than one per
    :data:`BYTES_PER_DEFAULT_WORKER` of input, and at least one."""
    return max(1, min(cpus, -(-input_bytes // BYTES_PER_DEFAULT_WORKER)))


def _read_dataset(files: list[InputFile], limits: ReadLimits, *, workers: int):
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # determinism: rows leave in input order
    context.enable_progress_bars = False
    context.target_max_block_size = BLOCK_BYTES
    # Blocks in flight in the object store: enough for every worker to have several queued, and a bound
    # that does not grow with the corpus (Ray Data's default is half the object store).
    limits_now = context.execution_options.resource_limits
    context.execution_options.resource_limits = limits_now.copy(
        object_store_memory=OBJECT_STORE_BASE + workers * OBJECT_STORE_PER_WORKER
    )
    items = [
        {
            "file_index": i,
            "uri": f.uri,
            "format": f.format,
            "compression": f.compression or "",
            "size": f.size,
        }
        for i, f in enumerate(files)
    ]
    for item in items:
        item["compression"] = item["compression"] or None
    documents = ray.data.from_items(items, override_num_blocks=len(items))
    readers = max(1, -(-workers // ENCODERS_PER_READER))
    # Reading is I/O and light; it needs no CPU of its own, so the encoders can hold every CPU.
    documents = documents.flat_map(
        read_rows, fn_kwargs={"limits": limits}, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=readers)
    )
    return documents


def train_tokenizer(
    files: list[InputFile], config: Config, output: Path, limits: ReadLimits, *, quiet: bool
) -> Path:
    """Trains SentencePiece on a hash-sampled set of documents of at most ``tokenizer_sample_bytes``."""
    import ray

    pre = config.preprocess
    total = sum(f.size for f in files) or 1
    fraction = min(1.0, pre.tokenizer_sample_bytes / total)
    sentences = (
        _read_dataset(files, limits, workers=int(ray.cluster_resources().get("CPU", 1)))
        .map_batches(prepare_documents, fn_kwargs={"lowercase": pre.lowercase}, batch_format="pyarrow")
        .map_batches(
            sample_sentences, fn_kwargs={"fraction": fraction, "seed": pre.seed}, batch_format="pyarrow"
        )
    )
    with tempfile.TemporaryDirectory(dir=output) as tmp:
        sample = Path(tmp) / "sample.txt"
        written = 0
        bar = tqdm(
            desc="tokenizer sample",
            unit="B",
            unit_scale=True,
            disable=quiet,
            total=min(pre.tokenizer_sample_bytes, total),
        )
        with sample.open("w", encoding="utf-8") as f:
            for batch in sentences.iter_batches(batch_format="pyarrow", batch_size=None):
                for sentence in batch["sentence"].to_pylist():
                    line = sentence.replace("\n", " ") + "\n"
                    f.write(line)
                    written += len(line)
                bar.update(min(written, bar.total) - bar.n)
                if written >= pre.tokenizer_sample_bytes:
                    break
        bar.close()
        if written == 0:
            raise ValueError("the inputs hold no usable text to train a tokenizer on")
        if not quiet:
            print(
                f"training SentencePiece (unigram, vocab {config.model.vocab_size}) on {written / 1e6:.1f} MB",
                file=sys.stderr,
            )
        return tok.train(
            sample,
            output / tok.MODEL_FILENAME,
            vocab_size=config.model.vocab_size,
            seed=pre.seed,
            input_sentence_size=pre.tokenizer_max_sentences,
            num_threads=pre.tokenizer_threads,
        )


def write_shards(
    files: list[InputFile], config: Config, output: Path, limits: ReadLimits, *, num_workers: int, quiet: bool
) -> dict[str, Any]:
    """Runs the encoding graph and streams its instances into train and validation shards."""
    import ray

    pre, data = config.preprocess, config.data
    encoded = _read_dataset(files, limits, workers=num_workers).map_batches(
        DocumentEncoder,
        fn_constructor_kwargs={
            "model_proto": (output / tok.MODEL_FILENAME).read_bytes(),
            "max_seq_length": data.max_seq_length,
            "short_seq_prob": data.short_seq_prob,
            "seed": pre.seed,
            "validation_fraction": pre.validation_fraction,
            "lowercase": pre.lowercase,
        },
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=1,
    )
    writers = {split: ShardWriter(output, split, pre.shard_rows) for split in ("train", "validation")}
    skipped: Counter[str] = Counter()
    documents = 0
    text_bytes = 0
    bar = tqdm(desc="preprocess", unit="B", unit_scale=True, disable=quiet)
    for batch in encoded.iter_batches(batch_format="pyarrow", batch_size=None):
        documents += batch.num_rows
        for reason in batch["skip"].to_pylist():
            if reason:
                skipped[reason] += 1
        train, validation = explode(batch)
        writers["train"].add(train)
        writers["validation"].add(validation)
        added = int(sum(batch["text_bytes"].to_pylist()))
        text_bytes += added
        bar.update(added)
        bar.set_postfix(
            docs=documents,
            instances=sum(w.rows for w in writers.values()),
        )
    bar.close()
    splits = {}
    for split, writer in writers.items():
        shards = writer.close()
        splits[split] = {
            "shards": shards,
            "rows": sum(s["rows"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
        }
    return {
        "splits": splits,
        "documents_read": documents,
        "skipped": dict(sorted(skipped.items())),
        "text_bytes": text_bytes,
    }


def run(args: argparse.Namespace) -> int:
    started = time.time()
    move_overrides(args, "input")
    config = load_config(args.config, args.overrides)
    check_sequence_length(config)
    if args.num_workers is not None and args.num_workers < 1:
        raise ValueError(f"--num-workers={args.num_workers}: must be >= 1")
    pre = config.preprocess
    limits = ReadLimits(pre.text_field, pre.max_line_bytes, pre.max_document_bytes)
    files, skipped_inputs = discover(args.input)
    check_named_files(files, args.input)
    given_tokenizer = Path(args.tokenizer) if args.tokenizer else None
    tokenizer_sha = None
    if given_tokenizer is not None:
        tok.load(given_tokenizer, vocab_size=config.model.vocab_size)
        tokenizer_sha = sha256_file(given_tokenizer)
    check_cluster_address(args.ray_address, "--ray-address")
    output = Path(args.output)
    fp = fingerprint(files, config, tokenizer_sha)
    progress = prepare_output(output, fp)
    if progress is None:
        print(f"{output}: already complete (same inputs, settings and tokenizer)", file=sys.stderr)
        return 0

    model_path = output / tok.MODEL_FILENAME
    started_ray = _start_ray(args.ray_address)
    try:
        import ray

        num_workers = args.num_workers
        if num_workers is None:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            input_bytes = sum(f.size for f in files)
            num_workers = default_workers(cpus, input_bytes)
            if num_workers < cpus and not args.quiet:
                print(
                    f"{num_workers} encoding worker(s) for {input_bytes / 1e6:.1f} MB of input (one per "
                    f"{BYTES_PER_DEFAULT_WORKER >> 20} MB; {cpus} CPUs; --num-workers N to choose)",
                    file=sys.stderr,
                )
        if given_tokenizer is not None:
            if not model_path.exists() or sha256_file(model_path) != tokenizer_sha:
                atomic_write_bytes(model_path, given_tokenizer.read_bytes())
        elif not (model_path.exists() and progress.get("tokenizer_sha256") == sha256_file(model_path)):
            train_tokenizer(files, config, output, limits, quiet=args.quiet)
        tok.load(model_path, vocab_size=config.model.vocab_size)
        spiece_sha = sha256_file(model_path)
        atomic_write_text(output / PROGRESS, json.dumps({"fingerprint": fp, "tokenizer_sha256": spiece_sha}))
        result = write_shards(files, config, output, limits, num_workers=num_workers, quiet=args.quiet)
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    instances = sum(split["rows"] for split in result["splits"].values())
    if instances == 0:
        raise ValueError(f"no instance was written: every document was skipped ({result['skipped']})")
    skipped_docs = sum(result["skipped"].values())
    manifest = {
        "format": "albert-scale/sop-shards",
        "schema_version": SCHEMA_VERSION,
        "schema": {field.name: str(field.type) for field in SHARD_SCHEMA},
        "fingerprint": fp,
        "tokenizer": {
            "file": tok.MODEL_FILENAME,
            "sha256": spiece_sha,
            "vocab_size": config.model.vocab_size,
            "source": "given" if given_tokenizer else "trained",
        },
        "seed": pre.seed,
        "config": {
            "model": {"vocab_size": config.model.vocab_size},
            "data": dataclasses.asdict(config.data),
            "preprocess": dataclasses.asdict(pre),
        },
        "inputs": fingerprint_inputs(files),
        "counts": {
            "input_files": len(files),
            "documents_read": result["documents_read"],
            "documents_skipped": skipped_docs,
            "instances_written": instances,
            "text_bytes": result["text_bytes"],
            "skipped_reasons": result["skipped"],
            "inputs_skipped": [{"uri": uri, "reason": reason} for uri, reason in skipped_inputs],
        },
        "splits": result["splits"],
    }
    atomic_write_text(output / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (output / PROGRESS).unlink(missing_ok=True)

    elapsed = time.time() - started
    print(
        f"{output}: {instances:,} instances ({result['splits']['train']['rows']:,} train, "
        f"{result['splits']['validation']['rows']:,} validation) from {result['documents_read']:,} documents "
        f"in {elapsed:.0f} s; {skipped_docs:,} documents and {len(skipped_inputs)} files skipped",
        file=sys.stderr,
    )
    for reason, count in result["skipped"].items():
        print(f"  skipped {count:,} x {reason}", file=sys.stderr)
    for uri, reason in skipped_inputs:
        print(f"  skipped file {uri}: {reason}", file=sys.stderr)
    return 0


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
