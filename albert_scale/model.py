"""ALBERT for pretraining: factorized embeddings, cross-layer parameter sharing, MLM and SOP heads.

Parameter names are those of Hugging Face's ``AlbertForPreTraining`` (the interchange format), so a
``state_dict()`` moves between the two with ``strict=True``. This file imports nothing distributed: the
model is built plain here and wrapped for parallelism elsewhere.

Shapes: B batch, S sequence, P masked positions, E embedding size, H hidden size, N heads, D head size,
I FFN size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

# Hidden activations by their Hugging Face names. ALBERT uses `gelu_new`, the tanh approximation, which
# torch computes as one fused op (Hugging Face spells it out in five element-wise ops).
ACTIVATIONS = {
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

IGNORE_INDEX = -100  # label value that contributes no loss (padding of masked positions)


@dataclass(frozen=True)
class AlbertConfig:
    """ALBERT architecture. Field names and defaults are those of ``transformers.AlbertConfig``
    (the defaults are ALBERT-xxlarge v2)."""

    vocab_size: int = 30000
    """Vocabulary size of the SentencePiece model."""
    embedding_size: int = 128
    """Size E of the factorized token embeddings (projected to the hidden size)."""
    hidden_size: int = 4096
    """Hidden size H of every transformer layer."""
    num_hidden_layers: int = 12
    """Layer applications L (the shared layers are run this many times)."""
    num_hidden_groups: int = 1
    """Groups of shared parameters; layer i uses group int(i / L * groups)."""
    num_attention_heads: int = 64
    """Attention heads; must divide the hidden size."""
    intermediate_size: int = 16384
    """FFN size I."""
    inner_group_num: int = 1
    """Distinct layers inside a group, run one after the other at each application."""
    hidden_act: str = "gelu_new"
    """Activation of the FFN and the MLM head: gelu_new (tanh approximation), gelu, relu, silu."""
    hidden_dropout_prob: float = 0.0
    """Dropout on embeddings and layer outputs (0 in ALBERT v2)."""
    attention_probs_dropout_prob: float = 0.0
    """Dropout on attention probabilities (0 in ALBERT v2)."""
    max_position_embeddings: int = 512
    """Longest sequence the position table holds."""
    type_vocab_size: int = 2
    """Token types (segments A and B)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initializer."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon."""
    classifier_dropout_prob: float = 0.1
    """Dropout before a downstream classifier (fine-tuning); the SOP head of pretraining has none."""
    pad_token_id: int = 0
    """Id of [pad]; its embedding row starts at zero and gets no gradient from the lookup."""

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "embedding_size",
            "hidden_size",
            "num_hidden_layers",
            "num_hidden_groups",
            "num_attention_heads",
            "intermediate_size",
            "inner_group_num",
            "max_position_embeddings",
            "type_vocab_size",
        )
        for name in positive:
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}={value}: must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size}: not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_hidden_groups > self.num_hidden_layers:
            raise ValueError(
                f"num_hidden_groups={self.num_hidden_groups}: more groups than "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        for i in range(self.num_hidden_layers):
            # google-research/ALBERT computes int(i / L * G), transformers int(i / (L / G)); in floating
            # point they disagree for a few (L, G) pairs, and a checkpoint would then run differently in
            # the two. Such pairs are refused rather than silently made non-portable.
            exact = self.group_of_layer(i)
            original = int(i / self.num_hidden_layers * self.num_hidden_groups)
            hf = int(i / (self.num_hidden_layers / self.num_hidden_groups))
            if not exact == original == hf:
                raise ValueError(
                    f"num_hidden_groups={self.num_hidden_groups}: with num_hidden_layers="
                    f"{self.num_hidden_layers}, layer {i} would use group {original} in google-research/ALBERT "
                    f"but {hf} in transformers; pick a group count that divides the layers"
                )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value}: must be in [0, 1)")
        if self.initializer_range <= 0 or self.layer_norm_eps <= 0:
            raise ValueError("initializer_range and layer_norm_eps must be > 0")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id}: outside the vocabulary of {self.vocab_size}")

    @property
    def layers_run(self) -> int:
        """Transformer layers executed per forward pass (applications x layers per group)."""
        return self.num_hidden_layers * self.inner_group_num

    def group_of_layer(self, i: int) -> int:
        """The parameter group used by layer application ``i`` (exact integer form of int(i / L * G))."""
        return i * self.num_hidden_groups // self.num_hidden_layers

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` contents of the equivalent Hugging Face model."""
        return {
            **asdict(self),
            "model_type": "albert",
            "architectures": ["AlbertForPreTraining"],
            "bos_token_id": 2,
            "eos_token_id": 3,
            "tie_word_embeddings": True,
        }


@dataclass
class PreTrainingOutput:
    """What ``AlbertForPreTraining.forward`` returns. Losses are None without labels."""

    loss: Tensor | None
    mlm_loss: Tensor | None
    sop_loss: Tensor | None
    mlm_logits: Tensor  # [B, P, V] at the given masked positions, else [B, S, V]
    sop_logits: Tensor  # [B, 2]


class AlbertEmbeddings(nn.Module):
    """Token, position and token-type embeddings of size E, summed and normalized."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        seq_len = input_ids.shape[1]
        x = self.word_embeddings(input_ids)  # [B, S, E]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings.weight[:seq_len]  # [S, E] broadcast over B
        return self.dropout(self.LayerNorm(x))


def attention(
    qkv: Tensor,
    mask: Tensor | None,
    *,
    num_heads: int,
    dropout: float = 0.0,
    query_index: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product self-attention over packed q, k, v [B, S, 3H]; returns the context [B, Q, H].

    mask: [B, 1, 1, S] bool, True = attend, or None for full attention.
    query_index: [B, Q] the positions whose outputs are wanted; None for all (Q = S).
    """
    batch, seq_len, _ = qkv.shape
    if qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16 and dropout == 0.0:
        return _CPUBFloat16Attention.apply(qkv, mask, query_index, num_heads)
    q, k, v = qkv.view(batch, seq_len, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, N, S, D]
    if query_index is not None:
        q = q.gather(2, query_index[:, None, :, None].expand(-1, num_heads, -1, q.shape[-1]))  # [B, N, Q, D]
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return context.transpose(1, 2).flatten(2)  # [B, Q, H]


class _CPUBFloat16Attention(torch.autograd.Function):
    """Attention in bf16 on CPU from batched GEMMs; the probabilities are recomputed in backward.

    Why: torch's CPU flash-attention kernel runs bf16 far below the GEMM rate on CPUs without AMX (on
    AVX-512 BF16 at S=512, its forward + backward takes about twice as long as this), while bf16 ``bmm``
    runs near peak. Like flash attention it saves only q, k and v and recomputes the [Q, S]
    probabilities in backward, a few sequences at a time, so it holds no more memory than SDPA. One
    difference: scores are rounded to bf16 before the softmax (which computes in fp32), as in unfused
    attention, where flash keeps them in fp32; the error against fp64 is ~1.5x that of flash, both at
    the bf16 level. In fp32 and on other devices SDPA is used.
    """

    @staticmethod
    def forward(
        ctx: Any, qkv: Tensor, mask: Tensor | None, query_index: Tensor | None, num_heads: int
    ) -> Tensor:
        batch, seq_len, three_hidden = qkv.shape
        head_dim = three_hidden // (3 * num_heads)
        num_queries = seq_len if query_index is None else query_index.shape[1]
        with torch.autocast("cpu", enabled=False):
            # [B, S, 3, N, D] -> [3, B, N, S, D]: each head's matrix contiguous for bmm; q pre-scaled.
            heads = qkv.new_empty(3, batch, num_heads, seq_len, head_dim)
            heads.copy_(qkv.view(batch, seq_len, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4))
            heads[0].mul_(head_dim**-0.5)
            context = qkv.new_empty(batch, num_queries, num_heads, head_dim)
            for rows in _sequence_chunks(batch, num_heads * num_queries * seq_len):
                probs = _probabilities(_queries(heads, query_index, rows), heads[1, rows], mask, rows)
                out = torch.bmm(probs, heads[2, rows].flatten(0, 1))  # [c*N, Q, D]
                context[rows] = out.view(-1, num_heads, num_queries, head_dim).transpose(1, 2)
        ctx.save_for_backward(heads, mask, query_index)
        return context.view(batch, num_queries, num_heads * head_dim)

    @staticmethod
    def backward(ctx: Any, grad_context: Tensor) -> tuple[Tensor, None, None, None]:
        heads, mask, query_index = ctx.saved_tensors
        _, batch, num_heads, seq_len, head_dim = heads.shape
        num_queries = grad_context.shape[1]
        grad_heads = torch.empty_like(heads)
        if query_index is not None:
            grad_heads[0].zero_()  # q rows that were not queried get no gradient
        grad = grad_context.view(batch, num_queries, num_heads, head_dim).transpose(1, 2)  # [B, N, Q, D]
        with torch.autocast("cpu", enabled=False):
            for rows in _sequence_chunks(batch, num_heads * num_queries * seq_len):
                q = _queries(heads, query_index, rows)  # [c*N, Q, D]
                k, v = heads[1, rows].flatten(0, 1), heads[2, rows].flatten(0, 1)  # [c*N, S, D]
                g = grad[rows].reshape(-1, num_queries, head_dim)
                probs = _probabilities(q, heads[1, rows], mask, rows)
                torch.bmm(probs.transpose(1, 2), g, out=grad_heads[2, rows].flatten(0, 1))
                grad_scores = torch._softmax_backward_data(
                    torch.bmm(g, v.transpose(1, 2)), probs, -1, probs.dtype
                )
                torch.bmm(grad_scores.transpose(1, 2), q, out=grad_heads[1, rows].flatten(0, 1))
                if query_index is None:
                    torch.bmm(grad_scores, k, out=grad_heads[0, rows].flatten(0, 1))
                else:  # scatter_add_: padded prediction slots repeat a position
                    grad_q = torch.bmm(grad_scores, k).view(-1, num_heads, num_queries, head_dim)
                    grad_heads[0, rows].scatter_add_(2, _expand_index(query_index[rows], grad_q), grad_q)
            grad_heads[0].mul_(head_dim**-0.5)
            grad_qkv = grad_heads.permute(1, 3, 0, 2, 4).reshape(batch, seq_len, 3 * num_heads * head_dim)
        return grad_qkv, None, None, None


# Score elements (sequences x heads x queries x keys) the CPU path computes at once: bounds its transient
# memory to a few buffers of 8 MiB in bf16 whatever the batch.
_SCORE_CHUNK = 1 << 22


def _sequence_chunks(batch: int, scores_per_sequence: int) -> list[slice]:
    step = max(1, _SCORE_CHUNK // scores_per_sequence)
    return [slice(start, start + step) for start in range(0, batch, step)]


def _expand_index(index: Tensor, like: Tensor) -> Tensor:
    """[c, Q] positions -> [c, N, Q, D], to gather or scatter rows of per-head matrices like ``like``."""
    return index[:, None, :, None].expand(-1, like.shape[1], -1, like.shape[3])


def _queries(heads: Tensor, query_index: Tensor | None, rows: slice) -> Tensor:
    """The (scaled) queries of the sequences in ``rows``: [c*N, Q, D]."""
    q = heads[0, rows]  # [c, N, S, D]
    if query_index is not None:
        q = q.gather(2, _expand_index(query_index[rows], q))
    return q.flatten(0, 1)


def _probabilities(q: Tensor, k: Tensor, mask: Tensor | None, rows: slice) -> Tensor:
    """Softmax over keys of the scores of queries q [c*N, Q, D] against keys k [c, N, S, D]."""
    num_heads, seq_len = k.shape[1], k.shape[2]
    k = k.flatten(0, 1).transpose(1, 2)  # [c*N, D, S]
    if mask is None:
        scores = torch.bmm(q, k)
    else:
        # The mask as an additive bias that the GEMM accumulates onto (beta=1): a tenth of the cost of a
        # masked_fill_ over the scores afterwards.
        bias = torch.zeros(mask[rows].shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~mask[rows], torch.finfo(q.dtype).min)
        scores = torch.baddbmm(bias.expand(-1, num_heads, -1, -1).reshape(-1, 1, seq_len), q, k)
    return torch.softmax(scores, dim=-1)  # [c*N, Q, S]


class AlbertAttention(nn.Module):
    """Multi-head self-attention with a residual LayerNorm (post-norm, as BERT and ALBERT)."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, mask: Tensor | None, query_index: Tensor | None = None) -> Tensor:
        """[B, S, H] -> [B, S, H], or [B, Q, H] at the positions query_index [B, Q]."""
        # One GEMM for q, k and v; the three tensors stay separate parameters under their HF names.
        weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))  # [3H, H]
        bias = torch.cat((self.query.bias, self.key.bias, self.value.bias))
        qkv = F.linear(x, weight, bias)  # [B, S, 3H]
        dropout = self.attention_dropout if self.training else 0.0
        context = attention(qkv, mask, num_heads=self.num_heads, dropout=dropout, query_index=query_index)
        if query_index is not None:
            x = x.gather(1, query_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # residual at those rows
        return self.LayerNorm(x + self.output_dropout(self.dense(context)))


class AlbertLayer(nn.Module):
    """Attention block followed by the FFN block, each with a residual LayerNorm."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.attention = AlbertAttention(config)
        self.ffn = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.full_layer_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, mask: Tensor | None, query_index: Tensor | None = None) -> Tensor:
        """[B, S, H] -> [B, S, H], or [B, Q, H] at the positions query_index [B, Q]."""
        attended = self.attention(x, mask, query_index)  # [B, S or Q, H]
        out = self.ffn_output(self.activation(self.ffn(attended)))  # [B, S, I] -> [B, S, H]
        return self.full_layer_layer_norm(attended + self.dropout(out))


class AlbertLayerGroup(nn.Module):
    """One set of shared parameters: ``inner_group_num`` distinct layers."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.albert_layers = nn.ModuleList(AlbertLayer(config) for _ in range(config.inner_group_num))


class AlbertTransformer(nn.Module):
    """Projects embeddings E -> H, then applies the shared layer groups L times."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList(
            AlbertLayerGroup(config) for _ in range(config.num_hidden_groups)
        )
        self.activation_checkpointing = False

    def forward(self, x: Tensor, mask: Tensor | None, query_index: Tensor | None = None) -> Tensor:
        """[B, S, E] -> [B, S, H]; with query_index [B, Q], the last layer runs only at those positions
        and the result is [B, Q, H]."""
        x = self.embedding_hidden_mapping_in(x)  # [B, S, E] -> [B, S, H]
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        layers = [
            layer
            for i in range(self.config.num_hidden_layers)
            for layer in self.albert_layer_groups[self.config.group_of_layer(i)].albert_layers
        ]
        for n, layer in enumerate(layers):
            index = query_index if n == len(layers) - 1 else None
            if recompute:
                # Non-reentrant: the reentrant variant breaks with shared weights under ZeRO-2.
                x = checkpoint(layer, x, mask, index, use_reentrant=False)
            else:
                x = layer(x, mask, index)
        return x


class AlbertModel(nn.Module):
    """The encoder: embeddings, shared transformer layers, and the tanh pooler on [CLS]."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.embeddings = AlbertEmbeddings(config)
        self.encoder = AlbertTransformer(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.last_layer_at_positions = False

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns the sequence output [B, S, H] and the pooled [CLS] output [B, H].

        attention_mask: [B, S], 1 = token, 0 = pad; None = no padding.
        positions: [B, P]: return the sequence output only there, [B, P, H]. With
        ``last_layer_at_positions`` the last layer then runs only at these positions and [CLS].
        """
        mask = None
        # An all-ones mask is dropped, as the unmasked attention kernels are faster, but only where the
        # check costs no device sync (CPU tensors); on accelerators pass None for unpadded batches.
        if attention_mask is not None and not (attention_mask.device.type == "cpu" and attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S], True = attend
        x = self.embeddings(input_ids, token_type_ids)
        if positions is None or not self.last_layer_at_positions:
            x = self.encoder(x, mask)
            pooled = torch.tanh(self.pooler(x[:, 0]))
            if positions is not None:
                x = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, P, H]
            return x, pooled
        query_index = torch.cat((torch.zeros_like(positions[:, :1]), positions), dim=1)  # [CLS] first
        x = self.encoder(x, mask, query_index)  # [B, 1 + P, H]
        return x[:, 1:], torch.tanh(self.pooler(x[:, 0]))


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits [N, V] (any float dtype, computed in fp32) over the labels [N] that are
    not IGNORE_INDEX; the same value and gradient as ``F.cross_entropy(logits.float(), labels)``."""
    return _ChunkedCrossEntropy.apply(logits, labels)


# fp32 elements of the [rows, V] blocks the cross-entropy works on at once (8 MiB).
_CE_CHUNK = 1 << 21


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy that keeps only the per-row log-sum-exp for backward and recomputes the softmax there,
    a few rows at a time.

    Why: ``F.cross_entropy(logits.float())`` materializes an fp32 copy of the logits and their fp32
    log-softmax (kept for backward), and backward two more [N, V] fp32 buffers; with V = 30000 those are
    tens of MB per step, each faulted in fresh from the OS. This is ~4x faster on those logits (CPU, bf16,
    N = 308) and keeps 4 bytes per row instead of 4V.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor) -> Tensor:
        keep = labels != IGNORE_INDEX
        target = labels.masked_fill(~keep, 0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for rows in _row_chunks(logits):
            lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        picked = logits.gather(1, target.unsqueeze(1)).squeeze(1).float()
        count = keep.sum()
        ctx.save_for_backward(logits, target, keep, lse, count)
        return ((lse - picked) * keep).sum() / count  # 0 / 0 = nan when all are ignored, as torch

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None]:
        logits, target, keep, lse, count = ctx.saved_tensors
        scale = keep * (grad_loss / count)  # [N] fp32, 0 on ignored rows
        grad = torch.empty_like(logits)
        for rows in _row_chunks(logits):
            probs = torch.exp(logits[rows].float() - lse[rows, None])  # softmax
            probs.scatter_add_(1, target[rows, None], probs.new_full((probs.shape[0], 1), -1.0))
            grad[rows] = probs.mul_(scale[rows, None])
        return grad, None


def _row_chunks(logits: Tensor) -> list[slice]:
    step = max(1, _CE_CHUNK // logits.shape[1])
    return [slice(start, start + step) for start in range(0, logits.shape[0], step)]


class AlbertMLMHead(nn.Module):
    """Dense H -> E, activation, LayerNorm, then the decoder tied to the word embeddings, plus a bias."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size)
        self.decoder.bias = self.bias  # one tensor under both names, as Hugging Face ties it

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.LayerNorm(self.activation(self.dense(x))))  # [..., H] -> [..., V]


class AlbertSOPHead(nn.Module):
    """Sentence-order prediction from the pooled output: 1 = segments swapped.

    No dropout, as in google-research/ALBERT, whose pretraining applies the classifier to the pooled
    output directly (``get_sentence_order_output``). transformers' AlbertSOPHead drops
    ``classifier_dropout_prob`` (0.1) of the pooled output here, which adds noise to every pretraining
    gradient of a v2 model, whose other dropout is 0. ``classifier_dropout_prob`` belongs to the
    downstream classifier of fine-tuning, where both use it.
    """

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.classifier = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(pooled)


class AlbertForPreTraining(nn.Module):
    """ALBERT with its two pretraining heads: masked language modelling and sentence-order prediction."""

    def __init__(
        self,
        config: AlbertConfig,
        *,
        activation_checkpointing: bool = False,
        last_layer_at_predictions: bool = False,
    ):
        super().__init__()
        self.config = config
        self.albert = AlbertModel(config)
        self.predictions = AlbertMLMHead(config)
        self.sop_classifier = AlbertSOPHead(config)
        self.predictions.decoder.weight = self.albert.embeddings.word_embeddings.weight
        self.set_activation_checkpointing(activation_checkpointing)
        self.set_last_layer_at_predictions(last_layer_at_predictions)
        self.init_weights()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer application in the backward pass instead of storing its activations."""
        self.albert.encoder.activation_checkpointing = enabled

    def set_last_layer_at_predictions(self, enabled: bool) -> None:
        """Run the last layer only at ``masked_lm_positions`` and [CLS], the only outputs the losses read.

        Exact (the losses and gradients are unchanged up to rounding) and it skips about (1 - (P+1)/S) of
        one layer: ~7% of the encoder of ALBERT-base at S=512, P=77. Off by default because the model then
        executes fewer FLOPs than ``albert_scale.flops`` counts, so an MFU computed from that formula
        would be overstated by the same fraction.
        """
        self.albert.last_layer_at_positions = enabled

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        for module in self.modules():
            if module is self.predictions.decoder:
                continue  # tied: its weight is the word embeddings, its bias the head's bias
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.predictions.bias.zero_()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        masked_lm_positions: Tensor | None = None,
        masked_lm_labels: Tensor | None = None,
        sentence_order_labels: Tensor | None = None,
    ) -> PreTrainingOutput:
        """Runs the encoder and both heads.

        input_ids, attention_mask (1 = token, 0 = pad), token_type_ids: [B, S].
        masked_lm_positions: [B, P] positions to predict; the hidden states are gathered there before the
        vocabulary projection. Without it, logits are computed for every position.
        masked_lm_labels: [B, P] (or [B, S] without positions), IGNORE_INDEX where nothing is predicted.
        sentence_order_labels: [B], 1 = segments swapped.
        """
        # With positions, the encoder returns hidden states only there ([B, P, H]): the vocabulary
        # projection (and with set_last_layer_at_predictions the last layer) runs at P, not S, positions.
        sequence, pooled = self.albert(
            input_ids, attention_mask, token_type_ids, positions=masked_lm_positions
        )
        mlm_logits = self.predictions(sequence)
        sop_logits = self.sop_classifier(pooled)

        mlm_loss = sop_loss = loss = None
        if masked_lm_labels is not None:
            mlm_loss = cross_entropy(mlm_logits.flatten(0, 1), masked_lm_labels.flatten())
            loss = mlm_loss
        if sentence_order_labels is not None:
            sop_loss = F.cross_entropy(sop_logits.float(), sentence_order_labels.flatten())
            loss = sop_loss if loss is None else loss + sop_loss
        return PreTrainingOutput(loss, mlm_loss, sop_loss, mlm_logits, sop_logits)


def count_parameters(config: AlbertConfig) -> int:
    """Distinct parameters of ``AlbertForPreTraining(config)`` (tied tensors counted once), computed on the
    meta device without allocating them."""
    with torch.device("meta"):
        model = AlbertForPreTraining(config)
    return sum(p.numel() for p in model.parameters())
