"""One LAMB optimizer step: our ``Lamb`` against a per-tensor Python loop and against memcpy bandwidth.

Usage:
    python bench/lamb.py                               # base and large, 1 thread, ~15 s
    python bench/lamb.py --sizes base --repeats 31 --threads 2
    python bench/lamb.py --profile                     # also print where a step spends its time

Setup, per size (``--sizes``, default ``base,large``): the real parameters of our model,
``AlbertForPreTraining(load_config("albert-<size>").model)`` (ALBERT-base: 32 tensors, 11.8M elements;
ALBERT-large: 32 tensors, 17.8M elements; ALBERT shares its layers, hence so few tensors), fp32, split
into ALBERT's two groups by ``param_groups`` (weight decay and trust ratio, or neither), with fixed
N(0, 1) gradients and the preset's optimizer settings (lr, betas, eps, weight decay).

Variants, each with its own copy of the weights and state (the gradients are shared):

- ``ours``: ``albert_scale.optim.Lamb.step()`` as training runs it on CPU: the compiled loops
  (``torch.compile``, compiled before timing) when the machine has a C++ compiler, the eager chunks
  otherwise (the header line says which).
- ``ours-eager``: the same with ``compile_cpu=False``: torch's eager kernels, chunk by chunk.
- ``python-loop``: ``loop_lamb_step`` below, a plain ``for p in params:`` loop with per-tensor torch ops
  and the same math, op for op (m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; u = m / (sqrt(v) + eps)
  + wd w; r = ||w|| / ||u|| when both are > 0, else 1; w -= lr r u). Before timing, one step of each
  from the same weights and zero state is checked with ``torch.testing.assert_close`` on the weights
  and both moments, so both variants do the same work.
- ``memcpy``: ``dst.copy_(src)`` of ``--copy-mib`` MiB (default 256), the bandwidth reference.

Timing: ``--warmup`` untimed rounds, then ``--repeats`` timed rounds; in each round every variant runs
once (one optimizer step, one copy), the first variant rotating from round to round so machine noise
hits them alike. Figures are medians over rounds; "(best)" is the fastest round. The thread count is
set with ``torch.set_num_threads(--threads)`` (default 1: per-core figures) and applies to all
variants, the copy included.

Bandwidth: a LAMB step must at least read w, g, m and v and write w, m and v: 7 fp32 transfers = 28
bytes per parameter element. The step's bandwidth is 28 x elements / step time; the copy's counts the
bytes read plus the bytes written, 2 x size / copy time. "% of copy" is their ratio. The counts are the
minimum a step needs, not what a given implementation moves (it may make more passes over memory).

Also reported per step: this process's system (kernel) time and minor page faults, which on CPU come
from freshly mapped allocations of the step's temporaries, and the share of the cores that other
processes used during the timed rounds (from /proc/stat): results are only as good as that is low.

Targets: ours >= 3x the Python loop, and ours >= 50% of the copy's bandwidth.

Results are printed as a table and written to bench/results/lamb.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from albert_scale.config import load_config
from albert_scale.model import AlbertForPreTraining
from albert_scale.optim import Lamb, cpu_step_compiles, param_groups

RESULTS = Path(__file__).resolve().parent / "results" / "lamb.json"
SIZES = ("base", "large", "xlarge", "xxlarge")
BYTES_PER_ELEMENT = 7 * 4  # fp32 reads of w, g, m, v and writes of w, m, v
TARGET_RATIO = 3.0
TARGET_COPY_FRACTION = 0.5
OURS, EAGER, LOOP, COPY = "ours", "ours-eager", "python-loop", "memcpy"


@dataclass
class Hyper:
    """The optimizer settings of a preset."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def loop_lamb_step(
    groups: list[dict[str, Any]], state: dict[Tensor, dict[str, Tensor]], hyper: Hyper
) -> None:
    """ALBERT's LAMB as a plain per-tensor loop: the same math as ``Lamb.step``, one tensor at a time."""
    beta1, beta2 = hyper.betas
    with torch.no_grad():
        for group in groups:
            for p in group["params"]:
                grad = p.grad
                moments = state.setdefault(p, {})
                if not moments:
                    moments["exp_avg"] = torch.zeros_like(p)
                    moments["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = moments["exp_avg"], moments["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + hyper.eps)
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if group["trust_ratio"]:
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                    update.mul_(ratio)
                p.add_(update, alpha=-hyper.lr)


@dataclass
class Setup:
    """One size: the parameter groups of each variant (weights copied from one model) and their steps."""

    size: str
    elements: int
    tensors: int
    hyper: Hyper
    groups: dict[str, list[dict[str, Any]]]
    steps: dict[str, Callable[[], None]] = field(default_factory=dict)
    lambs: dict[str, Lamb] = field(default_factory=dict)
    loop_state: dict[Tensor, dict[str, Tensor]] = field(default_factory=dict)


def build(size: str, seed: int) -> Setup:
    """Our model's real fp32 parameters for ``size``, copied once per optimizer variant, with shared
    random gradients; the optimizers are built but have taken no step."""
    config = load_config(f"albert-{size}")
    optim = config.optim
    hyper = Hyper(optim.lr, (optim.beta1, optim.beta2), optim.eps, optim.weight_decay)
    torch.manual_seed(seed)
    model = AlbertForPreTraining(config.model).float()
    template = param_groups(model, hyper.weight_decay)
    generator = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(p.shape, generator=generator) for group in template for p in group["params"]]
    groups: dict[str, list[dict[str, Any]]] = {}
    for variant in (OURS, EAGER, LOOP):
        flat = iter(grads)
        groups[variant] = []
        for group in template:
            params = []
            for p in group["params"]:
                copy = nn.Parameter(p.detach().clone())
                copy.grad = next(flat)
                params.append(copy)
            groups[variant].append({**group, "params": params})
    elements = sum(g.numel() for g in grads)
    del model, template
    setup = Setup(size, elements, len(grads), hyper, groups)
    for variant in (OURS, EAGER):
        lamb = Lamb(
            groups[variant], lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, compile_cpu=variant == OURS
        )
        setup.lambs[variant] = lamb
        setup.steps[variant] = lamb.step
    setup.steps[LOOP] = lambda: loop_lamb_step(setup.groups[LOOP], setup.loop_state, hyper)
    return setup


def check_same_step(setup: Setup) -> None:
    """After one step from the same weights and zero state, every variant holds the loop's weights and
    moments (so the timed comparison is of equal work), and the step changed the weights."""
    loop = [p for group in setup.groups[LOOP] for p in group["params"]]
    before = [p.detach().clone() for p in loop]
    for variant in (OURS, EAGER, LOOP):
        setup.steps[variant]()
    for variant in (OURS, EAGER):
        ours = [p for group in setup.groups[variant] for p in group["params"]]
        for a, b in zip(ours, loop, strict=True):
            torch.testing.assert_close(a.detach(), b.detach())
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(setup.lambs[variant].state[a][key], setup.loop_state[b][key])
    if all(torch.equal(a.detach(), w) for a, w in zip(loop, before, strict=True)):
        raise AssertionError("the checked step did not change the weights")


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have used so far (Linux /proc/stat), else None."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Samples:
    """Per timed round and variant: wall seconds, system seconds, minor page faults; and the share of
    the cores other processes used per round."""

    wall: dict[str, list[float]]
    system: dict[str, list[float]]
    faults: dict[str, list[int]]
    others: list[float]


def time_rounds(runs: dict[str, Callable[[], Any]], *, repeats: int, warmup: int) -> Samples:
    """Runs every variant once per round, rotating the order; records the timed rounds."""
    names = list(runs)
    samples = Samples({n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}, [])
    cores = os.cpu_count() or 1
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        busy, own, round_start = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        for name in names[shift:] + names[:shift]:
            usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            runs[name]()
            elapsed = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            if round_index >= warmup:
                samples.wall[name].append(elapsed)
                samples.system[name].append(after.ru_stime - usage.ru_stime)
                samples.faults[name].append(after.ru_minflt - usage.ru_minflt)
        busy_after, round_time = _busy_cpu_seconds(), time.perf_counter() - round_start
        if round_index >= warmup and busy is not None and busy_after is not None:
            other = busy_after - busy - (time.process_time() - own)
            samples.others.append(min(1.0, max(0.0, other / (round_time * cores))))
    return samples


def profile_step(step: Callable[[], Any], rows: int) -> list[dict[str, Any]]:
    """The ops of one step by self CPU time (torch.profiler), the top ``rows``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
        for e in events[:rows]
        if e.self_cpu_time_total > 0
    ]


def run_size(size: str, copy_src: Tensor, copy_dst: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    setup = build(size, args.seed)
    check_same_step(setup)
    print(
        f"\n== albert-{size}: {setup.tensors} tensors, {setup.elements / 1e6:.2f}M fp32 elements "
        f"({setup.elements * 4 / 2**20:.0f} MiB per array); lr {setup.hyper.lr}, wd {setup.hyper.weight_decay}; "
        "one step of ours, ours-eager and the Python loop agree (assert_close on weights and moments); "
        f"ours {'compiled' if cpu_step_compiles() else 'NOT compiled (no working compiler): eager chunks'}",
        flush=True,
    )
    runs = {name: setup.steps[name] for name in (OURS, EAGER, LOOP)} | {
        COPY: lambda: copy_dst.copy_(copy_src)
    }
    samples = time_rounds(runs, repeats=args.repeats, warmup=args.warmup)

    copy_s = statistics.median(samples.wall[COPY])
    copy_bytes = 2 * copy_src.numel() * copy_src.element_size()
    copy_bandwidth = copy_bytes / copy_s
    step_bytes = BYTES_PER_ELEMENT * setup.elements
    rows: dict[str, dict[str, Any]] = {}
    for name in runs:
        median, best = statistics.median(samples.wall[name]), min(samples.wall[name])
        moved = copy_bytes if name == COPY else step_bytes
        rows[name] = {
            "ms": 1e3 * median,
            "ms_best": 1e3 * best,
            "gb_per_s": moved / median / 1e9,
            "copy_fraction": moved / median / copy_bandwidth,
            "system_ms": 1e3 * statistics.median(samples.system[name]),
            "minor_faults": statistics.median(samples.faults[name]),
            "wall_s": samples.wall[name],
        }
    ratio = rows[LOOP]["ms"] / rows[OURS]["ms"]
    ratio_best = rows[LOOP]["ms_best"] / rows[OURS]["ms_best"]
    fraction = rows[OURS]["copy_fraction"]

    print(
        f"{'variant':<12} {'ms/step':>8} {'(best)':>7} {'GB/s':>6} {'% of copy':>10} "
        f"{'sys ms':>7} {'faults':>7}"
    )
    for name, row in rows.items():
        print(
            f"{name:<12} {row['ms']:>8.2f} {row['ms_best']:>7.2f} {row['gb_per_s']:>6.1f} "
            f"{100 * row['copy_fraction']:>9.0f}% {row['system_ms']:>7.1f} {row['minor_faults']:>7.0f}"
        )
    verdict = {True: "met", False: "MISSED"}
    print(
        f"ours / python-loop: {ratio:.2f}x ({ratio_best:.2f}x best) -> target >= {TARGET_RATIO:g}x "
        f"{verdict[ratio >= TARGET_RATIO]}; ours-eager / python-loop: "
        f"{rows[LOOP]['ms'] / rows[EAGER]['ms']:.2f}x"
    )
    print(
        f"ours at {100 * fraction:.0f}% of memcpy bandwidth ({BYTES_PER_ELEMENT} B/element; copy "
        f"{copy_bandwidth / 1e9:.1f} GB/s of {copy_src.numel() * 4 / 2**20:.0f} MiB) -> target >= "
        f"{100 * TARGET_COPY_FRACTION:.0f}% {verdict[fraction >= TARGET_COPY_FRACTION]}"
    )
    noise = samples.others
    if noise:
        print(
            f"(other processes used {100 * statistics.median(noise):.0f}% (median), {100 * max(noise):.0f}% "
            f"(max) of the cores during timed rounds; {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    result: dict[str, Any] = {
        "tensors": setup.tensors,
        "elements": setup.elements,
        "hyper": {**vars(setup.hyper)},
        "bytes_per_element": BYTES_PER_ELEMENT,
        "copy_bytes_counted": copy_bytes,
        "copy_gb_per_s": copy_bandwidth / 1e9,
        "variants": rows,
        "ratio_ours_vs_loop": ratio,
        "ratio_ours_vs_loop_best": ratio_best,
        "ratio_eager_vs_loop": rows[LOOP]["ms"] / rows[EAGER]["ms"],
        "ours_compiled": cpu_step_compiles(),
        "ours_copy_fraction": fraction,
        "target_ratio_met": ratio >= TARGET_RATIO,
        "target_copy_fraction_met": fraction >= TARGET_COPY_FRACTION,
        "other_processes_cpu_share": noise,
    }
    if args.profile:
        result["profile"] = {}
        for name in (OURS, LOOP):
            top = profile_step(setup.steps[name], args.profile_rows)
            result["profile"][name] = top
            total = sum(e["self_ms"] for e in top)
            print(f"{name}: top ops of one step by self CPU time (sum of these {total:.1f} ms)")
            for e in top:
                print(f"    {e['op']:<32} {e['self_ms']:>8.2f} ms {e['calls']:>5} calls")
    return result


def parse_sizes(text: str) -> list[str]:
    sizes = [s.strip().removeprefix("albert-") for s in text.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if not sizes or unknown:
        raise argparse.ArgumentTypeError(f"sizes must be a comma-separated subset of {','.join(SIZES)}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time one step of our LAMB against a per-tensor Python loop with the same math and "
        "against memcpy bandwidth, on the real parameters of ALBERT-base and -large (fp32).",
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=["base", "large"],
        help=f"comma-separated model sizes, of {','.join(SIZES)} (default: base,large)",
    )
    parser.add_argument("--repeats", type=int, default=31, help="timed rounds (default: 31)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default: 5)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads for every variant (default: 1)"
    )
    parser.add_argument(
        "--copy-mib", type=int, default=256, help="size of the copied tensor in MiB (default: 256)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and gradients")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one step of ours and of the loop"
    )
    parser.add_argument("--profile-rows", type=int, default=10, help="ops shown per profile (default: 10)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON output (default: {RESULTS})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.copy_mib < 1:
        raise SystemExit("--repeats, --threads and --copy-mib must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    machine = {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    print(
        f"torch {machine['torch']} ({machine['cpu_capability']}), {machine['threads']} thread(s) of "
        f"{machine['cpu_count']} cores"
        + (f", GLIBC_TUNABLES={machine['glibc_tunables']}" if machine["glibc_tunables"] else "")
    )
    copy_src = torch.randn(args.copy_mib * 2**20 // 4)
    copy_dst = torch.empty_like(copy_src)
    results: dict[str, Any] = {
        "machine": machine,
        "command": " ".join(sys.argv),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "copy_mib": args.copy_mib,
        "sizes": {},
    }
    for size in args.sizes:
        results["sizes"][size] = run_size(size, copy_src, copy_dst, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
