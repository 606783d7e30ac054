"""Sentence-order-prediction instances and the shard schema: pure functions, testable without Ray.

An instance is ``[CLS] A [SEP] B [SEP]`` built inside one document (create_pretraining_data semantics):
sentences are packed up to a target length of ``max_seq_length - 3`` (a shorter random target with
probability ``short_seq_prob``), split at a random sentence boundary into A and B, and with probability
0.5 A and B are swapped (label 1). Pairs never cross documents: where a chunk holds one sentence, that
sentence is split at a random token instead of borrowing B from another document. Masking happens later,
at load time, so the shards hold unmasked tokens.

Every random draw of a document comes from its own generator, seeded by (seed, document key), so the
instances of a document do not depend on how documents are distributed over workers or blocks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.tokenizer import CLS_ID, SEP_ID

SCHEMA_VERSION = 1

# The shard schema: the contract between preprocessing and the trainer's loader.
SHARD_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # [CLS] A [SEP] B [SEP]
        pa.field("segment_a_length", pa.int32(), nullable=False),  # tokens of A, without specials
        pa.field("sop_label", pa.int8(), nullable=False),  # 1 = A and B swapped
        pa.field("document", pa.int64(), nullable=False),  # key of the source document
    ],
    metadata={"albert_scale.schema_version": str(SCHEMA_VERSION)},
)

# Rows between the stages of the pipeline: one per document (or per skipped input).
DOCUMENT_KEY_BITS = 36  # documents per input file: up to 2**36; input files: up to 2**27


def document_key(file_index: int, doc_index: int) -> int:
    """A stable int64 key from the input file's index (in sorted input order) and the document's index."""
    return (file_index << DOCUMENT_KEY_BITS) | doc_index


def stable_hash(*parts: int) -> int:
    """A 64-bit hash of integers, the same on every machine and Python (unlike ``hash``)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def document_seed(seed: int, key: int) -> int:
    return stable_hash(seed, key)


def is_validation(text_hash: int, fraction: float) -> bool:
    """Held out by content hash, so a duplicated document never lands in both splits."""
    return (text_hash & 0xFFFFFFFF) < fraction * 2**32


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """Trims the longer segment, from the front or the back at random, until the pair fits."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def document_instances(
    sentences: Sequence[Sequence[int]],
    *,
    max_seq_length: int,
    short_seq_prob: float,
    rng: random.Random,
) -> list[tuple[list[int], int, int]]:
    """The SOP instances of one document: (input_ids, segment A length, sop label) each."""
    max_tokens = max_seq_length - 3
    target = max_tokens  # drawn once per document, as the original does
    if rng.random() < short_seq_prob:
        target = rng.randint(2, max_tokens)
    instances: list[tuple[list[int], int, int]] = []
    chunk: list[Sequence[int]] = []
    length = 0
    for i, sentence in enumerate(sentences):
        if not sentence:
            continue
        chunk.append(sentence)
        length += len(sentence)
        if i < len(sentences) - 1 and length < target:
            continue
        if len(chunk) >= 2:
            a_end = rng.randint(1, len(chunk) - 1)
            a = [t for s in chunk[:a_end] for t in s]
            b = [t for s in chunk[a_end:] for t in s]
        else:
            tokens = list(chunk[0])
            if len(tokens) < 2:
                a, b = [], []
            else:
                cut = rng.randint(1, len(tokens) - 1)
                a, b = tokens[:cut], tokens[cut:]
        if a and b:
            swapped = rng.random() < 0.5
            if swapped:
                a, b = b, a
            truncate_pair(a, b, max_tokens, rng)
            instances.append(([CLS_ID, *a, SEP_ID, *b, SEP_ID], len(a), int(swapped)))
        chunk, length = [], 0
    return instances


def instances_table(rows: list[tuple[list[int], int, int, int]]) -> pa.Table:
    """(input_ids, segment A length, sop label, document key) rows as a table of ``SHARD_SCHEMA``."""
    if not rows:
        return SHARD_SCHEMA.empty_table()
    ids, a_len, sop, doc = zip(*rows, strict=True)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    return pa.Table.from_arrays(
        [
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            pa.array(a_len, pa.int32()),
            pa.array(sop, pa.int8()),
            pa.array(doc, pa.int64()),
        ],
        schema=SHARD_SCHEMA,
    )


def count_tokens(table: pa.Table) -> int:
    return int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
