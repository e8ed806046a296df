"""A run can pin the optimizer's step implementation (``--step-path``), and records it.

The step paths agree to rounding, not bitwise, so a recorded run reproduces exactly only
under the path it was made with; the records under ``docs/results/`` name theirs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from msvag_mb.cli import reproduce_main, train_main
from msvag_mb.runner import OPTIMIZERS, STEP_PATHS, TrainConfig
from msvag_mb.runner.components import make_optimizer

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("step_path", sorted(STEP_PATHS))
def test_the_pinned_path_reaches_the_optimizer(optimizer, step_path):
    config = TrainConfig(problem="digits", optimizer=optimizer, lr=0.1,
                         step_path=step_path).resolved()
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(config, model)
    for key, value in STEP_PATHS[step_path].items():
        assert all(group[key] is value for group in opt.param_groups), (key, value)


def test_an_unknown_path_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="for-loop"):
        TrainConfig(problem="digits", step_path="compiled").resolved()


def test_every_recorded_run_names_its_step_path():
    configs = sorted(RESULTS.glob("*/*/config.json"))
    assert configs, "no records found under docs/results"
    for path in configs:
        saved = json.loads(path.read_text())
        assert saved.get("step_path") in STEP_PATHS, path


def _digits_run(out: Path) -> Path:
    assert train_main(["--problem", "digits", "--optimizer", "msvag", "--variance",
                       "minibatch", "--steps", "12", "--eval-every", "6", "--out", str(out),
                       "--no-progress", "--step-path", "for-loop"]) == 0
    (run_dir,) = (out / "digits").iterdir()
    return run_dir


def test_reproduce_confirms_a_fresh_run_and_catches_a_changed_record(tmp_path, capsys):
    run_dir = _digits_run(tmp_path / "runs")
    assert reproduce_main([str(run_dir), "--until", "12"]) == 0
    assert "identical: the records of steps 0, 6, 12" in capsys.readouterr().out
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    changed = json.loads(lines[1])
    changed["train_loss"] = math.nextafter(changed["train_loss"], 0.0)  # one ulp
    metrics.write_text("\n".join([lines[0], json.dumps(changed), *lines[2:]]) + "\n")
    assert reproduce_main([str(run_dir)]) == 1  # the first interval: steps 0 and 6
    out = capsys.readouterr().out
    assert "step 6: train_loss recorded" in out and "step 0" not in out


@pytest.mark.slow
@pytest.mark.parametrize("run", ["msgd__lr3__seed0", "msvag-mb__lr10__seed0"])
def test_the_recorded_p4_runs_reproduce_their_first_interval(run):
    """The issue's promise for docs/results: rerunning the first evaluation interval
    (2,000 steps of P4) gives the recorded numbers exactly (minutes per run)."""
    run_dir = RESULTS / "tolstoi_char_rnn" / run
    assert reproduce_main([str(run_dir), "--threads", "1"]) == 0
