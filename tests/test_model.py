"""The model against its peer, transformers' AlbertForPreTraining: names, logits, losses, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from torch.testing import assert_close

from albert_scale.config import CONFIG_DIR, load_config
from albert_scale.model import IGNORE_INDEX, AlbertConfig, AlbertForPreTraining, count_parameters

TINY = AlbertConfig(
    vocab_size=99,
    embedding_size=16,
    hidden_size=36,
    num_hidden_layers=2,
    num_attention_heads=6,
    intermediate_size=37,
    max_position_embeddings=64,
)

SHAPES = {
    "tiny": TINY,
    "groups": dataclasses.replace(TINY, num_hidden_layers=6, num_hidden_groups=3),
    "inner-groups": dataclasses.replace(TINY, num_hidden_layers=3, num_hidden_groups=2, inner_group_num=2),
    "uneven-groups": dataclasses.replace(TINY, num_hidden_layers=5, num_hidden_groups=3, inner_group_num=3),
    "exact-gelu": dataclasses.replace(
        TINY, hidden_act="gelu", embedding_size=8, num_attention_heads=4, hidden_size=32
    ),
}


def hf_twin(config: AlbertConfig) -> transformers.AlbertForPreTraining:
    hf_config = transformers.AlbertConfig(**dataclasses.asdict(config))
    return transformers.AlbertForPreTraining(hf_config)


def make_batch(config: AlbertConfig, *, batch: int = 3, seq: int = 11, predictions: int = 4, seed: int = 0):
    """A padded SOP batch: token types, a padded tail on some rows, masked positions with labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch, seq), generator=g)
    ids[:, 0] = 2
    lengths = torch.tensor([seq, seq - 3, seq - 5][:batch])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    types = torch.zeros_like(ids)
    types[:, seq // 2 :] = 1
    types = types * mask
    positions = torch.stack([torch.randperm(int(n) - 1, generator=g)[:predictions] + 1 for n in lengths])
    labels = ids.gather(1, positions)
    labels[0, -1] = IGNORE_INDEX  # a padded prediction slot
    sop = torch.randint(0, 2, (batch,), generator=g)
    return ids, mask, types, positions, labels, sop


def dense_labels(ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' label layout: [B, S] with IGNORE_INDEX except at the masked positions."""
    out = torch.full_like(ids, IGNORE_INDEX)
    keep = labels != IGNORE_INDEX
    rows = torch.arange(ids.shape[0])[:, None].expand_as(positions)
    out[rows[keep], positions[keep]] = labels[keep]
    return out


def loss_and_grads(model: AlbertForPreTraining, config: AlbertConfig):
    """One forward and backward pass on ``make_batch(config)``: the output and every parameter's gradient."""
    ids, mask, types, positions, labels, sop = make_batch(config)
    model.zero_grad()
    out = model(
        ids, mask, types, masked_lm_positions=positions, masked_lm_labels=labels, sentence_order_labels=sop
    )
    out.loss.backward()
    return out, {name: param.grad.clone() for name, param in model.named_parameters()}


def paired(config: AlbertConfig, seed: int = 0):
    torch.manual_seed(seed)
    ours = AlbertForPreTraining(config)
    theirs = hf_twin(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    # eval(): transformers' SOP head drops out classifier_dropout_prob of the pooled output in training.
    return ours.eval(), theirs.eval()


@pytest.mark.unit
def test_state_dict_names_and_shapes_match_transformers():
    ours, theirs = AlbertForPreTraining(TINY), hf_twin(TINY)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.unit
def test_pretraining_is_deterministic_in_training_mode_without_dropout():
    """v2 configs have no dropout, and the SOP head has none (google-research/ALBERT's
    get_sentence_order_output), whatever classifier_dropout_prob, the fine-tuning classifier's, says:
    two training-mode passes give the same losses and gradients."""
    config = dataclasses.replace(TINY, classifier_dropout_prob=0.5)
    model = AlbertForPreTraining(config).train()
    (first, first_grads), (second, second_grads) = (loss_and_grads(model, config) for _ in range(2))
    assert torch.equal(first.sop_logits, second.sop_logits)
    for name, grad in first_grads.items():
        assert torch.equal(grad, second_grads[name]), name


@pytest.mark.unit
def test_decoder_is_tied_to_word_embeddings():
    model = AlbertForPreTraining(TINY)
    assert model.predictions.decoder.weight is model.albert.embeddings.word_embeddings.weight
    assert model.predictions.decoder.bias is model.predictions.bias


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_losses_and_gradients_match_transformers(name):
    config = SHAPES[name]
    ours, theirs = paired(config)
    ids, mask, types, positions, labels, sop = make_batch(config)

    out = ours(
        ids, mask, types, masked_lm_positions=positions, masked_lm_labels=labels, sentence_order_labels=sop
    )
    ref = theirs(
        ids,
        attention_mask=mask,
        token_type_ids=types,
        labels=dense_labels(ids, positions, labels),
        sentence_order_label=sop,
    )
    rows = torch.arange(ids.shape[0])[:, None]
    assert_close(out.mlm_logits, ref.prediction_logits[rows, positions])
    assert_close(out.sop_logits, ref.sop_logits)
    assert_close(out.loss, ref.loss)
    assert_close(out.mlm_loss + out.sop_loss, out.loss)

    out.loss.backward()
    ref.loss.backward()
    ref_grads = dict(theirs.named_parameters(remove_duplicate=False))
    for param_name, param in ours.named_parameters(remove_duplicate=False):
        assert param.grad is not None, param_name
        assert_close(param.grad, ref_grads[param_name].grad, msg=lambda m, n=param_name: f"{n}: {m}")


@pytest.mark.parity
def test_full_logits_without_positions_match_transformers():
    ours, theirs = paired(SHAPES["groups"])
    ids, mask, types, *_ = make_batch(SHAPES["groups"])
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    out = ours(ids, mask, types, masked_lm_labels=labels)
    ref = theirs(ids, attention_mask=mask, token_type_ids=types)
    assert out.mlm_logits.shape == (*ids.shape, SHAPES["groups"].vocab_size)
    assert_close(out.mlm_logits, ref.prediction_logits)
    expected = torch.nn.functional.cross_entropy(ref.prediction_logits.flatten(0, 1), labels.flatten())
    assert_close(out.mlm_loss, expected)
    assert out.sop_loss is None


@pytest.mark.parity
def test_default_token_types_and_mask_match_transformers():
    ours, theirs = paired(TINY)
    ids = make_batch(TINY)[0]
    assert_close(ours(ids).mlm_logits, theirs(ids).prediction_logits)


@pytest.mark.parity
@pytest.mark.parametrize(
    "name", ["albert-base", "albert-large", "albert-xlarge", "albert-xxlarge", "quickstart", "tiny"]
)
def test_parameter_counts_equal_transformers(name):
    config = load_config(CONFIG_DIR / f"{name}.yaml").model
    with torch.device("meta"):
        theirs = hf_twin(config)
    assert count_parameters(config) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.unit
def test_layer_to_group_mapping_equals_both_references_or_is_refused():
    refused = 0
    for layers in range(1, 49):
        for groups in range(1, layers + 1):
            original = [int(i / layers * groups) for i in range(layers)]  # google-research/ALBERT
            hf = [int(i / (layers / groups)) for i in range(layers)]  # transformers
            if original != hf:
                refused += 1
                with pytest.raises(ValueError, match="would use group"):
                    dataclasses.replace(TINY, num_hidden_layers=layers, num_hidden_groups=groups)
                continue
            config = dataclasses.replace(TINY, num_hidden_layers=layers, num_hidden_groups=groups)
            assert [config.group_of_layer(i) for i in range(layers)] == hf, (layers, groups)
    assert 0 < refused < 50  # only a few odd pairs disagree; every divisor pair is accepted


@pytest.mark.unit
def test_gathered_head_equals_dense_head_at_the_positions():
    torch.manual_seed(0)
    model = AlbertForPreTraining(SHAPES["inner-groups"]).eval()
    ids, mask, types, positions, *_ = make_batch(SHAPES["inner-groups"])
    dense = model(ids, mask, types).mlm_logits
    gathered = model(ids, mask, types, masked_lm_positions=positions).mlm_logits
    assert_close(gathered, dense[torch.arange(ids.shape[0])[:, None], positions])


@pytest.mark.unit
def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = AlbertForPreTraining(TINY).eval()
    ids, mask, types, *_ = make_batch(TINY)
    other = ids.masked_fill(mask == 0, 7)  # different tokens under the padding
    a = model(ids, mask, types).mlm_logits
    b = model(other, mask, types).mlm_logits
    real = mask.bool()
    assert_close(a[real], b[real])


@pytest.mark.unit
def test_activation_checkpointing_gives_equal_gradients():
    config = SHAPES["inner-groups"]
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        grads.append(
            loss_and_grads(AlbertForPreTraining(config, activation_checkpointing=enabled), config)[1]
        )
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


@pytest.mark.unit
def test_init_weights():
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, vocab_size=4000, hidden_size=96, num_attention_heads=6)
    model = AlbertForPreTraining(config)
    words = model.albert.embeddings.word_embeddings.weight
    assert torch.count_nonzero(words[config.pad_token_id]) == 0
    assert abs(words[1:].std().item() - 0.02) < 0.001
    ffn = model.albert.encoder.albert_layer_groups[0].albert_layers[0].ffn
    assert abs(ffn.weight.std().item() - 0.02) < 0.002 and torch.count_nonzero(ffn.bias) == 0
    assert torch.count_nonzero(model.predictions.bias) == 0
    norm = model.albert.encoder.albert_layer_groups[0].albert_layers[0].full_layer_layer_norm
    assert torch.all(norm.weight == 1) and torch.count_nonzero(norm.bias) == 0


@pytest.mark.unit
def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = AlbertForPreTraining(TINY).state_dict()
    torch.manual_seed(3)
    b = AlbertForPreTraining(TINY).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.unit
def test_hf_config_export_builds_the_same_transformers_model():
    hf_config = transformers.AlbertConfig(**SHAPES["groups"].to_hf_dict())
    model = transformers.AlbertForPreTraining(hf_config)
    model.load_state_dict(AlbertForPreTraining(SHAPES["groups"]).state_dict(), strict=True)
    assert hf_config.model_type == "albert"


@pytest.mark.unit
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_queries", [False, True])
def test_cpu_bf16_attention_matches_sdpa(with_mask, with_queries):
    """The bf16 CPU attention (batched GEMMs, recomputation in backward) against SDPA in fp32."""
    from albert_scale.model import attention

    torch.manual_seed(0)
    batch, seq, heads, dim = 3, 37, 4, 16
    qkv = torch.randn(batch, seq, 3 * heads * dim)
    mask = None
    if with_mask:
        mask = (torch.arange(seq)[None, :] < torch.tensor([seq, 30, 12])[:, None])[:, None, None, :]
    queries = torch.tensor([[0, 5, 5, 9], [0, 1, 2, 29], [0, 11, 0, 0]]) if with_queries else None
    grad = torch.randn(batch, seq if queries is None else queries.shape[1], heads * dim)

    results = []
    for dtype in (torch.float32, torch.bfloat16):
        x = qkv.to(dtype).detach().requires_grad_(True)
        out = attention(x, mask, num_heads=heads, query_index=queries)
        out.backward(grad.to(dtype))
        results.append((out.float(), x.grad.float()))
    (ref_out, ref_grad), (out, grad_in) = results
    assert out.shape == ref_out.shape
    # bf16 has an 8-bit mantissa: agreement at that level, relative to the tensors' scale.
    assert (out - ref_out).abs().max() <= 0.02 * ref_out.abs().max()
    assert (grad_in - ref_grad).abs().max() <= 0.03 * ref_grad.abs().max()
