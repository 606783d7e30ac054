"""Resolve a run's configuration and print the plan: the config, the batch arithmetic, size and FLOPs.

Usage:
    albert-scale plan --config CFG [key=value ...] [--world-size N] [--format yaml|json]
    python -m albert_scale.plan --config CFG [key=value ...]

Nothing is trained or allocated: use it to check a config and its overrides before a long run, or to
size a cluster (``cluster.num_workers=64``).
"""

from __future__ import annotations

import argparse
import json
import sys

from albert_scale.cli import add_config_arguments, stage_main
from albert_scale.config import BatchPlan, Config, check, load_config
from albert_scale.flops import train_flops_per_sequence
from albert_scale.model import count_parameters
from albert_scale.schedule import rescaling_warning


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Resolve a config (file + key=value overrides), check it, and print it with the batch "
        "arithmetic, the model's parameter count and its training FLOPs. Allocates nothing.",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="data-parallel size to plan for (default: the launcher's WORLD_SIZE, else cluster.num_workers)",
    )
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml", help="output format")
    return parser


def summarize(config: Config, plan: BatchPlan) -> dict[str, object]:
    """The plan as plain values: batch arithmetic, model size, FLOPs and schedule notes."""
    model, train, schedule = config.model, config.train, config.schedule
    per_sequence = train_flops_per_sequence(model, plan.seq_len, config.data.max_predictions_per_seq)
    warning = rescaling_warning(train, schedule, config.optim)
    notes = [warning] if warning else []
    return {
        "data_parallel_size": plan.world_size,
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "global_batch_size": plan.global_batch_size,
        "sequence_length": plan.seq_len,
        "tokens_per_step": plan.tokens_per_step,
        "parameters": count_parameters(model),
        "layers_run": model.layers_run,
        "train_flops_per_sequence": per_sequence,
        "train_flops_per_step": per_sequence * plan.global_batch_size,
        "train_flops_total": per_sequence * plan.global_batch_size * schedule.total_steps,
        "notes": notes,
    }


def _si(value: float, unit: str) -> str:
    for factor, prefix in (
        (1e21, "Z"),
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_summary(s: dict[str, object], config: Config) -> str:
    t = config.train
    rows = [
        ("data-parallel size", f"{s['data_parallel_size']}"),
        ("micro batch per rank", f"{s['micro_batch_size']}"),
        (
            "gradient accumulation",
            f"{s['gradient_accumulation_steps']} = {t.global_batch_size} / "
            f"({t.micro_batch_size} x {s['data_parallel_size']})",
        ),
        ("global batch", f"{s['global_batch_size']} sequences"),
        ("sequence length", f"{s['sequence_length']}"),
        ("tokens per step", f"{s['tokens_per_step']:,}"),
        ("parameters", f"{s['parameters']:,} ({s['layers_run']} layers run, shared)"),
        ("train FLOPs per sequence", _si(float(s["train_flops_per_sequence"]), "FLOP")),  # type: ignore[arg-type]
        ("train FLOPs per step", _si(float(s["train_flops_per_step"]), "FLOP")),  # type: ignore[arg-type]
        (
            "train FLOPs in total",
            f"{_si(float(s['train_flops_total']), 'FLOP')} ({config.schedule.total_steps:,} steps)",  # type: ignore[arg-type]
        ),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["# plan"] + [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"note: {note}" for note in s["notes"]]  # type: ignore[attr-defined]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.world_size is not None and args.world_size < 1:
        raise ValueError(f"--world-size={args.world_size}: must be >= 1")
    plan = check(config, world_size=args.world_size)
    summary = summarize(config, plan)
    if args.format == "json":
        print(json.dumps({"config": config.to_dict(), "plan": summary}, indent=2))
    else:
        print("# resolved config")
        print(config.to_yaml().rstrip())
        print(format_summary(summary, config))
    return 0


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
