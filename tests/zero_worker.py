"""Trains the tiny ALBERT with Lamb under DeepSpeed on CPU ranks (gloo) and saves what test_optim checks.

Usage: deepspeed --num_gpus 2 tests/zero_worker.py --output DIR

Every run starts from the same initial weights and takes the same global batches; rank k trains on the
k-th slice of each. Rank 0 writes DIR/results.pt:
- weights[run]: the fp32 master weights after the run (fp32 runs: ZeRO 0-3 with Lamb; two negative
  controls: ZeRO-2 with the per-tensor reference LAMB, ZeRO-3 with Lamb but no all-reduce of the norms);
- layout[run]: what ``zero_partition_layout`` reads, checked against the weights (every wrapper, fp32
  and bf16);
- losses[run]: the losses of a few bf16 steps (ZeRO 1-3);
- all_reduces[run]: (all-reduces Lamb made per step, optimizer calls per step that need one);
- refused: the error DeepSpeed's bf16 without ZeRO (FP16_UnfusedOptimizer) meets.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from test_optim import (
    GLOBAL_BATCH,
    LR,
    MAX_GRAD_NORM,
    STEPS,
    WEIGHT_DECAY,
    ReferenceLamb,
    make_batches,
    tiny_model,
)

import albert_scale.optim
from albert_scale.engine import init_distributed
from albert_scale.optim import Lamb, param_groups, zero_partition_layout

BF16_STEPS = 3


class CountingDist:
    """``torch.distributed`` as albert_scale.optim sees it, counting its all_reduce calls."""

    def __init__(self) -> None:
        self.all_reduces = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)

    def all_reduce(self, *args: Any, **kwargs: Any) -> Any:
        self.all_reduces += 1
        return dist.all_reduce(*args, **kwargs)


def ds_config(stage: int, *, micro_batch: int, bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Partition every parameter (the tiny ones too) and split the flat fp32 state into several
        # sub-groups, each handed to the optimizer in its own step() call.
        zero.update(stage3_param_persistence_threshold=0, sub_group_size=4000)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "gradient_clipping": MAX_GRAD_NORM,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
        if stage == 1:
            config["data_types"] = {"grad_accum_dtype": "fp32"}  # selects DeepSpeed's BF16_Optimizer
    return config


def run(stage: int, *, bf16: bool, reference: bool, steps: int, unreduced: bool = False) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model()
    groups = param_groups(model, WEIGHT_DECAY)
    params = [p for group in groups for p in group["params"]]  # the optimizer's order
    initial = [p.detach().clone() for p in params]
    optimizer = ReferenceLamb(groups, lr=LR) if reference else Lamb(groups, lr=LR)
    micro = GLOBAL_BATCH // world
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(stage, micro_batch=micro, bf16=bf16)
    )
    if not reference:
        optimizer.attach_zero_partitions(engine.optimizer)
    if unreduced:  # negative control: trust ratios from this rank's fragments alone, no all-reduce
        optimizer._layout.partitioned = False

    result: dict[str, Any] = {"losses": []}
    if engine.optimizer is not optimizer and not (reference or unreduced):
        expected = [w.to(torch.bfloat16).float() if bf16 else w for w in initial]
        result["layout"] = check_layout(engine.optimizer, params, expected)
        result["layout"]["group_keys"] = [
            ("names" if "names" in g else None, g["trust_ratio"]) for g in optimizer.param_groups
        ]

    counter = albert_scale.optim.dist = CountingDist()
    try:
        for batch in make_batches(steps):
            shard = {k: v[rank * micro : (rank + 1) * micro] for k, v in batch.items()}
            loss = engine(**shard).loss
            engine.backward(loss)
            engine.step()
            result["losses"].append(loss.item())
    finally:
        albert_scale.optim.dist = dist
    # ZeRO-3 calls the optimizer once per sub-group; those of the trust-ratio group need norms.
    sub_groups = getattr(engine.optimizer, "sub_group_to_group_id", {0: 0}).values()
    calls = sum(optimizer.param_groups[i]["trust_ratio"] for i in sub_groups)
    result["all_reduces"] = (counter.all_reduces / steps, calls if engine.optimizer is not optimizer else 0)

    if engine.optimizer is optimizer:
        result["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:  # the fp32 master weights, gathered from the partitions (a collective)
        result["weights"] = {
            n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.named_parameters()
        }
    engine.destroy()
    return result


def check_layout(
    zero_optimizer: Any, params: list[torch.Tensor], expected: list[torch.Tensor]
) -> dict[str, Any]:
    """Rebuilds every parameter from all ranks' fragments; counts how often each element is covered."""
    layout = zero_partition_layout(zero_optimizer, params)
    values = [torch.zeros(w.numel()) for w in expected]
    counts = [torch.zeros(w.numel()) for w in expected]
    split = torch.zeros(1)
    for flat, fragments in layout.fragments.items():
        for f in fragments:
            values[f.index][f.offset : f.offset + f.numel] += flat.detach()[
                f.start : f.start + f.numel
            ].float()
            counts[f.index][f.offset : f.offset + f.numel] += 1
            split += f.numel < expected[f.index].numel()
    values_flat, counts_flat = torch.cat(values), torch.cat(counts)
    if layout.partitioned:
        for t in (values_flat, counts_flat, split):
            dist.all_reduce(t, group=layout.process_group)
    error = (values_flat - torch.cat([w.flatten() for w in expected])).abs().max()
    return {
        "wrapper": type(zero_optimizer).__name__,
        "coverage": (int(counts_flat.min()), int(counts_flat.max())),
        "max_error": float(error),
        "split_parameters": int(split),
        "sub_groups": len(getattr(zero_optimizer, "fp32_partitioned_groups_flat", [])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_distributed()  # gloo on CPU; leaves no shared-memory buffers behind
    torch.set_num_threads(1)

    runs = {
        f"fp32-stage{s}": {"stage": s, "bf16": False, "reference": False, "steps": STEPS} for s in range(4)
    }
    runs["naive-fp32-stage2"] = {"stage": 2, "bf16": False, "reference": True, "steps": STEPS}
    runs["unreduced-fp32-stage3"] = {
        "stage": 3,
        "bf16": False,
        "reference": False,
        "steps": STEPS,
        "unreduced": True,
    }
    runs |= {
        f"bf16-stage{s}": {"stage": s, "bf16": True, "reference": False, "steps": BF16_STEPS}
        for s in (1, 2, 3)
    }

    results: dict[str, Any] = {"weights": {}, "layout": {}, "losses": {}, "all_reduces": {}, "refused": None}
    try:
        run(0, bf16=True, reference=False, steps=1)
    except RuntimeError as error:
        results["refused"] = str(error)
    for name, options in runs.items():
        result = run(**options)
        results["all_reduces"][name] = result["all_reduces"]
        if "layout" in result:
            results["layout"][name] = result["layout"]
        if options["bf16"]:
            results["losses"][name] = result["losses"]
        else:
            results["weights"][name] = result["weights"]
    if dist.get_rank() == 0:
        args.output.mkdir(parents=True, exist_ok=True)
        torch.save(results, args.output / "results.pt")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
