"""Training on a Ray cluster: Ray Train's TorchTrainer runs the training function on N workers.

Usage:
    albert-scale train --config CFG --data DIR --output RUN_DIR cluster.backend=ray \\
        cluster.num_workers=N [cluster.use_gpu=true] [cluster.address=HOST:6379] [cluster.max_failures=3]

This process is the driver. It checks the config, the dataset and the run directory first (a mistake is
one line here, not N failed workers), connects to the Ray cluster (``cluster.address``, else RAY_ADDRESS,
else a Ray started in this process) and hands :func:`albert_scale.train.train` to a TorchTrainer: N workers,
one GPU each (nccl) or CPU workers (gloo), in one process group that Ray Train sets up. The training
function is the one every launcher runs; on each worker DeepSpeed joins Ray's group.

Checkpoints: the ranks gather the ZeRO partitions and rank 0 writes RUN_DIR/checkpoints/step-N, the same
world-size-independent checkpoint as under any launcher. RUN_DIR is Ray Train's experiment directory, so
each checkpoint is reported to Ray Train where it lies (no copy), with rank 0's metrics. When a worker dies,
Ray Train (``FailureConfig(max_failures)``) starts the worker group again and the training function resumes
from the newest good checkpoint in RUN_DIR, so the run ends with the weights an uninterrupted run has. The
dataset and RUN_DIR must be on a file system that every node mounts (NFS, a shared volume).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from albert_scale import checkpoint
from albert_scale.cli import RunStopped
from albert_scale.config import Config, build, check, launcher_world_size
from albert_scale.ray_address import check_cluster_address
from albert_scale.tracking import absolute_uri, first_line, tracking_uri

# The metric a worker reports when the run stopped on purpose (e.g. a non-finite loss): every rank stops
# at the same step, so the run ends as a failure of the job rather than of a worker (which Ray would retry).
STOPPED = "albert_scale/stopped"


def fit(config: Config, *, data: Path, output: Path, stop_at_step: int | None, quiet: bool) -> None:
    """Runs the training on Ray Train workers and waits for it; RunStopped with one line if it fails."""
    if (launcher_world_size() or 1) > 1:
        raise ValueError(
            "cluster.backend=ray: run 'albert-scale train' as one process (the driver); Ray Train starts "
            "the workers, so do not start it under deepspeed or torchrun"
        )
    data, output = data.resolve(), output.resolve()
    config = _for_workers(config)
    preflight(config, data=data, output=output)
    check_cluster_address(config.cluster.address, "cluster.address")
    output.mkdir(parents=True, exist_ok=True)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cluster = config.cluster
    started_here = _connect(cluster.address)
    try:
        _check_resources(cluster, local=started_here)
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "config": config.to_dict(),
                "data": str(data),
                "output": str(output),
                "stop_at_step": stop_at_step,
                "quiet": quiet,
            },
            torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cluster.num_workers,
                use_gpu=cluster.use_gpu,
                resources_per_worker={
                    "CPU": cluster.cpus_per_worker,
                    **({"GPU": 1} if cluster.use_gpu else {}),
                },
            ),
            run_config=RunConfig(
                name=output.name,
                storage_path=str(output.parent),
                failure_config=FailureConfig(max_failures=cluster.max_failures),
                # RUN_DIR/checkpoints keeps train.keep_checkpoints itself; Ray only lists them.
                checkpoint_config=CheckpointConfig(num_to_keep=None),
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise RunStopped(
                f"training on Ray failed ({_restarts(cluster.max_failures)}): {worker_error(err)}"
            ) from None
    finally:
        if started_here:
            ray.shutdown()
    stopped = (result.metrics or {}).get(STOPPED)
    if stopped:
        raise RunStopped(str(stopped))


def preflight(config: Config, *, data: Path, output: Path) -> None:
    """What every worker would find wrong, found once in the driver: the batch arithmetic at
    ``cluster.num_workers``, the dataset, and whether RUN_DIR's newest checkpoint continues this run."""
    from albert_scale.train import check_resume, open_datasets

    check(config, world_size=config.cluster.num_workers)
    dataset, _ = open_datasets(data, config)
    found = checkpoint.list_checkpoints(output)
    if found:
        newest = found[-1][1]
        check_resume(newest, checkpoint.read_state(newest), config, dataset, warn=lambda message: None)


def worker_error(err: Exception) -> str:
    """One line for a Ray Train failure: the first failed rank's own exception."""
    failures: dict[int, Exception] = getattr(err, "worker_failures", None) or {}
    if not failures:
        cause = getattr(err, "controller_failure", err)
        return _first_line(cause)
    rank = min(failures)
    cause = failures[rank]
    cause = getattr(cause, "cause", None) or cause  # RayTaskError wraps the worker's exception
    return f"worker rank {rank}: {_first_line(cause)}"


def _worker(loop_config: dict[str, Any]) -> None:
    """The training function of each Ray Train worker."""
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train import CheckpointUploadMode

    from albert_scale.train import train

    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs a line per report at INFO
    config = build(Config, loop_config["config"], prefix="")
    context = ray.train.get_context()
    rank0 = context.get_world_rank() == 0
    nodes: list[Any] = [None] * context.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())  # Ray Train started the group
    if rank0 and not loop_config["quiet"]:
        _echo(f"Ray Train: {len(nodes)} worker(s) on {len(set(nodes))} node(s)")

    def report(step: int, metrics: dict[str, float], saved: Path | None) -> None:
        # A barrier on every rank; rank 0's metrics and checkpoint are what Ray Train keeps.
        ray.train.report(
            {"step": step, **metrics},
            checkpoint=ray.train.Checkpoint(str(saved)) if saved is not None and rank0 else None,
            checkpoint_dir_name=saved.name if saved is not None else None,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )

    try:
        train(
            config,
            data=Path(loop_config["data"]),
            output=Path(loop_config["output"]),
            stop_at_step=loop_config["stop_at_step"],
            quiet=loop_config["quiet"],
            log=_echo,
            report=report,
        )
    except RunStopped as err:  # raised on every rank at the same step (after an all-reduce)
        ray.train.report({STOPPED: str(err)})


def _echo(message: str) -> None:
    """Progress lines straight to the worker's stdout, which Ray forwards to the driver (Ray Train's
    patched ``print`` would also send them through its logger, and the driver would show them twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _for_workers(config: Config) -> Config:
    """The config as the workers must see it: a relative tracking store made absolute (a worker's working
    directory is not the driver's), and an MLFLOW_TRACKING_URI of the driver carried over."""
    tracking = config.tracking
    if not tracking.enabled:
        return config
    uri = absolute_uri(tracking_uri(tracking.uri))
    return dataclasses.replace(config, tracking=dataclasses.replace(tracking, uri=uri))


def _connect(address: str) -> bool:
    """Connects to the Ray cluster, or starts one in this process; True if it was started here."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        ray.init(
            address=address or None,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    except ConnectionError as err:
        raise ValueError(
            f"cluster.address={address!r}: cannot reach the Ray cluster ({_first_line(err)})"
        ) from None
    return not address


def _check_resources(cluster: Any, *, local: bool) -> None:
    """A local Ray that cannot hold the workers would wait forever: say so instead."""
    import ray

    need = {"CPU": cluster.num_workers * cluster.cpus_per_worker}
    if cluster.use_gpu:
        need["GPU"] = cluster.num_workers
    have = ray.cluster_resources()
    short = {key: (value, have.get(key, 0)) for key, value in need.items() if have.get(key, 0) < value}
    if not short:
        return
    text = ", ".join(f"{need:g} {key} needed, {has:g} available" for key, (need, has) in short.items())
    hint = "lower cluster.num_workers or cluster.cpus_per_worker"
    if local:
        raise ValueError(
            f"cluster.num_workers={cluster.num_workers}: the local Ray is too small ({text}); {hint}"
        )
    print(f"waiting for the Ray cluster to provide the workers ({text})", file=sys.stderr)


def _restarts(max_failures: int) -> str:
    return "no restarts allowed" if max_failures == 0 else f"after up to {max_failures} restart(s)"


def _first_line(err: BaseException) -> str:
    text = first_line(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
