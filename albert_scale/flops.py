"""FLOPs accounting for ALBERT, the basis of tokens/s honesty and MFU.

ALBERT shares weights but runs every layer, so 6 x parameters x tokens undercounts xxlarge about tenfold.
We count matmul FLOPs, 2 per multiply-add, with L layers run, H hidden, I FFN, E embedding, V vocabulary,
s sequence length and P predicted positions:

    forward/sequence = s*L*(8H^2 + 4HI + 4sH) + s*2EH + P*(2HE + 2EV) + 2H^2 + 4H
    train/sequence   = 3 * forward   (recomputation by activation checkpointing is not counted)
"""

from __future__ import annotations

from albert_scale.model import AlbertConfig

# Dense peak FLOP/s of accelerators by (name fragment, precision). The first fragment found in the
# device name wins, so more specific names come first. Override with an explicit peak where missing.
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("H100 PCIe", "bf16"): 756e12,
    ("H100 PCIe", "fp16"): 756e12,
    ("H100 PCIe", "fp32"): 378e12,  # TF32 tensor cores
    ("H100", "bf16"): 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    ("H100", "fp16"): 989e12,
    ("H100", "fp32"): 494e12,
    ("H200", "bf16"): 989e12,
    ("H200", "fp16"): 989e12,
    ("A100", "bf16"): 312e12,
    ("A100", "fp16"): 312e12,
    ("A100", "fp32"): 156e12,
    ("L40S", "bf16"): 362e12,
    ("L4", "bf16"): 121e12,
    ("A10", "bf16"): 125e12,
    ("V100", "fp16"): 125e12,
}


def forward_flops_per_sequence(config: AlbertConfig, seq_len: int, num_predictions: int | None = None) -> int:
    """Matmul FLOPs of one forward pass over one sequence of ``seq_len`` tokens.

    ``num_predictions`` is P, the positions the MLM head projects to the vocabulary; None means every
    position (the head run densely, as Hugging Face does).
    """
    s = seq_len
    p = s if num_predictions is None else num_predictions
    L, H, I = config.layers_run, config.hidden_size, config.intermediate_size  # noqa: E741
    E, V = config.embedding_size, config.vocab_size
    encoder = s * L * (8 * H * H + 4 * H * I + 4 * s * H)
    embedding_projection = s * 2 * E * H
    mlm_head = p * (2 * H * E + 2 * E * V)
    pooler_and_sop = 2 * H * H + 4 * H
    return encoder + embedding_projection + mlm_head + pooler_and_sop


def train_flops_per_sequence(config: AlbertConfig, seq_len: int, num_predictions: int | None = None) -> int:
    """Forward plus backward (twice the forward): 3x the forward FLOPs."""
    return 3 * forward_flops_per_sequence(config, seq_len, num_predictions)


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s for a device name (as ``torch.cuda.get_device_name`` reports it), or None."""
    for (fragment, dtype), peak in PEAK_FLOPS.items():
        if dtype == precision and fragment.lower() in device_name.lower():
            return peak
    return None


def mfu(flops_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the device's peak (None if unknown)."""
    return flops_per_second / peak if peak else None
