"""Follow and control albert-scale jobs on a Ray cluster through its dashboard (the Ray Jobs API).

Usage:
    albert-scale jobs status JOB_ID [--address URL] [--header 'Name: value' ...]
    albert-scale jobs logs JOB_ID [--follow] [--address URL] [--header 'Name: value' ...]
    albert-scale jobs stop JOB_ID [--address URL] [--header 'Name: value' ...]
    albert-scale jobs list [--address URL] [--header 'Name: value' ...]

Jobs are started with ``albert-scale submit`` (``cluster/submit.py``). ``--address`` is the dashboard's
HTTP address, ``http://HEAD:8265`` (default: ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``).
``status`` prints the job's state and exits 2 with the job's last error line when it FAILED; ``logs
--follow`` streams the output until the job ends and exits 2 when it FAILED or was STOPPED; ``stop``
waits until the job has ended.

Authentication:
- ``--header 'Authorization: Bearer TOKEN'`` (repeatable, any header) is sent with every request, e.g. to
  a dashboard behind an authenticating proxy; ``ALBERT_SCALE_RAY_HEADERS`` may hold the same as a JSON
  object (``{"Authorization": "Bearer TOKEN"}``), and ``--header`` wins over it. Header values are
  never printed.
- A Ray cluster with token authentication (Ray 2.52+; ``ray start`` enables it whenever a token exists)
  wants Ray's token. With ``RAY_AUTH_MODE=token`` Ray's client sends it to any address; otherwise it is
  sent to a dashboard on this machine (localhost) only. Ray looks for it in ``RAY_AUTH_TOKEN``, then in
  the file ``RAY_AUTH_TOKEN_PATH``, then in ``~/.ray/auth_token``. An ``Authorization`` header of your
  own replaces it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from albert_scale.cli import stage_main
from albert_scale.redact import redact_uri

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

HEADERS_ENV = "ALBERT_SCALE_RAY_HEADERS"
ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_SECONDS = 0.5
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_REQUEST_FAILED = re.compile(r"Request failed with status code (\d+): (.*)", re.DOTALL)
_EXCEPTION_LINE = re.compile(r"^[\w.]*(?:Error|Exception): (.+)$")


# --- connecting -------------------------------------------------------------------------------------------


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--address`` and ``--header``, shared by ``submit`` and every ``jobs`` action."""
    parser.add_argument(
        "--address",
        metavar="URL",
        help="the Ray dashboard, http(s)://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)",
    )
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help=f"an HTTP header sent with every request, e.g. 'Authorization: Bearer TOKEN' (repeatable; "
        f"also {HEADERS_ENV} as a JSON object); values are never printed",
    )


def dashboard_address(given: str | None) -> str:
    """The dashboard URL: ``--address``, else the first of RAY_API_SERVER_ADDRESS and RAY_ADDRESS that is
    set. It must be http(s): a GCS address (``HOST:6379``) or ``ray://`` is not the Jobs API."""
    source, address = "--address", given
    if address is None:
        source, address = next(
            ((name, os.environ[name]) for name in ADDRESS_ENVS if os.environ.get(name)), ("", "")
        )
    if not address:
        raise ValueError("no Ray dashboard address: give --address http://HEAD:8265 or set RAY_ADDRESS")
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{source}={address!r} is not a Ray dashboard address: give http://HEAD:8265 "
            "(the dashboard's HTTP port, not the cluster's 6379 or ray://)"
        )
    return address.rstrip("/")


def parse_headers(given: Sequence[str], from_env: str | None = None) -> dict[str, str]:
    """Headers from ``HEADERS_ENV`` (a JSON object) overlaid by ``--header 'Name: value'`` options (names
    are case-insensitive). Errors name the header, never its value."""
    headers: dict[str, str] = {}
    if from_env:
        try:
            loaded = json.loads(from_env)
        except json.JSONDecodeError:
            loaded = None
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise ValueError(
                f'{HEADERS_ENV} must be a JSON object of strings, e.g. {{"Authorization": "Bearer ..."}}'
            )
        for name, value in loaded.items():
            _set_header(headers, name, value, HEADERS_ENV)
    for number, header in enumerate(given, 1):
        name, colon, value = header.partition(":")
        if not colon:
            raise ValueError(f"--header #{number} must look like 'Name: value'")
        _set_header(headers, name.strip(), value.strip(), f"--header {name.strip()!r}")
    return headers


def _set_header(headers: dict[str, str], name: str, value: str, source: str) -> None:
    if not _HEADER_NAME.match(name):
        raise ValueError(f"{source}: not a valid HTTP header name")
    if not value or "\n" in value or "\r" in value:
        raise ValueError(f"{source}: the value is empty or spans lines")
    for existing in [key for key in headers if key.lower() == name.lower()]:
        del headers[existing]
    headers[name] = value


def ray_token_header(address: str, headers: dict[str, str]) -> dict[str, str]:
    """``Authorization: Bearer <Ray's token>`` for a dashboard on this machine, unless the headers already
    authorize, RAY_AUTH_MODE is set (``token``: Ray's client sends it itself; ``disabled``: not wanted) or
    there is no token. Ray's own order: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE") or any(name.lower() == "authorization" for name in headers):
        return {}
    if not _is_local(urlsplit(address).hostname or ""):
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(args: argparse.Namespace) -> tuple[JobSubmissionClient, str]:
    """A Jobs client for ``args.address`` with ``args.header`` (and Ray's token, see above), and the
    address to show (a password in it redacted); the dashboard's version is checked here, so an
    unreachable address fails now, naming it."""
    address = dashboard_address(args.address)
    headers = parse_headers(args.header, os.environ.get(HEADERS_ENV))
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_logging()
    with dashboard_errors(redact_uri(address)):
        client = JobSubmissionClient(address, headers=headers | ray_token_header(address, headers))
    return client, redact_uri(address)


def _quiet_ray_logging() -> None:
    """Ray's client logs uploads and requests, and warns about a missing token before the request fails;
    what goes wrong reaches the user as one error line anyway."""
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def dashboard_errors(address: str, subject: str = "") -> Iterator[None]:
    """Turns what Ray's Jobs client raises into one line naming the address (and the job): OSError when
    the dashboard cannot be reached, ValueError when it refuses the request."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    where = f"{address}: {subject}: " if subject else f"{address}: "
    try:
        yield
    except AuthenticationError as err:
        raise ValueError(
            f"{where}{_first_line(str(err))}; send Ray's token (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) or --header 'Authorization: Bearer TOKEN'"
        ) from err
    except aiohttp.ClientResponseError as err:  # the log stream's websocket was refused
        raise ValueError(f"{where}HTTP {err.status}: {err.message}") from err
    except (ConnectionError, requests.RequestException, aiohttp.ClientError, asyncio.TimeoutError) as err:
        raise OSError(f"cannot reach the Ray dashboard at {address}: {_unreachable_reason(err)}") from err
    except RuntimeError as err:
        raise ValueError(f"{where}{_request_failure(err)}") from err


def _unreachable_reason(err: BaseException) -> str:
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return "unknown host"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (is the cluster up, with its dashboard on this port?)"
        cause = cause.__cause__ or cause.__context__
    return _first_line(str(err)) or type(err).__name__


def _request_failure(err: RuntimeError) -> str:
    """Ray's ``Request failed with status code 400: BODY.`` as ``HTTP 400: MESSAGE``: the message of the
    last exception when BODY is a (possibly nested) traceback, else BODY's first line."""
    match = _REQUEST_FAILED.match(str(err))
    if match is None:
        return _first_line(str(err))
    status, body = match.groups()
    raised = [found.group(1) for found in map(_EXCEPTION_LINE.match, body.splitlines()) if found]
    return f"HTTP {status}: {(raised[-1] if raised else _first_line(body)).rstrip('.')}"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# --- job states -------------------------------------------------------------------------------------------


def error_line(message: str | None) -> str:
    """The line of a job's message that says what went wrong: the last one mentioning an error (a
    ``albert-scale CMD: error: ...`` line, or a traceback's last line), else the last line."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no message"])[-1]


def check_outcome(info: JobDetails, *, stopped_is_error: bool) -> None:
    """Raises ValueError with the job's error line if it FAILED (or was STOPPED, when that is an error)."""
    status = str(info.status)
    if status == "FAILED" or (status == "STOPPED" and stopped_is_error):
        exit_code = f" (exit code {info.driver_exit_code})" if info.driver_exit_code is not None else ""
        raise ValueError(f"job {info.submission_id} {status}{exit_code}: {error_line(info.message)}")


def wait_until_ended(client: JobSubmissionClient, job_id: str) -> JobDetails:
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in ENDED:
            return info
        time.sleep(POLL_SECONDS)


def follow(client: JobSubmissionClient, address: str, job_id: str) -> JobDetails:
    """Streams the job's output to stdout until it ends; returns its final state."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with dashboard_errors(address, f"job {job_id}"):
        client.get_job_info(job_id)  # an unknown id is named here, not by the log stream's refused handshake
        asyncio.run(tail())
        return wait_until_ended(client, job_id)


def describe(info: JobDetails) -> str:
    rows = [
        ("job", info.submission_id or info.job_id or "?"),
        ("status", str(info.status)),
        ("entrypoint", info.entrypoint),
        ("started", _when(info.start_time)),
        ("ended", _when(info.end_time)),
        ("message", _first_line(info.message or "")),
    ]
    return "\n".join(f"{name:<11}{value}" for name, value in rows if value)


def _when(milliseconds: int | None) -> str:
    return (
        datetime.fromtimestamp(milliseconds / 1000).isoformat(sep=" ", timespec="seconds")
        if milliseconds
        else ""
    )


def jobs_command(action: str, job_id: str, address: str, with_headers: bool, *options: str) -> str:
    """The ``albert-scale jobs ACTION JOB_ID`` command line for the user to copy (header values left out)."""
    words = ["albert-scale", "jobs", action, job_id, *options, "--address", address]
    return shlex.join(words) + (" --header ..." if with_headers else "")


# --- the command ------------------------------------------------------------------------------------------


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Follow and control jobs on a Ray cluster (started with 'albert-scale submit') "
        "through its dashboard.",
        epilog="example: albert-scale jobs logs raysubmit_XYZ --follow --address http://head:8265",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="{status,logs,stop,list}")
    status = actions.add_parser(
        "status",
        help="the job's state and message; exit 2 if it FAILED",
        description="Print a job's state, entrypoint, times and message; exit 2 with its error if it FAILED.",
    )
    logs = actions.add_parser(
        "logs",
        help="the job's output so far, or --follow it until the job ends",
        description="Print a job's output. With --follow, stream it until the job ends and exit 2 if the "
        "job FAILED or was STOPPED.",
    )
    logs.add_argument("--follow", action="store_true", help="stream the output until the job ends")
    stop = actions.add_parser(
        "stop",
        help="stop the job and wait until it has ended",
        description="Stop a job and wait until it has ended.",
    )
    for action in (status, logs, stop):
        action.add_argument("job_id", metavar="JOB_ID", help="the id printed by 'albert-scale submit'")
    listing = actions.add_parser(
        "list", help="every job of the cluster", description="List the cluster's jobs."
    )
    for action in (status, logs, stop, listing):
        add_connection_arguments(action)
    return parser


def run(args: argparse.Namespace) -> int:
    client, address = connect(args)
    if args.action == "list":
        with dashboard_errors(address):
            print(format_listing(client.list_jobs()))
        return 0
    job_id = args.job_id
    if args.action == "logs" and args.follow:
        check_outcome(follow(client, address, job_id), stopped_is_error=True)
        return 0
    with dashboard_errors(address, f"job {job_id}"):
        if args.action == "logs":
            sys.stdout.write(client.get_job_logs(job_id))
            return 0
        if args.action == "stop":
            return stop(client, job_id)
        info = client.get_job_info(job_id)
    print(describe(info))
    check_outcome(info, stopped_is_error=False)
    return 0


def stop(client: JobSubmissionClient, job_id: str) -> int:
    if not client.stop_job(job_id):
        print(f"job {job_id} had already ended: {client.get_job_status(job_id)}")
        return 0
    print(f"stopping job {job_id}", flush=True)
    print(f"job {job_id}: {wait_until_ended(client, job_id).status}")
    return 0


def format_listing(jobs: Sequence[JobDetails]) -> str:
    if not jobs:
        return "no jobs"
    rows = [
        (job.submission_id or job.job_id or "-", str(job.status), _when(job.start_time), job.entrypoint)
        for job in sorted(jobs, key=lambda job: job.start_time or 0)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)), row[3]]) for row in rows
    )


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
