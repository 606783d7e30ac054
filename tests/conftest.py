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
