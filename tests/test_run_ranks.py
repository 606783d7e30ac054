"""``helpers.run_ranks``: a launch aborted in native code is run once more on a new port, nothing else is."""

from __future__ import annotations

import sys

import pytest
from helpers import NATIVE_ABORT, run_ranks

# Aborts (exit 250, as the deepspeed launcher does) while the marker file does not exist, then succeeds.
ABORT_ONCE = f"""
import pathlib, sys
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text(sys.argv[3])
    print({NATIVE_ABORT!r}, file=sys.stderr)
    sys.exit(250)
print("port", sys.argv[3])
"""


def test_a_native_abort_is_launched_once_more_on_a_new_port(tmp_path):
    marker = tmp_path / "aborted"
    with pytest.warns(UserWarning, match="aborted in native code"):
        proc = run_ranks([sys.executable, "-c", ABORT_ONCE, str(marker), "--master_port", "1"])
    assert proc.returncode == 0
    assert marker.read_text() == "1"
    assert proc.stdout.split() == ["port", proc.stdout.split()[1]] and proc.stdout.split()[1] != "1"


def test_any_other_failure_is_returned_as_it_is(tmp_path, recwarn):
    proc = run_ranks([sys.executable, "-c", "import sys; sys.exit(3)", "--master_port", "1"])
    assert proc.returncode == 3
    assert not recwarn.list


def test_a_second_abort_is_returned(tmp_path):
    always = f"import sys; print({NATIVE_ABORT!r}, file=sys.stderr); sys.exit(250)"
    with pytest.warns(UserWarning):
        proc = run_ranks([sys.executable, "-c", always, "--master_port", "1"])
    assert proc.returncode == 250
