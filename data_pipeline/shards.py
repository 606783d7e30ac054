"""Arrow IPC shards and the manifest: the contract between preprocessing and training.

A dataset directory holds ``spiece.model``, ``train-NNNNN.arrow`` and ``validation-NNNNN.arrow`` (Arrow IPC
files of ``SHARD_SCHEMA``, record batches of ``BATCH_ROWS`` rows, memory-mappable) and ``manifest.json``,
written last. Every file is written under a temporary name and renamed when complete, so a directory
without a manifest is never mistaken for a dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from albert_scale.fileio import sha256_file
from data_pipeline.instances import SCHEMA_VERSION, SHARD_SCHEMA, count_tokens

MANIFEST = "manifest.json"
PROGRESS = ".progress.json"
BATCH_ROWS = 1024
TMP_SUFFIX = ".tmp"
# The sections of a manifest that training reads (besides its fingerprint).
MANIFEST_KEYS = ("tokenizer", "config", "splits")


class ShardWriter:
    """Cuts a stream of instance tables into shards of exactly ``shard_rows`` rows (the last holds the
    rest), each written atomically with fixed record-batch boundaries, so the bytes are deterministic."""

    def __init__(self, directory: Path, split: str, shard_rows: int):
        self.directory = directory
        self.split = split
        self.shard_rows = shard_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.shard_rows:
            merged = pa.concat_tables(self.pending)
            self._write(merged.slice(0, self.shard_rows))
            rest = merged.slice(self.shard_rows)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> list[dict[str, Any]]:
        if self.pending_rows:
            self._write(pa.concat_tables(self.pending))
            self.pending, self.pending_rows = [], 0
        return self.shards

    def _write(self, table: pa.Table) -> None:
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        path = self.directory / name
        tmp = path.with_name(name + TMP_SUFFIX)
        table = table.combine_chunks()
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SHARD_SCHEMA) as writer:
            for batch in table.to_batches(max_chunksize=BATCH_ROWS):
                writer.write_batch(batch)
        os.replace(tmp, path)
        self.shards.append(
            {"file": name, "rows": table.num_rows, "tokens": count_tokens(table), "sha256": sha256_file(path)}
        )


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a dataset directory, checked for presence and schema version."""
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {str(directory)!r}: no {MANIFEST} (not a preprocessed dataset, or preprocessing did not finish)"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "invalid UTF-8"
        raise ValueError(f"dataset {str(directory)!r}: {MANIFEST} is not valid JSON ({reason})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"dataset {str(directory)!r}: {MANIFEST} is not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"dataset {str(directory)!r}: schema_version {version!r}, this albert-scale reads {SCHEMA_VERSION}"
        )
    missing = [key for key in MANIFEST_KEYS if not isinstance(manifest.get(key), dict)]
    if missing or "fingerprint" not in manifest:
        raise ValueError(
            f"dataset {str(directory)!r}: {MANIFEST} has no {(missing or ['fingerprint'])[0]!r} (incomplete, or "
            "not written by albert-scale preprocess)"
        )
    return manifest
