"""Pretrain ALBERT on a preprocessed dataset: DeepSpeed ZeRO, LAMB, evaluation, checkpoints, auto-resume.

Usage:
    albert-scale train --config CFG --data DIR --output RUN_DIR [key=value ...]
    deepspeed --num_gpus N $(which albert-scale) train --config CFG --data DIR --output RUN_DIR
    deepspeed --hostfile HOSTS --module albert_scale.train --config CFG --data DIR --output RUN_DIR
    torchrun --nproc-per-node N -m albert_scale.train --config CFG --data DIR --output RUN_DIR
    albert-scale train --config CFG --dry-run [--world-size N]

One entry for every launcher: without one it trains in this process (a world of one); under
``deepspeed`` or ``torchrun`` each rank runs it and they meet through the environment (RANK, WORLD_SIZE,
MASTER_ADDR, ...). Run it again with the same RUN_DIR and it resumes from the newest good checkpoint, at
any world size. RUN_DIR receives ``config.yaml`` (resolved), ``deepspeed_config.json`` (generated),
``metrics.jsonl`` (one record per log interval and evaluation) and ``checkpoints/``
(:mod:`albert_scale.checkpoint`).

The loop is :func:`train`; one step is: each micro-batch forward and backward; after the last backward,
one all-reduce of the step's sums (losses, correct predictions, counts) which also tells every rank
whether the loss was finite anywhere; then the update. A non-finite loss stops the run before the update
(``train.nonfinite=stop``; the last checkpoint stays good) or the update is skipped on every rank
(``skip``). The torch generators (dropout) are reseeded for every micro-batch from (seed, step, the
micro-batch's place in the global batch), so a resumed run draws what an uninterrupted one would without
any saved generator state, and at the same micro-batch size the draws do not depend on the world size.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from albert_scale import checkpoint
from albert_scale import engine as ds
from albert_scale.cli import RunStopped, add_config_arguments, stage_main
from albert_scale.config import Config, ConfigError, check, load_config
from albert_scale.data import Cursor, EvalSet, Phase, PretrainingLoader, ShardedDataset, phases
from albert_scale.flops import mfu, peak_flops, train_flops_per_sequence
from albert_scale.model import IGNORE_INDEX, AlbertForPreTraining
from albert_scale.tracking import MlflowTracker, Tracker, code_version, plot_metrics, tracking_uri
from data_pipeline.instances import stable_hash
from data_pipeline.tokenizer import MODEL_FILENAME

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
EXPORT_DIR = "export"
CONFIG_FILE = "config.yaml"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"

# The per-step sums all-reduced once: their positions in one flat tensor.
LOSS, MLM_LOSS, MLM_COUNT, MLM_CORRECT, SOP_LOSS, SOP_COUNT, SOP_CORRECT, NONFINITE, STOP = range(9)
NUM_SUMS = 9

# With train.nonfinite=skip, this many skipped steps in a row stop the run (the weights are damaged).
MAX_SKIPS_IN_A_ROW = 10

# Called on every rank after a step that logged, evaluated or saved: (step, its metrics, the checkpoint
# written at that step or None). Ray Train's report is one.
Reporter = Callable[[int, dict[str, float], "Path | None"], None]

# Sections of the config that must not change when a run resumes (the rest may, with a note).
FIXED_ON_RESUME = ("model", "train.global_batch_size", "train.seed", "data.masking")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Pretrain ALBERT with DeepSpeed ZeRO and LAMB on a preprocessed dataset. Runs in this "
        "process, or on every rank under deepspeed/torchrun. Rerun with the same --output to resume from "
        "its newest checkpoint (at any world size).",
        epilog="example: albert-scale train --config quickstart --data data/quickstart --output runs/qs "
        "train.log_every=10",
    )
    add_config_arguments(parser)
    parser.add_argument("--data", metavar="DIR", help="a dataset written by 'albert-scale preprocess'")
    parser.add_argument("--output", metavar="RUN_DIR", help="run directory: config, metrics, checkpoints")
    parser.add_argument(
        "--stop-at-step",
        type=int,
        metavar="N",
        help="checkpoint and exit once step N is done (the run resumes from there when rerun)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, world size, batch arithmetic and DeepSpeed config; train nothing",
    )
    parser.add_argument(
        "--world-size", type=int, metavar="N", help="with --dry-run: the data-parallel size to plan for"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines (metrics.jsonl is still written)"
    )
    # The deepspeed launcher passes --local_rank to every rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(config, args.world_size)
    if args.world_size is not None:
        raise ValueError("--world-size: only with --dry-run (a launcher sets the world size of a real run)")
    for option in ("data", "output"):
        if getattr(args, option) is None:
            raise ValueError(f"--{option} is required (or use --dry-run)")
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise ValueError(f"--stop-at-step={args.stop_at_step}: must be >= 1")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise NotADirectoryError(f"--output {args.output!r}: exists and is not a directory")
    run_training = train
    if config.cluster.backend == "ray":
        from cluster.ray_train import fit as run_training
    run_training(
        config,
        data=Path(args.data),
        output=Path(args.output),
        stop_at_step=args.stop_at_step,
        quiet=args.quiet,
    )
    return 0


def dry_run(config: Config, world_size: int | None) -> int:
    from albert_scale.plan import format_summary, summarize

    if world_size is not None and world_size < 1:
        raise ValueError(f"--world-size={world_size}: must be >= 1")
    plan = check(config, world_size=world_size)
    print("# resolved config")
    print(config.to_yaml().rstrip())
    print(format_summary(summarize(config, plan), config))
    print("# deepspeed config")
    print(json.dumps(ds.deepspeed_config(config, world_size=plan.world_size), indent=2))
    return 0


@dataclass
class TrainResult:
    """What a finished (or stopped) :func:`train` call leaves."""

    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    """The last logged training metrics."""
    evaluation: dict[str, float] = field(default_factory=dict)
    """The last evaluation."""
    first_evaluation: dict[str, float] = field(default_factory=dict)
    """The evaluation before any update (empty when the run resumed)."""


def train(
    config: Config,
    *,
    data: Path,
    output: Path,
    stop_at_step: int | None = None,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
    report: Reporter | None = None,
) -> TrainResult:
    """Trains ``config`` on the dataset in ``data``; resumes from ``output`` when it holds checkpoints.

    Collective: every rank calls it. Returns on every rank after the final checkpoint (at
    ``schedule.total_steps``, or at ``stop_at_step``, or on SIGTERM, after finishing the step in flight).
    Raises :class:`~albert_scale.cli.RunStopped` on a non-finite loss with ``train.nonfinite=stop``.
    Starts the process group if no launcher or framework has, and then also ends it. ``report``, if given,
    is called on every rank after each step that logged, evaluated or wrote a checkpoint.
    """
    process = ds.init_distributed()
    try:
        return _train(
            process,
            config,
            data=data,
            output=output,
            stop_at_step=stop_at_step,
            quiet=quiet,
            log=log,
            report=report,
        )
    finally:
        ds.release_distributed()


def _train(
    process: Any,
    config: Config,
    *,
    data: Path,
    output: Path,
    stop_at_step: int | None,
    quiet: bool,
    log: Callable[[str], None] | None,
    report: Reporter | None,
) -> TrainResult:
    rank0 = process.rank == 0
    say = (log or _stdout) if rank0 and not quiet else (lambda message: None)
    warn = (log or _stderr) if rank0 else (lambda message: None)

    dataset, validation = open_datasets(data, config)
    plan = check(config, world_size=process.world_size)
    resumed = _resume_point(output, rank0=rank0, warn=warn)
    if resumed is not None:
        check_resume(resumed.path, resumed.state, config, dataset, warn=warn)

    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    model = AlbertForPreTraining(config.model, activation_checkpointing=config.train.activation_checkpointing)
    if resumed is not None:
        _copy_weights(
            model, resumed.weights, resumed.path
        )  # before DeepSpeed makes its copies (see restore_state)
    engine = ds.initialize(model, config)
    try:
        if resumed is not None:
            counters = resumed.state["engine"]
            updates = counters["global_steps"] - counters["skipped_steps"]
            ds.restore_state(engine, resumed.weights, resumed.moments, updates=updates)
            ds.restore_counters(engine, counters)
            del resumed.weights, resumed.moments
        if rank0:
            _write_run_files(output, config, ds.deepspeed_config(config, world_size=process.world_size))
        cursor = Cursor.from_state_dict(resumed.state["data"]["cursor"]) if resumed else Cursor()
        loader = make_loader(dataset, config, process, cursor)
        evalset = _evalset(validation, config, plan.micro_batch_size, process.rank, process.world_size)
        start = resumed.step if resumed else 0
        tracker = open_tracker(config, output, dataset, process, warn) if rank0 else Tracker()
        node_monitor = _node_monitor(config, process, tracker.run_id)
        # Records after the checkpoint's step came from a run that died; without a checkpoint, all of them.
        metrics_log = MetricsLog(
            output / METRICS_FILE if rank0 else None, truncate_after=start if resumed else -1, tracker=tracker
        )
        loop = Loop(config, engine, loader, evalset, process, metrics_log, say, report)
        loop.progress = rank0 and not quiet and log is None
        if resumed:
            say(
                f"resumed from {resumed.path} (step {start}, world size {resumed.state['world_size']} -> {process.world_size})"
            )
        else:
            from albert_scale.schedule import rescaling_warning

            note = rescaling_warning(config.train, config.schedule, config.optim)
            if note:
                warn(note)
            say(
                f"training {config.schedule.total_steps} steps on {process.world_size} rank(s) "
                f"({process.device.type}), global batch {plan.global_batch_size}, "
                f"{plan.gradient_accumulation_steps} micro-batch(es) of {plan.micro_batch_size} per rank"
            )
        status = "FAILED"
        try:
            result = loop.run(start, stop_at_step=stop_at_step, output=output)
            status = "FINISHED" if result.step >= config.schedule.total_steps else "KILLED"
        finally:
            if rank0:
                plot = (
                    plot_metrics(output / METRICS_FILE, output / PLOT_FILE)
                    if (output / METRICS_FILE).exists()
                    else None
                )
                if plot is not None:
                    tracker.log_artifact(plot)
            tracker.close(status)
            if node_monitor is not None:
                node_monitor.finish()
        if rank0 and status == "FINISHED" and config.tracking.enabled and config.tracking.register_name:
            publish(output, config, run_id=tracker.run_id, say=say, warn=warn)
        return result
    finally:
        engine.destroy()


def publish(output: Path, config: Config, *, run_id: str | None, say, warn) -> None:
    """Exports the final checkpoint to RUN_DIR/export and registers it (``tracking.register_name``).
    A failure is reported with the commands that finish the job; training itself has succeeded."""
    from albert_scale.export import export
    from albert_scale.register import register

    target = output / EXPORT_DIR
    try:
        export(output, target, overwrite=True, say=say)
        done = register(
            target,
            name=config.tracking.register_name,
            alias=config.tracking.register_alias,
            run_id=run_id,
            uri=tracking_uri(config.tracking.uri),
        )
    except (OSError, ValueError, RuntimeError) as err:
        warn(
            f"the model was trained but not registered ({err}); run: albert-scale register --export {target} "
            f"--name {config.tracking.register_name} --alias {config.tracking.register_alias}"
        )
        return
    say(f"registered {done.model_uri} (version {done.version}) from {target}")


def _node_monitor(config: Config, process: Any, run_id: str | None) -> Any:
    """Rank 0's run id goes to every rank (collective); the first rank of each other node then logs its
    node's system metrics into the same run."""
    shared = [run_id]
    dist.broadcast_object_list(shared, src=0)
    if process.rank == 0 or process.local_rank != 0 or shared[0] is None:
        return None
    if not (config.tracking.enabled and config.tracking.system_metrics):
        return None
    from albert_scale.tracking import start_node_monitor

    return start_node_monitor(
        shared[0], tracking_uri(config.tracking.uri), config.tracking.system_metrics_interval
    )


def open_tracker(config: Config, output: Path, dataset: ShardedDataset, process: Any, warn) -> Tracker:
    """The MLflow run of this job (rank 0), with its parameters, tags and input artifacts."""
    if not config.tracking.enabled:
        return Tracker()
    from data_pipeline.shards import MANIFEST

    tracker = MlflowTracker(
        run_dir=output,
        experiment=config.tracking.experiment,
        run_name=output.resolve().name,
        params=_flatten(config.to_dict()),
        tags={
            "albert_scale.code": code_version(),
            "albert_scale.data_manifest_sha256": dataset.manifest_sha256,
            "albert_scale.data": str(dataset.directory.resolve()),
            "albert_scale.world_size": str(process.world_size),
            "albert_scale.device": process.device.type,
            "albert_scale.precision": config.train.precision,
            "albert_scale.run_dir": str(output.resolve()),
        },
        uri=tracking_uri(config.tracking.uri),
        say=warn,
        system_metrics=config.tracking.system_metrics,
        system_metrics_interval=config.tracking.system_metrics_interval,
        flush_seconds=config.tracking.flush_seconds,
    )
    tracker.log_artifact(output / CONFIG_FILE)
    tracker.log_artifact(output / DEEPSPEED_CONFIG_FILE)
    tracker.log_artifact(dataset.directory / MANIFEST, "data")
    tracker.log_artifact(dataset.directory / MODEL_FILENAME, "data")
    return tracker


def make_loader(
    dataset: ShardedDataset, config: Config, process: Any, cursor: Cursor | None = None
) -> PretrainingLoader:
    """This rank's training loader for ``config``, from ``cursor`` (default: the start)."""
    plan = check(config, world_size=process.world_size)
    return PretrainingLoader(
        dataset,
        global_batch_size=plan.global_batch_size,
        micro_batch_size=plan.micro_batch_size,
        rank=process.rank,
        world_size=process.world_size,
        seed=config.train.seed,
        phases=phases(config.data),
        masked_lm_prob=config.data.masked_lm_prob,
        static_masking=config.data.masking == "static",
        cursor=cursor or Cursor(),
    )


def _resume_point(output: Path, *, rank0: bool, warn) -> checkpoint.Checkpoint | None:
    """The checkpoint to resume from (collective): rank 0 picks the newest good one, verifying its
    checksums, and tells the others, which read that one without verifying it again."""
    found = None
    if rank0:
        found = checkpoint.load_latest(
            output, warn=lambda damage: warn(f"{damage}; trying the previous checkpoint")
        )
    chosen = [str(found.path) if found is not None else None]
    dist.broadcast_object_list(chosen, src=0)
    if rank0 or chosen[0] is None:
        return found
    return checkpoint.load(Path(chosen[0]), verify=False)


def open_datasets(directory: Path, config: Config) -> tuple[ShardedDataset, ShardedDataset | None]:
    """The train split and the validation split (None if empty), checked against the config."""
    dataset = ShardedDataset(directory, split="train")
    if dataset.vocab_size != config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size}: the dataset {str(directory)!r} was tokenized with "
            f"{dataset.vocab_size} pieces; set model.vocab_size={dataset.vocab_size}"
        )
    longest = max(p.seq_len for p in phases(config.data))
    if longest > dataset.max_seq_length:
        raise ConfigError(
            f"data.max_seq_length={longest}: the dataset {str(directory)!r} holds instances of at most "
            f"{dataset.max_seq_length} tokens; set data.max_seq_length={dataset.max_seq_length} or preprocess again"
        )
    validation = None
    if "validation" in dataset.manifest["splits"]:
        candidate = ShardedDataset(directory, split="validation")
        validation = candidate if len(candidate) else None
    return dataset, validation


def check_resume(path: Path, state: dict[str, Any], config: Config, dataset: ShardedDataset, *, warn) -> None:
    """The checkpoint at ``path`` (its ``state.json`` is ``state``) continues the same run: same model,
    batch, seed and dataset; other changes are noted."""
    saved = _flatten(state["config"])
    now = _flatten(config.to_dict())
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    for key in changed:
        if any(key == fixed or key.startswith(fixed + ".") for fixed in FIXED_ON_RESUME):
            raise ConfigError(
                f"{key}={now.get(key)!r}: the checkpoint {str(path)!r} was trained with "
                f"{key}={saved.get(key)!r}; use another --output to start a new run"
            )
    if state["data"]["dataset"] != dataset.fingerprint:
        raise ValueError(
            f"checkpoint {str(path)!r}: trained on another dataset (manifest fingerprint differs from "
            f"{str(dataset.directory)!r}); use another --output to start a new run"
        )
    if changed:
        warn(
            "resuming with changed settings: "
            + ", ".join(f"{k}={saved.get(k)!r}->{now.get(k)!r}" for k in changed)
        )


class MetricsLog:
    """``metrics.jsonl`` on rank 0: one JSON record per log interval or evaluation, also sent to the
    tracker. On resume, records after the checkpoint's step (written by the run that died) are dropped."""

    def __init__(self, path: Path | None, *, truncate_after: int, tracker: Tracker | None = None):
        self.path = path
        self.tracker = tracker or Tracker()
        if path is None or not path.exists():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= truncate_after
        ]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step)
        if self.path is None:
            return
        record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Loop:
    """The training loop's state and its pieces; :meth:`run` is the loop."""

    def __init__(self, config, engine, loader, evalset, process, metrics_log, say, reporter=None):
        self.config = config
        self.reporter = reporter
        self.engine = engine
        self.loader = loader
        self.evalset = evalset
        self.process = process
        self.metrics_log = metrics_log
        self.say = say
        self.device = process.device
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        precision = config.train.precision
        self.peak = config.train.peak_tflops * 1e12 or peak_flops(device_name, precision)
        self.stop_requested = False
        self.nonfinite_in_a_row = 0
        self.progress = False
        """Show a progress bar of the steps (on a terminal only)."""

    def run(self, start: int, *, stop_at_step: int | None, output: Path) -> TrainResult:
        """The loop: steps, logs, evaluations and checkpoints until the end (or a stop)."""
        config, train_cfg = self.config, self.config.train
        total = config.schedule.total_steps
        end = min(total, stop_at_step) if stop_at_step else total
        result = TrainResult(step=start, checkpoint=None)
        if start >= end:
            self.say(f"nothing to do: the run is at step {start} (schedule.total_steps={total})")
            return result
        if start == 0 and self.evalset is not None:
            result.first_evaluation = result.evaluation = self.evaluate(0)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        window = Window()
        step = start
        bar = tqdm(
            total=end,
            initial=start,
            desc="training",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None if self.progress else True,  # None: shown on a terminal only
        )
        try:
            while step < end and not self.stop_requested:
                sums, norm, lr = self.train_step(step)
                step += 1
                bar.update()
                window.add(sums, norm, lr, self.loader.phase(step - 1), self.config)
                if bool(sums[STOP]):
                    self.stop_requested = True
                reported: dict[str, float] = {}
                saved = None
                if step % train_cfg.log_every == 0 or step == end or self.stop_requested:
                    result.metrics = self.report(step, end, window)
                    reported |= result.metrics
                    window = Window()
                if self.evalset is not None and (step % train_cfg.eval_every == 0 or step == total):
                    result.evaluation = self.evaluate(step)
                    reported |= result.evaluation
                if step % train_cfg.checkpoint_every == 0 or step == end or self.stop_requested:
                    saved = result.checkpoint = self.save(step, output)
                if self.reporter is not None and (reported or saved is not None):
                    self.reporter(step, reported, saved)
                if "train/loss" in reported:
                    bar.set_postfix(loss=f"{reported['train/loss']:.3f}", refresh=False)
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        result.step = step
        if step < total:
            self.say(f"stopped at step {step} of {total}; rerun the same command to continue")
        else:
            self.say(f"done: {total} steps; final checkpoint {result.checkpoint}")
        return result

    def train_step(self, step: int) -> tuple[list[float], float | None, float]:
        """One global step: forward/backward of this rank's micro-batches, one all-reduce, the update."""
        engine = self.engine
        micro_batches = self.loader.micro_batches()
        first = self.process.rank * len(micro_batches)  # this rank's first micro-batch in the global batch
        sums = torch.zeros(NUM_SUMS, device=self.device, dtype=torch.float64)
        norm = None
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            # Dropout draws from a generator keyed by the micro-batch's place in the global batch, so the
            # same examples get the same masks at any world size (and after a resume).
            torch.manual_seed(stable_hash(self.config.train.seed, step, first + i))
            output = engine(**batch)
            engine.backward(output.loss)
            accumulate(sums, output, batch)
            if i == len(micro_batches) - 1:
                sums[STOP] = float(self.stop_requested)
                dist.all_reduce(sums)
                values = sums.tolist()
                skip = bool(values[NONFINITE]) and self._nonfinite(step, values)
                self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skip else 0
                norm = ds.unpartitioned_grad_norm(engine)
                lr = engine.lr_scheduler.get_last_lr()[0]  # the rate this update uses
                if skip:
                    ds.skipped_step(engine, engine.step)
                    continue
            engine.step()
        if norm is None:
            norm = ds.grad_norm(engine)
        return values, norm, lr

    def _nonfinite(self, step: int, values: list[float]) -> bool:
        """Stops the run (RunStopped) or returns True: skip this step's update."""
        message = (
            f"step {step + 1}: the loss is not finite on {int(values[NONFINITE])} micro-batch(es) "
            f"(mean loss {values[LOSS] / self._micro_batches_per_step():.4g})"
        )
        if self.config.train.nonfinite == "stop":
            raise RunStopped(
                f"{message}; stopped before the update, the newest checkpoint is intact. Lower optim.lr, "
                "check the data, or set train.nonfinite=skip to skip such steps"
            )
        if self.nonfinite_in_a_row + 1 > MAX_SKIPS_IN_A_ROW:
            raise RunStopped(
                f"{message}; the loss was not finite for {self.nonfinite_in_a_row + 1} steps in a row, so the "
                "weights are damaged: rerun from an earlier checkpoint (delete the newer ones) with a lower optim.lr"
            )
        self.say(f"{message}; skipping its update (train.nonfinite=skip)")
        return True

    def _micro_batches_per_step(self) -> int:
        return self.loader.accumulation * self.process.world_size

    def report(self, step: int, end: int, window: Window) -> dict[str, float]:
        metrics = window.metrics(self._micro_batches_per_step())
        metrics["train/loss_scale"] = ds.loss_scale(self.engine)
        metrics["train/skipped_steps"] = float(self.engine.skipped_steps)
        elapsed = window.elapsed()
        sequences = window.steps * self.loader.global_batch_size
        metrics["perf/sequences_per_s"] = sequences / elapsed
        metrics["perf/tokens_per_s"] = window.tokens / elapsed
        per_device = window.flops / elapsed / self.process.world_size
        metrics["perf/tflops_per_device"] = per_device / 1e12
        utilization = mfu(per_device, self.peak)
        if utilization is not None:
            metrics["perf/mfu"] = utilization
        metrics.update(memory_metrics(self.device))
        self.metrics_log.write(step, metrics)
        remaining = (end - step) * elapsed / window.steps
        mfu_text = f"{utilization:.1%}" if utilization is not None else "n/a"
        norm = metrics.get("train/grad_norm")
        self.say(
            f"step {step}/{self.config.schedule.total_steps} | loss {metrics['train/loss']:.4f} "
            f"mlm {metrics['train/mlm_loss']:.3f} ({metrics['train/mlm_accuracy']:.1%}) "
            f"sop {metrics['train/sop_loss']:.3f} ({metrics['train/sop_accuracy']:.1%}) | "
            f"lr {metrics['train/lr']:.3g} | grad norm {'n/a' if norm is None else f'{norm:.3g}'} | "
            f"{metrics['perf/tokens_per_s']:,.0f} tok/s {metrics['perf/sequences_per_s']:.1f} seq/s | "
            f"mfu {mfu_text} | mem {metrics['perf/memory_gb']:.2f} GB | eta {_duration(remaining)}"
        )
        return metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """MLM and SOP loss and accuracy over the fixed validation set (every rank its share)."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        sums = torch.zeros(NUM_SUMS, device=self.device, dtype=torch.float64)
        try:
            for batch in self.evalset:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                accumulate(sums, self.engine(**batch), batch)
        finally:
            module.train(was_training)
        dist.all_reduce(sums)
        values = sums.tolist()
        metrics = {
            "eval/mlm_loss": values[MLM_LOSS] / max(values[MLM_COUNT], 1),
            "eval/mlm_accuracy": values[MLM_CORRECT] / max(values[MLM_COUNT], 1),
            "eval/sop_loss": values[SOP_LOSS] / max(values[SOP_COUNT], 1),
            "eval/sop_accuracy": values[SOP_CORRECT] / max(values[SOP_COUNT], 1),
        }
        metrics["eval/loss"] = metrics["eval/mlm_loss"] + metrics["eval/sop_loss"]
        self.metrics_log.write(step, metrics)
        self.say(
            f"eval at step {step} ({int(values[SOP_COUNT])} instances): mlm {metrics['eval/mlm_loss']:.3f} "
            f"({metrics['eval/mlm_accuracy']:.1%}) sop {metrics['eval/sop_loss']:.3f} "
            f"({metrics['eval/sop_accuracy']:.1%})"
        )
        return metrics

    def save(self, step: int, output: Path) -> Path:
        """Gathers the state (collective) and writes the checkpoint on rank 0; every rank waits for it."""
        weights, moments = ds.gather_state(self.engine)
        path = output / checkpoint.CHECKPOINTS / checkpoint.checkpoint_name(step)
        if self.process.rank == 0:
            state = {
                "world_size": self.process.world_size,
                "data": self.loader.state_dict(),
                "engine": ds.engine_counters(self.engine),
                "config": self.config.to_dict(),
                "manifest_sha256": self.loader.dataset.manifest_sha256,
                "rng": "reseeded per micro-batch from (train.seed, step, place in the global batch)",
            }
            path = checkpoint.write(
                output,
                step,
                weights=weights,
                moments=moments,
                state=state,
                keep=self.config.train.keep_checkpoints,
                files={MODEL_FILENAME: (self.loader.dataset.directory / MODEL_FILENAME).read_bytes()},
            )
            self.say(f"checkpoint {path}")
        dist.barrier()
        return path

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True
        self.say("SIGTERM: finishing this step, then writing a checkpoint")


def accumulate(sums: torch.Tensor, output: Any, batch: dict[str, torch.Tensor]) -> None:
    """Adds a micro-batch's loss, and its MLM and SOP loss sums, correct predictions and counts, to ``sums``
    (on the device, without waiting for it)."""
    with torch.no_grad():
        labels = batch["masked_lm_labels"]
        valid = labels != IGNORE_INDEX
        count = valid.sum()
        correct = ((output.mlm_logits.max(-1).indices == labels) & valid).sum()  # argmax is slow on bf16
        sop_labels = batch["sentence_order_labels"]
        sop_valid = sop_labels != IGNORE_INDEX
        sop_count = sop_valid.sum()
        sop_correct = ((output.sop_logits.argmax(-1) == sop_labels) & sop_valid).sum()
        loss = (
            output.loss.detach().double() if output.loss is not None else torch.zeros((), device=sums.device)
        )
        finite = torch.isfinite(loss)
        update = torch.stack(
            [
                loss,
                output.mlm_loss.detach().double() * count,
                count.double(),
                correct.double(),
                output.sop_loss.detach().double() * sop_count,
                sop_count.double(),
                sop_correct.double(),
                (~finite).double(),
                torch.zeros((), dtype=torch.float64, device=sums.device),
            ]
        )
        sums += update.to(sums.device)


class Window:
    """Sums over the steps between two logs."""

    def __init__(self):
        self.start = time.perf_counter()
        self.steps = 0
        self.sums = [0.0] * NUM_SUMS
        self.tokens = 0
        self.flops = 0.0
        self.norms: list[float] = []
        self.lr = 0.0

    def add(self, sums: list[float], norm: float | None, lr: float, phase: Phase, config: Config) -> None:
        self.steps += 1
        self.lr = lr
        self.sums = [a + b for a, b in zip(self.sums, sums, strict=True)]
        batch = config.train.global_batch_size
        self.tokens += batch * phase.seq_len
        self.flops += batch * train_flops_per_sequence(config.model, phase.seq_len, phase.max_predictions)
        if norm is not None and math.isfinite(norm):
            self.norms.append(norm)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def metrics(self, micro_batches_per_step: int) -> dict[str, float]:
        s = self.sums
        metrics = {
            "train/loss": s[LOSS] / (self.steps * micro_batches_per_step),
            "train/mlm_loss": s[MLM_LOSS] / max(s[MLM_COUNT], 1),
            "train/mlm_accuracy": s[MLM_CORRECT] / max(s[MLM_COUNT], 1),
            "train/sop_loss": s[SOP_LOSS] / max(s[SOP_COUNT], 1),
            "train/sop_accuracy": s[SOP_CORRECT] / max(s[SOP_COUNT], 1),
            "train/lr": self.lr,
        }
        if self.norms:
            metrics["train/grad_norm"] = self.norms[-1]
        return metrics


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory: the accelerator's allocator on a GPU (reset after reading), else the process's RSS."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"perf/memory_gb": peak / 2**30}
    return {"perf/memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}


def _evalset(validation, config: Config, micro_batch_size: int, rank: int, world_size: int) -> EvalSet | None:
    if validation is None:
        return None
    final = phases(config.data)[-1]
    return EvalSet(
        validation,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=config.train.seed,
        phase=final,
        masked_lm_prob=config.data.masked_lm_prob,
        limit=config.train.eval_examples,
    )


def _copy_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    names = {name for name, _ in model.named_parameters()}
    if names != set(weights):
        missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.shape != weights[name].shape:
                raise ValueError(
                    f"checkpoint {str(path)!r} does not fit the model: {name} has shape {tuple(weights[name].shape)}, "
                    f"the model {tuple(param.shape)}"
                )
            param.copy_(weights[name])


def _write_run_files(output: Path, config: Config, ds_config: dict[str, Any]) -> None:
    from albert_scale.fileio import atomic_write_text

    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / CONFIG_FILE, config.to_yaml())
    atomic_write_text(output / DEEPSPEED_CONFIG_FILE, json.dumps(ds_config, indent=2) + "\n")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stdout(message: str) -> None:
    tqdm.write(message)  # above the progress bar, if one is shown


def _stderr(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
