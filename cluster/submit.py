"""Submit an albert-scale step to a Ray cluster as a Ray job.

Usage:
    albert-scale submit --address http://HEAD:8265 [--working-dir DIR] [--runtime-env FILE]
        [--num-gpus N] [--num-cpus N] [--job-id ID] [--follow] [--header 'Name: value' ...]
        -- COMMAND ARGS ...

COMMAND is one of preprocess, train, export, finetune, register, corpus; the job's entrypoint is
``albert-scale COMMAND ARGS`` (quoted as given), run on the cluster by its Jobs server, so albert-scale
must be installed there (the cluster's image) and paths are the cluster's (a shared file system or object
storage). ``--runtime-env FILE`` is Ray's runtime environment as YAML or JSON (``env_vars``, ``pip``,
``working_dir``, ...); ``--working-dir DIR`` uploads DIR and runs the job in it (it replaces the file's
``working_dir``). ``--num-gpus`` / ``--num-cpus`` reserve resources for the entrypoint process itself:
``train`` in one process wants ``--num-gpus 1``; under Ray Train (``cluster.backend=ray``) the workers
reserve their own.

By default the job id and the commands to follow it are printed and the command returns; ``--follow``
streams the job's output until it ends and exits 2 with the job's last error line if it FAILED or was
STOPPED. Connection options and authentication are those of ``albert-scale jobs`` (``cluster/jobs.py``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from albert_scale.cli import stage_main
from cluster.jobs import (
    add_connection_arguments,
    check_outcome,
    connect,
    dashboard_errors,
    follow,
    jobs_command,
)

SUBMITTABLE = ("preprocess", "train", "export", "finetune", "register", "corpus")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run an albert-scale step on a Ray cluster as a Ray job: the entrypoint is "
        "'albert-scale COMMAND ARGS', submitted to the cluster's dashboard.",
        epilog="example: albert-scale submit --address http://head:8265 --num-gpus 1 --follow -- "
        "train --config albert-base --data /shared/data/base --output /shared/runs/base",
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--working-dir",
        metavar="DIR",
        help="a local directory to upload and run the job in (or a remote URI)",
    )
    parser.add_argument(
        "--runtime-env", metavar="FILE", help="Ray runtime environment, YAML or JSON (env_vars, pip, ...)"
    )
    parser.add_argument(
        "--num-gpus", type=float, metavar="N", help="GPUs reserved for the entrypoint process"
    )
    parser.add_argument(
        "--num-cpus", type=float, metavar="N", help="CPUs reserved for the entrypoint process"
    )
    parser.add_argument("--job-id", metavar="ID", help="the job's submission id (default: one Ray makes up)")
    parser.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's output until it ends; exit 2 if it FAILED or was STOPPED",
    )
    parser.add_argument(
        "step",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ARGS",
        help=f"the albert-scale command to run: {', '.join(SUBMITTABLE)}, with its arguments",
    )
    return parser


def entrypoint(step: Sequence[str]) -> str:
    """``albert-scale COMMAND ARGS`` quoted for the shell the Jobs server runs it in; a leading ``--`` is
    the separator, not part of the command."""
    words = list(step[1:] if step[:1] == ["--"] else step)
    if not words:
        raise ValueError(
            f"nothing to submit: give the command after --, e.g. -- train --config CFG ... "
            f"(one of: {', '.join(SUBMITTABLE)})"
        )
    if words[0] not in SUBMITTABLE:
        raise ValueError(f"cannot submit {words[0]!r}: the command must be one of {', '.join(SUBMITTABLE)}")
    return shlex.join(["albert-scale", *words])


def runtime_env(path: str | None, working_dir: str | None) -> dict[str, Any]:
    """The runtime environment: the YAML or JSON mapping in ``path``, with ``working_dir`` set from
    ``--working-dir`` (a local directory made absolute; a URI such as ``s3://...zip`` as given)."""
    env: dict[str, Any] = {}
    if path is not None:
        env = _load_mapping(Path(path))
    if working_dir is not None:
        if "://" not in working_dir:
            if not Path(working_dir).is_dir():
                raise OSError(f"--working-dir {working_dir}: no such directory")
            working_dir = str(Path(working_dir).resolve())
        env["working_dir"] = working_dir
    return env


def _load_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise OSError(f"--runtime-env {path}: no such file") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(
            f"--runtime-env {path}: not valid YAML or JSON{where}: {getattr(err, 'problem', err)}"
        ) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"--runtime-env {path}: must be a mapping (env_vars:, pip:, working_dir: ...), "
            f"not a {type(loaded).__name__}"
        )
    return loaded


def _resources(args: argparse.Namespace) -> dict[str, float]:
    """Ray's ``entrypoint_num_gpus`` / ``entrypoint_num_cpus`` for the options given."""
    given = {
        "--num-gpus": ("entrypoint_num_gpus", args.num_gpus),
        "--num-cpus": ("entrypoint_num_cpus", args.num_cpus),
    }
    for option, (_, value) in given.items():
        if value is not None and value < 0:
            raise ValueError(f"{option}={value:g}: must be >= 0")
    return {name: value for name, value in given.values() if value is not None}


def run(args: argparse.Namespace) -> int:
    command = entrypoint(args.step)
    env = runtime_env(args.runtime_env, args.working_dir)
    resources = _resources(args)
    client, address = connect(args)
    if args.working_dir is not None and "://" not in args.working_dir:
        print(f"uploading {env['working_dir']} to {address}", flush=True)
    with dashboard_errors(address, "the job was not submitted"):
        try:
            job_id = client.submit_job(
                entrypoint=command, runtime_env=env or None, submission_id=args.job_id, **resources
            )
        except (TypeError, ValueError) as err:  # Ray's checks of the runtime environment
            raise ValueError(f"{address}: the job was not submitted: runtime env: {err}") from err
    print(f"submitted job {job_id} to {address}: {command}")
    with_headers = bool(args.header)
    if not args.follow:
        print("follow it with:")
        for action, *options in (["status"], ["logs", "--follow"], ["stop"]):
            print(f"  {jobs_command(action, job_id, address, with_headers, *options)}")
        return 0
    try:
        info = follow(client, address, job_id)
    except KeyboardInterrupt:
        print(
            f"the job keeps running: {jobs_command('stop', job_id, address, with_headers)}", file=sys.stderr
        )
        raise
    check_outcome(info, stopped_is_error=True)
    print(f"job {job_id} {info.status}")
    return 0


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
