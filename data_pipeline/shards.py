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
    rest), with record batches of ``BATCH_ROWS`` rows counted from each shard's start, so the bytes do not
    depend on how the stream was cut. Each batch is written as soon as its rows are in, so memory holds
    at most one batch and the incoming table, whatever the shard size; a shard is written under a
    temporary name and renamed when complete."""

    def __init__(self, directory: Path, split: str, shard_rows: int):
        self.directory = directory
        self.split = split
        self.shard_rows = shard_rows
        self.pending: list[pa.Table] = []  # fewer rows than the next batch needs
        self.pending_rows = 0
        self.shards: list[dict[str, Any]] = []
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._shard_rows_written = 0
        self._shard_tokens = 0

    @property
    def rows(self) -> int:
        """Rows taken so far, written or not."""
        return sum(shard["rows"] for shard in self.shards) + self._shard_rows_written + self.pending_rows

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= (wanted := min(BATCH_ROWS, self.shard_rows - self._shard_rows_written)):
            merged = pa.concat_tables(self.pending)
            self._write_batch(merged.slice(0, wanted))
            rest = merged.slice(wanted)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> list[dict[str, Any]]:
        if self.pending_rows:
            self._write_batch(pa.concat_tables(self.pending))
            self.pending, self.pending_rows = [], 0
        if self._writer is not None:
            self._finish_shard()
        return self.shards

    def _path(self) -> Path:
        return self.directory / f"{self.split}-{len(self.shards):05d}.arrow"

    def _write_batch(self, table: pa.Table) -> None:
        if self._writer is None:
            self._sink = pa.OSFile(str(self._path()) + TMP_SUFFIX, "wb")
            self._writer = pa.ipc.new_file(self._sink, SHARD_SCHEMA)
        self._writer.write_batch(_canonical_batch(table))
        self._shard_rows_written += table.num_rows
        self._shard_tokens += count_tokens(table)
        if self._shard_rows_written == self.shard_rows:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._writer is not None and self._sink is not None
        self._writer.close()
        self._sink.close()
        path = self._path()
        os.replace(str(path) + TMP_SUFFIX, path)
        self.shards.append(
            {
                "file": path.name,
                "rows": self._shard_rows_written,
                "tokens": self._shard_tokens,
                "sha256": sha256_file(path),
            }
        )
        self._writer = self._sink = None
        self._shard_rows_written = self._shard_tokens = 0


def _canonical_batch(table: pa.Table) -> pa.RecordBatch:
    """The rows of ``table`` in buffers of their own, starting at offset 0. Arrow's IPC writer records a
    sliced array's buffers slightly differently from a fresh one's (the same values), so without this a
    shard's bytes would depend on where the incoming tables were cut."""
    ids = table["input_ids"].combine_chunks()
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy()[offsets[0] : offsets[-1]].copy()
    return pa.RecordBatch.from_arrays(
        [
            pa.ListArray.from_arrays(pa.array(offsets - offsets[0]), pa.array(values)),
            *(pa.array(table[name].to_numpy().copy()) for name in SHARD_SCHEMA.names[1:]),
        ],
        schema=SHARD_SCHEMA,
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
