"""Smoke tests: each example of examples/ runs with --quick and writes what it promises
(docs/index.md says every example takes --quick).

(The maths behind examples/paper_theory.py is tested by tests/test_paper_theory.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, MPLBACKEND="Agg", OMP_WAIT_POLICY="PASSIVE")
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", cwd=tmp_path)
    losses = {line.split(":")[0].strip(): float(line.split("steps")[1].split(",")[0])
              for line in out.splitlines() if "loss after" in line}
    assert set(losses) == {"moving_average", "minibatch"}
    assert all(0.0 < loss < 2.3 for loss in losses.values())  # below log(10) at the start


def test_compare_estimators(tmp_path):
    out = run_example("compare_estimators.py", "--out", str(tmp_path / "out"), cwd=tmp_path)
    for method in ("M-SGD", "M-SSD", "Adam", "M-SVAG (moving average)", "M-SVAG (mini-batch)"):
        assert method in out
    assert_png(tmp_path / "out" / "compare_estimators.png")
    problems = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(problems) == {"digits", "pydoc_char_rnn"}
    for problem, quick_steps in (("digits", 30), ("pydoc_char_rnn", 20)):
        assert problem in out
        results = problems[problem]["results"]
        assert len(results) == 5
        for runs in results.values():
            (run,) = runs  # --quick: one seed
            assert run["step"][-1] == quick_steps
            assert run["train_loss"][-1] < run["train_loss"][0]  # it learned something


def test_monitoring(tmp_path):
    from msvag_mb.monitoring import tensorboard_available

    tensorboard = tensorboard_available()  # the TensorBoard output is tested where it imports
    args = ["--out", str(tmp_path / "out")]
    out = run_example("monitoring.py", *args, cwd=tmp_path)
    assert "gamma q25" in out
    for variance in ("moving_average", "minibatch"):
        log = tmp_path / "out" / f"monitor_{variance}.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert sorted({r["step"] for r in records}) == [0, 5, 10, 15, 20, 25]
        assert all(0.0 <= r["gamma_q05"] <= r["gamma_q95"] <= 1.0 for r in records)
        assert_png(tmp_path / "out" / f"monitor_{variance}.png")
    assert (tmp_path / "out" / "tensorboard").exists() == tensorboard


def test_paper_theory(tmp_path):
    out = run_example("paper_theory.py", "--out", str(tmp_path / "out"), cwd=tmp_path)
    for part in ("Fig. 3:", "p_diag, d=100", "sQP", "Lemma 2"):
        assert part in out
    for name in ("fig3_sign_vs_variance_factor", "pdiag_random_rotations", "sqp_ssd_vs_sgd",
                 "lemma2_wilson"):
        assert_png(tmp_path / "out" / f"{name}.png")
