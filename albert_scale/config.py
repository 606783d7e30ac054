"""Typed run configuration: frozen dataclasses are the only schema.

A run is described by one YAML file (a preset in ``configs/`` or a user's own) plus dotted ``key=value``
overrides; precedence is command line > file > the defaults below. Unknown keys, wrong types and
impossible combinations raise :class:`ConfigError`, whose message names the key and the value.
Each section is handed only to the code that owns it; cross-field checks live in :func:`check` alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from albert_scale.model import AlbertConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration value a user can fix; the message names the key and the value."""


@dataclass(frozen=True)
class DataConfig:
    """Pretraining instances and masking (create_pretraining_data semantics)."""

    max_seq_length: int = 512
    """Tokens per instance, including [CLS] and two [SEP]."""
    max_predictions_per_seq: int = 77
    """Cap on masked positions per instance. 15% of 512 is 77; the original flags used 20 (~4%)."""
    masked_lm_prob: float = 0.15
    """Fraction of tokens to mask (before the cap)."""
    short_seq_prob: float = 0.1
    """Probability of a shorter random target length, so the model also sees short inputs."""
    masking: Literal["dynamic", "static"] = "dynamic"
    """dynamic: a fresh mask every epoch; static: the same mask every epoch, as the paper's
    preprocessed masks (without storing copies)."""
    phase1_seq_length: int = 0
    """Sequence length of a first, cheaper phase cut from the same shards (e.g. 128); 0 = no phase 1."""
    phase1_steps: int = 0
    """Optimizer steps of phase 1; the rest of the run uses max_seq_length."""
    phase1_max_predictions: int = 20
    """Cap on masked positions per instance during phase 1."""

    def __post_init__(self) -> None:
        _require(self.max_seq_length >= 8, "max_seq_length", self.max_seq_length, "must be >= 8")
        _require(
            1 <= self.max_predictions_per_seq <= self.max_seq_length,
            "max_predictions_per_seq",
            self.max_predictions_per_seq,
            f"must be in [1, max_seq_length={self.max_seq_length}]",
        )
        _require(0 < self.masked_lm_prob < 1, "masked_lm_prob", self.masked_lm_prob, "must be in (0, 1)")
        _require(0 <= self.short_seq_prob <= 1, "short_seq_prob", self.short_seq_prob, "must be in [0, 1]")
        if self.phase1_seq_length:
            _require(
                8 <= self.phase1_seq_length < self.max_seq_length,
                "phase1_seq_length",
                self.phase1_seq_length,
                f"must be in [8, max_seq_length={self.max_seq_length}) or 0",
            )
            _require(
                1 <= self.phase1_max_predictions <= self.phase1_seq_length,
                "phase1_max_predictions",
                self.phase1_max_predictions,
                f"must be in [1, phase1_seq_length={self.phase1_seq_length}]",
            )
        _require(self.phase1_steps >= 0, "phase1_steps", self.phase1_steps, "must be >= 0")


@dataclass(frozen=True)
class PreprocessConfig:
    """Corpus preprocessing: tokenizer training, reading limits, shards and the validation split."""

    seed: int = 12345
    """Seed of tokenizer sampling and instance creation; the same inputs and seed give the same bytes."""
    shard_rows: int = 65536
    """Instances per shard (the last shard of a split holds the rest)."""
    validation_fraction: float = 0.01
    """Fraction of documents held out for validation, chosen by a hash of their text."""
    text_field: str = "text"
    """Field of .jsonl records and column of .parquet / datasets inputs that holds the text."""
    lowercase: bool = True
    """Lowercase and strip accents before SentencePiece, as ALBERT does."""
    tokenizer_sample_bytes: int = 100_000_000
    """Bytes of input text sampled (by document hash) to train SentencePiece."""
    tokenizer_max_sentences: int = 2_000_000
    """Sentences SentencePiece trains on at most (its input_sentence_size)."""
    tokenizer_threads: int = 4
    """SentencePiece training threads. The trained model depends on this number, so it is fixed here
    rather than taken from the machine."""
    max_line_bytes: int = 1_048_576
    """A .txt line longer than this skips its document (counted in the manifest)."""
    max_document_bytes: int = 33_554_432
    """A document larger than this is skipped (counted in the manifest)."""

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _require(self.shard_rows >= 1, "shard_rows", self.shard_rows, "must be >= 1")
        _require(
            0 <= self.validation_fraction < 1,
            "validation_fraction",
            self.validation_fraction,
            "must be in [0, 1)",
        )
        _require(bool(self.text_field), "text_field", self.text_field, "must not be empty")
        for name in (
            "tokenizer_sample_bytes",
            "tokenizer_max_sentences",
            "tokenizer_threads",
            "max_line_bytes",
            "max_document_bytes",
        ):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer. LAMB is ALBERT's, exactly: no bias correction, trust ratio ||w|| / ||update||."""

    name: Literal["lamb", "adamw"] = "lamb"
    """Optimizer: lamb (ALBERT's) or adamw."""
    lr: float = 0.00176
    """Peak learning rate (the xxlarge recipe's, for a global batch of 4096)."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to LayerNorm weights and biases."""
    beta1: float = 0.9
    """First-moment decay."""
    beta2: float = 0.999
    """Second-moment decay."""
    eps: float = 1e-6
    """Added to the root of the second moment."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping; 0 turns it off."""
    compile_cpu: bool = True
    """LAMB on CPU (a CPU run, or ZeRO-Offload's host step): compile its step for groups of 1M elements or
    more (per rank under ZeRO) into fused loops with torch.compile (once per process, a few seconds, needs
    a C++ compiler; without one it warns and runs torch's eager kernels). false: always the eager kernels."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", self.lr, "must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, name, getattr(self, name), "must be in [0, 1)")
        _require(self.eps > 0, "eps", self.eps, "must be > 0")
        _require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "must be >= 0 (0 = off)")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then linear or polynomial decay to ``end_lr``."""

    total_steps: int = 125000
    """Optimizer steps in the whole run."""
    warmup_steps: int = 3125
    """Steps of linear warmup from 0 to the peak learning rate."""
    decay: Literal["linear", "polynomial"] = "linear"
    """Shape of the decay after warmup."""
    power: float = 1.0
    """Exponent of the polynomial decay (1.0 is linear)."""
    end_lr: float = 0.0
    """Learning rate at the last step."""
    reference_batch_size: int = 4096
    """Global batch the learning rate and warmup were tuned for; a different batch draws a warning."""

    def __post_init__(self) -> None:
        _require(self.total_steps >= 1, "total_steps", self.total_steps, "must be >= 1")
        _require(
            0 <= self.warmup_steps <= self.total_steps,
            "warmup_steps",
            self.warmup_steps,
            f"must be in [0, total_steps={self.total_steps}]",
        )
        _require(self.power > 0, "power", self.power, "must be > 0")
        _require(self.end_lr >= 0, "end_lr", self.end_lr, "must be >= 0")
        _require(self.reference_batch_size >= 1, "reference_batch_size", self.reference_batch_size, ">= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Batch arithmetic, precision and loop cadence."""

    global_batch_size: int = 4096
    """Sequences per optimizer step over all ranks (micro batch x accumulation x data-parallel size)."""
    micro_batch_size: int = 32
    """Sequences per rank per forward/backward."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Compute precision: fp32, bf16 (master weights fp32), or fp16 with dynamic loss scaling."""
    activation_checkpointing: bool = True
    """Recompute each layer in the backward pass instead of storing its activations."""
    seed: int = 12345
    """Seed of initialization, data order and masking."""
    log_every: int = 100
    """Steps between metric logs."""
    eval_every: int = 5000
    """Steps between validation passes."""
    checkpoint_every: int = 5000
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in the run directory (older ones are deleted)."""
    eval_examples: int = 10_000
    """Validation instances evaluated at each pass (the first ones of the split; 0 = all of it)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN or inf loss: stop the run naming the step, or skip that step's update and go on."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device in train.precision, for MFU (0 = from the built-in device table)."""

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "micro_batch_size", "log_every", "eval_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _require(self.eval_examples >= 0, "eval_examples", self.eval_examples, "must be >= 0 (0 = all)")
        _require(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "must be >= 0 (0 = device table)")


@dataclass(frozen=True)
class ZeroConfig:
    """DeepSpeed ZeRO partitioning and communication."""

    stage: Literal[0, 1, 2, 3] = 2
    """0: plain data parallel; 1: optimizer states; 2: + gradients; 3: + parameters partitioned."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    contiguous_gradients: bool = True
    """Copy gradients into one buffer as they are produced (less fragmentation)."""
    reduce_bucket_size: int = 500_000_000
    """Elements reduced at once."""
    allgather_bucket_size: int = 500_000_000
    """Elements gathered at once (stages 1 and 2)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states and the step in host memory."""

    def __post_init__(self) -> None:
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the run executes. Under a launcher (deepspeed, torchrun, Ray Train) the launcher's
    WORLD_SIZE is the data-parallel size; ``num_workers`` is the size for planning otherwise."""

    backend: str = "launcher"
    """launcher: this process, or each rank of the deepspeed/torchrun launcher that started it;
    ray: Ray Train starts ``num_workers`` workers on a Ray cluster and restarts them after a failure."""
    num_workers: int = 1
    """Data-parallel workers (one process per GPU, or per CPU worker)."""
    use_gpu: bool = False
    """backend=ray: one GPU per worker (else CPU workers over gloo)."""
    cpus_per_worker: int = 1
    """backend=ray: CPUs reserved for each worker (its data loading and, on CPU, its compute)."""
    address: str = ""
    """backend=ray: the Ray cluster (``ray://HOST:10001`` or ``HOST:6379``); empty = RAY_ADDRESS, else a
    local Ray started in this process."""
    max_failures: int = 3
    """backend=ray: restarts after a worker fails (each resumes from the newest checkpoint); -1 = no limit."""

    def __post_init__(self) -> None:
        _require(self.backend in ("launcher", "ray"), "backend", self.backend, "must be launcher or ray")
        _require(self.num_workers >= 1, "num_workers", self.num_workers, "must be >= 1")
        _require(self.cpus_per_worker >= 1, "cpus_per_worker", self.cpus_per_worker, "must be >= 1")
        _require(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= -1")
        _no_secret("address", self.address, "RAY_AUTH_TOKEN or a --header for a proxy")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking of training runs (rank 0 logs; a server that is down never stops training)."""

    enabled: bool = True
    """Log the run to MLflow (metrics.jsonl in the run directory is written either way)."""
    uri: str = ""
    """Tracking URI; empty = MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str = "albert-scale"
    """MLflow experiment of the run."""
    system_metrics: bool = True
    """Also log CPU, memory, disk, network and GPU use of each node."""
    system_metrics_interval: float = 30.0
    """Seconds between two samples of system metrics (each sample is read back from and written to the
    tracking store); MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, when set, takes precedence."""
    flush_seconds: float = 10.0
    """Metrics are sent at most this often, the ones logged meanwhile in one call (0 = at once)."""
    register_name: str = ""
    """At the end of training, export to RUN_DIR/export and register it under this name (empty = no)."""
    register_alias: str = "candidate"
    """The alias the registered version gets."""

    def __post_init__(self) -> None:
        _require(bool(self.experiment.strip()), "experiment", self.experiment, "must not be empty")
        _require(
            self.system_metrics_interval > 0,
            "system_metrics_interval",
            self.system_metrics_interval,
            "must be > 0",
        )
        _require(self.flush_seconds >= 0, "flush_seconds", self.flush_seconds, "must be >= 0")
        _no_secret(
            "uri", self.uri, "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
        )


@dataclass(frozen=True)
class Config:
    """A whole run. Each section goes only to the code that owns it."""

    model: AlbertConfig = field(default_factory=AlbertConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of a run at a given data-parallel size."""

    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def _require(ok: bool, key: str, value: Any, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {message}")


def _no_secret(key: str, value: str, instead: str) -> None:
    """A config value is logged and saved with the run: a URI in it must not carry a password or token."""
    from albert_scale.redact import redact_uri

    safe = redact_uri(value)
    _require(safe == value, key, safe, f"holds a password or token, which would be logged; use {instead}")


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML file + dotted overrides -> Config


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A config file path, or the name of a shipped preset (``tiny``, ``albert-base``, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config {str(name_or_path)!r}: is a directory, not a YAML file")
    preset = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {str(name_or_path)!r}: no such file and no such preset (presets: {presets})")


def load_config(name_or_path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Builds a :class:`Config` from defaults, an optional YAML file and ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            loaded = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config {str(path)!r}: not a YAML text file (invalid UTF-8 at byte {err.start})"
            ) from None
        except OSError as err:
            raise ConfigError(f"config {str(path)!r}: cannot read ({err.strerror or err})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(
                f"config {str(path)!r}{where}: not valid YAML ({getattr(err, 'problem', err)})"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config {str(path)!r}: expected a mapping of sections, got {type(loaded).__name__}"
            )
        tree = loaded or {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return build(Config, tree, prefix="")


def parse_override(item: str) -> tuple[str, Any]:
    """``optim.lr=1e-3`` -> (``optim.lr``, 0.001). Values are parsed as YAML scalars or lists."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. optim.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def build(cls: type, values: Mapping[str, Any], *, prefix: str) -> Any:
    """Builds dataclass ``cls`` from a mapping, checking every key and type; errors name the dotted key."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None
    except ValueError as err:  # the model's own checks name the field without the section
        raise ConfigError(f"{prefix}{err}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, prefix=f"{key}.")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and type(value) is type(choices[0]):
            return value
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        return _to_int(value, key)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise AssertionError(f"config field {key} has an unsupported type {hint!r}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if isinstance(value, int):
        return value
    number: float | None = None
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = None
    if number is not None and number.is_integer():
        return int(number)
    raise ConfigError(f"{key}={value!r}: expected an integer")


# ---------------------------------------------------------------------------------------------------------
# Cross-field checks, in one place


def launcher_world_size() -> int | None:
    """The data-parallel size set by a launcher (deepspeed, torchrun, Ray Train), if any."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return None
    try:
        size = int(raw)
    except ValueError:
        raise ConfigError(f"environment WORLD_SIZE={raw!r}: expected a positive integer") from None
    if size < 1:
        raise ConfigError(f"environment WORLD_SIZE={raw!r}: expected a positive integer")
    return size


def check_sequence_length(config: Config) -> None:
    """Instances must fit the model's position table."""
    if config.data.max_seq_length > config.model.max_position_embeddings:
        raise ConfigError(
            f"data.max_seq_length={config.data.max_seq_length}: longer than "
            f"model.max_position_embeddings={config.model.max_position_embeddings}"
        )


def check(config: Config, *, world_size: int | None = None) -> BatchPlan:
    """Checks what no single section can, and returns the batch arithmetic.

    ``world_size`` defaults to the launcher's WORLD_SIZE, else ``cluster.num_workers``.
    """
    if world_size is None:
        world_size = launcher_world_size() or config.cluster.num_workers
    data, train = config.data, config.train
    check_sequence_length(config)
    if data.phase1_steps > config.schedule.total_steps:
        raise ConfigError(
            f"data.phase1_steps={data.phase1_steps}: more than schedule.total_steps={config.schedule.total_steps}"
        )
    if data.phase1_steps and not data.phase1_seq_length:
        raise ConfigError(f"data.phase1_steps={data.phase1_steps}: set data.phase1_seq_length too")
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size}: not divisible by "
            f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {world_size} = {per_step}"
        )
    return BatchPlan(
        world_size=world_size,
        micro_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.global_batch_size // per_step,
        global_batch_size=train.global_batch_size,
        seq_len=data.max_seq_length,
    )
