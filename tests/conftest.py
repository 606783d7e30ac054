"""Shared test set-up. Tests never reach a model or dataset hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
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
        code = preprocess.main(
            [
                "--config",
                "tiny",
                "--quiet",
                "--input",
                str(corpus),
                "--output",
                str(root / "shards"),
                "preprocess.shard_rows=300",
                "preprocess.validation_fraction=0.05",
            ]
        )
    finally:
        ray.shutdown()
    assert code == 0
    return root / "shards"
