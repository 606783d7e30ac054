"""Learning-rate schedule: warmup, peak, decay, end, polynomial, the resumable scheduler, the batch warning."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from albert_scale.config import OptimConfig, ScheduleConfig, TrainConfig, load_config
from albert_scale.schedule import WarmupDecay, lr_at, rescaling_warning

LR = 0.01
SCHEDULE = ScheduleConfig(total_steps=20, warmup_steps=4, end_lr=0.001)


def curve(schedule: ScheduleConfig = SCHEDULE, lr: float = LR, steps: int | None = None) -> list[float]:
    return [lr_at(s, lr=lr, schedule=schedule) for s in range(steps or schedule.total_steps)]


@pytest.mark.unit
def test_warmup_starts_above_zero_and_reaches_the_peak_at_update_w():
    # Update n = step + 1 uses lr n / W: the first update already trains, update W uses the peak.
    assert curve()[:4] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR])
    assert max(curve()) == LR and curve().index(LR) == SCHEDULE.warmup_steps - 1


@pytest.mark.unit
def test_linear_decay_from_the_peak_to_end_lr_at_the_last_update():
    lrs = curve()
    # After update W = 4, T - W = 16 updates go linearly from the peak to end_lr.
    for n in range(5, 21):
        assert lrs[n - 1] == pytest.approx(0.001 + (LR - 0.001) * (20 - n) / 16)
    assert lrs[-1] == 0.001  # update T = total_steps
    assert all(a > b for a, b in itertools.pairwise(lrs[3:]))


@pytest.mark.unit
def test_past_the_end_the_rate_stays_at_end_lr():
    assert lr_at(20, lr=LR, schedule=SCHEDULE) == lr_at(10**6, lr=LR, schedule=SCHEDULE) == 0.001


@pytest.mark.unit
def test_polynomial_decay_uses_power_and_linear_ignores_it():
    poly = ScheduleConfig(total_steps=20, warmup_steps=4, decay="polynomial", power=2.0, end_lr=0.0)
    lrs = curve(poly)
    assert lrs[:4] == curve(ScheduleConfig(total_steps=20, warmup_steps=4, end_lr=0.0))[:4]
    for n in range(5, 21):
        assert lrs[n - 1] == pytest.approx(LR * ((20 - n) / 16) ** 2)
    linear = ScheduleConfig(total_steps=20, warmup_steps=4, decay="linear", power=2.0, end_lr=0.0)
    assert curve(linear) == curve(ScheduleConfig(total_steps=20, warmup_steps=4, end_lr=0.0))


@pytest.mark.unit
def test_edges_no_warmup_and_all_warmup():
    no_warmup = ScheduleConfig(total_steps=10, warmup_steps=0, end_lr=0.0)
    assert curve(no_warmup)[0] == pytest.approx(LR * 0.9) and curve(no_warmup)[-1] == 0.0
    all_warmup = ScheduleConfig(total_steps=10, warmup_steps=10)
    assert curve(all_warmup) == pytest.approx([LR * n / 10 for n in range(1, 11)])
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, lr=LR, schedule=SCHEDULE)


@pytest.mark.unit
def test_the_xxlarge_recipe():
    schedule = load_config("albert-xxlarge").schedule
    lr = 0.00176
    assert lr_at(0, lr=lr, schedule=schedule) == pytest.approx(lr / 3125)
    assert lr_at(3124, lr=lr, schedule=schedule) == lr
    assert lr_at(3125 + (125000 - 3125) // 2 - 1, lr=lr, schedule=schedule) == pytest.approx(lr / 2, rel=1e-4)
    assert lr_at(124999, lr=lr, schedule=schedule) == 0.0


@pytest.mark.unit
def test_scheduler_sets_every_group_and_resumes_from_the_step_alone():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=1.0
    )
    scheduler = WarmupDecay(optimizer, lr=LR, schedule=SCHEDULE)
    seen = []
    for _ in range(7):
        assert len({g["lr"] for g in optimizer.param_groups}) == 1
        seen.append(scheduler.get_last_lr()[0])
        scheduler.step()
    assert seen == curve()[:7]
    assert scheduler.state_dict() == {"step": 7}

    resumed = WarmupDecay(optimizer, lr=LR, schedule=SCHEDULE)
    assert resumed.get_last_lr() == [LR / 4, LR / 4]
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.get_last_lr() == [curve()[7]] * 2
    assert WarmupDecay(optimizer, lr=LR, schedule=SCHEDULE, step=7).get_last_lr() == [curve()[7]] * 2


@pytest.mark.unit
def test_no_warning_at_the_reference_batch():
    config = load_config("albert-xxlarge")
    assert rescaling_warning(config.train, config.schedule, config.optim) is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("batch", "lr", "warmup", "total"),
    [(1024, "0.00088", 12500, 500000), (16384, "0.00352", 781, 31250)],
)
def test_warning_suggests_sqrt_lr_and_inverse_steps(batch, lr, warmup, total):
    train = TrainConfig(global_batch_size=batch)
    message = rescaling_warning(train, ScheduleConfig(), OptimConfig())
    assert message is not None
    assert f"train.global_batch_size={batch} differs from schedule.reference_batch_size=4096" in message
    assert "optim.lr=0.00176 and schedule.warmup_steps=3125" in message
    assert message.endswith(
        f"optim.lr={lr} schedule.warmup_steps={warmup} schedule.total_steps={total} "
        f"schedule.reference_batch_size={batch}"
    )
    # The suggestion is a set of overrides that loads and silences the warning.
    config = load_config(
        "albert-xxlarge", [f"train.global_batch_size={batch}", *message.split(": ")[-1].split()]
    )
    assert rescaling_warning(config.train, config.schedule, config.optim) is None
