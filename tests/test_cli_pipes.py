"""The command-line tools end quietly when the reader of their output goes away, as Unix
tools do (``msvag-train ... | head -3``): exit status 141 (128 + SIGPIPE), no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from msvag_mb import cli
from msvag_mb.cli import CLOSED_PIPE_STATUS

#: the functions of the console scripts (pyproject.toml's [project.scripts], as installed)
ENTRY_POINTS = tuple(sorted(
    script.value.split(":")[1] for script in entry_points(group="console_scripts")
    if script.value.startswith("msvag_mb.cli:")))


def _command(entry_point: str, *args: str) -> list[str]:
    """``python -c`` running one entry point of ``msvag_mb.cli`` as its console script does."""
    code = f"import sys; from msvag_mb.cli import {entry_point}; sys.exit({entry_point}())"
    return [sys.executable, "-c", code, *args]


def _environment() -> dict[str, str]:
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="0")


def _assert_quiet(returncode: int, stderr: str) -> None:
    assert returncode == CLOSED_PIPE_STATUS, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_the_console_scripts_are_found():
    assert len(ENTRY_POINTS) >= 4, "msvag_mb is not installed (pip install -e .)"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_entry_point_ends_quietly_on_a_closed_pipe(entry_point):
    """One wrapper serves them all (a subprocess each would only repeat the tests below)."""
    assert getattr(cli, entry_point).__wrapped__.__name__ == entry_point


def test_help_into_a_closed_pipe_exits_quietly():
    """The reading end closed before the first write; argparse's help ends by SystemExit,
    and the help is still in stdout's buffer then."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        completed = subprocess.run(_command("tune_main", "--help"), stdout=write_end,
                                   stderr=subprocess.PIPE, text=True, env=_environment(),
                                   timeout=300)
    finally:
        os.close(write_end)
    _assert_quiet(completed.returncode, completed.stderr)


def test_training_piped_into_a_reader_that_stops_after_one_line(tmp_path):
    """``msvag-train ... | head -1``: the reader closes after the first line, the run's
    later lines (its evaluations, the table) go nowhere and the command ends quietly."""
    args = ["--problem", "digits", "--data", "synthetic", "--steps", "20", "--eval-every",
            "10", "--no-progress", "--threads", "1", "--out", str(tmp_path)]
    process = subprocess.Popen(_command("train_main", *args), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_environment())
    first = process.stdout.readline()
    process.stdout.close()  # as head -1 does once it has its line
    try:
        stderr = process.communicate(timeout=300)[1]
    finally:
        process.kill()
    assert first.startswith("msvag-train: one run"), (first, stderr)
    _assert_quiet(process.returncode, stderr)
