"""Trains the tiny config through ``albert_scale.engine.initialize`` and saves what test_engine checks.

Usage:
    deepspeed --num_gpus 2 tests/engine_worker.py --output DIR     # 2 CPU ranks over gloo
    python tests/engine_worker.py --output DIR                      # no launcher: a world of one

Every run starts from the same weights and takes ``STEPS`` updates on one fixed random global batch;
rank k trains on the k-th slice of it. Rank 0 writes DIR/results.json with, per run: the loss of each
update (the mean over all ranks' micro batches), the learning rate each update used, DeepSpeed's step
count, the optimizer wrapper DeepSpeed built and, in a world of one, how far the gradient DeepSpeed
hands the optimizer at the first update is from the mean of the micro batches' gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

import albert_scale.engine
from albert_scale.config import Config, load_config
from albert_scale.engine import init_distributed, initialize
from albert_scale.model import AlbertForPreTraining

STEPS = 6
SEQ = 32

# 2 ranks: fp32 at ZeRO 0 and 2, and ZeRO-2 with gradient accumulation, activation checkpointing and the
# optimizer offloaded; all must give the same losses.
RUNS = {
    "fp32-stage0": ["zero.stage=0"],
    "fp32-stage2": ["zero.stage=2"],
    "fp32-stage2-accumulate": [
        "zero.stage=2",
        "train.micro_batch_size=2",
        "train.activation_checkpointing=true",
        "zero.offload_optimizer=cpu",
    ],
}
# A world of one, 4 micro batches per update: fp32, and bf16 at every ZeRO stage it allows.
SINGLE_RUNS = {
    "fp32-stage0": ["zero.stage=0"],
    "fp32-stage2": ["zero.stage=2"],
    "bf16-stage1": ["zero.stage=1", "train.precision=bf16"],
    "bf16-stage2": ["zero.stage=2", "train.precision=bf16"],
    "bf16-stage2-offload": ["zero.stage=2", "train.precision=bf16", "zero.offload_optimizer=cpu"],
    "bf16-stage3": ["zero.stage=3", "train.precision=bf16"],
    # What deepspeed_config avoids: bf16 at ZeRO-1 with fp32 accumulation (DeepSpeed's BF16_Optimizer).
    "control-bf16-stage1-fp32-accumulation": ["zero.stage=1", "train.precision=bf16"],
}
SINGLE_MICRO_BATCH = 2


def tiny_model(config: Config) -> AlbertForPreTraining:
    """Fixed initial weights."""
    torch.manual_seed(config.train.seed)
    return AlbertForPreTraining(config.model, activation_checkpointing=config.train.activation_checkpointing)


def fixed_batch(config: Config, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """One random padded SOP global batch. Every prediction slot is a real label, so the mean loss over
    the global batch is the mean of equal micro batches' means, whatever the layout."""
    g = torch.Generator().manual_seed(seed)
    batch, vocab = config.train.global_batch_size, config.model.vocab_size
    predictions = config.data.max_predictions_per_seq
    ids = torch.randint(5, vocab, (batch, SEQ), generator=g)
    ids[:, 0] = 2
    lengths = torch.randint(SEQ // 2, SEQ + 1, (batch,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    positions = torch.stack([torch.randperm(int(n) - 1, generator=g)[:predictions] + 1 for n in lengths])
    return {
        "input_ids": ids.masked_fill(mask == 0, 0),
        "attention_mask": mask,
        "token_type_ids": (torch.arange(SEQ)[None, :] >= lengths[:, None] // 2).long() * mask,
        "masked_lm_positions": positions,
        "masked_lm_labels": torch.randint(5, vocab, (batch, predictions), generator=g),
        "sentence_order_labels": torch.randint(0, 2, (batch,), generator=g),
    }


def mean_gradient(model: AlbertForPreTraining, batch: dict[str, torch.Tensor], *, micro: int) -> dict:
    """The mean over micro batches of their gradients, each computed alone and summed in fp32."""
    total: dict[str, torch.Tensor] = {}
    chunks = len(batch["input_ids"]) // micro
    for i in range(chunks):
        model.zero_grad(set_to_none=True)
        model(**{k: v[i * micro : (i + 1) * micro] for k, v in batch.items()}).loss.backward()
        for name, p in model.named_parameters():
            total[name] = total.get(name, 0) + p.grad.float() / chunks
    return total


def gradient_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest ||got - want|| / ||want|| over parameters."""
    assert got.keys() == want.keys()
    return max(float((got[n].float() - want[n]).norm() / want[n].norm()) for n in want if want[n].norm() > 0)


@contextlib.contextmanager
def fp32_accumulation() -> Iterator[None]:
    """``initialize`` with ``data_types.grad_accum_dtype: fp32`` added to the generated config."""
    generate = albert_scale.engine.deepspeed_config

    def forced(config: Config, *, world_size: int) -> dict[str, Any]:
        return {**generate(config, world_size=world_size), "data_types": {"grad_accum_dtype": "fp32"}}

    albert_scale.engine.deepspeed_config = forced
    try:
        yield
    finally:
        albert_scale.engine.deepspeed_config = generate


def run(overrides: list[str]) -> dict[str, Any]:
    config = load_config("tiny", overrides)
    model = tiny_model(config)
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = fixed_batch(config)
    want = None
    if world == 1:  # the gradient of the first update, from a twin in the run's precision
        twin = copy.deepcopy(model).to(torch.bfloat16 if config.train.precision == "bf16" else torch.float32)
        want = mean_gradient(twin, batch, micro=config.train.micro_batch_size)
    engine = initialize(model, config)
    micro, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    per_rank = micro * accumulation
    mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}

    # Calls of one shared layer's forward: activation checkpointing runs it again in the backward pass
    # (where torch's recomputation skips module hooks, so the method itself counts).
    calls = [0]
    layer = engine.module.albert.encoder.albert_layer_groups[0].albert_layers[0]

    def counted(*args: Any, forward: Any = layer.forward, **kwargs: Any) -> Any:
        calls[0] += 1
        return forward(*args, **kwargs)

    layer.forward = counted

    losses, lrs, error = [], [], None
    for step in range(STEPS):
        lrs.append(engine.get_lr()[0])
        total = torch.zeros(())
        for i in range(accumulation):
            loss = engine(**{k: v[i * micro : (i + 1) * micro] for k, v in mine.items()}).loss
            engine.backward(loss)
            if want is not None and step == 0 and i == accumulation - 1:
                got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
                error = gradient_error(got, want)
            engine.step()  # applies the update (and advances the lr) at the last micro batch only
            total += loss.detach().float()
        dist.all_reduce(total)  # every rank's sum of micro-batch means
        losses.append(total.item() / (accumulation * world))
    del layer.forward
    result = {
        "layer_calls_per_micro_batch": calls[0] / (STEPS * accumulation),
        "losses": losses,
        "lrs": lrs,
        "global_steps": engine.global_steps,
        "wrapper": type(engine.optimizer).__name__,
        "micro_batch": micro,
        "accumulation": accumulation,
        "gradient_error": error,
    }
    engine.destroy()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    process = init_distributed()
    if process.world_size > 1:
        runs = RUNS
    else:
        runs = {name: [*o, f"train.micro_batch_size={SINGLE_MICRO_BATCH}"] for name, o in SINGLE_RUNS.items()}
    results = {"world_size": process.world_size, "device": str(process.device)}
    results["runs"] = {}
    for name, overrides in runs.items():
        with fp32_accumulation() if name.startswith("control") else contextlib.nullcontext():
            results["runs"][name] = run(overrides)
    if process.rank == 0:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
