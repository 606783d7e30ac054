"""albert-scale: distributed, large-scale ALBERT pretraining.

The model and its configuration import nothing distributed; DeepSpeed, MLflow and Ray are imported only
by the stages that use them.
"""

from albert_scale.config import Config, ConfigError, load_config
from albert_scale.flops import forward_flops_per_sequence, train_flops_per_sequence
from albert_scale.model import AlbertConfig, AlbertForPreTraining, AlbertModel, PreTrainingOutput

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
