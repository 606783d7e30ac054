"""Look at what the model will see, before a long run.

Usage:
    albert-scale data sample DIR --num-examples N --output FILE.jsonl [--config CFG] [--split S]
                             [--epoch E] [key=value ...]
    albert-scale data stats DIR [--config CFG] [--num-examples N] [--split S] [key=value ...]
    python -m albert_scale.data_cli ...

``sample`` writes masked examples exactly as the loader builds them for training (same seed, masking and
sequence length): ids, masked positions and labels, token types, the SOP label, and the decoded text
with the masked tokens shown. ``stats`` reports the masked fraction, the n-gram histogram, the
replacement split, the SOP balance and the lengths over many examples.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from albert_scale.cli import add_config_arguments, stage_main
from albert_scale.config import Config, load_config
from albert_scale.data import PretrainingLoader, ShardedDataset, phases
from albert_scale.fileio import atomic_write_text
from albert_scale.masking import IGNORE_INDEX, MASK_ID, ngram_probabilities
from data_pipeline.tokenizer import MODEL_FILENAME, from_proto

STATS_BATCH = 256


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Inspect a preprocessed dataset as training sees it."
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="{sample,stats}")
    for name, summary in (
        ("sample", "write masked examples (ids, positions, labels, decoded text) to a JSONL file"),
        ("stats", "masked fraction, n-gram histogram, replacement split, SOP balance, lengths"),
    ):
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument("directory", metavar="DIR", help="a directory written by albert-scale preprocess")
        add_config_arguments(sub, required=False)
        sub.add_argument("--split", default="train", choices=("train", "validation"))
        sub.add_argument("--epoch", type=int, default=0, help="the epoch whose masks to draw (default 0)")
        if name == "sample":
            sub.add_argument("--num-examples", type=int, default=16, metavar="N")
            sub.add_argument("--output", required=True, metavar="FILE.jsonl")
        else:
            sub.add_argument(
                "--num-examples", type=int, default=10_000, metavar="N", help="examples to measure"
            )
    return parser


def _loader(args: argparse.Namespace) -> tuple[PretrainingLoader, Config]:
    config = load_config(args.config, args.overrides)
    if args.num_examples < 1:
        raise ValueError(f"--num-examples={args.num_examples}: must be >= 1")
    if args.epoch < 0:
        raise ValueError(f"--epoch={args.epoch}: must be >= 0")
    dataset = ShardedDataset(args.directory, split=args.split)
    batch = min(STATS_BATCH, len(dataset))
    loader = PretrainingLoader(
        dataset,
        global_batch_size=batch,
        micro_batch_size=batch,
        seed=config.train.seed,
        phases=phases(config.data),
        masked_lm_prob=config.data.masked_lm_prob,
        static_masking=config.data.masking == "static",
    )
    return loader, config


def _examples(loader: PretrainingLoader, args: argparse.Namespace):
    """(dataset indices, arrays, masked batch) in the epoch's training order, up to --num-examples."""
    order = loader.order(args.epoch)
    phase = loader.phases[-1]
    total = min(args.num_examples, len(loader.dataset))
    epoch = 0 if loader.static_masking else args.epoch
    for start in range(0, total, STATS_BATCH):
        indices = order(np.arange(start, min(total, start + STATS_BATCH)))
        arrays = loader.dataset.collate(indices, phase.seq_len)
        yield indices, arrays, loader.mask(indices, arrays["input_ids"], phase, epoch)


def sample(args: argparse.Namespace) -> int:
    loader, _ = _loader(args)
    processor = from_proto((Path(args.directory) / MODEL_FILENAME).read_bytes())
    lines = []
    for indices, arrays, masked in _examples(loader, args):
        for row, index in enumerate(indices):
            length = int(arrays["attention_mask"][row].sum())
            ids = masked.input_ids[row, :length].tolist()
            original = arrays["input_ids"][row, :length].tolist()
            keep = masked.masked_labels[row] != IGNORE_INDEX
            positions = masked.masked_positions[row][keep].tolist()
            labels = masked.masked_labels[row][keep].tolist()
            lines.append(
                json.dumps(
                    {
                        "index": int(index),
                        "input_ids": ids,
                        "token_type_ids": arrays["token_type_ids"][row, :length].tolist(),
                        "masked_positions": positions,
                        "masked_labels": labels,
                        "sop_label": int(arrays["sentence_order_labels"][row]),
                        "text": " ".join(processor.id_to_piece(i) for i in ids),
                        "original_text": processor.decode(original),
                        "masked": [
                            {
                                "position": p,
                                "label": processor.id_to_piece(lab),
                                "input": processor.id_to_piece(ids[p]),
                            }
                            for p, lab in zip(positions, labels, strict=True)
                        ],
                    },
                    ensure_ascii=False,
                )
            )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} examples to {output}", file=sys.stderr)
    return 0


def stats(args: argparse.Namespace) -> int:
    loader, config = _loader(args)
    tokens = masked_tokens = budget = examples = swapped = 0
    replaced: Counter[str] = Counter()
    spans: Counter[int] = Counter()
    lengths: list[int] = []
    for _, arrays, masked in _examples(loader, args):
        real = arrays["attention_mask"].sum(axis=1)
        keep = masked.masked_labels != IGNORE_INDEX
        rows, slots = np.nonzero(keep)
        positions = masked.masked_positions[rows, slots]
        inputs = masked.input_ids[rows, positions]
        labels = masked.masked_labels[rows, slots]
        replaced["[MASK]"] += int((inputs == MASK_ID).sum())
        replaced["unchanged"] += int((inputs == labels).sum())
        replaced["random"] += int(((inputs != MASK_ID) & (inputs != labels)).sum())
        starts = loader.word_start[labels]
        span_keys = rows.astype(np.int64) * 1_000_000 + masked.masked_span_ids[rows, slots]
        words_per_span = Counter()
        for key, start in zip(span_keys.tolist(), starts.tolist(), strict=True):
            words_per_span[key] += int(start)
        spans.update(max(1, n) for n in words_per_span.values())
        tokens += int(real.sum())
        masked_tokens += int(keep.sum())
        budget += int(masked.num_to_predict.sum())
        examples += len(real)
        swapped += int(arrays["sentence_order_labels"].sum())
        lengths += real.tolist()
    seq_len = loader.phases[-1].seq_len
    total_spans = sum(spans.values()) or 1
    expected = ngram_probabilities(3)
    report = {
        "examples": examples,
        "masked_fraction": masked_tokens / tokens,
        "predictions_per_example": masked_tokens / examples,
        "budget_filled": masked_tokens / max(1, budget),
        "ngram_words": {str(n): spans[n] / total_spans for n in sorted(spans)},
        "ngram_expected": {str(n + 1): float(p) for n, p in enumerate(expected)},
        "replacement": {k: v / max(1, masked_tokens) for k, v in sorted(replaced.items())},
        "sop_swapped": swapped / examples,
        "length_mean": float(np.mean(lengths)),
        "length_p50": float(np.percentile(lengths, 50)),
        "length_p95": float(np.percentile(lengths, 95)),
        "at_max_length": float(np.mean(np.asarray(lengths) >= seq_len)),
        "sequence_length": seq_len,
        "max_predictions": config.data.max_predictions_per_seq,
    }
    print(json.dumps(report, indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    return sample(args) if args.action == "sample" else stats(args)


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
