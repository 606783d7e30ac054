"""Two proofs on 2 CPU ranks over gloo under DeepSpeed ZeRO-2, run by ``tests/proof_worker.py``.

1. Activation checkpointing does not change the gradients of shared layers under ZeRO-2 (default suite).
   The tiny preset applies each of its 2 groups of 2 inner layers twice per forward; with checkpointing
   every layer application is recomputed in backward, so a shared layer's weights receive their gradient
   from two recomputed segments, which ZeRO-2 then reduces across ranks into partitions. From the same
   weights and the same global batch (each rank its half), one forward and backward with checkpointing
   off and one with it on give bitwise equal losses and full gradients of every parameter, read with
   ``safe_get_full_grad`` after ``engine.backward`` and before ``engine.step``. That read is the reduced,
   averaged gradient: at the accumulation boundary ZeRO-2 has cleared ``.grad`` and the call reassembles
   the partitions, and the result equals, bit for bit, the mean of the two halves' gradients computed
   without DeepSpeed. The checks cannot pass vacuously: the recomputation is counted, the shared layers'
   gradients are far from zero, a single rank's unreduced gradient differs from the reference, and moving
   one shared weight by 1e-3 changes the gradients by hundreds of times a tolerance looser than the
   bitwise check.

2. The albert-xxlarge preset (223M parameters, bf16, activation checkpointing, ALBERT's LAMB) trains two
   steps at ZeRO-2 on 2 ranks at micro batch 1 and sequence length 128 (slow, outside the default suite):
   finite losses of an untrained model, finite gradient norms, and a shared weight whose fp32 master moves
   by exactly the learning rate times its norm per step, as LAMB's trust ratio prescribes. The parameter
   count, step times and memory of the run are printed.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import deepspeed_command, run_ranks, subprocess_env
from torch.testing import assert_close

TESTS = Path(__file__).resolve().parent

XXLARGE_TIMEOUT = 900
"""Seconds for the xxlarge test; its worker takes about 75 s on 2 cores (2 steps of ~25-35 s)."""


def _launch(proof: str, out: Path, *, timeout: float) -> float:
    """``tests/proof_worker.py --proof PROOF`` under ``deepspeed --num_gpus 2`` (2 CPU ranks, gloo), with
    the environment of a fresh launch. Returns the wall-clock seconds."""
    command = deepspeed_command(2, TESTS / "proof_worker.py", "--proof", proof, "--output", str(out))
    env = subprocess_env()
    started = time.perf_counter()
    try:
        proc = run_ranks(command, env=env, timeout=timeout, cwd=TESTS.parent)
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else str(err.stdout)
        pytest.fail(f"proof_worker --proof {proof} timed out after {timeout} s:\n{output[-5000:]}")
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        pytest.fail(
            f"proof_worker --proof {proof} failed ({proc.returncode}):\n"
            f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
        )
    return seconds


# --- 1. activation checkpointing under ZeRO-2 with shared layers ----------------------------------------

SHARED = "albert.encoder.albert_layer_groups."
"""Prefix of the shared layers' parameters; in the tiny preset every one of them runs twice per forward."""

# The negative control is judged against a tolerance 100x looser than fp32's resolution, so that it shows
# the perturbation would be caught even if the bitwise check were ever relaxed to a tolerance.
CONTROL_RTOL, CONTROL_ATOL = 1e-5, 1e-8


@pytest.fixture(scope="module")
def checkpointing(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("checkpointing")
    _launch("checkpointing", out, timeout=240)
    return torch.load(out / "results.pt")


def _excess(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest |got - want| / (atol + rtol |want|) over all elements (> 1 fails the control tolerance)."""
    return max(
        float(((got[n] - want[n]).abs() / (CONTROL_ATOL + CONTROL_RTOL * want[n].abs())).max()) for n in want
    )


@pytest.mark.multiprocess
def test_checkpointing_recomputes_the_shared_layers(checkpointing):
    """The flag takes effect: the first shared layer runs twice per forward (layers 0 and 1 use group 0),
    and with checkpointing twice more in backward."""
    runs = checkpointing["runs"]
    assert checkpointing["world_size"] == 2
    assert runs["off"]["layer_calls"] == {"forward": 2, "forward_and_backward": 2}
    assert runs["on"]["layer_calls"] == {"forward": 2, "forward_and_backward": 4}


@pytest.mark.multiprocess
def test_full_gradient_before_step_is_the_averaged_gradient(checkpointing):
    """After ``engine.backward`` at the accumulation boundary, ZeRO-2 has cleared every ``.grad`` and
    ``safe_get_full_grad`` reassembles the reduced partitions: the mean of both ranks' gradients, equal
    bit for bit to the mean computed without DeepSpeed (with two ranks, a + b is the same rounded number in
    either order, and halving it is exact, whether before or after the sum). Rank 0's own gradient is far
    from it, so an unreduced read would fail."""
    reference = checkpointing["reference"]
    for name in ("off", "on"):
        run = checkpointing["runs"][name]
        assert run["grad_cleared"], name
        # Each rank holds pieces of some parameters only (one may straddle the boundary).
        owned = run["parameters_owned_per_rank"]
        assert all(0 < k < len(reference) for k in owned) and sum(owned) >= len(reference), owned
        assert run["grads"].keys() == reference.keys()
        assert_close(run["grads"], reference, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert _excess(checkpointing["local"], reference) > 1e3


@pytest.mark.multiprocess
def test_checkpointing_gives_bitwise_equal_gradients(checkpointing):
    """Every parameter's full gradient, shared layers included, is the same bit for bit with and without
    activation checkpointing."""
    off, on = checkpointing["runs"]["off"]["grads"], checkpointing["runs"]["on"]["grads"]
    assert off.keys() == on.keys()
    assert sum(name.startswith(SHARED) for name in off) == 2 * 2 * 16  # 2 groups x 2 layers x 16 tensors
    for name in off:
        assert off[name].dtype == torch.float32, name
        assert_close(on[name], off[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.multiprocess
def test_shared_layer_gradients_are_not_zero(checkpointing):
    """So that equality is not vacuous. The key biases are the exception: they add the same term to every
    score of a query, which the softmax cancels, so their gradient is zero up to rounding (~1e-12)."""
    grads = checkpointing["runs"]["on"]["grads"]
    for name, grad in grads.items():
        if name.startswith(SHARED) and not name.endswith("attention.key.bias"):
            assert grad.norm() > 1e-6, f"{name}: {grad.norm()}"
            assert (grad != 0).float().mean() > 0.5, name


@pytest.mark.multiprocess
def test_checkpointing_gives_the_same_loss(checkpointing):
    """Each rank's loss (on its half of the batch) is the same bit for bit with and without checkpointing."""
    off, on = checkpointing["runs"]["off"]["losses"], checkpointing["runs"]["on"]["losses"]
    assert len(off) == 2 and all(math.isfinite(x) for x in off)
    assert off[0] != off[1]  # different halves
    assert on == off


@pytest.mark.multiprocess
def test_negative_control_a_perturbed_shared_weight_is_detected(checkpointing):
    """The comparison can fail: the checkpointed run from weights where one element of a shared layer's
    weight moved by 1e-3 differs from the unperturbed gradients by far more than even the loose control
    tolerance."""
    off = checkpointing["runs"]["off"]["grads"]
    perturbed = checkpointing["runs"]["perturbed"]
    assert checkpointing["shared_weight"].startswith(SHARED)
    assert perturbed["layer_calls"]["forward_and_backward"] == 4
    with pytest.raises(AssertionError):
        assert_close(perturbed["grads"], off, rtol=CONTROL_RTOL, atol=CONTROL_ATOL)
    assert _excess(perturbed["grads"], off) > 100


# --- 2. albert-xxlarge, 2 steps at ZeRO-2 ----------------------------------------------------------------


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return math.nan


class _LowestAvailableMemory:
    """Samples the machine's MemAvailable twice a second while the block runs (other processes count too)."""

    def __init__(self) -> None:
        self.before = _mem_available_gib()
        self.lowest = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.lowest = min(self.lowest, _mem_available_gib())

    def __enter__(self) -> _LowestAvailableMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(XXLARGE_TIMEOUT)
def test_albert_xxlarge_trains_two_steps_at_zero_2(tmp_path, capsys):
    out = tmp_path / "xxlarge"
    with _LowestAvailableMemory() as memory:
        seconds = _launch("xxlarge", out, timeout=XXLARGE_TIMEOUT - 60)
    r = json.loads((out / "results.json").read_text())

    # The preset as configured (bf16, activation checkpointing, LAMB under DeepSpeed's ZeRO-1/2 wrapper), at
    # the requested shape.
    expected = {
        "world_size": 2,
        "zero_stage": 2,
        "micro_batch": 1,
        "accumulation": 1,
        "seq_len": 128,
        "precision": "bf16",
        "model_dtype": "torch.bfloat16",
        "activation_checkpointing": True,
        "optimizer_wrapper": "DeepSpeedZeroOptimizer",
    }
    assert {k: r[k] for k in expected} == expected
    assert r["parameters"] == r["parameters_counted"]
    assert 220e6 < r["parameters"] < 226e6

    # Two applied updates with finite losses (those of an untrained model: about ln V + ln 2 = 11.0) and
    # finite gradient norms.
    assert r["global_steps"] == 2
    untrained = math.log(r["vocab_size"]) + math.log(2)
    for rank_losses in r["losses"]:
        assert len(rank_losses) == 2
        for loss in rank_losses:
            assert math.isfinite(loss) and abs(loss - untrained) < 3, r["losses"]
    assert all(math.isfinite(g) and g > 0 for g in r["grad_norms"]), r["grad_norms"]

    # The shared weight's fp32 master moved at each step by lr x its norm: LAMB's trust ratio makes the
    # update's norm ||w|| whatever the gradient, so this checks the step itself, not only that it happened.
    assert r["lrs"][0] > 0 and r["lrs"][1] > r["lrs"][0]
    assert r["relative_change"] == pytest.approx(r["lrs"], rel=1e-2)
    # The bf16 weights the model computes with are the fp32 masters rounded.
    assert r["bf16_is_rounded_master"]

    peaks = [m["peak"] for m in r["memory_gib"]]
    assert sum(peaks) < 16, r["memory_gib"]

    with capsys.disabled():
        steps = r["seconds"]["steps"][0]
        print(
            f"\nalbert-xxlarge, ZeRO-2, 2 CPU ranks: {r['parameters']:,} parameters; "
            f"micro batch 1 x seq 128, bf16, activation checkpointing\n"
            f"  losses per rank {r['losses']}, grad norms {[round(g, 2) for g in r['grad_norms']]}\n"
            f"  model build {r['seconds']['build']:.1f} s, initialize {r['seconds']['initialize']:.1f} s, "
            f"steps {', '.join(f'{s:.1f}' for s in steps)} s; whole launch {seconds:.0f} s\n"
            f"  {r['shared_weight']}: ||dw||/||w|| {r['relative_change']} vs lr {r['lrs']}; "
            f"bf16 elements changed {r['bf16_elements_changed']:,} of {r['shared_weight_numel']:,}\n"
            f"  resident GiB per rank: "
            + "; ".join(", ".join(f"{k} {v:.2f}" for k, v in m.items()) for m in r["memory_gib"])
            + f"\n  machine MemAvailable {memory.before:.1f} GiB before, lowest {memory.lowest:.1f} GiB during "
            f"(drop {memory.before - memory.lowest:.1f} GiB)"
        )
