"""``albert-scale submit`` and ``albert-scale jobs`` against a real local Ray head (dashboard, Jobs server,
token authentication on): a preprocessing job and a training job on its output, logs, stop, failures and
authentication; and, without Ray, the argument handling and the KubeRay manifest."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import BIN, REPO, TINY_PREPROCESS, cli, error_lines, free_port, subprocess_env

from albert_scale.cli import COMMANDS
from albert_scale.data import ShardedDataset
from cluster import jobs, submit

KUBERAY_MANIFEST = REPO / "cluster" / "kuberay" / "rayjob.yaml"


# --- a real Ray head --------------------------------------------------------------------------------------


class RayHead:
    """``ray start --head --block`` on 127.0.0.1 with its own temp dir (a short path: Ray's unix sockets
    live under it) and free ports, token authentication on with a token of its own. Stopping it ends only
    its processes (its session, and the job entrypoints they started), never another Ray on the machine."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        ports = {
            "--port": free_port(),
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
        }
        command = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={self.dir}",
            *(f"{option}={port}" for option, port in ports.items()),
        ]
        # Job entrypoints inherit this environment: albert-scale on PATH, this checkout importable, offline.
        # The venv's bin goes last: first, its pip `ninja` would replace the system's for DeepSpeed's JIT
        # op builds, and the two versions' logs make each rebuild what the other built.
        path = f"{os.environ['PATH']}{os.pathsep}{BIN}"
        assert shutil.which("albert-scale", path=path) == str(BIN / "albert-scale"), (
            "another albert-scale on PATH"
        )
        env = subprocess_env(PATH=path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env.pop("RAY_ADDRESS", None)
        log = open(self.dir / "head.log", "wb")  # noqa: SIM115 - kept open for the head's lifetime
        self.process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "head.log").read_text()[-3000:]
                self.stop()
                pytest.fail(f"the Ray head did not start:\n{log}")
            time.sleep(0.5)

    def answers(self) -> bool:
        """The Jobs API lists jobs (with the token)."""
        request = urllib.request.Request(
            f"{self.address}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, grace: float = 3) -> None:
        """SIGTERM to the head's processes, SIGKILL to those left after ``grace`` seconds."""
        if self.process is not None:
            family = self.processes()
            for process in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.terminate()
            _, alive = psutil.wait_procs(family, timeout=grace)
            for process in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            self.process.wait(timeout=30)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def processes(self) -> list[psutil.Process]:
        """Every process of the head's session (``ray start`` leads it) and their descendants: the job
        entrypoints, which Ray starts in sessions of their own."""
        assert self.process is not None
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(process.pid) == self.process.pid:
                    found |= {p.pid: p for p in [process, *process.children(recursive=True)]}
        return list(found.values())


@pytest.fixture(scope="module")
def head():
    ray_head = RayHead()
    ray_head.start()
    try:
        yield ray_head
    finally:
        ray_head.stop()


def jobs_cli(head: RayHead, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``albert-scale ARGS`` as a user of this machine runs it: Ray's token in RAY_AUTH_TOKEN, RAY_AUTH_MODE
    unset (so albert-scale itself sends the token to the local dashboard)."""
    return cli(*args, timeout=240, **({"RAY_AUTH_MODE": "", "RAY_AUTH_TOKEN": head.token} | env))


def submitted_id(stdout: str) -> str:
    """The job id from ``submitted job ID to ADDRESS: ...``."""
    line = next(line for line in stdout.splitlines() if line.startswith("submitted job "))
    return line.split()[2]


def only_error(result: subprocess.CompletedProcess, prog: str) -> str:
    """The single ``PROG: error: ...`` line of a command that exited 2 without a traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"albert-scale {prog}: error: "), result.stderr
    return lines[0]


# --- jobs on the head -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preprocessed(head, tmp_path_factory):
    """The Lee corpus preprocessed by a submitted, followed job: (its result, the dataset directory)."""
    from data_pipeline.corpora import fetch_corpus

    root = tmp_path_factory.mktemp("jobs_data")
    corpus = fetch_corpus("lee", output_dir=root, progress=False, log=lambda message: None).jsonl
    shards = root / "shards"
    result = jobs_cli(
        head,
        "submit",
        "--address",
        head.address,
        "--follow",
        "--",
        "preprocess",
        *TINY_PREPROCESS,
        "--input",
        str(corpus),
        "--output",
        str(shards),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, shards


@pytest.mark.multiprocess
def test_a_preprocessing_job_writes_the_dataset(preprocessed, head):
    result, shards = preprocessed
    job_id = submitted_id(result.stdout)
    assert result.stdout.rstrip().endswith(f"job {job_id} SUCCEEDED")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "validation"}
    for split in manifest["splits"]:  # every shard present, with the rows and sha256 the manifest names
        assert len(ShardedDataset(shards, split=split, verify_checksums=True)) > 0


@pytest.mark.multiprocess
def test_a_training_job_checkpoints_and_tracks_to_mlflow(preprocessed, head, tmp_path):
    from mlflow import MlflowClient

    from albert_scale import checkpoint

    _, shards = preprocessed
    run, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    step = [
        "train",
        "--config",
        "tiny",
        "--data",
        str(shards),
        "--output",
        str(run),
        "schedule.total_steps=4",
        "train.log_every=2",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "tracking.system_metrics=false",
        f"tracking.uri={uri}",
    ]
    submitted = jobs_cli(head, "submit", "--address", head.address, "--num-cpus", "1", "--", *step)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted_id(submitted.stdout)
    assert f"albert-scale jobs logs {job_id} --follow --address {head.address}" in submitted.stdout
    assert f": {shlex.join(['albert-scale', *step])}" in submitted.stdout

    followed = jobs_cli(head, "jobs", "logs", job_id, "--follow", "--address", head.address)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    status = jobs_cli(head, "jobs", "status", job_id, "--address", head.address)
    assert status.returncode == 0 and "status     SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = jobs_cli(head, "jobs", "logs", job_id, "--address", head.address)
    assert logs.returncode == 0 and "step 4" in logs.stdout, logs.stdout[-3000:]

    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [4]
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    metrics = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    assert {"train/loss", "eval/mlm_loss"} <= set(metrics)

    listing = jobs_cli(head, "jobs", "list", "--address", head.address)
    assert listing.returncode == 0
    assert any(job_id in line and "SUCCEEDED" in line for line in listing.stdout.splitlines())


@pytest.mark.multiprocess
def test_stop_ends_a_running_job_stopped(preprocessed, head, tmp_path):
    _, shards = preprocessed
    job_id = f"albert-scale-stop-{secrets.token_hex(4)}"
    long_run = [
        "train",
        "--config",
        "tiny",
        "--data",
        str(shards),
        "--output",
        str(tmp_path),
        "schedule.total_steps=100000",
        "train.log_every=1",
        "train.eval_every=100000",
        "tracking.enabled=false",
    ]
    submitted = jobs_cli(head, "submit", "--address", head.address, "--job-id", job_id, "--", *long_run)
    assert submitted.returncode == 0 and submitted_id(submitted.stdout) == job_id, submitted.stderr
    # Stopped once it trains: a process killed while DeepSpeed builds or loads its CPU communication op
    # would leave that op's build lock behind for every later DeepSpeed process on the machine.
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        assert time.monotonic() < deadline, jobs_cli(
            head, "jobs", "logs", job_id, "--address", head.address
        ).stdout
        time.sleep(0.5)

    stopped = jobs_cli(head, "jobs", "stop", job_id, "--address", head.address)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == [f"stopping job {job_id}", f"job {job_id}: STOPPED"]
    status = jobs_cli(head, "jobs", "status", job_id, "--address", head.address)
    assert status.returncode == 0 and "status     STOPPED" in status.stdout
    again = jobs_cli(head, "jobs", "stop", job_id, "--address", head.address)
    assert again.returncode == 0 and again.stdout.strip() == f"job {job_id} had already ended: STOPPED"


@pytest.mark.multiprocess
def test_a_failing_job_exits_2_with_its_error_line(head, tmp_path):
    failing = [
        "train",
        "--config",
        "does-not-exist",
        "--data",
        str(tmp_path),
        "--output",
        str(tmp_path / "r"),
    ]
    result = jobs_cli(head, "submit", "--address", head.address, "--follow", "--", *failing)
    line = only_error(result, "submit")
    job_id = submitted_id(result.stdout)
    assert f"job {job_id} FAILED (exit code 2): albert-scale train: error: config 'does-not-exist'" in line
    assert "config 'does-not-exist'" in result.stdout  # the job's own output, streamed
    status = jobs_cli(head, "jobs", "status", job_id, "--address", head.address)
    assert "status     FAILED" in status.stdout
    assert "albert-scale train: error: config 'does-not-exist'" in only_error(status, "jobs")


@pytest.mark.multiprocess
def test_requests_the_dashboard_refuses_are_one_line(head, tmp_path):
    line = only_error(jobs_cli(head, "jobs", "status", "raysubmit_nope", "--address", head.address), "jobs")
    assert line.endswith(f"{head.address}: job raysubmit_nope: HTTP 404: Job raysubmit_nope does not exist")
    for follow in ([], ["--follow"]):
        logs = jobs_cli(head, "jobs", "logs", "raysubmit_nope", *follow, "--address", head.address)
        assert only_error(logs, "jobs").endswith("HTTP 404: Job raysubmit_nope does not exist")

    bad_env = tmp_path / "env.yaml"
    bad_env.write_text("pip: 5\n")
    args = ["submit", "--address", head.address, "--runtime-env", str(bad_env), "--", "corpus", "list"]
    line = only_error(jobs_cli(head, *args), "submit")
    assert "the job was not submitted: runtime env:" in line and "pip" in line

    listed = jobs_cli(
        head,
        "submit",
        "--address",
        head.address,
        "--working-dir",
        str(tmp_path),
        "--follow",
        "--",
        "corpus",
        "list",
    )
    assert listed.returncode == 0 and f"uploading {tmp_path}" in listed.stdout and "lee" in listed.stdout
    taken = submitted_id(listed.stdout)
    line = only_error(
        jobs_cli(head, "submit", "--address", head.address, "--job-id", taken, "--", "corpus", "list"),
        "submit",
    )
    assert f"the job was not submitted: HTTP 500: Job with submission_id {taken} already exists" in line


@pytest.mark.multiprocess
def test_authentication(head, tmp_path):
    no_token = {"RAY_AUTH_TOKEN": "", "HOME": str(tmp_path)}  # no token anywhere Ray would look
    line = only_error(jobs_cli(head, "jobs", "list", "--address", head.address, **no_token), "jobs")
    assert "Authentication required" in line and "--header 'Authorization: Bearer TOKEN'" in line

    # Where `ray start` and `ray.init()` keep it: ~/.ray/auth_token.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(f"{head.token}\n")
    listed = jobs_cli(head, "jobs", "list", "--address", head.address, RAY_AUTH_TOKEN="", HOME=str(home))
    assert listed.returncode == 0, listed.stderr
    # RAY_AUTH_MODE=token: Ray's client sends the token itself.
    listed = jobs_cli(head, "jobs", "list", "--address", head.address, RAY_AUTH_MODE="token")
    assert listed.returncode == 0, listed.stderr

    # A dashboard behind an authenticating proxy: the header is passed as it is.
    bearer = f"Authorization: Bearer {head.token}"
    assert (
        jobs_cli(head, "jobs", "list", "--address", head.address, "--header", bearer, **no_token).returncode
        == 0
    )
    headers = json.dumps({"authorization": f"Bearer {head.token}"})
    ok = jobs_cli(
        head, "jobs", "list", "--address", head.address, **no_token, ALBERT_SCALE_RAY_HEADERS=headers
    )
    assert ok.returncode == 0, ok.stderr

    wrong = "wrong-token-" + secrets.token_hex(8)
    result = jobs_cli(
        head, "jobs", "list", "--address", head.address, "--header", f"Authorization: Bearer {wrong}"
    )
    assert "Authentication failed" in only_error(result, "jobs")
    assert wrong not in result.stdout + result.stderr
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{head.address}/api/jobs/", timeout=10)  # the head does require the token


# --- without a cluster ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_an_unreachable_dashboard_is_one_line_naming_it():
    address = f"http://127.0.0.1:{free_port()}"
    line = only_error(cli("jobs", "status", "raysubmit_x", "--address", address), "jobs")
    assert line.endswith(
        f"cannot reach the Ray dashboard at {address}: connection refused (is the cluster up, "
        "with its dashboard on this port?)"
    )
    line = only_error(
        cli("submit", "--address", "http://no-such-host.invalid:8265", "--", "corpus", "list"), "submit"
    )
    assert line.endswith("cannot reach the Ray dashboard at http://no-such-host.invalid:8265: unknown host")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["jobs", "list"], {"RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": ""}, "no Ray dashboard address"),
        (
            ["jobs", "list"],
            {"RAY_ADDRESS": "127.0.0.1:6379", "RAY_API_SERVER_ADDRESS": ""},
            "RAY_ADDRESS='127.0.0.1:6379' is not a Ray",
        ),
        (["jobs", "list", "--address", "ray://head:10001"], {}, "--address='ray://head:10001' is not a Ray"),
        (["submit", "--address", "http://h:1", "--", "plan", "--config", "tiny"], {}, "cannot submit 'plan'"),
        (["submit", "--address", "http://h:1"], {}, "nothing to submit"),
        (
            ["submit", "--working-dir", "/no/such/dir", "--", "corpus", "list"],
            {},
            "--working-dir /no/such/dir: no such",
        ),
        (
            ["submit", "--runtime-env", "/no/such.yaml", "--", "corpus", "list"],
            {},
            "--runtime-env /no/such.yaml: no such",
        ),
        (["submit", "--num-gpus", "-1", "--", "corpus", "list"], {}, "--num-gpus=-1: must be >= 0"),
        (
            ["jobs", "list", "--address", "http://h:1", "--header", "Authorization Bearer s3cret"],
            {},
            "--header #1",
        ),
    ],
)
def test_usage_errors_are_one_line(args, env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command, *rest = args
    module = importlib.import_module(COMMANDS[command][0])
    assert module.main(rest, prog=f"albert-scale {command}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"albert-scale {command}: error: ") and message in err, err
    assert "s3cret" not in err


@pytest.mark.unit
def test_entrypoint_quotes_the_command_and_accepts_only_albert_scale_steps():
    step = ["--", "train", "--config", "tiny", "--output", "runs/a b", "optim.lr=1e-3", "$(rm -rf ~)", "x;y"]
    command = submit.entrypoint(step)
    assert command == "albert-scale train --config tiny --output 'runs/a b' optim.lr=1e-3 '$(rm -rf ~)' 'x;y'"
    assert shlex.split(command) == ["albert-scale", *step[1:]]
    assert submit.entrypoint(["corpus", "list"]) == "albert-scale corpus list"  # the separator is optional
    assert set(submit.SUBMITTABLE) <= set(COMMANDS)
    for rejected in (
        ["plan"],
        ["submit", "--", "train"],
        ["jobs", "list"],
        ["bash", "-c", "id"],
        ["--", "--help"],
    ):
        with pytest.raises(
            ValueError, match="must be one of preprocess, train, export, finetune, register, corpus"
        ):
            submit.entrypoint(rejected)


@pytest.mark.unit
def test_headers_from_the_environment_and_options_never_show_values():
    from_env = json.dumps({"Authorization": "Bearer from-env", "X-Team": "nlp"})
    headers = jobs.parse_headers(["authorization: Bearer from-option", "X-Extra:  a: b "], from_env)
    assert headers == {"X-Team": "nlp", "authorization": "Bearer from-option", "X-Extra": "a: b"}
    for given, message in [
        (["no colon s3cret"], "--header #1 must look like 'Name: value'"),
        (["Bad Name: s3cret"], "--header 'Bad Name': not a valid HTTP header name"),
        (["X-Empty:"], "--header 'X-Empty': the value is empty"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            jobs.parse_headers(given)
        assert "s3cret" not in str(error.value)
    for bad in ('["Bearer s3cret"]', "{not json s3cret", '{"X-N": 5}'):
        with pytest.raises(ValueError, match="ALBERT_SCALE_RAY_HEADERS must be a JSON object") as error:
            jobs.parse_headers([], bad)
        assert "s3cret" not in str(error.value)


@pytest.mark.unit
def test_rays_token_goes_only_to_a_local_dashboard(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    for local in ("http://127.0.0.1:8265", "http://localhost:8265", "https://[::1]:8265"):
        assert jobs.ray_token_header(local, {}) == {"Authorization": "Bearer from-file"}
    assert jobs.ray_token_header("http://head.example.com:8265", {}) == {}
    assert jobs.ray_token_header("http://10.0.0.5:8265", {}) == {}
    assert jobs.ray_token_header("http://127.0.0.1:8265", {"AUTHORIZATION": "Bearer mine"}) == {}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.ray_token_header("http://127.0.0.1:8265", {}) == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # Ray's client sends it itself, to any address
    assert jobs.ray_token_header("http://127.0.0.1:8265", {}) == {}


@pytest.mark.unit
def test_runtime_env_files(tmp_path):
    (tmp_path / "env.yaml").write_text("env_vars:\n  OMP_NUM_THREADS: '4'\npip: [sentencepiece]\n")
    (tmp_path / "env.json").write_text('{"env_vars": {"A": "1"}, "working_dir": "s3://bucket/code.zip"}')
    (tmp_path / "bad.yaml").write_text("env_vars: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- pip\n")
    (tmp_path / "empty.yaml").write_text("")
    code = tmp_path / "code"
    code.mkdir()

    assert submit.runtime_env(str(tmp_path / "env.yaml"), None) == {
        "env_vars": {"OMP_NUM_THREADS": "4"},
        "pip": ["sentencepiece"],
    }
    assert submit.runtime_env(str(tmp_path / "env.json"), str(code)) == {
        "env_vars": {"A": "1"},
        "working_dir": str(code.resolve()),  # --working-dir replaces the file's
    }
    assert submit.runtime_env(None, "s3://bucket/code.zip") == {"working_dir": "s3://bucket/code.zip"}
    assert submit.runtime_env(str(tmp_path / "empty.yaml"), None) == {}
    assert submit.runtime_env(None, None) == {}
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML or JSON at line 2"):
        submit.runtime_env(str(tmp_path / "bad.yaml"), None)
    with pytest.raises(ValueError, match=r"list.yaml: must be a mapping .* not a list"):
        submit.runtime_env(str(tmp_path / "list.yaml"), None)
    with pytest.raises(OSError, match=r"--runtime-env .*missing.yaml: no such file"):
        submit.runtime_env(str(tmp_path / "missing.yaml"), None)
    with pytest.raises(OSError, match=r"--working-dir .*nowhere: no such directory"):
        submit.runtime_env(None, str(tmp_path / "nowhere"))


@pytest.mark.unit
def test_error_line_of_a_job_message():
    failed = (
        "Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
        "loading config\nalbert-scale train: error: config 'x': no such file and no such preset\n"
    )
    assert jobs.error_line(failed) == "albert-scale train: error: config 'x': no such file and no such preset"
    traceback = 'Traceback (most recent call last):\n  File "a.py", line 1\nRuntimeEnvSetupError: no conda\n'
    assert jobs.error_line(traceback) == "RuntimeEnvSetupError: no conda"
    assert jobs.error_line("Job was intentionally stopped.") == "Job was intentionally stopped."
    assert jobs.error_line(None) == "no message"


@pytest.mark.unit
def test_the_kuberay_manifest_runs_preprocessing_then_ray_train():
    from albert_scale.cli import move_overrides
    from albert_scale.config import load_config

    manifest = yaml.safe_load(KUBERAY_MANIFEST.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in workers["template"]["spec"]["volumes"]}
    assert mounts["shared"] == "/shared" and claims["shared"]["claimName"]
    assert {e["name"] for e in container["env"]} >= {"MLFLOW_TRACKING_URI"}

    words = shlex.split(spec["entrypoint"])
    steps = [step.split() for step in " ".join(words).split(" && ")]
    assert [step[:2] for step in steps] == [["albert-scale", "preprocess"], ["albert-scale", "train"]]
    for _, command, *args in steps:
        module = importlib.import_module(COMMANDS[command][0])
        parsed = module.build_parser(f"albert-scale {command}").parse_args(args)  # options exist
        if command == "preprocess":
            move_overrides(parsed, "input")
        config = load_config(parsed.config, parsed.overrides)  # keys and values are valid
    assert config.cluster.backend == "ray" and config.cluster.use_gpu
    assert config.cluster.num_workers == workers["replicas"]
