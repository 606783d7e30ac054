"""Training step of our ALBERT against transformers' ``AlbertForPreTraining`` (BENCHMARKS.md rows 3 and 4).

Usage:
    python bench/model_step.py                          # both settings, ~3.5 min on 2 quiet cores
    python bench/model_step.py --quick                  # smoke run, under a minute
    python bench/model_step.py --settings seq512-bf16 --batch-size 4 --repeats 9
    python bench/model_step.py --peer-attention eager   # transformers with its eager attention
    python bench/model_step.py --last-layer-at-predictions

Both models get the same config (ALBERT-base shape, all dropout 0), the same weights (our state_dict
loaded into theirs with strict=True, checked by equal fp32 losses on the batch), the same batch and the
same optimizer: ``torch.optim.AdamW`` (lr 1e-4, betas 0.9/0.999, eps 1e-6, weight decay 0.01, its default
multi-tensor implementation). A step is forward and loss (under ``torch.autocast("cpu", bf16)`` in the
bf16 setting), backward, ``optimizer.step()`` and ``zero_grad()``. transformers runs with its default
attention (SDPA) and, as its API requires, labels at every position (-100 where nothing is predicted),
so it projects all S positions to the vocabulary; ours gets ``masked_lm_positions`` and computes the MLM
head only there (and its last layer too with ``--last-layer-at-predictions``). "ours+ckpt" is ours with
activation checkpointing.

The batch has the SOP layout ``[CLS] A [SEP] B [SEP]`` with a random split, token_type_ids 0 on
``[CLS] A [SEP]`` and 1 on ``B [SEP]``, a full attention mask (given to both; both drop it as all
ones, transformers after a check, ours on CPU where the check costs no device sync), random ids from
the non-control range, and 15% of the tokens (at most max_predictions: 20 at seq 128, 77 at seq 512)
masked the ALBERT way (80% [MASK], 10% random, 10% unchanged; never [CLS] or [SEP]); unused prediction
slots are position 0 with label -100, as create_pretraining_data pads them.

Speed: tokens/s = batch x seq / step time, from the median of ``--repeats`` timed steps after
``--warmup`` untimed ones. The variants take turns within each repetition, rotating which goes first,
so machine noise hits them alike. Ratios are ours / theirs of the medians; "(best)" is the same ratio
of the fastest steps, a check when other processes share the machine. The share of the cores that
other processes used during the timed steps (from /proc/stat) is printed: results are only as good as
that is low.

Memory: "activation memory per sequence" is the peak of the memory allocated by torch's CPU allocator
during forward + backward, above what was allocated before the forward, per sequence. It is read from
the allocator itself: under ``torch.profiler`` with ``profile_memory=True`` every allocation and free
is recorded with its size, in order; their running sum is the live memory and its maximum the peak.
This counts everything the step allocates (tensors saved for backward, logits, what activation
checkpointing recomputes, activation gradients, temporaries of backward), which a count of saved
tensors would not (it misses what checkpointing recomputes). Parameter gradients are allocated before
the measured step, so they are not counted. To drop per-step costs that do not grow with the batch
(bf16 copies of the weights under autocast, weight-gradient buffers), the figure is the slope between
batch sizes b/2 and b: (peak(b) - peak(b/2)) / (b/2). "held" is the same slope of the memory live
when backward starts (what the forward keeps for backward). Allocations that MKL/oneDNN make outside
torch's allocator (GEMM scratch) are not seen; they do not grow with the batch.

Results are printed as a table and written to bench/results/model_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from torch.profiler import ProfilerActivity, profile, record_function

from albert_scale.model import IGNORE_INDEX, AlbertConfig, AlbertForPreTraining

RESULTS = Path(__file__).resolve().parent / "results" / "model_step.json"
CLS_ID, SEP_ID, MASK_ID, FIRST_PIECE_ID = 2, 3, 4, 5  # ALBERT's SentencePiece control ids
MASKED_LM_PROB = 0.15
BASE = AlbertConfig(
    vocab_size=30000,
    embedding_size=128,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    classifier_dropout_prob=0.0,
)


@dataclass(frozen=True)
class Setting:
    """One benchmarked shape and precision."""

    seq_len: int
    max_predictions: int
    bf16: bool
    batch_size: int
    """Default batch size (sequences per step)."""


SETTINGS = {
    "seq128-fp32": Setting(seq_len=128, max_predictions=20, bf16=False, batch_size=8),
    "seq512-bf16": Setting(seq_len=512, max_predictions=77, bf16=True, batch_size=4),
}
VARIANTS = ("ours", "ours+ckpt", "theirs")


def make_batch(batch_size: int, seq_len: int, max_predictions: int, *, seed: int) -> dict[str, torch.Tensor]:
    """A random SOP batch: ids, segments, mask, masked positions and labels (ours), dense labels (theirs)."""
    g = torch.Generator().manual_seed(seed)
    vocab = BASE.vocab_size
    ids = torch.randint(FIRST_PIECE_ID, vocab, (batch_size, seq_len), generator=g)
    token_type_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    num_predict = min(max_predictions, max(1, round(seq_len * MASKED_LM_PROB)))  # as create_pretraining_data
    positions = torch.zeros(batch_size, max_predictions, dtype=torch.long)
    labels = torch.full((batch_size, max_predictions), IGNORE_INDEX)
    for row in range(batch_size):
        len_a = int(torch.randint(1, seq_len - 3, (1,), generator=g))  # B gets the rest, >= 1 piece
        sep_a = 1 + len_a
        ids[row, 0], ids[row, sep_a], ids[row, -1] = CLS_ID, SEP_ID, SEP_ID
        token_type_ids[row, sep_a + 1 :] = 1
        candidates = torch.cat((torch.arange(1, sep_a), torch.arange(sep_a + 1, seq_len - 1)))
        chosen = candidates[torch.randperm(len(candidates), generator=g)[:num_predict]].sort().values
        positions[row, :num_predict] = chosen
        labels[row, :num_predict] = ids[row, chosen]
        action = torch.rand(num_predict, generator=g)
        random_ids = torch.randint(FIRST_PIECE_ID, vocab, (num_predict,), generator=g)
        ids[row, chosen] = torch.where(
            action < 0.8, MASK_ID, torch.where(action < 0.9, random_ids, ids[row, chosen])
        )
    dense_labels = torch.full((batch_size, seq_len), IGNORE_INDEX)
    dense_labels.scatter_(1, positions[:, :num_predict], labels[:, :num_predict])
    return {
        "input_ids": ids,
        "token_type_ids": token_type_ids,
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "masked_lm_positions": positions,
        "masked_lm_labels": labels,
        "dense_labels": dense_labels,
        "sentence_order_labels": torch.randint(0, 2, (batch_size,), generator=g),
    }


def loss_ours(model: AlbertForPreTraining, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        masked_lm_positions=batch["masked_lm_positions"],
        masked_lm_labels=batch["masked_lm_labels"],
        sentence_order_labels=batch["sentence_order_labels"],
    ).loss


def loss_theirs(model: transformers.AlbertForPreTraining, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
        labels=batch["dense_labels"],
        sentence_order_label=batch["sentence_order_labels"],
    ).loss


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    optimizer: torch.optim.Optimizer


def build_variants(seed: int, *, peer_attention: str, last_layer_at_predictions: bool) -> dict[str, Variant]:
    """Ours, ours with activation checkpointing, and transformers', all with the same weights."""
    torch.manual_seed(seed)
    ours = AlbertForPreTraining(BASE, last_layer_at_predictions=last_layer_at_predictions)
    ours_ckpt = AlbertForPreTraining(
        BASE, activation_checkpointing=True, last_layer_at_predictions=last_layer_at_predictions
    )
    ours_ckpt.load_state_dict(ours.state_dict(), strict=True)
    theirs = transformers.AlbertForPreTraining(
        transformers.AlbertConfig(**BASE.to_hf_dict(), attn_implementation=peer_attention)
    )
    theirs.load_state_dict(ours.state_dict(), strict=True)
    variants = {}
    for name, model, loss_fn in (
        ("ours", ours, loss_ours),
        ("ours+ckpt", ours_ckpt, loss_ours),
        ("theirs", theirs, loss_theirs),
    ):
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01
        )
        variants[name] = Variant(name, model, loss_fn, optimizer)
    return variants


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(variant: Variant, batch: dict[str, torch.Tensor], bf16: bool) -> float:
    with autocast(bf16):
        loss = variant.loss_fn(variant.model, batch)
    loss.backward()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def check_parity(variants: dict[str, Variant], batch: dict[str, torch.Tensor]) -> float:
    """Same weights and batch give the same fp32 loss (guards the comparison itself)."""
    with torch.no_grad():
        ours = loss_ours(variants["ours"].model, batch)
        theirs = loss_theirs(variants["theirs"].model, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    return ours.item()


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have used so far (Linux /proc/stat), else None."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Timings:
    """Per timed step: wall seconds and the process's system seconds and minor page faults by variant,
    and the share of the machine's cores other processes used meanwhile (the noise)."""

    wall: dict[str, list[float]]
    system: dict[str, list[float]]
    page_faults: dict[str, list[int]]
    others: list[float]


def time_steps(
    variants: dict[str, Variant], batch: dict[str, torch.Tensor], bf16: bool, *, repeats: int, warmup: int
) -> Timings:
    """Times training steps of each variant, interleaved and rotated round by round."""
    names = list(variants)
    timings = Timings({n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}, [])
    cores = os.cpu_count() or 1
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            busy, own = _busy_cpu_seconds(), time.process_time()
            usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            train_step(variants[name], batch, bf16)
            elapsed = time.perf_counter() - start
            usage_after, busy_after = resource.getrusage(resource.RUSAGE_SELF), _busy_cpu_seconds()
            if round_index < warmup:
                continue
            timings.wall[name].append(elapsed)
            timings.system[name].append(usage_after.ru_stime - usage.ru_stime)
            timings.page_faults[name].append(usage_after.ru_minflt - usage.ru_minflt)
            if busy is not None and busy_after is not None:
                other_cpu = busy_after - busy - (time.process_time() - own)
                timings.others.append(min(1.0, max(0.0, other_cpu / (elapsed * cores))))
    return timings


BACKWARD_MARK = "model_step/backward"


def step_memory(variant: Variant, batch: dict[str, torch.Tensor], bf16: bool) -> tuple[int, int]:
    """(peak, held when backward starts) bytes allocated during forward + backward, above the start."""
    model = variant.model
    for p in model.parameters():  # gradients exist before the step: they are not activations
        p.grad = torch.zeros_like(p)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with autocast(bf16):
            loss = variant.loss_fn(model, batch)
        with record_function(BACKWARD_MARK):
            loss.backward()
    del loss
    variant.optimizer.zero_grad(set_to_none=True)

    # Every allocation (+bytes) and free (-bytes) the CPU allocator reported, in order. Frees of memory
    # allocated before profiling started are reported as nothing, so the running sum is the memory
    # allocated by this step that is still live.
    allocations, backward_start = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        elif event.name == BACKWARD_MARK:
            backward_start = event.start_time_ns
    assert backward_start is not None, "the backward marker was not recorded"
    live = peak = held = 0
    for t, size in sorted(allocations):
        live += size
        peak = max(peak, live)
        if t < backward_start:
            held = live
    return peak, held


def measure_memory(
    variant: Variant, setting: Setting, batch_size: int, bf16: bool, *, seed: int
) -> dict[str, float]:
    """Peak and held-after-forward memory per sequence (slope between batch b/2 and b) in MiB."""
    small = max(1, batch_size // 2)
    large = small * 2
    results = {}
    for b in (small, large):
        batch = make_batch(b, setting.seq_len, setting.max_predictions, seed=seed)
        results[b] = step_memory(variant, batch, bf16)
    mib = 2.0**20
    return {
        "peak_mib_per_seq": (results[large][0] - results[small][0]) / (large - small) / mib,
        "held_mib_per_seq": (results[large][1] - results[small][1]) / (large - small) / mib,
        "peak_mib_at_batch": results[large][0] / mib,
        "memory_batches": [small, large],
    }


def run_setting(name: str, setting: Setting, args: argparse.Namespace) -> dict[str, object]:
    batch_size = args.batch_size or setting.batch_size
    precision = "bf16 autocast" if setting.bf16 else "fp32"
    started = time.perf_counter()
    variants = build_variants(
        args.seed,
        peer_attention=args.peer_attention,
        last_layer_at_predictions=args.last_layer_at_predictions,
    )
    batch = make_batch(batch_size, setting.seq_len, setting.max_predictions, seed=args.seed)
    fp32_loss = check_parity(variants, batch)
    print(
        f"\n== {name}: batch {batch_size} x seq {setting.seq_len}, {precision}, "
        f"{int((batch['masked_lm_labels'] != IGNORE_INDEX).sum()) // batch_size} predictions per sequence; "
        f"fp32 losses agree ({fp32_loss:.4f})",
        flush=True,
    )
    timings = time_steps(variants, batch, setting.bf16, repeats=args.repeats, warmup=args.warmup)
    times, others = timings.wall, timings.others
    timed = time.perf_counter()
    memory = {
        v: measure_memory(variants[v], setting, batch_size, setting.bf16, seed=args.seed) for v in VARIANTS
    }
    tokens = batch_size * setting.seq_len
    rows: dict[str, dict[str, object]] = {}
    for v in VARIANTS:
        rows[v] = {
            "tokens_per_s": tokens / statistics.median(times[v]),
            "tokens_per_s_best": tokens / min(times[v]),
            "step_s": times[v],
            "system_s_per_step": statistics.median(timings.system[v]),
            "page_faults_per_step": statistics.median(timings.page_faults[v]),
            **memory[v],
        }
    theirs = rows["theirs"]
    for r in rows.values():
        r["speed_ratio"] = r["tokens_per_s"] / theirs["tokens_per_s"]
        r["speed_ratio_best"] = r["tokens_per_s_best"] / theirs["tokens_per_s_best"]
        r["memory_ratio"] = r["peak_mib_per_seq"] / theirs["peak_mib_per_seq"]
        r["held_memory_ratio"] = r["held_mib_per_seq"] / theirs["held_mib_per_seq"]

    print(
        f"{'variant':<10} {'tokens/s':>9} {'ratio':>6} {'(best)':>7} "
        f"{'peak MiB/seq':>13} {'ratio':>6} {'held MiB/seq':>13} {'ratio':>6}"
    )
    for v, r in rows.items():
        print(
            f"{v:<10} {r['tokens_per_s']:>9.0f} {r['speed_ratio']:>6.2f} {r['speed_ratio_best']:>7.2f} "
            f"{r['peak_mib_per_seq']:>13.1f} {r['memory_ratio']:>6.2f} "
            f"{r['held_mib_per_seq']:>13.1f} {r['held_memory_ratio']:>6.2f}"
        )
    print(
        "kernel time per step (minor page faults): "
        + ", ".join(
            f"{v} {r['system_s_per_step']:.2f} s ({r['page_faults_per_step'] / 1e3:.0f}k)"
            for v, r in rows.items()
        )
    )
    noise = (
        f"other processes used {100 * statistics.median(others):.0f}% (median), "
        f"{100 * max(others):.0f}% (max) of the cores during timed steps; "
        if others
        else ""
    )
    print(
        f"(ratios are ours / theirs; '(best)' compares the fastest steps; {noise}"
        f"timing {timed - started:.0f} s, memory {time.perf_counter() - timed:.0f} s)",
        flush=True,
    )
    return {
        "batch_size": batch_size,
        "seq_len": setting.seq_len,
        "max_predictions": setting.max_predictions,
        "precision": precision,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "peer_attention": args.peer_attention,
        "last_layer_at_predictions": args.last_layer_at_predictions,
        "fp32_loss": fp32_loss,
        "other_processes_cpu_share": others,
        "variants": rows,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time one training step and measure activation memory of our ALBERT against "
        "transformers' AlbertForPreTraining (same config, weights, batch, optimizer and dtype).",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=sorted(SETTINGS),
        default=sorted(SETTINGS),
        help="which settings to run (default: all)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="sequences per step (default: 8 at seq 128, 4 at seq 512)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant (default: 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batch")
    parser.add_argument(
        "--peer-attention",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="transformers' attention implementation (default: sdpa, its default)",
    )
    parser.add_argument(
        "--last-layer-at-predictions",
        action="store_true",
        help="ours runs its last layer only at the masked positions and [CLS] (off by default in the model)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: batch 2, 1 warm-up and 2 timed steps"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON output (default: {RESULTS})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.batch_size, args.repeats, args.warmup = args.batch_size or 2, 2, 1
    if (args.batch_size is not None and args.batch_size < 1) or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--batch-size and --repeats must be >= 1, --warmup >= 0")
    machine = {
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    print(
        f"torch {machine['torch']} ({machine['cpu_capability']}, {machine['cpu_threads']} threads), "
        f"transformers {machine['transformers']}"
    )
    results = {"machine": machine, "command": " ".join(sys.argv), "settings": {}}
    for name in args.settings:
        results["settings"][name] = run_setting(name, SETTINGS[name], args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
