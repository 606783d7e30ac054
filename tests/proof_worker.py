"""Two proofs about training under DeepSpeed ZeRO-2 on CPU ranks (gloo); test_zero_proofs checks them.

Usage:
    deepspeed --num_gpus 2 tests/proof_worker.py --proof checkpointing --output DIR
    deepspeed --num_gpus 2 tests/proof_worker.py --proof xxlarge --output DIR

``checkpointing``: the tiny preset (4 layer applications over 2 shared groups of 2 inner layers) at
ZeRO-2 in fp32 takes one forward and backward on one fixed random global batch, rank k on its k-th half,
once with activation checkpointing off and once on, from the same initial weights (two engines in this
process, one after the other). After ``engine.backward`` and before ``engine.step`` every rank reads the
full gradient of every parameter with ``safe_get_full_grad``: at the accumulation boundary ZeRO-2 has
reduced the gradients into each rank's partition and cleared ``.grad``, and the call all-reduces the
partitions into the whole tensor. Rank 0 writes DIR/results.pt with, per run: the gradients, each rank's
loss, how often one shared layer ran in forward and in forward plus backward (recomputation runs it
again), whether every ``.grad`` was cleared and how many parameters each rank holds a piece of. Besides
the runs: the gradient of the same global batch computed in this process without DeepSpeed (the mean of
the two halves' gradients, what ZeRO-2 must hand over), the gradient of rank 0's half alone, and a
negative control, the checkpointed run again with one element of a shared layer's weight moved by 1e-3.

``xxlarge``: the albert-xxlarge preset as configured (bf16, activation checkpointing, LAMB, ZeRO-2) at
micro batch 1, sequence length 128 and 20 predictions, global batch 2, takes two optimizer steps on
random batches. Rank 0 writes DIR/results.json with the parameter count, the losses of both ranks, the
learning rate and gradient norm of each step, the seconds of start-up and of each step, each rank's
resident memory after each phase and at its peak, and what happened to one shared weight (its fp32 master
gathered with ``safe_get_full_fp32_param`` before and after each step): the norm of each step's change
relative to the weight's norm, which ALBERT's LAMB makes equal to that step's learning rate for a weight
with a trust ratio, whether the bf16 weight the model computes with is the master rounded to bf16, and
how many of its bf16 elements changed.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from albert_scale.config import Config, load_config
from albert_scale.engine import init_distributed, initialize
from albert_scale.model import AlbertForPreTraining, count_parameters

SHARED_WEIGHT = "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.dense.weight"
"""A weight of the first shared layer: every forward runs it more than once (tiny: twice; xxlarge: 12x)."""

# --- checkpointing -------------------------------------------------------------------------------------

TINY = ["zero.stage=2", "train.precision=fp32"]
"""The tiny preset has no dropout (v2), so both runs see the same function in training mode."""
TINY_SEQ = 32
PERTURBATION = 1e-3


def random_batch(config: Config, size: int, seq: int, *, seed: int, padded: bool) -> dict[str, torch.Tensor]:
    """``size`` random sequences: ids in [5, vocab) after [CLS] (2), two segments, masked positions
    (distinct, never [CLS], inside the sequence) with random labels, and random SOP labels. ``padded``
    shortens sequences to random lengths in [seq / 2, seq] with pad (0) and a 0 attention mask."""
    g = torch.Generator().manual_seed(seed)
    vocab, predictions = config.model.vocab_size, config.data.max_predictions_per_seq
    ids = torch.randint(5, vocab, (size, seq), generator=g)
    ids[:, 0] = 2
    if padded:
        lengths = torch.randint(seq // 2, seq + 1, (size,), generator=g)
    else:
        lengths = torch.full((size,), seq)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    positions = torch.stack(
        [(torch.randperm(int(n) - 1, generator=g)[:predictions] + 1).sort().values for n in lengths]
    )
    return {
        "input_ids": ids.masked_fill(mask == 0, 0),
        "attention_mask": mask,
        "token_type_ids": (torch.arange(seq)[None, :] >= lengths[:, None] // 2).long() * mask,
        "masked_lm_positions": positions,
        "masked_lm_labels": torch.randint(5, vocab, (size, predictions), generator=g),
        "sentence_order_labels": torch.randint(0, 2, (size,), generator=g),
    }


def halves(batch: dict[str, torch.Tensor], world: int) -> list[dict[str, torch.Tensor]]:
    size = len(batch["input_ids"]) // world
    return [{k: v[r * size : (r + 1) * size] for k, v in batch.items()} for r in range(world)]


def plain_gradients(
    model: AlbertForPreTraining, parts: list[dict[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """The gradient of each part's loss, computed here without DeepSpeed."""
    grads = []
    for part in parts:
        model.zero_grad(set_to_none=True)
        model(**part).loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return grads


def one_backward(
    config: Config, initial: dict[str, torch.Tensor], mine: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """One forward and backward through a fresh ZeRO-2 engine; the full gradients read before step()."""
    model = AlbertForPreTraining(config.model, activation_checkpointing=config.train.activation_checkpointing)
    model.load_state_dict(initial)
    engine = initialize(model, config)
    assert engine.zero_optimization_stage() == 2 and engine.gradient_accumulation_steps() == 1

    # Calls of one shared layer's forward. The recomputation in backward bypasses module hooks, so the
    # bound method itself is wrapped.
    calls = [0]
    layer = engine.module.albert.encoder.albert_layer_groups[0].albert_layers[0]

    def counted(*args: Any, forward: Any = layer.forward, **kwargs: Any) -> Any:
        calls[0] += 1
        return forward(*args, **kwargs)

    layer.forward = counted
    loss = engine(**mine).loss
    after_forward = calls[0]
    engine.backward(loss)
    # At the accumulation boundary ZeRO-2 has reduced the gradients into each rank's partition and cleared
    # .grad, so safe_get_full_grad reassembles them from the partitions: a collective, every rank gathers
    # every parameter in the same order.
    params = dict(engine.module.named_parameters())
    cleared = all(p.grad is None and hasattr(p, "_hp_mapping") for p in params.values())
    # Parameters with a piece in this rank's partition (_hp_mapping is None for the others).
    owned = torch.tensor(sum(p._hp_mapping is not None for p in params.values()))
    owned_per_rank = [torch.zeros_like(owned) for _ in range(dist.get_world_size())]
    dist.all_gather(owned_per_rank, owned)
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in params.items()}
    del layer.forward
    losses = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss.detach().float())
    engine.destroy()
    return {
        "grads": grads,
        "losses": [float(x) for x in losses],
        "layer_calls": {"forward": after_forward, "forward_and_backward": calls[0]},
        "grad_cleared": cleared,
        "parameters_owned_per_rank": [int(x) for x in owned_per_rank],
    }


def prove_checkpointing() -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config("tiny", TINY)
    torch.manual_seed(config.train.seed)
    model = AlbertForPreTraining(config.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batch = random_batch(config, config.train.global_batch_size, TINY_SEQ, seed=1, padded=True)
    parts = halves(batch, world)

    per_part = plain_gradients(model, parts)
    reference = {n: sum(g[n] for g in per_part) / world for n in per_part[0]}
    del model

    runs = {}
    for name, checkpointing in (("off", False), ("on", True)):
        overrides = [*TINY, f"train.activation_checkpointing={str(checkpointing).lower()}"]
        runs[name] = one_backward(load_config("tiny", overrides), initial, parts[rank])

    perturbed = {k: v.clone() for k, v in initial.items()}
    perturbed[SHARED_WEIGHT][0, 0] += PERTURBATION
    on = load_config("tiny", [*TINY, "train.activation_checkpointing=true"])
    runs["perturbed"] = one_backward(on, perturbed, parts[rank])

    return {
        "world_size": world,
        "runs": runs,
        "reference": reference,
        "local": per_part[0],
        "shared_weight": SHARED_WEIGHT,
    }


# --- xxlarge ---------------------------------------------------------------------------------------------

XXLARGE = [
    "train.micro_batch_size=1",
    "train.global_batch_size=2",
    "zero.stage=2",
    "data.max_seq_length=128",
    "data.max_predictions_per_seq=20",
]
XXLARGE_STEPS = 2


def rss_gib() -> float:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return math.nan


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (a collective)."""
    mine = torch.tensor(values, dtype=torch.float64)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def prove_xxlarge() -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config("albert-xxlarge", XXLARGE)
    memory = {"start": rss_gib()}

    started = time.perf_counter()
    torch.manual_seed(config.train.seed)
    model = AlbertForPreTraining(config.model, activation_checkpointing=config.train.activation_checkpointing)
    parameters = sum(p.numel() for p in model.parameters())
    seconds_build = time.perf_counter() - started
    memory["model_built"] = rss_gib()

    started = time.perf_counter()
    engine = initialize(model, config)
    seconds_initialize = time.perf_counter() - started
    memory["initialized"] = rss_gib()
    micro, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()

    shared = dict(engine.module.named_parameters())[SHARED_WEIGHT]
    weights = [safe_get_full_fp32_param(shared).detach().clone()]
    initial_bf16 = shared.detach().clone()
    losses, lrs, grad_norms, step_seconds = [], [], [], []
    for step in range(XXLARGE_STEPS):
        batch = random_batch(config, micro * world, config.data.max_seq_length, seed=100 + step, padded=False)
        mine = halves(batch, world)[rank]
        lrs.append(engine.get_lr()[0])
        started = time.perf_counter()
        loss = engine(**mine).loss
        engine.backward(loss)
        engine.step()
        step_seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
        grad_norms.append(float(engine.get_global_grad_norm()))
        memory[f"step{step + 1}"] = rss_gib()
        weights.append(safe_get_full_fp32_param(shared).detach().clone())

    w = [x.double() for x in weights]
    relative_change = [float((w[i + 1] - w[i]).norm() / w[i].norm()) for i in range(XXLARGE_STEPS)]
    bf16_is_rounded_master = bool(torch.equal(shared.detach(), weights[-1].to(shared.dtype)))
    bf16_elements_changed = int((shared.detach() != initial_bf16).sum())
    result = {
        "world_size": world,
        "parameters": parameters,
        "parameters_counted": count_parameters(config.model),
        "precision": config.train.precision,
        "model_dtype": str(shared.dtype),
        "activation_checkpointing": config.train.activation_checkpointing,
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer_wrapper": type(engine.optimizer).__name__,
        "micro_batch": micro,
        "accumulation": accumulation,
        "seq_len": config.data.max_seq_length,
        "vocab_size": config.model.vocab_size,
        "losses": gather_floats(losses),
        "lrs": lrs,
        "grad_norms": grad_norms,
        "global_steps": engine.global_steps,
        "relative_change": relative_change,
        "shared_weight": SHARED_WEIGHT,
        "bf16_is_rounded_master": bf16_is_rounded_master,
        "bf16_elements_changed": bf16_elements_changed,
        "shared_weight_numel": shared.numel(),
        "seconds": {
            "build": seconds_build,
            "initialize": seconds_initialize,
            "steps": gather_floats(step_seconds),
        },
    }
    memory["peak"] = peak_rss_gib()
    phases = list(memory)
    result["memory_gib"] = [dict(zip(phases, m, strict=True)) for m in gather_floats(list(memory.values()))]
    engine.destroy()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proof", choices=["checkpointing", "xxlarge"], required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    process = init_distributed()
    if args.proof == "checkpointing":
        results = prove_checkpointing()
        if process.rank == 0:
            args.output.mkdir(parents=True, exist_ok=True)
            torch.save(results, args.output / "results.pt")
    else:
        results = prove_xxlarge()
        if process.rank == 0:
            args.output.mkdir(parents=True, exist_ok=True)
            (args.output / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
