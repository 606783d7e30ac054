"""The tracker's sender in process, against a real MLflow SQLite store: batching and its limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from albert_scale.tracking import MAX_METRICS_PER_CALL, MlflowTracker, _next_call


def _metrics(step: int, n: int) -> tuple[str, tuple[dict[str, float], int, int]]:
    return ("metrics", ({f"m{i}": float(i) for i in range(n)}, step, 0))


def test_one_call_takes_the_leading_metrics_up_to_mlflows_limit():
    backlog = [_metrics(s, 400) for s in range(3)] + [("artifact", ("f", None)), _metrics(9, 1)]
    assert _next_call(backlog) == backlog[:2]  # a third would pass 1000 metrics
    assert _next_call(backlog[2:]) == backlog[2:3]
    assert _next_call(backlog[3:]) == backlog[3:4]  # anything else goes alone
    too_big = [_metrics(0, MAX_METRICS_PER_CALL + 1), _metrics(1, 1)]
    assert _next_call(too_big) == too_big[:1]  # never an empty call


@pytest.mark.parametrize("flush_seconds", [0.0, 600.0])
def test_every_record_arrives_and_the_end_does_not_wait_for_the_flush_interval(tmp_path: Path, flush_seconds):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    said: list[str] = []
    tracker = MlflowTracker(
        run_dir=tmp_path / "run",
        experiment="batching",
        run_name="run",
        params={"a": 1},
        tags={},
        uri=uri,
        say=said.append,
        system_metrics=False,
        system_metrics_interval=30.0,
        flush_seconds=flush_seconds,
    )
    for step in range(1, 401):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1, "perf/x": float(step)}, step)
    tracker.close()
    assert said == []  # nothing left behind (close waits 30 s at most, the interval here is 600 s)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 401))
    assert {m.step: m.value for m in history}[7] == 1.0 / 7
