"""Benchmark: the loader's dynamic masking against a per-example Python masker (BENCHMARKS.md row 2).

Usage:
    python bench/loader.py [--batches 20] [--repeats 7] [--stat-epochs 1] [--tokenizer SPIECE]
                           [--output bench/results/loader.json]

Input: real text, the built-in ``news`` and ``wiki`` corpora (fetched and cached like
``albert-scale corpus fetch``), normalized and split into sentences as preprocessing does, encoded with
a SentencePiece unigram model of 30000 pieces (trained here on the same text with seed 1 unless
``--tokenizer`` gives one), and turned into SOP instances ``[CLS] A [SEP] B [SEP]`` with
create_pretraining_data semantics (``data_pipeline.instances.document_instances``, short_seq_prob 0.1).
The instances are shuffled with a fixed seed and cut into batches of 64, padded with 0 to 512.

Rows (one function per row, see ROWS; each masks the same batches):

- ``python-masker``: ``reference_mask`` below, example by example: a straightforward Python version of
  ALBERT's create_masked_lm_predictions with n-grams (candidate words, num_to_predict, n-grams with
  P(n) ~ 1/n, shorter n-grams when a longer one does not fit, 80/10/10 replacement) with the
  original's bugs fixed and our sampling rules, so that both rows have the same semantics. It fills the
  same padded arrays as ours.
- ``mask_batch``: ``albert_scale.masking.mask_batch`` on the whole padded batch.

Speed: each row masks all batches once per repetition; rows take turns within a repetition (the first
one rotates) so machine noise hits them alike. Times are medians over repetitions of wall time and of
this process's CPU time (one thread: CPU seconds are seconds of one core). tokens/s per core counts the
non-pad tokens (what the text holds); positions/s counts batch x 512 (what the trainer consumes). The
ratio is ours / the Python masker.

Statistics of our masks (and the Python masker's on the timed batches): the realized n-gram length
frequencies, the masked fraction of the non-pad tokens, the share of rows that reach num_to_predict,
and the replacement split, at seq 512 (max_predictions 77) and seq 128 (max_predictions 20).

Results are printed as a table and written to bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from albert_scale.masking import (
    FIRST_REGULAR_ID,
    IGNORE_INDEX,
    MASK_ID,
    PAD_ID,
    MaskedBatch,
    example_seeds,
    mask_batch,
    ngram_probabilities,
    word_starts,
)

REPO = Path(__file__).resolve().parent.parent
BATCH_SIZE = 64
SETTINGS = {512: 77, 128: 20}  # sequence length -> max_predictions (15% of 512 is 77)
VOCAB_SIZE = 30000
SEED = 12345
PROBES = 20  # random start probes per span before an exact scan


def reference_mask(
    tokens: Sequence[int],
    *,
    rng: random.Random,
    word_start: np.ndarray,
    vocab_size: int,
    masked_lm_prob: float = 0.15,
    max_predictions: int,
    max_ngram: int = 3,
) -> tuple[list[int], list[int], list[int], list[int], int]:
    """Masks one example (no padding): (output tokens, masked positions ascending, labels, span ids,
    num_to_predict). The semantics of ``albert_scale.masking`` in plain Python, one example at a time.

    Fixed against the original create_masked_lm_predictions: a word never spans [SEP] (nor an n-gram);
    the overlap check really checks; n is drawn from ``rng``, per span, and kept until the span is
    placed (a fresh n per candidate start favours short n-grams, since long ones collide more); a
    start is uniform among the n-grams that fit, preferring remainders of 0 or >= max_ngram (otherwise
    the end of the budget is filled with 1-grams); the count is exactly num_to_predict unless no
    unmasked word fits the remainder.
    """
    # Whole words, as [first, end) token ranges. Special tokens (ids < 5) are never candidates.
    cand_indexes: list[list[int]] = []
    for i, token in enumerate(tokens):
        if token < FIRST_REGULAR_ID:
            continue
        if cand_indexes and cand_indexes[-1][1] == i and not word_start[token]:
            cand_indexes[-1][1] = i + 1
        else:
            cand_indexes.append([i, i + 1])
    num_words = len(cand_indexes)
    run = [1] * num_words  # contiguous words from each word on (an n-gram never crosses [SEP])
    for k in range(num_words - 2, -1, -1):
        if cand_indexes[k][1] == cand_indexes[k + 1][0]:
            run[k] = min(max_ngram, run[k + 1] + 1)

    num_tokens = sum(1 for token in tokens if token != PAD_ID)
    num_to_predict = 0
    if masked_lm_prob > 0:
        num_to_predict = min(max_predictions, max(1, round(num_tokens * masked_lm_prob)))
    ngrams = list(range(1, max_ngram + 1))
    pvals = list(ngram_probabilities(max_ngram))

    covered = [False] * num_words
    remaining = num_to_predict

    def span_tokens(k: int, n: int) -> int:
        return cand_indexes[k + n - 1][1] - cand_indexes[k][0]

    def fits(k: int, n: int) -> bool:
        return run[k] >= n and not any(covered[k : k + n]) and span_tokens(k, n) <= remaining

    def preferred(k: int, n: int) -> bool:
        if not fits(k, n):
            return False
        rest = remaining - span_tokens(k, n)
        return rest == 0 or rest >= max_ngram

    spans: list[tuple[int, int]] = []
    while remaining > 0 and num_words:
        n = rng.choices(ngrams, weights=pvals)[0]
        choice = None
        for size in range(n, 0, -1):  # "try shorter n-grams", only when n fits nowhere
            # Random probes, then an exact scan: either way uniform among the preferred starts.
            for _ in range(PROBES):
                k = rng.randrange(num_words)
                if preferred(k, size):
                    choice = (k, size)
                    break
            if choice is None:
                pool = [k for k in range(num_words) if preferred(k, size)]
                pool = pool or [k for k in range(num_words) if fits(k, size)]
                if pool:
                    choice = (rng.choice(pool), size)
            if choice is not None:
                break
        if choice is None:
            break
        k, size = choice
        for i in range(k, k + size):
            covered[i] = True
        spans.append((cand_indexes[k][0], cand_indexes[k + size - 1][1]))
        remaining -= span_tokens(k, size)

    output_tokens = list(tokens)
    positions: list[int] = []
    labels: list[int] = []
    span_ids: list[int] = []
    for span_id, (first, end) in enumerate(sorted(spans)):
        for index in range(first, end):
            if rng.random() < 0.8:  # 80% of the time, replace with [MASK]
                output_tokens[index] = MASK_ID
            elif rng.random() < 0.5:  # 10% of the time, keep the original
                pass
            else:  # 10% of the time, replace with a random regular token
                output_tokens[index] = rng.randint(FIRST_REGULAR_ID, vocab_size - 1)
            positions.append(index)
            labels.append(tokens[index])
            span_ids.append(span_id)
    return output_tokens, positions, labels, span_ids, num_to_predict


def mask_batch_reference(
    input_ids: np.ndarray,
    *,
    seeds: np.ndarray,
    word_start: np.ndarray,
    vocab_size: int,
    masked_lm_prob: float = 0.15,
    max_predictions: int,
    max_ngram: int = 3,
) -> MaskedBatch:
    """``reference_mask`` on each row of a padded batch, keyed by the row's seed; the same output
    format as ``mask_batch`` (the random numbers differ, the distribution is the same)."""
    B = input_ids.shape[0]
    out = input_ids.astype(np.int32, copy=True)
    positions = np.zeros((B, max_predictions), dtype=np.int32)
    labels = np.full((B, max_predictions), IGNORE_INDEX, dtype=np.int32)
    span_ids = np.full((B, max_predictions), -1, dtype=np.int32)
    budget = np.zeros(B, dtype=np.int32)
    lengths = np.count_nonzero(input_ids != PAD_ID, axis=1)
    for b in range(B):
        tokens = input_ids[b, : lengths[b]].tolist()
        masked, pos, lab, ids, budget[b] = reference_mask(
            tokens,
            rng=random.Random(int(seeds[b])),
            word_start=word_start,
            vocab_size=vocab_size,
            masked_lm_prob=masked_lm_prob,
            max_predictions=max_predictions,
            max_ngram=max_ngram,
        )
        out[b, : lengths[b]] = masked
        positions[b, : len(pos)] = pos
        labels[b, : len(lab)] = lab
        span_ids[b, : len(ids)] = ids
    return MaskedBatch(
        input_ids=out,
        masked_positions=positions,
        masked_labels=labels,
        masked_span_ids=span_ids,
        num_to_predict=budget,
    )


def span_statistics(
    batch: MaskedBatch, *, input_ids: np.ndarray, word_start: np.ndarray, max_ngram: int = 3
) -> dict[str, Any]:
    """Counts over one masked batch: spans by n-gram length (words per span), masked tokens, budget,
    rows that reached their budget, real tokens, and how the masked tokens were replaced."""
    used = batch.masked_labels != IGNORE_INDEX
    rows = np.nonzero(used)[0]
    labels = batch.masked_labels[used]
    span = batch.masked_span_ids[used]
    replaced = batch.input_ids[rows, batch.masked_positions[used]]
    first = np.ones(len(rows), dtype=bool)  # the first token of each span
    first[1:] = (rows[1:] != rows[:-1]) | (span[1:] != span[:-1])
    span_index = np.cumsum(first) - 1
    # A span's words: its first token, plus every later token that starts a word.
    words = 1 + np.bincount(span_index, weights=word_start[labels] & ~first, minlength=int(first.sum()))
    ngram_counts = np.bincount(words.astype(np.int64), minlength=max_ngram + 1)[1:]
    is_mask = replaced == MASK_ID
    kept = ~is_mask & (replaced == labels)
    return {
        "ngram_counts": ngram_counts.tolist(),
        "masked": int(used.sum()),
        "budget": int(batch.num_to_predict.sum()),
        "rows": len(batch.num_to_predict),
        "rows_at_budget": int((used.sum(axis=1) == batch.num_to_predict).sum()),
        "real_tokens": int(np.count_nonzero(input_ids != PAD_ID)),
        "replaced_mask": int(is_mask.sum()),
        "replaced_kept": int(kept.sum()),
        "replaced_random": int((~is_mask & ~kept).sum()),
    }


def merge_statistics(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums ``span_statistics`` of several batches and adds the frequencies."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, list):
                total[key] = [a + b for a, b in zip(total.get(key, [0] * len(value)), value, strict=True)]
            else:
                total[key] = total.get(key, 0) + value
    spans = sum(total["ngram_counts"])
    total["ngram_frequencies"] = [round(c / spans, 4) for c in total["ngram_counts"]]
    total["masked_fraction_of_real_tokens"] = round(total["masked"] / total["real_tokens"], 4)
    total["masked_fraction_of_budget"] = round(total["masked"] / total["budget"], 6)
    masked = total["masked"]
    total["replacement_split"] = [
        round(total[k] / masked, 4) for k in ("replaced_mask", "replaced_random", "replaced_kept")
    ]
    return total


# ---------------------------------------------------------------------------------------------------------
# Input


def load_documents(directory: Path) -> list[str]:
    from data_pipeline.corpora import fetch_corpus

    quiet = lambda message: None  # noqa: E731
    files = [
        fetch_corpus(name, output_dir=directory, progress=False, log=quiet).jsonl for name in ("news", "wiki")
    ]
    return [json.loads(line)["text"] for f in files for line in Path(f).open(encoding="utf-8")]


def tokenized_documents(
    texts: list[str], *, tokenizer: Path | None, workdir: Path
) -> tuple[list[list[list[int]]], list[str]]:
    """Sentences of each document as SentencePiece ids, and the model's pieces."""
    from data_pipeline import tokenizer as tok
    from data_pipeline.text import normalize_many, split_sentences

    documents = [normalize_many(split_sentences(text)) for text in texts]
    if tokenizer is None:
        sample = workdir / "sentences.txt"
        with sample.open("w", encoding="utf-8") as f:
            for sentences in documents:
                f.writelines(s + "\n" for s in sentences if s)
        tokenizer = tok.train(sample, workdir / "spiece.model", vocab_size=VOCAB_SIZE, seed=1, num_threads=2)
    processor = tok.load(tokenizer)
    encoded = [processor.encode(sentences) for sentences in documents]
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    return encoded, pieces


def padded_instances(documents: list[list[list[int]]], *, seq_len: int, seed: int) -> np.ndarray:
    """SOP instances of every document at ``seq_len``, shuffled, padded with 0: int32 [N, seq_len]."""
    from data_pipeline.instances import document_instances

    rng = random.Random(seed)
    rows = [
        ids
        for doc in documents
        for ids, _, _ in document_instances(doc, max_seq_length=seq_len, short_seq_prob=0.1, rng=rng)
    ]
    random.Random(seed).shuffle(rows)
    out = np.zeros((len(rows), seq_len), dtype=np.int32)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out


@dataclass
class Workload:
    """The batches every row masks, and what masking needs besides."""

    batches: list[np.ndarray]  # int32 [BATCH_SIZE, seq_len], pad 0
    seeds: list[np.ndarray]  # example_seeds of each batch
    word_start: np.ndarray
    vocab_size: int
    max_predictions: int

    @property
    def real_tokens(self) -> int:
        return sum(int(np.count_nonzero(b)) for b in self.batches)

    @property
    def positions(self) -> int:
        return sum(b.size for b in self.batches)


def workload(
    instances: np.ndarray,
    *,
    batches: int,
    word_start: np.ndarray,
    vocab_size: int,
    max_predictions: int,
    first: int = 0,
    epoch: int = 0,
) -> Workload:
    if len(instances) < (first + batches) * BATCH_SIZE:
        raise SystemExit(f"only {len(instances)} instances: fewer than {batches} batches of {BATCH_SIZE}")
    starts = range(first * BATCH_SIZE, (first + batches) * BATCH_SIZE, BATCH_SIZE)
    return Workload(
        batches=[instances[s : s + BATCH_SIZE] for s in starts],
        seeds=[example_seeds(SEED, epoch, np.arange(s, s + BATCH_SIZE)) for s in starts],
        word_start=word_start,
        vocab_size=vocab_size,
        max_predictions=max_predictions,
    )


# ---------------------------------------------------------------------------------------------------------
# Rows: each masks every batch of the workload once and returns the masked batches.


def row_python_masker(work: Workload) -> list[MaskedBatch]:
    return [
        mask_batch_reference(
            batch,
            seeds=seeds,
            word_start=work.word_start,
            vocab_size=work.vocab_size,
            max_predictions=work.max_predictions,
        )
        for batch, seeds in zip(work.batches, work.seeds, strict=True)
    ]


def row_mask_batch(work: Workload) -> list[MaskedBatch]:
    return [
        mask_batch(
            batch,
            seeds=seeds,
            word_start=work.word_start,
            vocab_size=work.vocab_size,
            max_predictions=work.max_predictions,
        )
        for batch, seeds in zip(work.batches, work.seeds, strict=True)
    ]


# The full loader (memory-mapped shards -> padded SOP batches -> masking -> tensors) gets a row here.
ROWS: dict[str, Callable[[Workload], list[MaskedBatch]]] = {
    "python-masker": row_python_masker,
    "mask_batch": row_mask_batch,
}
PEER, OURS = "python-masker", "mask_batch"


def time_rows(
    work: Workload, *, repeats: int
) -> tuple[dict[str, dict[str, float]], dict[str, list[MaskedBatch]]]:
    """Median wall and CPU seconds per batch of every row; and each row's masked batches (last run)."""
    names = list(ROWS)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[MaskedBatch]] = {}
    for name in names:  # warm-up (imports, caches)
        ROWS[name](
            Workload(work.batches[:1], work.seeds[:1], work.word_start, work.vocab_size, work.max_predictions)
        )
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            outputs[name] = ROWS[name](work)
            wall[name].append((time.perf_counter() - started_wall) / len(work.batches))
            cpu[name].append((time.process_time() - started_cpu) / len(work.batches))
        print(
            f"repeat {repeat + 1}: " + ", ".join(f"{n} {wall[n][-1] * 1e3:.2f} ms/batch" for n in names),
            flush=True,
        )
    medians = {
        name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])} for name in names
    }
    return medians, outputs


def full_loader_row(directory: Path, *, batches: int, repeats: int) -> dict[str, float]:
    """The whole loader on real shards: ``PretrainingLoader.micro_batches`` for ``batches`` steps of one
    micro-batch of 64 (memory-mapped reads, the epoch's shuffle, padding, masking, SOP labels, torch
    tensors). Median over repetitions, each from a fresh cursor."""
    from albert_scale.data import Phase, PretrainingLoader, ShardedDataset

    dataset = ShardedDataset(directory)
    seq_len = dataset.max_seq_length
    phase = Phase(seq_len, max(1, round(0.15 * seq_len)), None)
    walls, cpus, real = [], [], 0
    for _ in range(repeats):
        loader = PretrainingLoader(
            dataset,
            global_batch_size=BATCH_SIZE,
            micro_batch_size=BATCH_SIZE,
            seed=SEED,
            phases=[phase],
            masked_lm_prob=0.15,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        out = [loader.micro_batches()[0] for _ in range(batches)]
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        real = sum(int(b["attention_mask"].sum()) for b in out) / batches
    wall, cpu = statistics.median(walls) / batches, statistics.median(cpus) / batches
    return {
        "seq_len": seq_len,
        "ms_per_batch_wall": wall * 1e3,
        "ms_per_batch_cpu": cpu * 1e3,
        "tokens_per_s_per_core": real / cpu,
        "positions_per_s_per_core": BATCH_SIZE * seq_len / cpu,
        "real_tokens_per_batch": real,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20, help="timed batches of 64 at seq 512")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--stat-batches",
        type=int,
        default=400,
        help="batches per sequence length for our statistics (at most all)",
    )
    parser.add_argument(
        "--stat-epochs", type=int, default=1, help="epochs (fresh masks) of those batches for our statistics"
    )
    parser.add_argument("--tokenizer", type=Path, help="a SentencePiece model to use instead of training one")
    parser.add_argument(
        "--dataset",
        type=Path,
        help="a directory from `albert-scale preprocess`: adds the full-loader row (memory-mapped shards, "
        "shuffle, padding, masking, SOP labels, torch tensors) at the dataset's sequence length",
    )
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "loader.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        texts = load_documents(tmp / "corpora")
        started = time.perf_counter()
        documents, pieces = tokenized_documents(texts, tokenizer=args.tokenizer, workdir=tmp)
        print(
            f"corpus: news + wiki, {len(texts):,} documents; tokenizer ready in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    word_start = word_starts(pieces)
    vocab_size = len(pieces)
    instances = {seq: padded_instances(documents, seq_len=seq, seed=SEED) for seq in SETTINGS}

    timed = workload(
        instances[512],
        batches=args.batches,
        word_start=word_start,
        vocab_size=vocab_size,
        max_predictions=SETTINGS[512],
    )
    medians, outputs = time_rows(timed, repeats=args.repeats)

    stats: dict[str, Any] = {}
    for seq, max_predictions in SETTINGS.items():
        count = min(args.stat_batches, len(instances[seq]) // BATCH_SIZE)
        parts = []
        for epoch in range(args.stat_epochs):
            work = workload(
                instances[seq],
                batches=count,
                word_start=word_start,
                vocab_size=vocab_size,
                max_predictions=max_predictions,
                epoch=epoch,
            )
            parts += [
                span_statistics(m, input_ids=b, word_start=word_start)
                for m, b in zip(row_mask_batch(work), work.batches, strict=True)
            ]
        stats[f"{OURS}_seq{seq}"] = merge_statistics(parts)
    stats[f"{PEER}_seq512_timed_batches"] = merge_statistics(
        [
            span_statistics(m, input_ids=b, word_start=word_start)
            for m, b in zip(outputs[PEER], timed.batches, strict=True)
        ]
    )

    real, positions = timed.real_tokens / len(timed.batches), timed.positions / len(timed.batches)
    rows = {
        name: {
            "ms_per_batch_wall": m["wall"] * 1e3,
            "ms_per_batch_cpu": m["cpu"] * 1e3,
            "tokens_per_s_per_core": real / m["cpu"],
            "positions_per_s_per_core": positions / m["cpu"],
            "tokens_per_s_wall": real / m["wall"],
        }
        for name, m in medians.items()
    }
    ratio_cpu = rows[OURS]["tokens_per_s_per_core"] / rows[PEER]["tokens_per_s_per_core"]
    ratio_wall = rows[OURS]["tokens_per_s_wall"] / rows[PEER]["tokens_per_s_wall"]
    report = {
        "setting": {
            "seq_len": 512,
            "batch_size": BATCH_SIZE,
            "max_predictions": SETTINGS[512],
            "masked_lm_prob": 0.15,
            "max_ngram": 3,
            "vocab_size": vocab_size,
            "timed_batches": len(timed.batches),
            "repeats": args.repeats,
            "real_tokens_per_batch": real,
            "positions_per_batch": positions,
        },
        "rows": rows,
        "ratio_ours_vs_python_per_core": ratio_cpu,
        "ratio_ours_vs_python_wall": ratio_wall,
        "target_tokens_per_s_per_core": 5e6,
        "target_met": rows[OURS]["tokens_per_s_per_core"] >= 5e6,
        "expected_ngram_frequencies": [round(float(p), 4) for p in ngram_probabilities(3)],
        "statistics": stats,
    }

    print()
    print(
        f"seq 512, batch {BATCH_SIZE}, max_predictions {SETTINGS[512]}: {real:.0f} non-pad tokens per batch of {positions:.0f}"
    )
    header = f"{'row':<16}{'ms/batch wall':>15}{'ms/batch CPU':>14}{'M tokens/s/core':>17}{'M positions/s/core':>20}"
    print(header)
    for name, row in rows.items():
        print(
            f"{name:<16}{row['ms_per_batch_wall']:>15.2f}{row['ms_per_batch_cpu']:>14.2f}"
            f"{row['tokens_per_s_per_core'] / 1e6:>17.2f}{row['positions_per_s_per_core'] / 1e6:>20.2f}"
        )
    print()
    print(f"ours / Python masker: {ratio_cpu:.1f}x per core (CPU time), {ratio_wall:.1f}x wall")
    verdict = "met" if report["target_met"] else "MISSED"
    print(
        f"target >= 5 M tokens/s per core: {verdict} ({rows[OURS]['tokens_per_s_per_core'] / 1e6:.2f} M non-pad tokens/s/core)"
    )
    if args.dataset is not None:
        full = full_loader_row(args.dataset, batches=args.batches, repeats=args.repeats)
        report["full_loader"] = full
        print(
            f"{'full-loader':<16}{full['ms_per_batch_wall']:>15.2f}{full['ms_per_batch_cpu']:>14.2f}"
            f"{full['tokens_per_s_per_core'] / 1e6:>17.2f}{full['positions_per_s_per_core'] / 1e6:>20.2f}"
            f"   (seq {full['seq_len']}, {args.dataset})"
        )
    print()
    print(f"n-gram frequencies expected {[float(p) for p in report['expected_ngram_frequencies']]}")
    for name, s in stats.items():
        print(
            f"  {name:<34} n-grams {s['ngram_frequencies']}  masked {s['masked_fraction_of_real_tokens']:.4f} of tokens, "
            f"{s['masked_fraction_of_budget']:.5f} of budget  [MASK]/random/kept {s['replacement_split']}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
