"""The pipeline's per-batch transforms: ``pyarrow.Table -> pyarrow.Table``, testable without Ray.

Rows flow one per document: ``read_rows`` gives (document, text, skip); ``prepare_documents`` splits
and normalizes sentences; ``DocumentEncoder`` (one per actor, so the SentencePiece model loads once)
prepares, encodes and builds each document's SOP instances. A document that cannot be used keeps its row with a
``skip`` reason, so the driver counts it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import tokenizer as tok
from data_pipeline.instances import (
    SHARD_SCHEMA,
    Span,
    document_key,
    document_seed,
    document_spans,
    is_validation,
    list_array,
    text_hash,
)
from data_pipeline.readers import InputFile, ReadLimits, read_documents
from data_pipeline.text import normalize_many, split_sentences
from data_pipeline.tokenizer import CLS_ID, SEP_ID

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
        lengths = [len(ids) for ids in encoded]
        tokens = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, count=sum(lengths))
        spans: list[Span] = []  # over the batch's tokens end to end
        per_document = np.zeros(len(documents), np.int32)
        sentence = offset = 0
        for i, key in enumerate(documents):
            document_lengths = lengths[sentence : sentence + len(sentence_lists[i])]
            sentence += len(document_lengths)
            if not skips[i]:
                found = document_spans(
                    document_lengths,
                    max_seq_length=self.max_seq_length,
                    short_seq_prob=self.short_seq_prob,
                    rng=random.Random(document_seed(self.seed, key)),
                )
                if not found:
                    skips[i] = "too short for a sentence pair"
                spans += [
                    (a0 + offset, a1 + offset, b0 + offset, b1 + offset, sop) for a0, a1, b0, b1, sop in found
                ]
                per_document[i] = len(found)
            offset += sum(document_lengths)
        input_ids, a_lengths, sop = _gather_instances(tokens, spans)
        validation = [is_validation(h, self.validation_fraction) for h in hashes]
        return pa.Table.from_arrays(
            [
                batch["document"],
                pa.array(skips, pa.string()),
                pa.array(validation, pa.bool_()),
                list_array(per_document, input_ids),
                list_array(per_document, pa.array(a_lengths)),
                list_array(per_document, pa.array(sop)),
                pc.binary_length(batch["text"].cast(pa.binary())).cast(pa.int64()),
            ],
            schema=ENCODED_SCHEMA,
        )


def _gather_instances(tokens: np.ndarray, spans: list[Span]) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` for every span over ``tokens``, in one gather: (input_ids as a list
    array, A lengths, sop labels)."""
    table = np.concatenate([tokens, np.array([CLS_ID, SEP_ID], np.int32)])
    cls, sep = len(table) - 2, len(table) - 1
    s = np.array(spans, dtype=np.int64).reshape(-1, 5)
    a_len, b_len = s[:, 1] - s[:, 0], s[:, 3] - s[:, 2]
    ones = np.ones(len(s), np.int64)
    # Five pieces per instance: [CLS], A, [SEP], B, [SEP] as (first index into the table, length).
    starts = np.stack([cls * ones, s[:, 0], sep * ones, s[:, 2], sep * ones], axis=1).ravel()
    sizes = np.stack([ones, a_len, ones, b_len, ones], axis=1).ravel()
    within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    ids = table[np.repeat(starts, sizes) + within]
    input_ids = list_array(a_len + b_len + 3, pa.array(ids))
    return input_ids, a_len.astype(np.int32), s[:, 4].astype(np.int8)


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
