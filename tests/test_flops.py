"""FLOPs accounting: the formula against the paper-size figure and against torch's FLOP counter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from albert_scale.config import load_config
from albert_scale.flops import forward_flops_per_sequence, mfu, peak_flops, train_flops_per_sequence
from albert_scale.model import AlbertConfig, AlbertForPreTraining

pytestmark = pytest.mark.unit


def test_xxlarge_at_512_is_7_59_tflop_per_trained_sequence():
    config = load_config("albert-xxlarge").model
    dense = train_flops_per_sequence(config, 512)  # MLM head at every position
    assert dense == pytest.approx(7.59e12, rel=1e-3)
    assert dense / 512 == pytest.approx(14.8e9, rel=3e-3)
    gathered = train_flops_per_sequence(config, 512, 77)  # only the masked positions
    assert gathered == pytest.approx(7.578e12, rel=1e-3) and gathered < dense


def test_train_is_three_forwards():
    config = load_config("albert-base").model
    assert train_flops_per_sequence(config, 128, 20) == 3 * forward_flops_per_sequence(config, 128, 20)


def test_inner_groups_count_as_layers_run():
    base = AlbertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=4)
    doubled = dataclasses.replace(base, inner_group_num=2)
    encoder = forward_flops_per_sequence(doubled, 16, 0) - forward_flops_per_sequence(base, 16, 0)
    assert encoder == 16 * 4 * (8 * 64**2 + 4 * 64 * 128 + 4 * 16 * 64)


@pytest.mark.parametrize(("seq", "predictions"), [(16, 3), (32, None)])
def test_formula_equals_torch_flop_counter(seq, predictions):
    config = AlbertConfig(
        vocab_size=500,
        embedding_size=16,
        hidden_size=64,
        num_hidden_layers=3,
        num_hidden_groups=1,
        num_attention_heads=4,
        intermediate_size=96,
        inner_group_num=2,
        max_position_embeddings=64,
    )
    model = AlbertForPreTraining(config).eval()
    ids = torch.randint(5, 500, (2, seq))
    positions = None if predictions is None else torch.arange(1, predictions + 1).expand(2, -1)
    # The math backend runs attention as counted matmuls (the fused CPU kernel is not counted).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(ids, masked_lm_positions=positions)
    assert counter.get_total_flops() == 2 * forward_flops_per_sequence(config, seq, predictions)


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("cpu", "bf16") is None
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)
    assert mfu(1.0, None) is None
