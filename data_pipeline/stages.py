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
from data_pipeline.text import normalize_many, split_sentences

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


def split_and_normalize(
    texts: list[str], skips: list[str], *, lowercase: bool
) -> tuple[list[list[str]], list[str], list[int]]:
    """Each document's normalized sentences, its skip reason (an empty document gets one) and the
    hash of its normalized text."""
    split = [split_sentences(text or "") for text in texts]
    flat = normalize_many([s for sentences in split for s in sentences], lowercase=lowercase)
    sentences: list[list[str]] = []
    hashes: list[int] = []
    reasons = list(skips)
    start = 0
    for i, raw in enumerate(split):
        normalized = [s for s in flat[start : start + len(raw)] if s]
        start += len(raw)
        if not reasons[i] and not normalized:
            reasons[i] = "empty document"
        sentences.append([] if reasons[i] else normalized)
        hashes.append(text_hash("\n".join(normalized)))
    return sentences, reasons, hashes


def prepare_documents(batch: pa.Table, *, lowercase: bool) -> pa.Table:
    """Read rows -> rows with each document's normalized sentences (for the tokenizer sample)."""
    sentences, skips, _ = split_and_normalize(
        batch["text"].to_pylist(), batch["skip"].to_pylist(), lowercase=lowercase
    )
    return pa.table(
        {
            "document": batch["document"],
            "skip": pa.array(skips, pa.string()),
            "sentences": pa.array(sentences, pa.list_(pa.string())),
        }
    )


def _list_array(values: list[list[Any]], child: pa.Array) -> pa.Array:
    lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), child)


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
        """Read rows (document, text, skip) -> one row per document of ``ENCODED_SCHEMA``."""
        documents = batch["document"].to_pylist()
        sentence_lists, skips, hashes = split_and_normalize(
            batch["text"].to_pylist(), batch["skip"].to_pylist(), lowercase=self.lowercase
        )
        flat = [s for sentences in sentence_lists for s in sentences]
        encoded = self.processor.encode(flat, num_threads=1) if flat else []  # one core per actor
        per_document: list[list[tuple[list[int], int, int]]] = []
        start = 0
        for i, (key, sentences) in enumerate(zip(documents, sentence_lists, strict=True)):
            ids = encoded[start : start + len(sentences)]
            start += len(sentences)
            instances = []
            if not skips[i]:
                instances = document_instances(
                    ids,
                    max_seq_length=self.max_seq_length,
                    short_seq_prob=self.short_seq_prob,
                    rng=random.Random(document_seed(self.seed, key)),
                )
                if not instances:
                    skips[i] = "too short for a sentence pair"
            per_document.append(instances)
        # Nested lists go to Arrow through flat numpy buffers: much faster than pa.array on lists.
        instances = [x for doc in per_document for x in doc]
        tokens = np.fromiter((t for x in instances for t in x[0]), dtype=np.int32)
        input_ids = _list_array(per_document, _list_array([x[0] for x in instances], pa.array(tokens)))
        a_len = _list_array(
            per_document, pa.array(np.fromiter((x[1] for x in instances), np.int32, len(instances)))
        )
        sop = _list_array(
            per_document, pa.array(np.fromiter((x[2] for x in instances), np.int8, len(instances)))
        )
        validation = [is_validation(h, self.validation_fraction) for h in hashes]
        return pa.Table.from_arrays(
            [
                batch["document"],
                pa.array(skips, pa.string()),
                pa.array(validation, pa.bool_()),
                input_ids,
                a_len,
                sop,
                pc.binary_length(batch["text"].cast(pa.binary())).cast(pa.int64()),
            ],
            schema=ENCODED_SCHEMA,
        )


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
