"""MLflow tracking of a training run: one run per job, from rank 0, never in the way of training.

The one module that imports mlflow. :class:`MlflowTracker` sends everything from a background thread:
the training loop only puts records on a queue. When the tracking server is down (at start or in the
middle of a run), the failure is reported once, records wait in memory in their order, and they are
sent when the server answers again, with a note of how many were late. Metrics are also in
``RUN_DIR/metrics.jsonl`` in any case, so a server that never comes back loses nothing.

The default tracking URI is a SQLite store in the working directory (``sqlite:///mlflow.db``, which
serves the model registry too); ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point it at a server. A
resumed run continues the same MLflow run (its id is kept in ``RUN_DIR/mlflow_run.json``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from albert_scale.redact import redact_params, redact_text, redact_uri

DEFAULT_URI = "sqlite:///mlflow.db"
RUN_FILE = "mlflow_run.json"
RETRY_SECONDS = 5.0
"""Pause between attempts to reach a tracking server that did not answer."""
CLOSE_SECONDS = 30.0
"""How long the end of a run waits for pending records to be sent."""
MAX_PARAMS_PER_CALL = 100  # MLflow's limits per log_batch
MAX_METRICS_PER_CALL = 1000


class Tracker:
    """The interface, and what ranks other than 0 use: it records nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def tracking_uri(configured: str = "") -> str:
    """``tracking.uri``, else MLFLOW_TRACKING_URI, else the SQLite store in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def absolute_uri(uri: str) -> str:
    """A tracking URI that means the same from any working directory: a relative SQLite or file store is
    made absolute; any other URI is returned as it is."""
    for scheme in ("sqlite:///", "file:"):
        if uri.startswith(scheme):
            path = uri[len(scheme) :]
            return uri if Path(path).is_absolute() else scheme + str(Path(path).resolve())
    return uri


def code_version() -> str:
    """The git commit of this code when it runs from a checkout, else the package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            return out.stdout.strip()
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"albert-scale {version('albert-scale')}"
    except PackageNotFoundError:
        return "unknown"


class MlflowTracker(Tracker):
    """One MLflow run for a training job; all calls return at once (a background thread sends).

    ``say`` gets the one-line reports: the server unreachable (once per outage) and back again.
    """

    def __init__(
        self,
        *,
        run_dir: Path,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        uri: str,
        say: Callable[[str], None],
        system_metrics_interval: float,
        flush_seconds: float,
        system_metrics: bool = True,
    ):
        # A tracking server that does not answer must not hold the thread for minutes (this class retries).
        connect(uri, timeout_seconds=10)
        from mlflow import MlflowClient

        self.uri = uri
        self.shown_uri = redact_text(uri)  # in messages: without a password it may carry
        self.client = MlflowClient(tracking_uri=uri)
        self.run_file = Path(run_dir) / RUN_FILE
        self.experiment = experiment
        self.run_name = run_name
        self.params = redact_params(params)
        self.tags = dict(tags)
        self.say = say
        self.system_metrics = system_metrics
        self.system_metrics_interval = system_metrics_interval
        self.flush_seconds = flush_seconds
        self.monitor: Any = None
        self.run_id = self._saved_run_id()
        self.resumed = self.run_id is not None
        self.backlog: list[tuple[str, Any]] = []
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.failing_since: float | None = None
        self.late = 0
        self.done = threading.Event()
        self._try(self._start)  # at once when the server answers, so the run id is known from the start
        self.thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self.thread.start()

    # --- the loop's side: enqueue and return --------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self.queue.put(("metrics", (dict(metrics), step, stamp)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.queue.put(("artifact", (str(path), artifact_path)))

    def close(self, status: str = "FINISHED") -> None:
        """Ends the run; waits up to :data:`CLOSE_SECONDS` for pending records, then reports what is left."""
        self.queue.put(("end", status))
        self.done.wait(CLOSE_SECONDS)
        left = len(self.backlog) + self.queue.qsize()
        if left:
            self.say(
                f"MLflow at {self.shown_uri} did not take {left} pending record(s) before the end; the metrics are "
                f"in metrics.jsonl and the run can be logged again by rerunning when the server is up"
            )
        if self.monitor is not None:
            self.monitor.finish()

    # --- the thread's side ----------------------------------------------------------------------------------

    def _work(self) -> None:
        last_sent = -float("inf")
        while True:
            try:
                item = self.queue.get(timeout=RETRY_SECONDS if self.backlog else None)
                self.backlog.append(item)
                # Metrics wait for the rest of the flush interval, to go out in one call with those that
                # follow (each call is a database transaction on the server); anything else goes at once.
                while (
                    item[0] == "metrics" and (wait := last_sent + self.flush_seconds - time.monotonic()) > 0
                ):
                    item = self.queue.get(timeout=wait)
                    self.backlog.append(item)
                while True:  # take whatever else is waiting, to send it in few calls
                    self.backlog.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            if self.run_id is None and not self._try(self._start):
                continue
            while self.backlog:
                items = _next_call(self.backlog)
                if not self._try(lambda items=items: self._send(items)):
                    break
                del self.backlog[: len(items)]
                last_sent = time.monotonic()
                if items[-1][0] == "end":
                    self.done.set()
                    return

    def _try(self, action: Callable[[], None]) -> bool:
        try:
            action()
        except Exception as err:  # an unreachable or failing server: keep the records, retry later
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                self.say(
                    f"MLflow at {self.shown_uri} is not reachable "
                    f"({type(err).__name__}: {redact_text(first_line(err))}); "
                    "training goes on and the records are sent when it answers again"
                )
            return False
        if self.failing_since is not None:
            outage = time.monotonic() - self.failing_since
            self.failing_since = None
            self.say(
                f"MLflow at {self.shown_uri} answers again after {outage:.0f} s; sending the records it missed"
            )
        return True

    def _saved_run_id(self) -> str | None:
        if not self.run_file.is_file():
            return None
        saved = json.loads(self.run_file.read_text())
        return saved["run_id"] if saved.get("tracking_uri") == redact_uri(self.uri) else None

    def _start(self) -> None:
        from mlflow.entities import Param, RunTag

        if self.run_id is not None:
            if self.resumed:  # reopen the run of the checkpoints this job resumes from
                self.client.update_run(self.run_id, status="RUNNING")
                self.resumed = False
                self._start_monitor()
            return
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                self.experiment, artifact_location=_artifact_location(self.uri)
            )
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in self.params.items()]
        for i in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_PER_CALL])
        self.client.log_batch(self.run_id, tags=[RunTag("mlflow.runName", self.run_name)])
        self.run_file.parent.mkdir(parents=True, exist_ok=True)
        self.run_file.write_text(
            json.dumps({"run_id": self.run_id, "tracking_uri": redact_uri(self.uri)}) + "\n"
        )
        self._start_monitor()

    def _start_monitor(self) -> None:
        if self.system_metrics and self.monitor is None:
            self.monitor = start_node_monitor(self.run_id, self.uri, self.system_metrics_interval)

    def _send(self, items: list[tuple[str, Any]]) -> None:
        from mlflow.entities import Metric

        kind, payload = items[0]
        if kind == "metrics":
            batch = [
                Metric(k, float(v), stamp, step)
                for _, (metrics, step, stamp) in items
                for k, v in metrics.items()
                if v is not None and v == v
            ]
            self.client.log_batch(self.run_id, metrics=batch)
        elif kind == "artifact":
            path, artifact_path = payload
            self.client.log_artifact(self.run_id, path, artifact_path)
        elif kind == "end":
            self.client.set_terminated(self.run_id, status=payload)


def _next_call(backlog: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The records the next call sends: the leading metrics records, as many as one log_batch takes
    (at least one), or the one other record at the front."""
    if backlog[0][0] != "metrics":
        return backlog[:1]
    taken, count = 0, 0
    for kind, payload in backlog:
        if kind != "metrics" or (taken and count + len(payload[0]) > MAX_METRICS_PER_CALL):
            break
        taken, count = taken + 1, count + len(payload[0])
    return backlog[:taken]


def connect(uri: str | None = None, *, timeout_seconds: int = 120, log_level: int = logging.WARNING) -> str:
    """Prepares this process to talk to MLflow at ``uri`` (default :func:`tracking_uri`) and returns it.

    MLflow's own HTTP retries are turned off (its default backs off for minutes; callers here retry or
    report once) and requests time out after ``timeout_seconds``, both only where the environment says
    nothing; MLflow's logger is set to ``log_level`` (no INFO lines about tables and monitors); the URI
    becomes mlflow's for its fluent API. A URI with a password keeps MLflow from printing run links.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_seconds))
    import mlflow

    logging.getLogger("mlflow").setLevel(log_level)
    uri = uri or tracking_uri()
    if redact_uri(uri) != uri:  # MLflow prints run links to the server with the URI's password in them
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    return uri


def start_node_monitor(run_id: str, uri: str, interval: float) -> Any:
    """System metrics of this node into the run (rank 0's tracker, and the first rank of every other
    node); returns the monitor to ``finish()``, or None when MLflow cannot be reached."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    connect(uri)
    # An outage is reported once, by the tracker; MLflow's monitor would warn at every sample.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    try:
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=interval,
            node_id=socket.gethostname(),
            tracking_uri=uri,
            resume_logging=True,
        )
        monitor.start()
    except Exception:
        return None
    return monitor


def _artifact_location(uri: str) -> str | None:
    """With a SQLite store, artifacts go to ``mlruns`` beside the database file (MLflow would put them
    under the working directory); with a server, where the server says."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return None


def first_line(err: BaseException) -> str:
    """The first line of an error's message (at most 200 characters; empty if it has none)."""
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def plot_metrics(metrics_file: Path, output: Path) -> Path | None:
    """A PNG of the training loss, the evaluation losses and the throughput over the steps."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("train/loss") is not None]
    evals = [r for r in records if r.get("eval/loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, speed) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        losses.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train loss")
    if evals:
        steps = [r["step"] for r in evals]
        losses.plot(steps, [r["eval/mlm_loss"] for r in evals], "o-", label="eval MLM loss")
        losses.plot(steps, [r["eval/sop_loss"] for r in evals], "s-", label="eval SOP loss")
    losses.set_xlabel("step")
    losses.set_title("loss")
    losses.legend()
    if train:
        speed.plot([r["step"] for r in train], [r["perf/tokens_per_s"] for r in train])
    speed.set_xlabel("step")
    speed.set_title("tokens / s")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
