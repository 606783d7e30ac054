"""DeepSpeed: the generated config, the process group and the engine. The one module that imports deepspeed.

Usage (one process, or one per rank under ``deepspeed``/``torchrun``/Ray Train)::

    process = init_distributed()                 # world of one without a launcher
    torch.manual_seed(config.train.seed)         # the same start on every rank
    model = AlbertForPreTraining(config.model, activation_checkpointing=...)
    engine = initialize(model, config)           # LAMB (or AdamW), the lr schedule, ZeRO
    for micro_batch in ...:                      # engine.gradient_accumulation_steps() per update
        loss = engine(**micro_batch).loss
        engine.backward(loss)                    # divides by the accumulation steps; reduces at the boundary
        engine.step()                            # clips, updates and advances the lr at the boundary only

The DeepSpeed config is generated from the typed :class:`~albert_scale.config.Config` by
:func:`deepspeed_config`, never kept by hand. ``deepspeed`` itself is imported only by the functions that
need it: importing it takes seconds and, on a machine without a GPU, prints a warning on stdout, which
would spoil ``plan``-style output of the config.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from albert_scale.config import Config, ConfigError, OptimConfig, check
from albert_scale.optim import AdamW, Lamb, PartitionLayout, param_groups, zero_partition_layout
from albert_scale.schedule import WarmupDecay

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

# fp16 dynamic loss scaling: DeepSpeed's defaults, written out so that the generated config shows them.
FP16_INITIAL_SCALE_POWER = 16
"""The first loss scale is 2**16."""
FP16_LOSS_SCALE_WINDOW = 1000
"""Updates without overflow before the scale doubles."""
FP16_HYSTERESIS = 2
"""Overflows tolerated before the scale halves."""
FP16_MIN_LOSS_SCALE = 1
"""The scale never drops below this."""

STEPS_PER_PRINT = 2**31 - 1
"""DeepSpeed's own progress lines: never (the training loop logs)."""


def deepspeed_config(config: Config, *, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run at data-parallel size ``world_size``, generated from ``config``.

    Batch sizes come from :func:`albert_scale.config.check`; ``gradient_clipping`` is
    ``optim.max_grad_norm`` (0 = off; DeepSpeed's own default would be 1.0). The optimizer is not in
    the config: :func:`initialize` passes ours.

    bf16 at ZeRO-2/3 adds ``data_types.grad_accum_dtype: fp32``: DeepSpeed then sums the micro batches'
    gradients in fp32 (without it, in bf16, which moves some gradients by percents after a few micro
    batches). At ZeRO-1 the same key would select DeepSpeed's BF16_Optimizer instead, which clears the
    bf16 gradients between micro batches only from backward hooks that DeepSpeed 0.19 attaches to the
    forward output when it is a tensor, tuple, list or dict; our model returns a dataclass, so it would
    add up running sums. ZeRO-1 therefore accumulates in bf16: prefer ZeRO-2 with bf16.

    Raises :class:`~albert_scale.config.ConfigError` (a ValueError) naming the keys when the batch does
    not divide, or when ``train.precision`` bf16/fp16 meets ``zero.stage`` 0 (see the code), or
    ``zero.offload_optimizer`` meets stage 0. Every other combination of the typed values is valid.
    """
    if world_size < 1:
        raise ConfigError(f"world_size={world_size}: must be >= 1")
    plan = check(config, world_size=world_size)
    train, zero = config.train, config.zero
    if train.precision != "fp32" and zero.stage == 0:
        # Without ZeRO, DeepSpeed wraps a custom optimizer in FP16_UnfusedOptimizer, which steps it once on
        # zero gradients while it is built: LAMB (and AdamW) would decay every weight before training.
        raise ConfigError(
            f"train.precision={train.precision!r} with zero.stage=0: DeepSpeed without ZeRO steps the "
            f"optimizer ({config.optim.name}) once on zero gradients at start-up, which decays the weights; "
            "use zero.stage=1 or more (it costs nothing at one rank) or train.precision='fp32'"
        )
    if zero.offload_optimizer != "none" and zero.stage == 0:
        raise ConfigError(
            f"zero.offload_optimizer={zero.offload_optimizer!r} with zero.stage=0: offloading the optimizer "
            "needs zero.stage=1 or more"
        )

    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_clipping": config.optim.max_grad_norm,
    }
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if zero.stage >= 2:
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif train.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": FP16_INITIAL_SCALE_POWER,
            "loss_scale_window": FP16_LOSS_SCALE_WINDOW,
            "hysteresis": FP16_HYSTERESIS,
            "min_loss_scale": FP16_MIN_LOSS_SCALE,
        }

    partitioning: dict[str, Any] = {"stage": zero.stage}
    if zero.stage >= 1:
        partitioning |= {
            "overlap_comm": zero.overlap_comm,
            "contiguous_gradients": zero.contiguous_gradients,
            "reduce_bucket_size": zero.reduce_bucket_size,
        }
    if zero.stage in (1, 2):
        partitioning["allgather_bucket_size"] = zero.allgather_bucket_size
    if zero.offload_optimizer != "none":
        partitioning["offload_optimizer"] = {"device": zero.offload_optimizer}
    ds["zero_optimization"] = partitioning

    ds |= {
        # Our LAMB is not on DeepSpeed's list of ZeRO optimizers; it is exact under ZeRO (albert_scale.optim).
        "zero_allow_untested_optimizer": True,
        # With offload, keep our optimizer rather than insisting on DeepSpeed's CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    return ds


_STARTED_HERE = False
"""Whether this process started the current process group (see :func:`release_distributed`)."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in the data-parallel group."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    """Where this rank computes: DeepSpeed's accelerator (cuda:LOCAL_RANK on GPUs, cpu here)."""


def init_distributed() -> Distributed:
    """Starts the process group (idempotent) and selects this rank's device.

    Under a launcher (``deepspeed``, ``torchrun``: env rendezvous) or Ray Train (which has started the
    group) it joins that group. Without one it starts a world of one, setting RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT where they are unset, so that no MPI discovery is attempted.
    MASTER_PORT 0 lets the rendezvous store bind a port the system picks: a port found free beforehand
    could be taken by another process before the store binds it. The backend is the accelerator's: nccl
    on CUDA, gloo on CPU.
    """
    global _STARTED_HERE
    deepspeed = _import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    _STARTED_HERE = _STARTED_HERE or not dist.is_initialized()
    if not dist.is_initialized() and os.environ.get("WORLD_SIZE", "1") == "1":
        for key, value in (
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "0"),
        ):
            os.environ.setdefault(key, value)
    accelerator = get_accelerator()
    joined = deepspeed.comm.is_initialized()
    with contextlib.redirect_stdout(io.StringIO()):  # "DeepSpeed ... shm_comm_op built successfully"
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
    if not joined:
        _unlink_shared_buffers()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator.set_device(local_rank)
    return Distributed(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        device=torch.device(accelerator.device_name(local_rank)),
    )


SHARED_BUFFER_DIR = "/dev/shm"


def _unlink_shared_buffers() -> None:
    """Removes the name of this rank's shared-memory all-reduce buffer once every rank has mapped it.

    When all ranks share one machine (the launcher's LOCAL_SIZE equals the world size), DeepSpeed's CPU
    communication op creates one buffer per rank in /dev/shm, about 70 MB each, and every rank maps
    all of them while the group starts. It never removes them, so each run would leave them behind,
    filling the machine's memory run after run. After the barrier every rank holds its mappings,
    which outlive the names: this rank unlinks its own, and nothing is left even if the run is killed.
    """
    world_size = dist.get_world_size()
    if world_size == 1 or os.environ.get("LOCAL_SIZE") != str(world_size):
        return
    dist.barrier()
    name = "_".join(
        (
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(dist.get_rank()),
        )
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHARED_BUFFER_DIR, name))


def release_distributed() -> None:
    """Destroys the process group if :func:`init_distributed` started it (not one that, say, Ray Train
    owns). A process that leaves with a gloo group alive after a collective can abort at exit."""
    global _STARTED_HERE
    if _STARTED_HERE and dist.is_initialized():
        # Through DeepSpeed, which also drops the groups it cached, so that a later train() in this
        # process starts afresh.
        _import_deepspeed().comm.destroy_process_group()
    _STARTED_HERE = False


def build_optimizer(model: nn.Module, *, optim: OptimConfig) -> torch.optim.Optimizer:
    """ALBERT's LAMB, or torch's AdamW, over ALBERT's two parameter groups (no decay for norms and biases)."""
    groups = param_groups(model, optim.weight_decay)
    betas = (optim.beta1, optim.beta2)
    if optim.name == "lamb":
        return Lamb(groups, lr=optim.lr, betas=betas, eps=optim.eps, compile_cpu=optim.compile_cpu)
    return AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps)


def initialize(model: nn.Module, config: Config, *, world_size: int | None = None) -> DeepSpeedEngine:
    """Wraps ``model`` in a DeepSpeed engine with our optimizer, the lr schedule and ZeRO as configured.

    Starts the process group if needed (:func:`init_distributed`). ``world_size`` defaults to the group's
    size and must equal it. The schedule (``engine.lr_scheduler``, a
    :class:`~albert_scale.schedule.WarmupDecay`) advances with every applied update and is saved in
    DeepSpeed checkpoints. Collective: every rank calls it with the same config. DeepSpeed overwrites
    every rank's weights with rank 0's (a broadcast, at every stage, for a model built without
    ``deepspeed.zero.Init``); seeding alike on every rank keeps the rest of the start-up equal too.
    """
    deepspeed = _import_deepspeed()

    init_distributed()
    actual = dist.get_world_size()
    if world_size is not None and world_size != actual:
        raise ValueError(f"world_size={world_size}: the process group has {actual} ranks")
    ds_config = deepspeed_config(config, world_size=actual)
    optimizer = build_optimizer(model, optim=config.optim)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # A callable: DeepSpeed builds the scheduler on the optimizer it actually steps.
        lr_scheduler=functools.partial(WarmupDecay, lr=config.optim.lr, schedule=config.schedule),
        config=ds_config,
    )
    if isinstance(optimizer, Lamb):
        optimizer.attach_zero_partitions(engine.optimizer)  # exact trust ratios on ZeRO's flat partitions
    return engine


MOMENTS = ("exp_avg", "exp_avg_sq")
"""The optimizer state of a parameter (LAMB and AdamW name their moments alike)."""

LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""fp16 dynamic loss scaling state."""


def client_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """Our optimizer inside the engine (``engine.optimizer`` is DeepSpeed's wrapper under ZeRO)."""
    return engine.basic_optimizer


def skipped_step(engine: DeepSpeedEngine, step: Callable[[], None]) -> None:
    """Runs ``step`` (the ``engine.step()`` at an accumulation boundary) without updating anything.

    Our optimizer leaves weights and moments untouched. DeepSpeed itself skips a step whose gradients are
    not finite only in some configurations (fp16, bf16 and ZeRO-1/2 with clipping); where it does not, it
    has advanced the schedule and counted an applied step, which is undone here, so that a skipped step
    looks the same everywhere: the schedule stays, ``engine.skipped_steps`` grows.
    """
    optimizer = client_optimizer(engine)
    schedule = engine.lr_scheduler.state_dict()
    optimizer.skip_update = True
    try:
        step()
    finally:
        optimizer.skip_update = False
    if engine.was_step_applied():
        engine.lr_scheduler.load_state_dict(schedule)
        engine.skipped_steps += 1


def _state_layout(engine: DeepSpeedEngine) -> tuple[list[str], list[torch.Tensor], PartitionLayout | None]:
    """The optimizer's parameters (names and tensors, in its order) and where they live in the flat fp32
    tensors DeepSpeed hands it on this rank; no layout without ZeRO (the optimizer holds the parameters)."""
    groups = param_groups(engine.module, 0.0)  # the order build_optimizer used
    names = [name for group in groups for name in group["names"]]
    params = [param for group in groups for param in group["params"]]
    if engine.optimizer is client_optimizer(engine):
        return names, params, None
    return names, params, zero_partition_layout(engine.optimizer, params)


def _full_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps an empty placeholder in param.data


def gather_state(
    engine: DeepSpeedEngine,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The fp32 master weights and the optimizer moments of every parameter, whole, on rank 0.

    Collective at ZeRO stages 1-3: each rank places its fragments of every parameter into a zero buffer of
    all parameters, and the buffers are summed on rank 0 (every element comes from exactly one rank, so
    the sum is exact); one reduce per quantity (weights, first and second moment). Independent of the
    world size and the ZeRO stage: the tensors one process would hold. Other ranks get empty dicts.
    Moments not created yet (before the first update) are zeros.
    """
    names, params, layout = _state_layout(engine)
    optimizer = client_optimizer(engine)
    keep = dist.get_rank() == 0
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in MOMENTS}
    if layout is None:
        for name, param in zip(names, params, strict=True):
            weights[name] = param.detach().float().cpu().clone()
            for key in MOMENTS:
                value = optimizer.state.get(param, {}).get(key)
                moments[key][name] = (
                    value.float().cpu().clone() if value is not None else torch.zeros_like(weights[name])
                )
        return (weights, moments) if keep else ({}, {key: {} for key in MOMENTS})

    shapes = [_full_shape(p) for p in params]
    sizes = [shape.numel() for shape in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    device = next(iter(layout.fragments)).device
    for quantity in ("weights", *MOMENTS):
        buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        for flat, fragments in layout.fragments.items():
            source = flat if quantity == "weights" else optimizer.state.get(flat, {}).get(quantity)
            if source is None:
                continue
            for f in fragments:
                at = offsets[f.index] + f.offset
                buffer[at : at + f.numel] = source.detach()[f.start : f.start + f.numel]
        dist.reduce(buffer, dst=0)
        if keep:
            host = buffer.cpu()
            target = weights if quantity == "weights" else moments[quantity]
            for name, at, size, shape in zip(names, offsets, sizes, shapes, strict=True):
                target[name] = host[at : at + size].view(shape).clone()
        del buffer
    return weights, moments


def restore_state(
    engine: DeepSpeedEngine,
    weights: Mapping[str, torch.Tensor],
    moments: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    updates: int,
) -> None:
    """Sets every parameter's fp32 master weight and moments from whole tensors (:func:`gather_state`).

    Every rank passes the same whole tensors and keeps its own fragments; the optimizer's state is created
    here when it does not exist yet. Load the same weights into the model *before* :func:`initialize` too:
    DeepSpeed derives the model's working copies (bf16, or ZeRO-3 partitions) from the module it gets, and
    the masters it builds from bf16 copies would be rounded; this call makes the masters exact.
    ``updates`` (updates applied so far) is AdamW's step count; LAMB has no bias correction.
    """
    names, params, layout = _state_layout(engine)
    optimizer = client_optimizer(engine)

    def set_state(tensor: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        state = optimizer.state[tensor]
        state.update(values)
        if isinstance(optimizer, torch.optim.AdamW):
            state["step"] = torch.tensor(float(updates))

    with torch.no_grad():
        if layout is None:
            for name, param in zip(names, params, strict=True):
                param.copy_(weights[name])
                set_state(
                    param, {k: moments[k][name].to(param.device, torch.float32).clone() for k in MOMENTS}
                )
            return
        for flat, fragments in layout.fragments.items():
            buffers = {key: torch.zeros_like(flat) for key in MOMENTS}
            for f in fragments:
                name = names[f.index]
                piece = slice(f.offset, f.offset + f.numel)
                flat[f.start : f.start + f.numel] = weights[name].reshape(-1)[piece]
                for key in MOMENTS:
                    buffers[key][f.start : f.start + f.numel] = moments[key][name].reshape(-1)[piece]
            set_state(flat, buffers)


def engine_counters(engine: DeepSpeedEngine) -> dict[str, Any]:
    """DeepSpeed's step counters, the schedule position and the fp16 loss scaler, as plain values."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return {
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "lr_scheduler": engine.lr_scheduler.state_dict(),
        "loss_scaler": {k: getattr(scaler, k) for k in LOSS_SCALER_FIELDS if hasattr(scaler, k)},
    }


def restore_counters(engine: DeepSpeedEngine, counters: Mapping[str, Any]) -> None:
    """Inverse of :func:`engine_counters`."""
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])
    engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in counters.get("loss_scaler", {}).items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, value)


def grad_norm(engine: DeepSpeedEngine) -> float | None:
    """The global gradient norm of the last update (before clipping). Without ZeRO DeepSpeed does not keep
    it: call :func:`unpartitioned_grad_norm` before ``engine.step()`` instead."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def unpartitioned_grad_norm(engine: DeepSpeedEngine) -> float | None:
    """Without ZeRO, the norm of the (already averaged) gradients at an accumulation boundary; else None."""
    if engine.optimizer is not client_optimizer(engine):
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def loss_scale(engine: DeepSpeedEngine) -> float:
    """The current fp16 loss scale (1 without fp16)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return float(getattr(scaler, "cur_scale", 1.0))


def _import_deepspeed() -> Any:
    """Imports deepspeed quietly: on a machine without a GPU it selects its CPU accelerator itself (instead
    of warning that it found none), and its logger reports warnings only."""
    import logging
    import warnings

    # DeepSpeed 0.19 calls torch.distributed functions that torch has deprecated (a warning per call site).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    logger = logging.getLogger("DeepSpeed")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _ExpectedWarnings) for f in logger.filters):
        logger.addFilter(_ExpectedWarnings())
    return deepspeed


class _ExpectedWarnings:
    """Drops DeepSpeed's warning that our LAMB is not on its list of ZeRO-tested optimizers: it is exact
    under ZeRO by construction (albert_scale.optim) and the multi-process tests prove it."""

    def filter(self, record: Any) -> bool:
        return "untested optimizer" not in record.getMessage()
