"""Preprocessing end to end through a local Ray, on a real corpus (gensim's Lee background corpus)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from albert_scale.fileio import sha256_file
from data_pipeline import preprocess, shards
from data_pipeline.corpora import fetch_corpus
from data_pipeline.instances import SHARD_SCHEMA

pytestmark = pytest.mark.multiprocess

ARGS = ["--config", "tiny", "--quiet", "preprocess.shard_rows=400", "preprocess.validation_fraction=0.05"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    result = fetch_corpus("lee", output_dir=directory, progress=False, log=lambda message: None)
    return Path(result.jsonl)


@pytest.fixture(scope="module")
def dataset(ray_local, corpus, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "two-workers"
    assert (
        preprocess.main(["--input", str(corpus), "--output", str(output), "--num-workers", "2", *ARGS]) == 0
    )
    return output


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_manifest_describes_the_shards(dataset):
    manifest = shards.read_manifest(dataset)
    assert manifest["counts"]["documents_read"] == 300
    assert manifest["counts"]["documents_skipped"] == 0
    assert manifest["tokenizer"]["sha256"] == sha256_file(dataset / "spiece.model")
    assert manifest["tokenizer"]["source"] == "trained"
    total = 0
    for split in ("train", "validation"):
        listed = manifest["splits"][split]
        assert listed["rows"] > 0
        for shard in listed["shards"]:
            table = pa.ipc.open_file(pa.memory_map(str(dataset / shard["file"]))).read_all()
            assert table.schema == SHARD_SCHEMA
            assert table.num_rows == shard["rows"]
            assert sha256_file(dataset / shard["file"]) == shard["sha256"]
            assert sum(len(x) for x in table["input_ids"].to_pylist()) == shard["tokens"]
            assert max(len(x) for x in table["input_ids"].to_pylist()) <= 64
            total += table.num_rows
    assert total == manifest["counts"]["instances_written"]
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"][:-1]] == [400] * (
        len(manifest["splits"]["train"]["shards"]) - 1
    )
    assert not list(dataset.glob("*.tmp")) and not (dataset / shards.PROGRESS).exists()


def test_one_worker_gives_the_same_bytes_as_two(ray_local, corpus, dataset, tmp_path):
    output = tmp_path / "one-worker"
    assert (
        preprocess.main(["--input", str(corpus), "--output", str(output), "--num-workers", "1", *ARGS]) == 0
    )
    assert files_of(output) == files_of(dataset)


def test_shards_load_with_datasets_and_pyarrow(dataset):
    import datasets

    files = sorted(str(p) for p in dataset.glob("train-*.arrow"))
    loaded = datasets.load_dataset("arrow", data_files=files, split="train")
    manifest = shards.read_manifest(dataset)
    assert loaded.num_rows == manifest["splits"]["train"]["rows"]
    assert set(loaded.column_names) == set(SHARD_SCHEMA.names)
    first = pa.ipc.open_file(files[0]).read_all().slice(0, 1).to_pylist()[0]
    assert loaded[0]["input_ids"] == first["input_ids"]


def test_rerun_is_a_no_op_and_a_different_dataset_is_refused(corpus, dataset, capsys):
    before = files_of(dataset)
    assert preprocess.main(["--input", str(corpus), "--output", str(dataset), *ARGS]) == 0
    assert "already complete" in capsys.readouterr().err
    assert files_of(dataset) == before
    assert (
        preprocess.main(["--input", str(corpus), "--output", str(dataset), *ARGS, "data.short_seq_prob=0.5"])
        == 2
    )
    assert "already holds a different dataset" in capsys.readouterr().err


def test_interrupted_run_leaves_no_manifest_and_a_rerun_finishes_it(
    ray_local, corpus, dataset, tmp_path, monkeypatch
):
    output = tmp_path / "interrupted"
    real_finish = shards.ShardWriter._finish_shard
    calls = {"n": 0}

    def finish_then_die(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard is written in full, but not yet renamed
            raise KeyboardInterrupt
        real_finish(self)

    monkeypatch.setattr(shards.ShardWriter, "_finish_shard", finish_then_die)
    assert preprocess.main(["--input", str(corpus), "--output", str(output), *ARGS]) == 130
    assert not (output / shards.MANIFEST).exists()
    assert (output / "train-00000.arrow").exists() and not (output / "train-00001.arrow").exists()
    assert (output / ("train-00001.arrow" + shards.TMP_SUFFIX)).exists()
    monkeypatch.setattr(shards.ShardWriter, "_finish_shard", real_finish)
    assert preprocess.main(["--input", str(corpus), "--output", str(output), *ARGS]) == 0
    assert files_of(output) == files_of(dataset)


def test_given_tokenizer_is_reused_with_identical_shards(ray_local, corpus, dataset, tmp_path):
    output = tmp_path / "given"
    given = tmp_path / "spiece.model"
    shutil.copyfile(dataset / "spiece.model", given)
    command = ["--input", str(corpus), "--output", str(output), "--tokenizer", str(given), *ARGS]
    assert preprocess.main(command) == 0
    assert shards.read_manifest(output)["tokenizer"]["source"] == "given"
    produced, expected = files_of(output), files_of(dataset)
    for name in expected:
        if name != shards.MANIFEST:
            assert produced[name] == expected[name], name


def test_bad_records_are_counted_in_the_manifest(ray_local, tmp_path):
    inputs = tmp_path / "mixed"
    inputs.mkdir()
    sentences = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(40))
    (inputs / "good.txt").write_text(f"{sentences}\n\n{sentences}\n")
    (inputs / "broken.jsonl").write_text(
        '{"text": "fine text here. and more text."}\n{oops\n\n{"title": "x"}\n'
    )
    (inputs / "empty.txt").write_text("")
    (inputs / "bad-utf8.txt").write_bytes(b"caf\xe9 au lait\n")
    (inputs / "image.png").write_bytes(b"\x89PNG")
    with (inputs / "one-line.txt").open("wb") as f:  # a single 50 MB line, read in bounded pieces
        f.write(b"word " * 10_000_000 + b"\n")
    output = tmp_path / "out"
    command = [
        "--input",
        str(inputs),
        "--output",
        str(output),
        "--config",
        "tiny",
        "--quiet",
        "model.vocab_size=40",
        "preprocess.validation_fraction=0",
    ]
    assert preprocess.main(command) == 0
    counts = shards.read_manifest(output)["counts"]
    assert counts["skipped_reasons"] == {
        "empty file": 1,
        "invalid JSON (line 2)": 1,
        "invalid UTF-8": 1,
        "line longer than max_line_bytes=1048576": 1,
        "no string field 'text'": 1,
    }
    assert counts["inputs_skipped"] == [{"uri": str(inputs / "image.png"), "reason": "unsupported file type"}]
    assert counts["documents_read"] == 8 and counts["documents_skipped"] == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input", "/no/such/corpus.txt"], "input '/no/such/corpus.txt': no such file or directory"),
        (["--input", "{corpus_dir}/x.docx"], "x.docx': unsupported file type"),
        (
            ["--input", "{corpus}", "--tokenizer", "/no/spiece.model"],
            "tokenizer '/no/spiece.model': no such file",
        ),
        (
            ["--input", "{corpus}", "--tokenizer", "{dataset}/spiece.model", "model.vocab_size=30000"],
            "pieces but model.vocab_size=30000",
        ),
        (
            ["--input", "{corpus}", "--output", "{corpus_dir}"],
            "is not empty and holds no run of this dataset",
        ),
        (["--input", "{corpus}", "preprocess.shard_rows=0"], "preprocess.shard_rows=0: must be >= 1"),
    ],
)
def test_user_errors_are_one_line(cli_path, corpus, dataset, tmp_path, extra, message):
    (corpus.parent / "x.docx").write_bytes(b"PK")
    values = {"corpus": corpus, "corpus_dir": corpus.parent, "dataset": dataset}
    words = [w.format(**values) for w in extra]
    if "--output" not in words:
        words += ["--output", str(tmp_path / "out")]
    result = subprocess.run(
        [str(cli_path), "preprocess", "--config", "tiny", *words], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out" / shards.MANIFEST).exists()


def test_manifest_is_plain_json(dataset):
    manifest = json.loads((dataset / shards.MANIFEST).read_text())
    assert manifest["schema_version"] == 1 and manifest["seed"] == 12345
