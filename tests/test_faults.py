"""Fault injection with real processes: a training process killed with SIGKILL at random steps (some kills
land while a checkpoint is being written) and rerun ends with exactly the weights and metrics of an
uninterrupted run; a Ray worker killed during preprocessing (an encoding actor, a read task) leaves the
job to finish with shards byte-identical to an uninterrupted run; a checkpoint damaged by a crash (a
truncated model file, a leftover temporary directory) is reported in one line and skipped for the one
before it when the run is continued from the command line.

The kill points are drawn from a seeded generator; the seed is printed (shown with a failure) and
ALBERT_SCALE_FAULT_SEED=N replays it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from helpers import BIN, TINY_PREPROCESS, cli, subprocess_env

from albert_scale import checkpoint
from albert_scale.fileio import sha256_file
from data_pipeline.corpora import fetch_corpus

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 240
CHECKPOINT_EVERY = 4
# fp32 on one process, a metrics record for every step, tracking off (its faults are test_tracking's).
TRAIN_OVERRIDES = (
    f"schedule.total_steps={STEPS}",
    f"train.checkpoint_every={CHECKPOINT_EVERY}",
    "train.log_every=1",
    "train.eval_every=60",
    "train.precision=fp32",
    "tracking.enabled=false",
)
KILLS = 3
STEP_LINE = re.compile(r"^step (\d+)/")


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", "tiny", "--data", str(data), "--output", str(run), *TRAIN_OVERRIDES, *extra]


# --- child processes --------------------------------------------------------------------------------------


class Child:
    """``albert-scale ARGS`` in its own session, its output (stdout and stderr merged, unbuffered) read
    line by line as it comes."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [str(BIN / "albert-scale"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(self.lines[-1])
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, match, timeout: float) -> str:
        """The first further line for which ``match(line)`` is true; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no expected line within {timeout} s:\n{self.output[-3000:]}")
            if line is None:
                self.proc.wait()
                pytest.fail(f"the process ended ({self.proc.returncode}) first:\n{self.output[-3000:]}")
            if match(line):
                return line

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would: the process alone, not its group; then no process of its session may
        be left."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.finish(timeout=30)
        left = session_members(self.proc.pid)
        assert not left, f"processes of the killed run survived it: {[p.cmdline() for p in left]}"

    def stop(self) -> None:
        """Cleanup: kills the process and everything of its session, if still there."""
        kill_session(self.proc)
        self._reader.join(timeout=10)
        self.proc.stdout.close()


def session_members(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(process.pid) == sid:
                found.append(process)
    return found


def kill_session(proc: subprocess.Popen) -> None:
    """Kills a child started with ``start_new_session=True`` and every process of its session (a local
    Ray's raylet and workers, which move to process groups of their own)."""
    members = session_members(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for member in members:
        with contextlib.suppress(psutil.Error):
            member.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


# --- 1. kill -9 of a training process ---------------------------------------------------------------------


@dataclass
class Kill:
    step: int
    """Kill once this step is done (or, during a checkpoint, the first checkpoint step from here)."""
    during: str
    """``step``: after the step's log line and a random pause of up to 20 ms, wherever the loop then is;
    ``checkpoint``: as soon as that step's checkpoint has its temporary directory, i.e. mid-write."""
    pause: float = 0.0


def kill_plan(rng: random.Random) -> list[Kill]:
    """One kill in each third of the run, after the first checkpoint and a few checkpoints apart (so each
    restart gets past its checkpoint before the next kill); at least one of each kind."""
    low, high = 2 * CHECKPOINT_EVERY, STEPS - 2 * CHECKPOINT_EVERY
    width = (high - low) // KILLS
    kinds = ["checkpoint", "step", rng.choice(["checkpoint", "step"])]
    rng.shuffle(kinds)
    plan = []
    for i, kind in enumerate(kinds):
        step = rng.randrange(low + i * width, low + (i + 1) * width - 2 * CHECKPOINT_EVERY)
        if kind == "checkpoint":
            step = -(-step // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
        plan.append(Kill(step, kind, pause=rng.uniform(0, 0.02)))
    return plan


def kill_at(child: Child, run: Path, kill: Kill) -> str:
    """Waits for ``kill``'s point and kills the process; returns where the kill landed."""

    def due(line: str) -> bool:
        match = STEP_LINE.match(line)
        if not match or int(match.group(1)) < kill.step:
            return False
        return kill.during == "step" or int(match.group(1)) % CHECKPOINT_EVERY == 0

    step = int(STEP_LINE.match(child.wait_for_line(due, timeout=180)).group(1))
    if kill.during == "step":
        time.sleep(kill.pause)
        child.kill()
        return f"after step {step}"
    root = run / checkpoint.CHECKPOINTS
    tmp_prefix, final = f".tmp-step-{step:08d}-", checkpoint.checkpoint_name(step)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = os.listdir(root)
        if any(name.startswith(tmp_prefix) for name in names) or final in names:
            break
        time.sleep(0.0002)
    child.kill()
    leftover = [p.name for p in root.glob(".tmp-step-*")]
    return f"writing checkpoint {step} (left {leftover or 'no temporary directory'})"


@pytest.fixture(scope="module")
def reference_run(tiny_shards, tmp_path_factory) -> Path:
    """The run without faults."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    result = cli(*train_args(tiny_shards, run))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


def records_without_timings(run: Path) -> list[dict]:
    """metrics.jsonl, without the throughput and memory figures (they depend on the machine's load)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def logged_steps(records: list[dict], key: str) -> list[int]:
    return [r["step"] for r in records if key in r]


@pytest.mark.timeout(240)
def test_a_training_process_killed_at_random_steps_resumes_to_the_same_weights(
    reference_run, tiny_shards, tmp_path
):
    seed = int(os.environ.get("ALBERT_SCALE_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    plan = kill_plan(random.Random(seed))
    context = f"ALBERT_SCALE_FAULT_SEED={seed}, kills {plan}"
    print(context)
    run = tmp_path / "killed"
    args = train_args(tiny_shards, run)
    resume_from = None
    for kill in [*plan, None]:
        child = Child(*args)
        try:
            if kill is None:
                code = child.finish(timeout=180)
                assert code == 0, f"{context}\n{child.output[-4000:]}"
                assert f"done: {STEPS} steps" in child.output, child.output[-3000:]
            else:
                landed = kill_at(child, run, kill)
                print(f"killed {landed}")
        finally:
            child.stop()
        # Every start continues from the newest complete checkpoint that the previous one left, silently.
        if resume_from is not None:
            path, step = resume_from
            assert f"resumed from {path} (step {step}," in child.output, f"{context}\n{child.output[-3000:]}"
        assert "trying the previous checkpoint" not in child.output, f"{context}\n{child.output[-3000:]}"
        step, path = checkpoint.list_checkpoints(run)[-1]
        resume_from = path, step

    assert not list((run / checkpoint.CHECKPOINTS).glob(".tmp-step-*")), "a temporary directory was left"
    assert checkpoint.list_checkpoints(run) == [
        (step, run / checkpoint.CHECKPOINTS / path.name)
        for step, path in checkpoint.list_checkpoints(reference_run)
    ]
    straight = checkpoint.load_latest(reference_run, warn=pytest.fail)
    killed = checkpoint.load_latest(run, warn=pytest.fail)
    assert straight.step == killed.step == STEPS
    assert straight.weights.keys() == killed.weights.keys()
    for name, tensor in straight.weights.items():
        assert torch.equal(tensor, killed.weights[name]), f"{context}: weight {name} differs"
    for kind, tensors in straight.moments.items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, killed.moments[kind][name]), f"{context}: {kind}/{name} differs"
    # metrics.jsonl: a rerun drops the records after its checkpoint and writes them again, so every step
    # is there once, with the values of the uninterrupted run.
    expected, got = records_without_timings(reference_run), records_without_timings(run)
    for key in ("train/loss", "eval/loss"):
        assert logged_steps(got, key) == logged_steps(expected, key), f"{context}: {key} steps differ"
    assert logged_steps(got, "train/loss") == list(range(1, STEPS + 1))
    assert got == expected, f"{context}: logged values differ"


def test_a_run_killed_before_its_first_checkpoint_logs_every_step_once(tiny_shards, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(tiny_shards), "--output", str(run)]
    args += ["train.log_every=1", "tracking.enabled=false"]
    child = Child(*args)
    try:
        kill_at(child, run, Kill(3, "step"))
    finally:
        child.stop()
    assert not checkpoint.list_checkpoints(run)
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    records = records_without_timings(run)
    assert logged_steps(records, "train/loss") == list(range(1, 21))
    assert logged_steps(records, "eval/loss") == [0, 10, 20]


# --- 2. a Ray worker killed during preprocessing ----------------------------------------------------------

COPIES, FILES = 60, 4
PREPROCESS_WORKERS = "2"


@pytest.fixture(scope="module")
def large_corpus(tmp_path_factory) -> Path:
    """The Lee corpus 60 times over (18,000 documents) in 4 JSONL files, enough to keep two encoding
    actors busy for seconds. Each copy's documents open with a sentence naming the copy, so no two
    documents are the same."""
    root = tmp_path_factory.mktemp("large_corpus")
    lee = fetch_corpus("lee", output_dir=root / "lee", progress=False, log=lambda message: None).jsonl
    documents = [json.loads(line)["text"] for line in lee.read_text().splitlines()]
    inputs = root / "inputs"
    inputs.mkdir()
    per_file = COPIES // FILES
    for part in range(FILES):
        with (inputs / f"part-{part}.jsonl").open("w") as f:
            for copy in range(part * per_file, (part + 1) * per_file):
                for text in documents:
                    f.write(json.dumps({"text": f"This is copy {copy} of the story. {text}"}) + "\n")
    return inputs


def preprocess_args(corpus: Path, output: Path) -> list[str]:
    return [
        "preprocess",
        *TINY_PREPROCESS,
        "--num-workers",
        PREPROCESS_WORKERS,
        "--input",
        str(corpus),
        "--output",
        str(output),
    ]


def digests(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def preprocessed(large_corpus, tmp_path_factory) -> dict[str, str]:
    """sha256 of every file of the uninterrupted run."""
    output = tmp_path_factory.mktemp("preprocessed") / "reference"
    result = cli(*preprocess_args(large_corpus, output), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return digests(output)


def ray_workers(root: psutil.Process, prefix: str) -> list[tuple[psutil.Process, str]]:
    """(process, title) of the descendants of ``root`` whose title (``ray::...``) starts with ``prefix``."""
    found = []
    for process in root.children(recursive=True):
        with contextlib.suppress(psutil.Error, IndexError):
            title = process.cmdline()[0]
            if title.startswith(prefix):
                found.append((process, title))
    return found


ENCODER = "ray::MapWorker(MapBatches(DocumentEncoder))"
READER = "ray::FlatMap(read_rows)"


@pytest.mark.timeout(280)
@pytest.mark.parametrize("victim", ["encoding actor", "read task"])
def test_a_ray_worker_killed_during_preprocessing_leaves_the_same_shards(
    preprocessed, large_corpus, tmp_path, victim
):
    output = tmp_path / "killed"
    child = Child(*preprocess_args(large_corpus, output))
    try:
        root = psutil.Process(child.proc.pid)
        deadline = time.monotonic() + 200
        chosen = None
        while chosen is None and child.proc.poll() is None and time.monotonic() < deadline:
            encoders = ray_workers(root, ENCODER)
            if victim == "encoding actor":
                # Once shards are being written, an actor at work (in ``submit``) if there is one.
                if (output / "train-00000.arrow").exists():
                    busy = [w for w in encoders if ".submit" in w[1]]
                    chosen = (busy or encoders or [None])[0]
            elif encoders:  # the encoding pass (the tokenizer's sample pass has read tasks too)
                chosen = (ray_workers(root, READER) or [None])[0]
            if chosen is None:
                time.sleep(0.02)
        assert chosen is not None, f"no {victim} found while the job ran:\n{child.output[-3000:]}"
        process, title = chosen
        written = len(list(output.glob("*.arrow")))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        print(f"killed {title} (pid {process.pid}) with {written} shard(s) written")
        code = child.finish(timeout=200)
    finally:
        child.stop()
    assert code == 0, child.output[-4000:]
    assert written < sum(name.endswith(".arrow") for name in preprocessed), (
        "the kill came after the last shard"
    )
    assert (output / "manifest.json").is_file()
    got = digests(output)
    assert got.keys() == preprocessed.keys()
    differ = [name for name in got if got[name] != preprocessed[name]]
    assert not differ, f"files differ from the uninterrupted run: {differ}"


# --- 3. a checkpoint damaged by a crash, through the command line -----------------------------------------


def test_a_checkpoint_damaged_by_a_crash_is_skipped_for_the_previous_one(tiny_shards, tmp_path):
    """Checkpoints are written into a temporary directory and renamed; a machine that dies can still leave
    such a directory behind, and a renamed checkpoint whose data never reached the disk."""
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(tiny_shards), "--output", str(run)]
    args += ["tracking.enabled=false"]
    first = cli(*args)  # 20 steps, checkpoints at 10 and 20
    assert first.returncode == 0, first.stderr[-3000:]
    root = run / checkpoint.CHECKPOINTS
    newest, previous = root / checkpoint.checkpoint_name(20), root / checkpoint.checkpoint_name(10)
    model = newest / checkpoint.MODEL_FILE
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    leftover = root / ".tmp-step-00000030-4242"
    leftover.mkdir()
    (leftover / checkpoint.MODEL_FILE).write_bytes(model.read_bytes()[:1000])

    second = cli(*args, "schedule.total_steps=30")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    about = [line for line in second.stderr.splitlines() if str(newest) in line]
    assert len(about) == 1, second.stderr
    assert about[0].startswith("warning:") and checkpoint.MODEL_FILE in about[0], about[0]
    assert "damaged" in about[0] and "trying the previous checkpoint" in about[0], about[0]
    assert f"resumed from {previous} (step 10," in second.stdout, second.stdout[-3000:]
    assert "done: 30 steps" in second.stdout
    # The leftover is gone, step 20 was written again, and every checkpoint left is good.
    assert not leftover.exists()
    assert [step for step, _ in checkpoint.list_checkpoints(run)] == [20, 30]
    for _, path in checkpoint.list_checkpoints(run):
        checkpoint.load(path)
    records = records_without_timings(run)
    assert logged_steps(records, "train/loss") == [5, 10, 15, 20, 25, 30]
    assert logged_steps(records, "eval/loss") == [0, 10, 20, 30]
