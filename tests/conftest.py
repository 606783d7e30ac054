"""Shared test set-up. Tests never reach a model or dataset hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import TINY_PREPROCESS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Training runs in tests track into a SQLite store of the session (not the working directory),
    unless a test points MLFLOW_TRACKING_URI at a server."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow_store') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def cli_path() -> Path:
    """The installed ``albert-scale`` console script of this environment."""
    path = BIN / "albert-scale"
    if not path.exists():
        pytest.fail(f"{path} is missing: install the package (make install)")
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Real shards for the tiny config: gensim's Lee corpus (300 documents) through the preprocessing
    pipeline on a local Ray (seq 64, shards of 300 rows, 5% validation). Made once per session."""
    import ray

    from data_pipeline import preprocess
    from data_pipeline.corpora import fetch_corpus

    root = tmp_path_factory.mktemp("tiny_shards")
    corpus = fetch_corpus("lee", output_dir=root, progress=False, log=lambda message: None).jsonl
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        code = preprocess.main([*TINY_PREPROCESS, "--input", str(corpus), "--output", str(root / "shards")])
    finally:
        ray.shutdown()
    assert code == 0
    return root / "shards"


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, local artifact root) that a test can stop
    (kill -9) and start again on the same port and store."""

    def __init__(self, root: Path):
        import socket

        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 90) -> None:
        import subprocess
        import time
        import urllib.request

        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - kept open for the server's lifetime
        self.process = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--default-artifact-root",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # MLflow's job runner (GenAI evaluation) is not used, and would leave its queue in /dev/shm.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail("mlflow server did not answer within the timeout")

    def kill(self) -> None:
        import os
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """Starts a real MLflow tracking server for the test and stops it afterwards."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def stopped_mlflow_server(tmp_path_factory):
    """An MLflow tracking server on a reserved port that the test starts when it wants (stopped after)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.kill()
