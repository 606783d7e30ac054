"""Learning-rate schedule: linear warmup to the peak, then linear or polynomial decay to ``end_lr``.

The rate is a pure function of the optimizer step, so a resumed run needs nothing but the step count.

Step convention: ``step`` counts the optimizer updates already applied (0 before the first one). With
W = ``warmup_steps``, T = ``total_steps`` and n = step + 1 the number of the update about to be applied,
update n uses the curve through (0, 0), (W, lr) and (T, end_lr) at n::

    n <= W:   lr * n / W                                               (update 1 uses lr / W, not 0)
    n >  W:   end_lr + (lr - end_lr) * (1 - (n - W) / (T - W)) ** p    (update T uses end_lr)

p is ``power`` for ``decay: polynomial`` and 1 for ``decay: linear`` (which ignores ``power``). Past T
the rate stays at end_lr. So the first update already trains, update W uses the peak and update T uses
end_lr (with W = T there is no decay and update T uses the peak).

google-research/ALBERT (``optimization.py``) evaluates its curve at the 0-based global step: its first
update has rate 0 and its last never reaches end_lr. Its decay also runs from step 0 rather than from W
(``polynomial_decay(lr, global_step, T)`` with the warmup pasted over the first W steps), so right after
warmup it uses lr (1 - W / T) ** p: 0.975 lr for the xxlarge recipe. Here the decay starts at the peak.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from albert_scale.config import OptimConfig, ScheduleConfig, TrainConfig


def lr_at(step: int, *, lr: float, schedule: ScheduleConfig) -> float:
    """The learning rate of the update applied after ``step`` updates (see the module docstring)."""
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    n, warmup, total = step + 1, schedule.warmup_steps, schedule.total_steps
    if n <= warmup:
        return lr * n / warmup
    if n >= total:
        return schedule.end_lr
    power = schedule.power if schedule.decay == "polynomial" else 1.0
    remaining = 1.0 - (n - warmup) / (total - warmup)
    return schedule.end_lr + (lr - schedule.end_lr) * remaining**power


class WarmupDecay:
    """Sets ``lr`` of every param group of ``optimizer`` to :func:`lr_at` of the step.

    Speaks DeepSpeed's ``lr_scheduler`` protocol: DeepSpeed calls :meth:`step` after each applied update
    (not after an fp16 update skipped on overflow) and saves :meth:`state_dict` in its checkpoints. The
    state is the step alone; ``load_state_dict({"step": n})`` resumes anywhere.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, lr: float, schedule: ScheduleConfig, step: int = 0
    ):
        self.optimizer = optimizer
        self.lr = lr
        self.schedule = schedule
        self.last_step = step
        """Updates applied so far; the next one uses ``lr_at(last_step)``."""
        self._apply()

    def step(self) -> None:
        """Called after an update has been applied: moves to the rate of the next one."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The rate of each param group for the next update (as torch's schedulers report it)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["step"])
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.last_step, lr=self.lr, schedule=self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def rescaling_warning(train: TrainConfig, schedule: ScheduleConfig, optim: OptimConfig) -> str | None:
    """A warning when the global batch differs from the batch the learning rate and warmup were tuned for.

    Suggests square-root scaling of the peak rate with the batch (as the LAMB papers do for BERT) and a
    warmup (and a run length) over the same number of sequences, i.e. steps scaled inversely with the
    batch. None when the batch is the reference batch.
    """
    batch, reference = train.global_batch_size, schedule.reference_batch_size
    if batch == reference:
        return None
    factor = batch / reference
    total = max(1, round(schedule.total_steps / factor))
    warmup = min(total, round(schedule.warmup_steps / factor))
    suggestion = (
        f"optim.lr={optim.lr * math.sqrt(factor):.4g} schedule.warmup_steps={warmup} "
        f"schedule.total_steps={total} schedule.reference_batch_size={batch}"
    )
    return (
        f"train.global_batch_size={batch} differs from schedule.reference_batch_size={reference}, the batch "
        f"that optim.lr={optim.lr:g} and schedule.warmup_steps={schedule.warmup_steps} were tuned for; "
        "large-batch training may diverge (and small-batch training waste steps) unless they are rescaled. "
        "Square-root lr scaling, with warmup and run length over the same number of sequences, suggests: "
        f"{suggestion}"
    )
