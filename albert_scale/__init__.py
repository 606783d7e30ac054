"""albert-scale: distributed, large-scale ALBERT pretraining.

The model and its configuration import nothing distributed; DeepSpeed, MLflow and Ray are imported only
by the stages that use them. The names below are imported on first use, so that a process that needs
only a small module of the package (a preprocessing worker, say) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AlbertConfig": "albert_scale.model",
    "AlbertForPreTraining": "albert_scale.model",
    "AlbertModel": "albert_scale.model",
    "Config": "albert_scale.config",
    "ConfigError": "albert_scale.config",
    "PreTrainingOutput": "albert_scale.model",
    "forward_flops_per_sequence": "albert_scale.flops",
    "load_config": "albert_scale.config",
    "train_flops_per_sequence": "albert_scale.flops",
}

__all__ = [
    "AlbertConfig",
    "AlbertForPreTraining",
    "AlbertModel",
    "Config",
    "ConfigError",
    "PreTrainingOutput",
    "forward_flops_per_sequence",
    "load_config",
    "train_flops_per_sequence",
]

if TYPE_CHECKING:
    from albert_scale.config import Config, ConfigError, load_config
    from albert_scale.flops import forward_flops_per_sequence, train_flops_per_sequence
    from albert_scale.model import AlbertConfig, AlbertForPreTraining, AlbertModel, PreTrainingOutput


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'albert_scale' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
