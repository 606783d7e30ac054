"""LAMB: ALBERT's exclusions, parity with a per-tensor reference, and exactness under DeepSpeed ZeRO 0-3."""

from __future__ import annotations

import copy
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import deepspeed_command, run_ranks, subprocess_env
from torch import nn
from torch.testing import assert_close

from albert_scale.model import AlbertConfig, AlbertForPreTraining, count_parameters
from albert_scale.optim import NO_DECAY_PATTERNS, Fragment, Lamb, PartitionLayout, _chunk_plan, param_groups

TINY = AlbertConfig(
    vocab_size=99,
    embedding_size=16,
    hidden_size=36,
    num_hidden_layers=4,
    num_hidden_groups=2,
    num_attention_heads=6,
    intermediate_size=37,
    inner_group_num=2,
    max_position_embeddings=64,
)
LR = 0.01  # with the trust ratio each step moves a weight matrix by ~1% of its norm
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0  # the recipe's global clipping, which DeepSpeed applies before the optimizer
STEPS = 10
GLOBAL_BATCH = 8
WORLD_SIZE = 2
TESTS = Path(__file__).resolve().parent


class ReferenceLamb(torch.optim.Optimizer):
    """ALBERT's LAMB written plainly, one tensor at a time (the peer of ``Lamb``). Its element-wise ops
    come in the order ``Lamb``'s multi-tensor ops use, so that the two round alike."""

    def __init__(self, params, lr, *, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, trust_ratio=True):
        super().__init__(
            params,
            {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "trust_ratio": trust_ratio},
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                state = self.state[w]
                m = state.setdefault("m", torch.zeros_like(w))
                v = state.setdefault("v", torch.zeros_like(w))
                m.mul_(beta1).add_(g, alpha=1 - beta1)  # m = b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = b2 v + (1 - b2) g^2
                u = m / (v.sqrt() + group["eps"])  # no bias correction
                u.add_(w, alpha=group["weight_decay"])  # u += wd w
                if group["trust_ratio"]:
                    w_norm, u_norm = w.norm(), u.norm()
                    if w_norm > 0 and u_norm > 0:
                        u.mul_(w_norm / u_norm)  # r = ||w|| / ||u||, else 1; no clamp
                w.add_(u, alpha=-group["lr"])  # w -= lr r u


def tiny_model(seed: int = 0) -> AlbertForPreTraining:
    """The tiny ALBERT with fixed initial weights, in eval mode: the SOP head's dropout would make runs
    that see the same data differ (gradients are computed all the same)."""
    torch.manual_seed(seed)
    return AlbertForPreTraining(TINY).eval()


def make_batches(
    steps: int = STEPS, *, batch: int = GLOBAL_BATCH, seq: int = 16, predictions: int = 4, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Random padded SOP batches. Every prediction slot is a real label, so the mean loss over the global
    batch equals the mean of the per-rank means over equal halves (and so do the gradients)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        ids = torch.randint(5, TINY.vocab_size, (batch, seq), generator=g)
        ids[:, 0] = 2
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        types = (torch.arange(seq)[None, :] >= lengths[:, None] // 2).long() * mask
        positions = torch.stack([torch.randperm(int(n) - 1, generator=g)[:predictions] + 1 for n in lengths])
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": types,
                "masked_lm_positions": positions,
                "masked_lm_labels": torch.randint(5, TINY.vocab_size, (batch, predictions), generator=g),
                "sentence_order_labels": torch.randint(0, 2, (batch,), generator=g),
            }
        )
    return batches


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[dict[str, torch.Tensor]],
    *,
    max_grad_norm: float = 0.0,
) -> None:
    for batch in batches:
        model(**batch).loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def single_process_weights() -> dict[str, torch.Tensor]:
    """The weights after ``STEPS`` steps of Lamb on whole global batches, in one process."""
    model = tiny_model()
    train(model, Lamb(param_groups(model, WEIGHT_DECAY), lr=LR), make_batches(), max_grad_norm=MAX_GRAD_NORM)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def excess(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, rtol: float) -> float:
    """The smallest atol for which ``got`` and ``want`` agree at ``rtol`` (assert_close's criterion)."""
    return max(float(((got[k] - want[k]).abs() - rtol * want[k].abs()).max()) for k in want)


# --- unit: parameter groups ---------------------------------------------------------------------------


@pytest.mark.unit
def test_param_groups_follow_albert_exclusions():
    model = tiny_model()
    adapted, excluded = param_groups(model, 0.01)
    assert (adapted["weight_decay"], adapted["trust_ratio"]) == (0.01, True)
    assert (excluded["weight_decay"], excluded["trust_ratio"]) == (0.0, False)
    for group in (adapted, excluded):
        assert len(group["names"]) == len(group["params"])
        named = dict(model.named_parameters())
        assert all(named[n] is p for n, p in zip(group["names"], group["params"], strict=True))

    assert all(not any(s in n for s in NO_DECAY_PATTERNS) for n in adapted["names"])
    assert all(any(s in n for s in NO_DECAY_PATTERNS) for n in excluded["names"])
    # Hugging Face's name for the layer's output norm has no "LayerNorm" in it.
    layer = "albert.encoder.albert_layer_groups.1.albert_layers.0."
    assert layer + "full_layer_layer_norm.weight" in excluded["names"]
    assert layer + "attention.LayerNorm.weight" in excluded["names"]
    assert layer + "ffn.bias" in excluded["names"]
    assert layer + "ffn.weight" in adapted["names"]
    assert "albert.embeddings.word_embeddings.weight" in adapted["names"]
    assert "albert.encoder.embedding_hidden_mapping_in.weight" in adapted["names"]
    assert "sop_classifier.classifier.weight" in adapted["names"]
    # Tied tensors appear once: the decoder weight is the word embeddings, its bias the head's bias.
    assert "predictions.bias" in excluded["names"]
    every = adapted["names"] + excluded["names"]
    assert "predictions.decoder.weight" not in every and "predictions.decoder.bias" not in every
    assert len(set(every)) == len(every)
    assert sum(p.numel() for g in (adapted, excluded) for p in g["params"]) == count_parameters(TINY)
    # 4 distinct layers x (6 biases + 2 norms x 2), and 9 outside them; 31 decayed matrices and embeddings.
    assert (len(adapted["names"]), len(excluded["names"])) == (31, 4 * 10 + 9)


@pytest.mark.unit
def test_param_groups_drop_empty_groups_and_check_weight_decay():
    groups = param_groups(nn.Linear(3, 4, bias=False), 0.1)
    assert [g["names"] for g in groups] == [["weight"]]
    with pytest.raises(ValueError, match="weight_decay=-1"):
        param_groups(nn.Linear(3, 4), -1)


# --- parity: Lamb against the per-tensor reference ------------------------------------------------------


@pytest.mark.parity
def test_lamb_equals_reference_on_tiny_albert():
    model = tiny_model()
    twin = copy.deepcopy(model)
    batches = make_batches()
    train(model, Lamb(param_groups(model, WEIGHT_DECAY), lr=LR), batches)
    train(twin, ReferenceLamb(param_groups(twin, WEIGHT_DECAY), lr=LR), batches)

    start = dict(tiny_model().named_parameters())
    got, want = dict(model.named_parameters()), dict(twin.named_parameters())
    for name in want:
        assert not torch.equal(want[name], start[name]), f"{name} did not move"
        assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.unit
def test_first_step_has_no_bias_correction_and_no_clamp():
    # Step 1 from m = v = 0: u = 0.1 g / (sqrt(0.001) |g| + eps) + wd w, where Adam's bias correction
    # would give ~sign(g). r = ||w|| / ||u|| is used as it is, even far above LAMB variants' clamp of 10.
    torch.manual_seed(0)
    w0, g = 100 * torch.randn(5, 7), torch.randn(5, 7)
    weight, bias = nn.Parameter(w0.clone()), nn.Parameter(w0[0].clone())
    weight.grad, bias.grad = g.clone(), g[0].clone()
    lr, wd, eps = 0.1, 0.01, 1e-6
    groups = [
        {"params": [weight], "weight_decay": wd, "trust_ratio": True},
        {"params": [bias], "weight_decay": 0.0, "trust_ratio": False},
    ]
    Lamb(groups, lr=lr, eps=eps).step()

    u = 0.1 * g / (math.sqrt(0.001) * g.abs() + eps) + wd * w0
    r = w0.norm() / u.norm()
    assert r > 10  # a clamp would show
    assert_close(weight.detach(), w0 - lr * r * u, rtol=1e-6, atol=1e-7)
    u_bias = 0.1 * g[0] / (math.sqrt(0.001) * g[0].abs() + eps)
    assert_close(bias.detach(), w0[0] - lr * u_bias, rtol=1e-6, atol=1e-7)


@pytest.mark.unit
def test_trust_ratio_is_one_where_a_norm_is_zero():
    lr, wd, eps = 0.1, 0.01, 1e-6
    g = torch.linspace(-1, 1, 6)
    zero_weight = nn.Parameter(torch.zeros(6))  # ||w|| = 0 -> r = 1 (u is the Adam direction only)
    zero_update = nn.Parameter(torch.ones(6))  # g = 0 and no decay: ||u|| = 0 -> r = 1, w unchanged
    only_decay = nn.Parameter(torch.ones(6))  # g = 0: u = wd w, r = 1 / wd, w -> (1 - lr) w
    zero_weight.grad, zero_update.grad, only_decay.grad = g.clone(), torch.zeros(6), torch.zeros(6)
    groups = [
        {"params": [zero_weight, only_decay], "weight_decay": wd},
        {"params": [zero_update], "weight_decay": 0.0},
    ]
    Lamb(groups, lr=lr, eps=eps).step()

    assert_close(zero_weight.detach(), -lr * 0.1 * g / (math.sqrt(0.001) * g.abs() + eps))
    assert torch.equal(zero_update.detach(), torch.ones(6))
    assert_close(only_decay.detach(), torch.full((6,), 1 - lr))


@pytest.mark.unit
def test_state_is_fp32_and_named_like_adam():
    model = tiny_model()
    optimizer = Lamb(param_groups(model, WEIGHT_DECAY), lr=LR)
    train(model, optimizer, make_batches(1))
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-6  # ALBERT's
    state = optimizer.state[model.albert.pooler.weight]
    assert set(state) == {"exp_avg", "exp_avg_sq"}
    assert all(t.dtype == torch.float32 and t.shape == (36, 36) for t in state.values())
    saved = optimizer.state_dict()["param_groups"][0]
    assert saved["names"][0] == "albert.embeddings.word_embeddings.weight" and saved["trust_ratio"] is True


@pytest.mark.unit
def test_user_errors_name_the_key():
    weight = nn.Parameter(torch.ones(3))
    for kwargs, key in (
        ({"lr": -1.0}, "lr=-1.0"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"betas": (0.9, 1.0)}, "betas="),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ):
        with pytest.raises(ValueError, match=key):
            Lamb([weight], **kwargs)
    with pytest.raises(ValueError, match="names: 2 names for 1 params"):
        Lamb([{"params": [weight], "names": ["a", "b"]}])

    half = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    half.grad = torch.ones(3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="half_weight: Lamb updates fp32 tensors"):
        Lamb([{"params": [half], "names": ["half_weight"]}]).step()


@pytest.mark.unit
def test_a_flat_tensor_it_was_not_told_about_is_refused():
    # What DeepSpeed ZeRO does to the optimizer: its groups' params become one flat partition.
    model = nn.Linear(3, 4)
    optimizer = Lamb(param_groups(model, 0.01))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).requires_grad_()
    flat.grad = torch.ones_like(flat)
    optimizer.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match=r"attach_zero_partitions\(engine.optimizer\)"):
        optimizer.step()


# --- parity: the CPU path (chunks) against the multi-tensor path ----------------------------------------


@pytest.mark.parity
def test_cpu_chunks_equal_multi_tensor_path_on_tiny_albert():
    # Every tensor of the tiny model fits in one chunk: the two paths run the same kernels on the same
    # elements, so 10 steps of training leave the same bits in the weights and the moments.
    model, batches = tiny_model(), make_batches()
    runs = {chunked: copy.deepcopy(model) for chunked in (True, False)}
    optimizers = {}
    for chunked, twin in runs.items():
        optimizers[chunked] = Lamb(param_groups(twin, WEIGHT_DECAY), lr=LR)
        optimizers[chunked]._chunked_on_cpu = chunked
        train(twin, optimizers[chunked], batches, max_grad_norm=MAX_GRAD_NORM)
    assert optimizers[True]._update_buffers and not optimizers[False]._update_buffers
    for (name, got), want in zip(runs[True].named_parameters(), runs[False].parameters(), strict=True):
        assert torch.equal(got, want), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizers[True].state[got][key], optimizers[False].state[want][key]), name


@pytest.mark.unit
def test_cpu_path_keeps_its_buffers_out_of_the_state():
    # u lives in one buffer per tensor, allocated at the first step and reused: not optimizer state, so
    # neither state_dict() nor the checkpoints (which read exp_avg and exp_avg_sq) see it.
    model = tiny_model()
    optimizer = Lamb(param_groups(model, WEIGHT_DECAY), lr=LR)
    train(model, optimizer, make_batches(1))
    buffers = {p: b.data_ptr() for p, b in optimizer._update_buffers.items()}
    assert set(buffers) == set(model.parameters())
    train(model, optimizer, make_batches(2, seed=2))
    assert {p: b.data_ptr() for p, b in optimizer._update_buffers.items()} == buffers
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in optimizer.state_dict()["state"].values())


def lay_out_flat(optimizer: Lamb, *, pad: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Makes ``optimizer`` update flat tensors, as under DeepSpeed ZeRO: each group's parameters laid end
    to end, the trust-ratio group's cut mid-parameter into two flats (so one parameter has a fragment in
    each) and padded with ``pad`` elements. Returns each group's (parameters, flats)."""
    index = {id(p): i for i, p in enumerate(optimizer._params)}
    optimizer._layout = PartitionLayout({}, None, partitioned=False)
    layout = []
    for group in optimizer.param_groups:
        members, extra = group["params"], pad if group["trust_ratio"] else 0
        whole = torch.cat([p.detach().reshape(-1) for p in members] + [torch.full((extra,), 0.5)])
        bounds = (
            [0, whole.numel() * 2 // 5 + 3, whole.numel()] if group["trust_ratio"] else [0, whole.numel()]
        )
        flats = [whole[a:b].clone().requires_grad_() for a, b in itertools.pairwise(bounds)]
        optimizer._layout.fragments.update({flat: [] for flat in flats})
        at = 0
        for p in members:
            for flat, (a, b) in zip(flats, itertools.pairwise(bounds), strict=True):
                lo, hi = max(a, at), min(b, at + p.numel())
                if lo < hi:
                    optimizer._layout.fragments[flat].append(Fragment(lo - a, hi - lo, index[id(p)], lo - at))
            at += p.numel()
        group["params"] = flats
        layout.append((members, flats))
    return layout


def three_steps(
    model: nn.Module,
    grads: list[list[torch.Tensor]],
    chunk: int | None,
    *,
    flat: bool,
    compiled: bool = False,
) -> list[torch.Tensor]:
    """The weights after a step on each of ``grads`` by Lamb on a copy of ``model``, one flat tensor per
    parameter in the model's order, plus the padding when ``flat`` (the layout of :func:`lay_out_flat`).
    ``chunk``: the CPU path with chunks of that many elements (None: the multi-tensor path); ``compiled``:
    its compiled loops, whatever the size of the groups, cut at ``chunk`` elements too."""
    twin = copy.deepcopy(model)
    optimizer = Lamb(param_groups(twin, WEIGHT_DECAY), lr=LR, compile_cpu=compiled)
    optimizer._chunked_on_cpu = chunk is not None
    optimizer._chunk_numel = optimizer._compiled_chunk_numel = chunk or optimizer._chunk_numel
    optimizer._compile_min_numel = 0
    layout = lay_out_flat(optimizer, pad=5) if flat else []
    for step_grads in grads:
        for p, g in zip(twin.parameters(), step_grads, strict=True):
            p.grad = g
        for members, flats in layout:
            padding = torch.ones(sum(f.numel() for f in flats) - sum(p.numel() for p in members))
            whole = torch.cat([p.grad.reshape(-1) for p in members] + [padding])
            for f, g in zip(flats, whole.split([f.numel() for f in flats]), strict=True):
                f.grad = g.clone()
        optimizer.step()
    assert (optimizer._scratch is None) == (compiled or chunk is None)  # the eager chunks' scratch
    if not flat:
        return [p.detach().reshape(-1) for p in twin.parameters()]
    pieces, padding = {}, []
    for members, flats in layout:
        whole = torch.cat([f.detach() for f in flats])
        sizes = [p.numel() for p in members]
        *weights, tail = whole.split([*sizes, whole.numel() - sum(sizes)])
        pieces.update(zip(map(id, members), weights, strict=True))
        padding.append(tail)
    return [pieces[id(p)] for p in twin.parameters()] + [torch.cat(padding)]


def random_grads(model: nn.Module, steps: int = 3) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(steps)]


@pytest.mark.parity
def test_cpu_chunks_on_a_flat_zero_like_layout():
    # One process standing in for ZeRO (lay_out_flat). Chunks of 37 elements cut fragments, and fragments
    # cut chunks. After 3 steps the flats hold the weights of the multi-tensor path on the same flats and
    # of Lamb on the parameters themselves; the padding is updated alike by both paths (with r = 1).
    model = tiny_model()
    grads = random_grads(model)
    want = three_steps(model, grads, None, flat=False)
    chunked = three_steps(model, grads, 37, flat=False)
    foreach_flat, chunked_flat = (
        three_steps(model, grads, None, flat=True),
        three_steps(model, grads, 37, flat=True),
    )
    assert len(chunked_flat) == len(foreach_flat) == len(want) + 1 and chunked_flat[-1].numel() == 5
    for got, expected in zip(chunked_flat, foreach_flat, strict=True):  # with the padding
        assert_close(got, expected, rtol=1e-6, atol=1e-9)
    for run_ in (chunked, chunked_flat):
        for got, expected in zip(run_, want, strict=False):
            assert_close(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parity
def test_compiled_cpu_step_matches_the_eager_chunks():
    # The compiled loops (torch.compile, forced on for the tiny model's small groups) on the parameters, and
    # on the flat ZeRO-like layout where calls of 37 elements cut fragments and fragments cut calls: after 3
    # steps, the weights of the eager chunks and of the multi-tensor path to fp32 rounding, padding included.
    model = tiny_model()
    grads = random_grads(model)
    want = three_steps(model, grads, None, flat=False)
    want_flat = three_steps(model, grads, 37, flat=True)
    compiled = three_steps(model, grads, 1 << 18, flat=False, compiled=True)
    compiled_flat = three_steps(model, grads, 37, flat=True, compiled=True)
    assert len(compiled_flat) == len(want_flat) and compiled_flat[-1].numel() == 5
    # Rounding apart (contracted multiply-adds, another square root), a step differs by ulps of lr r u: with
    # lr 0.01 and |u| up to ~1, some 1e-9 per step; moments that nearly cancel make a few of them larger.
    for got, expected in [*zip(compiled, want, strict=True), *zip(compiled_flat, want_flat, strict=True)]:
        assert_close(got, expected, rtol=1e-6, atol=1e-8)
    moved = torch.cat(compiled) - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert moved.abs().max() > 1e-3  # the steps did move the weights


FALLBACK_SCRIPT = """
import torch
from albert_scale.optim import Lamb
weights = []
for compile_cpu in (True, False):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3000))
    w.grad = torch.randn(3000)
    lamb = Lamb([w], lr=0.01, weight_decay=0.01, compile_cpu=compile_cpu)
    lamb._compile_min_numel = 0
    lamb.step()
    weights.append(w.detach())
print("equal" if torch.equal(*weights) else "differ")
"""


@pytest.mark.unit
def test_without_a_compiler_the_cpu_step_warns_once_and_runs_eagerly(tmp_path):
    # A real failure of torch.compile: no C++ compiler (CXX names none) and an empty Inductor cache, in a
    # child process. The step still happens, with the eager chunks' very bits, after one warning.
    env = subprocess_env(CXX=str(tmp_path / "no-such-c++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["equal"]
    warnings = [
        line for line in proc.stderr.splitlines() if "torch.compile of the CPU step does not work" in line
    ]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "eager" in warnings[0]


@pytest.mark.unit
def test_chunk_plan_splits_fragments_at_chunk_boundaries():
    fragments = [Fragment(12, 3, 2), Fragment(0, 7, 0), Fragment(7, 0, 5), Fragment(8, 4, 1)]  # gap at 7
    plan = list(_chunk_plan(17, fragments, 5))
    assert plan == [
        (0, 5, [(0, 5, 0)]),
        (5, 10, [(5, 7, 0), (8, 10, 1)]),
        (10, 15, [(10, 12, 1), (12, 15, 2)]),
        (15, 17, []),  # padding
    ]
    assert list(_chunk_plan(0, fragments, 5)) == []


@pytest.mark.unit
def test_non_contiguous_tensors_take_the_multi_tensor_path():
    # The chunks are flat ranges, which need contiguous tensors; a transposed parameter is updated all the
    # same, by the multi-tensor path, with the same result.
    results = []
    for chunked in (True, False):
        weight = nn.Parameter(torch.arange(12.0).view(3, 4).t())
        weight.grad = torch.linspace(-1, 1, 12).view(4, 3)
        optimizer = Lamb([weight], lr=0.1, weight_decay=0.01)
        optimizer._chunked_on_cpu = chunked
        optimizer.step()
        assert not optimizer._update_buffers
        results.append(weight.detach().clone())
    assert torch.equal(*results)
    assert not torch.equal(results[0], torch.arange(12.0).view(3, 4).t())


# --- multiprocess: DeepSpeed ZeRO on 2 CPU ranks over gloo ------------------------------------------------


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory) -> dict:
    """Runs ``tests/zero_worker.py`` once on 2 ranks (every ZeRO stage in one launch) and loads what rank 0
    saved."""
    out = tmp_path_factory.mktemp("zero")
    command = deepspeed_command(WORLD_SIZE, TESTS / "zero_worker.py", "--output", str(out))
    proc = run_ranks(command, env=subprocess_env(), timeout=270, cwd=TESTS.parent)
    if proc.returncode != 0 or not (out / "results.pt").exists():
        pytest.fail(f"zero_worker failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return torch.load(out / "results.pt")


@pytest.fixture(scope="module")
def single_process() -> dict[str, torch.Tensor]:
    return single_process_weights()


# Gradients summed over two ranks differ from one process's in the last bits; Adam's normalization turns
# that into differences of ~1e-7 in weights near zero (the key biases, whose gradient is zero up to
# rounding, move by nothing else). So rtol 1e-5 with atol 1e-5 x the init std (0.02): ZeRO may be no
# worse than plain data parallelism (stage 0), which needs ~1e-7.
RTOL, ATOL = 1e-5, 2e-7


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_equals_single_process(zero_results, single_process, stage):
    """Half of each global batch per rank under ZeRO = the whole batch in one process."""
    got = zero_results["weights"][f"fp32-stage{stage}"]
    assert got.keys() == single_process.keys()
    start = dict(tiny_model().named_parameters())
    for name, want in single_process.items():
        assert not torch.equal(want, start[name]), f"{name} did not move"
        assert_close(got[name], want, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"stage {stage} {n}: {m}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("control", ["naive-fp32-stage2", "unreduced-fp32-stage3"])
def test_negative_controls_differ(zero_results, single_process, control):
    """The test can fail: the per-tensor reference LAMB on ZeRO-2's flat partitions (what any optimizer
    does with what DeepSpeed hands it), or Lamb at ZeRO-3 with each rank's norms not all-reduced, are off
    by orders of magnitude more than the tolerance."""
    assert excess(zero_results["weights"][control], single_process, rtol=RTOL) > 1000 * ATOL


@pytest.mark.multiprocess
def test_one_all_reduce_per_optimizer_call(zero_results):
    """One collective per step at ZeRO-1/2 and with the BF16 optimizer (DeepSpeed steps each param group
    separately; only the trust-ratio group needs norms), one per trust-ratio sub-group at ZeRO-3, none
    without partitions."""
    counts = zero_results["all_reduces"]
    assert counts["fp32-stage0"] == (0, 0)
    for run in ("fp32-stage1", "fp32-stage2", "bf16-stage1", "bf16-stage2"):
        assert counts[run] == (1, 1), run
    for run in ("fp32-stage3", "bf16-stage3"):
        made, needed = counts[run]
        assert made == needed > 1, run


@pytest.mark.multiprocess
def test_layout_pins_deepspeed_internals(zero_results):
    """For every wrapper (ZeRO 1/2/3 in fp32 and bf16, the BF16 optimizer) the fragments that
    ``zero_partition_layout`` reads, gathered over the ranks, rebuild every parameter exactly once and with
    the master weights' values; DeepSpeed keeps our extra param-group keys."""
    checks = zero_results["layout"]
    assert set(checks) == {f"{dtype}-stage{s}" for dtype in ("fp32", "bf16") for s in (1, 2, 3)}
    for run, check in checks.items():
        assert check["coverage"] == (1, 1), f"{run}: elements covered min/max {check['coverage']}"
        assert check["max_error"] == 0.0, f"{run}: fragments differ from the weights by {check['max_error']}"
        assert check["group_keys"] == [("names", True), ("names", False)], run
        assert check["split_parameters"] > 0, f"{run}: no parameter straddles two ranks"
    assert checks["bf16-stage1"]["wrapper"] == "BF16_Optimizer"
    assert checks["bf16-stage2"]["wrapper"] == checks["fp32-stage1"]["wrapper"] == "DeepSpeedZeroOptimizer"
    assert checks["fp32-stage3"]["wrapper"] == "DeepSpeedZeroOptimizer_Stage3"
    assert checks["fp32-stage3"]["sub_groups"] > 2  # small sub_group_size: one optimizer call each


@pytest.mark.multiprocess
def test_bf16_trains_and_bf16_without_zero_is_refused(zero_results):
    assert set(zero_results["losses"]) == {"bf16-stage1", "bf16-stage2", "bf16-stage3"}
    for run, losses in zero_results["losses"].items():
        assert all(math.isfinite(x) for x in losses), run
    # FP16_UnfusedOptimizer steps on zero gradients at start-up, which would decay the weights.
    assert "use ZeRO stage 1 or more" in (zero_results["refused"] or "")
