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


Span = tuple[int, int, int, int, int]
"""An instance as positions in its document's tokens: (A start, A end, B start, B end, sop label)."""


def document_spans(
    sentence_lengths: Sequence[int],
    *,
    max_seq_length: int,
    short_seq_prob: float,
    rng: random.Random,
) -> list[Span]:
    """The SOP instances of one document whose sentences, in order, have the given token counts.

    Spans index the document's tokens laid end to end; A and B are already swapped (label 1) and
    truncated. The random draws are those of create_pretraining_data, in its order: the target length
    once per document; per chunk, the A/B split point, the swap, and one draw per token trimmed."""
    max_tokens = max_seq_length - 3
    target = max_tokens  # drawn once per document, as the original does
    if rng.random() < short_seq_prob:
        target = rng.randint(2, max_tokens)
    spans: list[Span] = []
    chunk: list[int] = []  # starts of the chunk's sentences
    length = 0
    position = 0
    last = len(sentence_lengths) - 1
    for i, n in enumerate(sentence_lengths):
        if not n:
            continue
        chunk.append(position)
        position += n
        length += n
        if i < last and length < target:
            continue
        if len(chunk) >= 2:
            a = (chunk[0], chunk[rng.randint(1, len(chunk) - 1)])
            b = (a[1], position)
        elif length >= 2:
            cut = chunk[0] + rng.randint(1, length - 1)
            a, b = (chunk[0], cut), (cut, position)
        else:
            a = b = (0, 0)
        if a[1] > a[0] and b[1] > b[0]:
            swapped = rng.random() < 0.5
            if swapped:
                a, b = b, a
            (a0, a1), (b0, b1) = a, b
            while (a1 - a0) + (b1 - b0) > max_tokens:  # trim the longer, from the front or the back
                if a1 - a0 > b1 - b0:
                    if rng.random() < 0.5:
                        a0 += 1
                    else:
                        a1 -= 1
                elif rng.random() < 0.5:
                    b0 += 1
                else:
                    b1 -= 1
            spans.append((a0, a1, b0, b1, int(swapped)))
        chunk, length = [], 0
    return spans


def document_instances(
    sentences: Sequence[Sequence[int]],
    *,
    max_seq_length: int,
    short_seq_prob: float,
    rng: random.Random,
) -> list[tuple[list[int], int, int]]:
    """The SOP instances of one document as token lists: (input_ids, segment A length, sop label) each."""
    tokens = [t for sentence in sentences for t in sentence]
    spans = document_spans(
        [len(s) for s in sentences], max_seq_length=max_seq_length, short_seq_prob=short_seq_prob, rng=rng
    )
    return [
        ([CLS_ID, *tokens[a0:a1], SEP_ID, *tokens[b0:b1], SEP_ID], a1 - a0, sop)
        for a0, a1, b0, b1, sop in spans
    ]


def list_array(lengths: np.ndarray, child: pa.Array) -> pa.Array:
    """A list array whose consecutive lists hold ``lengths`` of ``child``'s values."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), child)


def instances_table(rows: list[tuple[list[int], int, int, int]]) -> pa.Table:
    """(input_ids, segment A length, sop label, document key) rows as a table of ``SHARD_SCHEMA``."""
    if not rows:
        return SHARD_SCHEMA.empty_table()
    ids, a_len, sop, doc = zip(*rows, strict=True)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lengths.sum()))
    return pa.Table.from_arrays(
        [
            list_array(lengths, pa.array(flat)),
            pa.array(a_len, pa.int32()),
            pa.array(sop, pa.int8()),
            pa.array(doc, pa.int64()),
        ],
        schema=SHARD_SCHEMA,
    )


def count_tokens(table: pa.Table) -> int:
    return int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
