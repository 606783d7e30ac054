"""Training-loop overhead: the end-to-end step with the real loader against the same step fed pre-built
batches (BENCHMARKS.md row 6).

Usage:
    python bench/train_overhead.py --data DIR                     # ~2.5 min on 2 quiet cores
    python bench/train_overhead.py --data DIR --steps 10 --repeats 3 --warmup 3    # smoke run, ~20 s
    python bench/train_overhead.py --data DIR --threads 1         # steadier when other jobs share the cores
    python bench/train_overhead.py --data DIR train.micro_batch_size=32 train.global_batch_size=64

DIR is a dataset written by ``albert-scale preprocess`` with the config's vocabulary (quickstart: 8000
pieces, seq 128). The benchmark does not build one (that takes ~40 s and starts a local Ray); make one:

    albert-scale corpus fetch news --output CORPORA
    albert-scale preprocess --config quickstart --input CORPORA/news.jsonl --output DIR

Setup, as ``albert_scale.train.train`` does it, in this process (a world of one: DeepSpeed's CPU
accelerator over gloo, started by ``engine.init_distributed`` without a launcher): the config
(``--config``, default quickstart, then ``DEFAULT_OVERRIDES``, then the command line's key=value
overrides), the dataset checked against it (``open_datasets``: vocabulary and sequence length), the
model seeded with ``train.seed``, the DeepSpeed engine with our LAMB and ZeRO (``engine.initialize``),
a ``PretrainingLoader`` with the arguments ``train()`` gives a fresh run, a run directory with its
config files and ``metrics.jsonl``, the MLflow run from ``open_tracker`` (when ``tracking.enabled``, the
default; with ``tracking.uri`` unset it goes to a fresh SQLite store in a temporary directory, not to the
working directory's), and ``Loop`` objects with a silent ``say``. No evaluation set and no checkpoints:
they come every few hundred steps, not every step.

Variants, sharing one engine (the same weights, optimizer state and allocator):

- ``real``: what ``Loop.run`` does every step: ``Loop.train_step(step)``, whose first act is
  ``PretrainingLoader.micro_batches()`` (memory-mapped Arrow shards, stateless shuffle, padding and
  cropping, dynamic n-gram whole-word masking, SOP labels, torch tensors), then ``Window.add`` and, every
  ``train.log_every`` steps, ``Loop.report``, which writes ``metrics.jsonl`` and hands the record to the
  tracker (``MetricsLog.write``). The tracker only queues it; its background thread sends it to MLflow,
  and MLflow's system-metrics sampler runs in another thread (``tracking.system_metrics``).
- ``prebuilt``: ``Loop.train_step(step)`` alone, with a stand-in loader (``PrebuiltLoader``) that hands
  out micro-batches built beforehand, untimed, by a second ``PretrainingLoader`` with the same arguments
  walking the same steps, and ``MetricsLog(None, truncate_after=0)``, no tracker. Both variants train on
  identical tensors, step for step, with the same dropout seeds (``train_step`` seeds them from the step
  number): the same arithmetic, so only the loop's own work differs. The two loaders' cursors are compared
  after every repetition.

Timing: ``--warmup`` untimed steps of each variant, then ``--repeats`` repetitions of ``--steps`` steps
of each. Before a repetition its steps' batches are built, which gives the loader's own time per step,
by itself. Within a repetition the variants run the same data step back to back, alternating which goes
first (A B, B A, A B, ...), so machine noise hits both alike. Each pair gives a ratio real / prebuilt, in
which the real step counts the per-log-interval work (``Window.add`` and ``Loop.report``, timed on their
own) at its mean per step rather than at the step it falls on: a median of pairs is robust to steps that
another process slows down, and the mean keeps the rare report at its true share.

The in-step ratio is the median of those ratios over the quiet pairs, those during which other processes
left our threads their cores in both steps (see ``QUIET``; from /proc/stat), when there are at least
``MIN_QUIET_PAIRS`` of them; else over all pairs (the output says which). The tracker's threads work in
the background, during whichever step is running, the prebuilt ones included; their CPU time (per thread
from /proc/self/task/*/schedstat, over all timed steps) exists only because of the real loop's tracking,
so it is charged to the real step, one CPU second for one second of step time, divided by the median
prebuilt step and added: the result is in-step ratio + that share. That charge is a lower bound: with
torch's threads on every core, the steps during which the background threads ran were slower than the
others by 1.5-1.9x the threads' CPU time on the 2-core machine of docs/benchmarks.md (the JSON output
has per-step times and background CPU to redo that comparison). Also printed: the in-step ratio over
all pairs, the median over repetitions of the ratio of the two variants' total times (everything at its
true share, but exposed to every slow step), median step times, the median paired difference in ms, and
the loader's time per step twice: alone (while the batches are pre-built, back to back) and inside the
real step (its ``micro_batches`` timed there), where it runs with colder caches. ``tracking.enabled=false``
measures the loop without tracking.

With two torch threads on two cores, another process that takes a core stalls every parallel region of
ours (steps 5-10x slower, both variants); ``--threads 1`` is much less affected.

Target: real / prebuilt <= 1.02.

Results are printed as a table and written to bench/results/train_overhead.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from albert_scale import engine as ds
from albert_scale.config import Config, ConfigError, check, load_config
from albert_scale.data import Phase, PretrainingLoader, phases
from albert_scale.model import AlbertForPreTraining
from albert_scale.tracking import Tracker
from albert_scale.train import (
    CONFIG_FILE,
    DEEPSPEED_CONFIG_FILE,
    METRICS_FILE,
    Loop,
    MetricsLog,
    Window,
    make_loader,
    open_datasets,
    open_tracker,
)

RESULTS = Path(__file__).resolve().parent / "results" / "train_overhead.json"
DEFAULT_CONFIG = "quickstart"
DEFAULT_OVERRIDES = ("train.micro_batch_size=8", "train.global_batch_size=16")
"""Two micro-batches of 8 per step (gradient accumulation included) keep a quickstart step near 0.19 s
on 2 cores. Command-line overrides come after these and win."""
TARGET = 1.02
QUIET = 0.10
"""A pair of steps is quiet when, during each, other processes used less than this share of the cores
beyond those our torch threads leave free (with 1 thread on 2 cores: less than 60%)."""
MIN_QUIET_PAIRS = 50
"""The result comes from the quiet pairs when there are at least this many, else from all pairs."""
VARIANTS = ("real", "prebuilt")
MAKE_DATA = (
    "make one with:\n"
    "  albert-scale corpus fetch news --output CORPORA\n"
    "  albert-scale preprocess --config {config} --input CORPORA/news.jsonl --output DIR"
)


class PrebuiltLoader:
    """Stands in for a ``PretrainingLoader`` in ``Loop``: ``micro_batches()`` returns the next step's
    micro-batches from a queue that :meth:`prepare` fills beforehand by running the real ``source``
    loader. What else ``Loop`` reads comes from the source."""

    def __init__(self, source: PretrainingLoader):
        self.source = source
        self.dataset = source.dataset
        self.global_batch_size = source.global_batch_size
        self.micro_batch_size = source.micro_batch_size
        self.accumulation = source.accumulation
        self._queue: collections.deque[list[dict[str, torch.Tensor]]] = collections.deque()

    def prepare(self, steps: int) -> list[float]:
        """Builds the next ``steps`` steps' micro-batches; returns the source loader's seconds per step."""
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            batches = self.source.micro_batches()
            seconds.append(time.perf_counter() - start)
            self._queue.append(batches)
        return seconds

    def micro_batches(self) -> list[dict[str, torch.Tensor]]:
        return self._queue.popleft()

    def phase(self, step: int) -> Phase:
        return self.source.phase(step)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()


class RealStep:
    """``Loop.run``'s work for one step, without evaluation or checkpoints. Also times the loader's
    ``micro_batches()`` inside the step (wrapped on the instance: two clock reads added)."""

    def __init__(self, loop: Loop, config: Config):
        self.loop = loop
        self.config = config
        self.window = Window()
        self.bookkeeping = 0.0
        """Seconds of the last call spent after ``train_step``."""
        self.loading = 0.0
        """Seconds of the last call spent in the loader."""
        loader = loop.loader
        unwrapped = loader.micro_batches

        def micro_batches() -> list[dict[str, torch.Tensor]]:
            start = time.perf_counter()
            batches = unwrapped()
            self.loading = time.perf_counter() - start
            return batches

        loader.micro_batches = micro_batches

    def __call__(self, step: int) -> None:
        sums, norm, lr = self.loop.train_step(step)
        start = time.perf_counter()
        self.window.add(sums, norm, lr, self.loop.loader.phase(step), self.config)
        done = step + 1
        if done % self.config.train.log_every == 0:
            # Writes metrics.jsonl and hands the record to the tracker (MetricsLog.write), as in training.
            self.loop.report(done, self.config.schedule.total_steps, self.window)
            self.window = Window()
        self.bookkeeping = time.perf_counter() - start


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have used so far (Linux /proc/stat), else None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields)
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def background_cpu_seconds() -> float:
    """CPU seconds used so far by this process's Python threads other than the main one (the tracker's
    sender and its system-metrics sampler), from /proc/self/task/*/schedstat (ns); 0 where unavailable.
    torch's compute threads are not Python threads and are not counted."""
    total = 0
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.native_id is None:
            continue
        try:
            total += int(Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def timed_call(fn: Callable[[int], Any], step: int) -> tuple[float, float | None, float]:
    """Runs ``fn(step)``; returns its wall seconds, the share of the machine's cores that other processes
    used meanwhile (None where /proc/stat is not available) and the CPU seconds of our background threads
    meanwhile."""
    busy, own, background = _busy_cpu_seconds(), time.process_time(), background_cpu_seconds()
    start = time.perf_counter()
    fn(step)
    elapsed = time.perf_counter() - start
    background = background_cpu_seconds() - background
    busy_after, own_after = _busy_cpu_seconds(), time.process_time()
    if busy is None or busy_after is None:
        return elapsed, None, background
    other = busy_after - busy - (own_after - own)
    return elapsed, min(1.0, max(0.0, other / (elapsed * (os.cpu_count() or 1)))), background


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Sets up as ``train()`` does (the run directory and a default tracking store in ``scratch``), then
    measures; returns the results."""
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    config = load_config(args.config, overrides)
    if config.tracking.enabled and not config.tracking.uri:
        # Not the working directory's store that train() would default to: a fresh one, thrown away after.
        overrides.append(f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}")
        config = load_config(args.config, overrides)
    process = ds.init_distributed()
    if process.world_size != 1:
        raise SystemExit(f"run this benchmark without a launcher (world size {process.world_size})")
    try:
        dataset, _ = open_datasets(args.data, config)
    except ConfigError as err:
        raise SystemExit(f"{err}\n{MAKE_DATA.format(config=args.config)}") from None
    plan = check(config, world_size=process.world_size)
    phase = phases(config.data)[-1]
    tracking = (
        f"MLflow at {config.tracking.uri}, system metrics {'on' if config.tracking.system_metrics else 'off'}"
        if config.tracking.enabled
        else "off (tracking.enabled=false)"
    )
    setting = {
        "config": args.config,
        "overrides": overrides,
        "data": str(args.data),
        "train_instances": len(dataset),
        "seq_len": phase.seq_len,
        "max_predictions": phase.max_predictions,
        "precision": config.train.precision,
        "zero_stage": config.zero.stage,
        "global_batch_size": plan.global_batch_size,
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "log_every": config.train.log_every,
        "tracking": tracking,
    }
    print(
        f"{args.config} {' '.join(overrides)}: hidden {config.model.hidden_size}, "
        f"{config.model.num_hidden_layers} layers, vocab {config.model.vocab_size}, seq {phase.seq_len}, "
        f"{config.train.precision}, ZeRO-{config.zero.stage}; global batch {plan.global_batch_size} = "
        f"{plan.gradient_accumulation_steps} x {plan.micro_batch_size}; {len(dataset):,} train instances; "
        f"tracking: {tracking}",
        flush=True,
    )

    torch.manual_seed(config.train.seed)
    model = AlbertForPreTraining(config.model, activation_checkpointing=config.train.activation_checkpointing)
    engine = ds.initialize(model, config)
    tracker = Tracker()
    try:
        output = scratch / "run"
        output.mkdir()
        (output / CONFIG_FILE).write_text(config.to_yaml())
        ds_config = ds.deepspeed_config(config, world_size=process.world_size)
        (output / DEEPSPEED_CONFIG_FILE).write_text(json.dumps(ds_config, indent=2) + "\n")
        tracker = open_tracker(config, output, dataset, process, _warn)  # Tracker() when disabled
        real_loader = make_loader(dataset, config, process)
        prebuilt_loader = PrebuiltLoader(make_loader(dataset, config, process))

        # The real loop logs as rank 0 of a training run does (metrics.jsonl and the tracker); the
        # prebuilt one logs nothing (it never reports anyway).
        real_log = MetricsLog(output / METRICS_FILE, truncate_after=0, tracker=tracker)
        real_loop = Loop(config, engine, real_loader, None, process, real_log, lambda message: None)
        prebuilt_log = MetricsLog(None, truncate_after=0)
        prebuilt_loop = Loop(
            config, engine, prebuilt_loader, None, process, prebuilt_log, lambda message: None
        )
        real = RealStep(real_loop, config)
        results = measure(args, real, prebuilt_loop.train_step, real_loader, prebuilt_loader)
        return {"setting": setting, **results}
    finally:
        tracker.close("FINISHED")  # waits for the records still queued; not timed
        engine.destroy()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def measure(
    args: argparse.Namespace,
    real: RealStep,
    prebuilt: Callable[[int], Any],
    real_loader: PretrainingLoader,
    prebuilt_loader: PrebuiltLoader,
) -> dict[str, Any]:
    """Warm-up, then the timed repetitions; see the module docstring."""
    step_s: dict[str, list[float]] = {v: [] for v in VARIANTS}
    others: dict[str, list[float | None]] = {v: [] for v in VARIANTS}
    totals: dict[str, list[float]] = {v: [] for v in VARIANTS}
    background: dict[str, list[float]] = {v: [] for v in VARIANTS}
    bookkeeping: list[float] = []
    in_step_loader_s: list[float] = []
    loader_s: list[float] = []
    step = 0
    started = time.perf_counter()
    for repetition in range(-1, args.repeats):  # -1: the warm-up
        timed = repetition >= 0
        count = args.steps if timed else args.warmup
        built = prebuilt_loader.prepare(count)
        total = dict.fromkeys(VARIANTS, 0.0)
        for i in range(count):
            order = VARIANTS if (repetition + i) % 2 == 0 else VARIANTS[::-1]
            for name in order:
                elapsed, other, threads = timed_call(real if name == "real" else prebuilt, step)
                total[name] += elapsed
                if timed:
                    step_s[name].append(elapsed)
                    others[name].append(other)
                    background[name].append(threads)
                    if name == "real":
                        bookkeeping.append(real.bookkeeping)
                        in_step_loader_s.append(real.loading)
            step += 1
        if real_loader.cursor != prebuilt_loader.source.cursor:
            raise AssertionError("the variants' data cursors differ: they did not train on the same steps")
        if not timed:
            print(
                f"warm-up: {count} steps of each variant, {time.perf_counter() - started:.0f} s", flush=True
            )
            continue
        loader_s += built
        for name in VARIANTS:
            totals[name].append(total[name])
        print(
            f"repetition {repetition + 1}/{args.repeats}: real {1e3 * total['real'] / count:.1f} ms/step, "
            f"prebuilt {1e3 * total['prebuilt'] / count:.1f} ms/step, ratio of totals "
            f"{total['real'] / total['prebuilt']:.4f}",
            flush=True,
        )

    # The per-log-interval work counted at its mean per step (see the docstring).
    mean_bookkeeping = statistics.fmean(bookkeeping)
    paired = [
        (r - b + mean_bookkeeping) / p
        for r, b, p in zip(step_s["real"], bookkeeping, step_s["prebuilt"], strict=True)
    ]
    cores = os.cpu_count() or 1
    quiet_below = QUIET + max(0, cores - torch.get_num_threads()) / cores
    quiet = [
        ratio
        for ratio, a, b in zip(paired, others["real"], others["prebuilt"], strict=True)
        if a is not None and b is not None and max(a, b) < quiet_below
    ]
    basis = quiet if len(quiet) >= MIN_QUIET_PAIRS else paired
    in_step = statistics.median(basis)
    median_step = {v: statistics.median(step_s[v]) for v in VARIANTS}
    # The background threads exist only because of the real loop's tracking; whichever step they ran in,
    # their CPU time is charged to the real step, second for second.
    background_per_step = sum(background["real"] + background["prebuilt"]) / len(paired)
    ratio = in_step + background_per_step / median_step["prebuilt"]
    of_totals = [r / p for r, p in zip(totals["real"], totals["prebuilt"], strict=True)]
    loader = statistics.median(loader_s)
    in_step_loader = statistics.median(in_step_loader_s)
    difference = statistics.median(
        r - b + mean_bookkeeping - p
        for r, b, p in zip(step_s["real"], bookkeeping, step_s["prebuilt"], strict=True)
    )
    noise = [o for v in VARIANTS for o in others[v] if o is not None]
    return {
        "ratio_real_over_prebuilt": ratio,
        "in_step_ratio": in_step,
        "background_cpu_ms_per_step": 1e3 * background_per_step,
        "background_share_of_prebuilt_step": background_per_step / median_step["prebuilt"],
        "ratio_basis": "quiet pairs" if basis is quiet else "all pairs",
        "ratio_quartiles": _quartiles(basis),
        "target": TARGET,
        "target_met": ratio <= TARGET,
        "pairs": len(paired),
        "quiet_pairs": len(quiet),
        "quiet_below_other_share": quiet_below,
        "all_pairs_ratio": statistics.median(paired),
        "all_pairs_ratio_quartiles": _quartiles(paired),
        "quiet_pairs_ratio": statistics.median(quiet) if quiet else None,
        "ratio_of_totals_median": statistics.median(of_totals),
        "ratio_of_totals_per_repetition": of_totals,
        "median_step_ms": {v: 1e3 * s for v, s in median_step.items()},
        "paired_difference_ms_median": 1e3 * difference,
        "loader_ms_per_step": 1e3 * loader,
        "loader_share_of_prebuilt_step": loader / median_step["prebuilt"],
        "loader_in_step_ms_per_step": 1e3 * in_step_loader,
        "bookkeeping_ms_per_step_mean": 1e3 * mean_bookkeeping,
        "other_processes_cpu_share_median": statistics.median(noise) if noise else None,
        "other_processes_cpu_share_max": max(noise) if noise else None,
        "seconds": time.perf_counter() - started,
        "step_seconds": step_s,
        "other_processes_cpu_share": others,
        "background_cpu_seconds": background,
        "bookkeeping_seconds": bookkeeping,
        "loader_seconds": loader_s,
        "loader_in_step_seconds": in_step_loader_s,
    }


def _quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4) if len(values) > 1 else values * 3


def print_report(results: dict[str, Any]) -> None:
    step = results["median_step_ms"]
    print()
    print(f"{'variant':<10} {'ms/step (median)':>17} {'x prebuilt':>11}")
    for name in VARIANTS:
        print(f"{name:<10} {step[name]:>17.1f} {step[name] / step['prebuilt']:>11.4f}")
    low, _, high = results["ratio_quartiles"]
    print(
        f"ratio real / prebuilt: {results['ratio_real_over_prebuilt']:.4f} = in the step "
        f"{results['in_step_ratio']:.4f} (median of paired steps, {results['ratio_basis']}; quartiles "
        f"{low:.4f}-{high:.4f}) + background threads {results['background_share_of_prebuilt_step']:.4f}"
    )
    quiet = results["quiet_pairs_ratio"]
    print(
        f"  in the step over all {results['pairs']} pairs: {results['all_pairs_ratio']:.4f}; over the "
        f"{results['quiet_pairs']} pairs during which other processes used < "
        f"{results['quiet_below_other_share']:.0%} of the cores: "
        + ("n/a" if quiet is None else f"{quiet:.4f}")
    )
    spread = ", ".join(f"{r:.3f}" for r in results["ratio_of_totals_per_repetition"])
    print(f"ratio of total times, median of repetitions: {results['ratio_of_totals_median']:.4f} [{spread}]")
    print(
        f"real - prebuilt in the step: {results['paired_difference_ms_median']:.2f} ms (median of pairs); loader "
        f"{results['loader_ms_per_step']:.2f} ms/step alone ({100 * results['loader_share_of_prebuilt_step']:.2f}% "
        f"of the prebuilt step), {results['loader_in_step_ms_per_step']:.2f} ms/step inside the step; "
        f"Window.add + report {results['bookkeeping_ms_per_step_mean']:.3f} ms/step (mean); background threads "
        f"(tracking) {results['background_cpu_ms_per_step']:.2f} ms CPU per step"
    )
    if results["other_processes_cpu_share_median"] is not None:
        print(
            f"other processes used {100 * results['other_processes_cpu_share_median']:.0f}% (median), "
            f"{100 * results['other_processes_cpu_share_max']:.0f}% (max) of the cores during timed steps; "
            f"{results['seconds']:.0f} s"
        )
    verdict = "met" if results["target_met"] else "MISSED"
    print(f"target real / prebuilt <= {TARGET}: {verdict}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time the training loop's step with the real data loader against the same step\n"
        "fed pre-built batches (BENCHMARKS.md row 6: ratio <= 1.02). See the module docstring.",
        epilog=f"without --data: {MAKE_DATA.format(config=DEFAULT_CONFIG)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", type=Path, metavar="DIR", help="a dataset written by 'albert-scale preprocess' (required)"
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="CFG",
        help=f"preset or YAML file (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"config overrides, applied after the defaults {' '.join(DEFAULT_OVERRIDES)}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help="timed steps of each variant per repetition; a multiple of train.log_every (default: 20)",
    )
    parser.add_argument("--repeats", type=int, default=15, help="repetitions (default: 15)")
    parser.add_argument(
        "--warmup", type=int, default=8, help="untimed steps of each variant first (default: 8)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON output (default: {RESULTS})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data is None:
        raise SystemExit(
            f"--data DIR is required: a dataset written by 'albert-scale preprocess'; "
            f"{MAKE_DATA.format(config=args.config)}"
        )
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--steps and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    machine = {
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"torch {machine['torch']} ({machine['cpu_capability']}, {machine['cpu_threads']} threads)")
    with tempfile.TemporaryDirectory(prefix="train_overhead-") as scratch:
        results = run(args, Path(scratch))
    print_report(results)
    record = {
        "machine": machine,
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        **results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
