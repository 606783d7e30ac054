"""The fine-tuning margin over random initialization: a paired difference with its 95% interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from albert_scale.finetune import describe_margin, paired_margin


def test_counts_and_interval_by_hand():
    first = [True] * 7 + [False] * 3  # right on examples 0..6
    second = [False] * 2 + [True] * 7 + [False]  # right on examples 2..8
    margin = paired_margin(first, second)
    assert (margin["only_first"], margin["only_second"]) == (2, 2)
    assert margin["points"] == 0.0
    half = 1.959963984540054 * math.sqrt(4) / 10
    assert margin["ci95"] == pytest.approx([-half, half])
    assert not margin["significant"]


def test_agreeing_models_have_an_empty_interval_and_one_sided_wins_are_significant():
    same = [True, False, True, True]
    assert paired_margin(same, same) == {
        "points": 0.0,
        "ci95": [0.0, 0.0],
        "only_first": 0,
        "only_second": 0,
        "significant": False,
    }
    first = [True] * 60 + [False] * 140
    second = [False] * 200
    margin = paired_margin(first, second)
    assert margin["points"] == pytest.approx(0.3) and margin["significant"] and margin["ci95"][0] > 0
    assert paired_margin(second, first)["ci95"][1] < 0


def test_interval_agrees_with_a_paired_bootstrap():
    rng = np.random.default_rng(0)
    n = 3000
    first = rng.random(n) < 0.70
    # The second model shares most of the first's answers, as two models of one test set do.
    second = np.where(rng.random(n) < 0.8, first, rng.random(n) < 0.68)
    margin = paired_margin(first.tolist(), second.tolist())
    draws = rng.integers(0, n, size=(4000, n))
    differences = first[draws].mean(axis=1) - second[draws].mean(axis=1)
    low, high = np.percentile(differences, [2.5, 97.5])
    assert margin["points"] == pytest.approx(first.mean() - second.mean())
    assert margin["ci95"][0] == pytest.approx(low, abs=0.003)
    assert margin["ci95"][1] == pytest.approx(high, abs=0.003)


def test_description_and_bad_input():
    margin = {"points": 0.0147, "ci95": [-0.0091, 0.0382], "significant": False}
    assert (
        describe_margin(margin)
        == "+1.5 points (95% interval -0.9 to +3.8 over the test examples; not significant)"
    )
    with pytest.raises(ValueError, match="same length"):
        paired_margin([True], [True, False])
    with pytest.raises(ValueError, match="non-empty"):
        paired_margin([], [])


def test_reinit_pooler_draws_only_the_pooler_afresh():
    import torch
    import transformers

    from albert_scale.finetune import reinit_pooler

    config = transformers.AlbertConfig(
        vocab_size=50,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    net = transformers.AlbertForSequenceClassification(config)
    with torch.no_grad():
        net.albert.pooler.weight.fill_(0.5)
        net.albert.pooler.bias.fill_(0.5)
    before = {name: p.clone() for name, p in net.named_parameters()}
    torch.manual_seed(0)
    reinit_pooler(net)
    changed = {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"albert.pooler.weight", "albert.pooler.bias"}
    assert net.albert.pooler.bias.abs().max() == 0
    assert abs(net.albert.pooler.weight.std().item() - config.initializer_range) < 0.005
