"""The pipeline's per-batch transforms: ``pyarrow.Table -> pyarrow.Table``, testable without Ray.

Rows flow one per document: ``read_rows`` gives (document, text, skip); ``prepare_documents`` splits
and normalizes sentences; ``DocumentEncoder`` (one per actor, so the SentencePiece model loads once)
prepares, encodes and builds each document's SOP instances. A document that cannot be used keeps its row with a
``skip`` reason, so the driver counts it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import tokenizer as tok
from data_pipeline.instances import (
    SHARD_SCHEMA,
    document_instances,
    document_key,
    document_seed,
    is_validation,
    text_hash,
)
from data_pipeline.readers import InputFile, ReadLimits, read_documents
from data_pipeline.text import normalize, split_sentences

ENCODED_SCHEMA = pa.schema(
    [
        ("document", pa.int64()),
        ("skip", pa.string()),
        ("validation", pa.bool_()),
        ("input_ids", pa.list_(pa.list_(pa.int32()))),
        ("segment_a_length", pa.list_(pa.int32())),
        ("sop_label", pa.list_(pa.int8())),
        ("text_bytes", pa.int64()),
    ]
)


def read_rows(item: dict[str, Any], limits: ReadLimits) -> Iterator[dict[str, Any]]:
    """One input file -> one row per document: {document, text, skip}."""
    source = InputFile(item["uri"], item["format"], item["compression"], item["size"])
    for index, (text, skip) in enumerate(read_documents(source, limits)):
        yield {"document": document_key(item["file_index"], index), "text": text, "skip": skip}


def prepare_documents(batch: pa.Table, *, lowercase: bool) -> pa.Table:
    """Splits each document into sentences and normalizes them as ALBERT does."""
    sentences: list[list[str]] = []
    skips: list[str] = []
    hashes: list[int] = []
    for text, skip in zip(batch["text"].to_pylist(), batch["skip"].to_pylist(), strict=True):
        normalized = [
            s for s in (normalize(x, lowercase=lowercase) for x in split_sentences(text or "")) if s
        ]
        if not skip and not normalized:
            skip = "empty document"
        sentences.append([] if skip else normalized)
        skips.append(skip)
        hashes.append(text_hash("\n".join(normalized)))
    return pa.table(
        {
            "document": batch["document"],
            "skip": pa.array(skips, pa.string()),
            "sentences": pa.array(sentences, pa.list_(pa.string())),
            "text_hash": pa.array(hashes, pa.int64()),
            "text_bytes": pc.binary_length(batch["text"].cast(pa.binary())).cast(pa.int64()),
        }
    )


class DocumentEncoder:
    """Encodes sentences with SentencePiece and builds each document's SOP instances."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        max_seq_length: int,
        short_seq_prob: float,
        seed: int,
        validation_fraction: float,
        lowercase: bool = True,
    ):
        # The model travels as bytes, so an actor on any node of a cluster can load it.
        self.processor = tok.from_proto(model_proto)
        self.max_seq_length = max_seq_length
        self.short_seq_prob = short_seq_prob
        self.seed = seed
        self.validation_fraction = validation_fraction
        self.lowercase = lowercase

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Read rows (document, text, skip) -> encoded rows of ``ENCODED_SCHEMA``."""
        return self.encode(prepare_documents(batch, lowercase=self.lowercase))

    def encode(self, batch: pa.Table) -> pa.Table:
        """Prepared rows (``prepare_documents``) -> encoded rows of ``ENCODED_SCHEMA``."""
        documents = batch["document"].to_pylist()
        skips = batch["skip"].to_pylist()
        sentence_lists = batch["sentences"].to_pylist()
        hashes = batch["text_hash"].to_pylist()
        flat = [s for sentences in sentence_lists for s in sentences]
        encoded = iter(self.processor.encode(flat) if flat else [])
        out: dict[str, list[Any]] = {name: [] for name in ENCODED_SCHEMA.names if name != "text_bytes"}
        for key, skip, sentences, digest in zip(documents, skips, sentence_lists, hashes, strict=True):
            ids = [next(encoded) for _ in sentences]
            instances = []
            if not skip:
                rng = random.Random(document_seed(self.seed, key))
                instances = document_instances(
                    ids, max_seq_length=self.max_seq_length, short_seq_prob=self.short_seq_prob, rng=rng
                )
                if not instances:
                    skip = "too short for a sentence pair"
            out["document"].append(key)
            out["skip"].append(skip)
            out["validation"].append(is_validation(digest, self.validation_fraction))
            out["input_ids"].append([x[0] for x in instances])
            out["segment_a_length"].append([x[1] for x in instances])
            out["sop_label"].append([x[2] for x in instances])
        arrays = [pa.array(out[name], ENCODED_SCHEMA.field(name).type) for name in ENCODED_SCHEMA.names[:-1]]
        return pa.Table.from_arrays([*arrays, batch["text_bytes"]], schema=ENCODED_SCHEMA)


def explode(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Per-document rows -> (train instances, validation instances) in ``SHARD_SCHEMA``."""
    counts = pc.list_value_length(batch["sop_label"]).to_numpy(zero_copy_only=False)
    documents = np.repeat(batch["document"].to_numpy(zero_copy_only=False), counts)
    validation = np.repeat(batch["validation"].to_numpy(zero_copy_only=False), counts)
    table = pa.Table.from_arrays(
        [
            pc.list_flatten(batch["input_ids"]),
            pc.list_flatten(batch["segment_a_length"]),
            pc.list_flatten(batch["sop_label"]),
            pa.array(documents, pa.int64()),
        ],
        schema=SHARD_SCHEMA,
    )
    mask = pa.array(validation, pa.bool_())
    return table.filter(pc.invert(mask)), table.filter(mask)


def sample_sentences(batch: pa.Table, *, fraction: float, seed: int) -> pa.Table:
    """The normalized sentences of the documents that fall in the tokenizer sample (by hash)."""
    keep = [
        not skip and (document_seed(seed, key) & 0xFFFFFFFF) < fraction * 2**32
        for key, skip in zip(batch["document"].to_pylist(), batch["skip"].to_pylist(), strict=True)
    ]
    chosen = batch.filter(pa.array(keep, pa.bool_()))
    return pa.table({"sentence": pc.list_flatten(chosen["sentences"])})
