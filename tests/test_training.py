"""The runner and the command-line tools: learning, resume, determinism, files, errors."""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from msvag_mb.cli import plot_main, train_main, tune_main
from msvag_mb.plotting import RunGroup, best_step_sizes, collect_groups
from msvag_mb.problems import get_problem
from msvag_mb.problems.data import synthetic_text
from msvag_mb.runner import (
    RunFileError,
    TrainConfig,
    default_lr_max,
    load_run,
    step_size_grid,
    train,
)


def _vector(model) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


@pytest.mark.parametrize("variance", ["moving_average", "minibatch"])
def test_msvag_learns_digits(tmp_path, variance):
    """A few seconds of M-SVAG on the real digits: far above chance (10%)."""
    result = train(TrainConfig(problem="digits", optimizer="msvag", variance=variance,
                               steps=200, eval_every=100), tmp_path, progress=False)
    assert result.completed and not result.diverged
    assert result.final["test_accuracy"] > 0.8
    assert result.final["train_loss"] < 0.5 * result.records[0]["train_loss"]


def _digits_config(**overrides) -> TrainConfig:
    values = dict(problem="digits", optimizer="msvag", variance="minibatch", steps=30,
                  eval_every=10)
    values.update(overrides)
    return TrainConfig(**values)


def test_resume_equals_uninterrupted(tmp_path):
    config = _digits_config()
    full = train(config, tmp_path / "full", progress=False)
    part = train(config, tmp_path / "split", progress=False, stop_after=15)  # mid-interval
    assert not part.completed and part.records[-1]["step"] == 10
    resumed = train(config, tmp_path / "split", progress=False, resume=True)
    assert resumed.completed
    assert resumed.records == full.records
    assert torch.equal(_vector(resumed.model), _vector(full.model))
    _, on_disk = load_run(resumed.run_dir)
    assert on_disk == full.records


def test_resume_char_rnn_with_carried_state_and_dropout(tmp_path):
    """Stateful LSTM: the carried state, epoch resets (3 windows per epoch) and dropout
    masks must all continue exactly."""
    data = synthetic_text(83, 4 * 50 * 3 + 1, 4 * 50 + 1, seed=0)
    config = TrainConfig(problem="tolstoi_char_rnn", optimizer="msvag", batch_size=4,
                         steps=8, eval_every=4, data="synthetic")
    full = train(config, tmp_path / "full", progress=False, data=data)
    train(config, tmp_path / "split", progress=False, data=data, stop_after=5)
    resumed = train(config, tmp_path / "split", progress=False, data=data, resume=True)
    assert resumed.records == full.records
    assert torch.equal(_vector(resumed.model), _vector(full.model))
    assert [state[0].tolist() for state in resumed.model.get_state()] == \
        [state[0].tolist() for state in full.model.get_state()]
    # the schedule: x0.1 at round(0.625 * 8) = 5 steps
    assert [r["lr"] for r in full.records] == [10.0, 10.0, pytest.approx(1.0)]


def test_deterministic_for_a_seed(tmp_path):
    first = train(_digits_config(seed=3), tmp_path / "a", progress=False)
    second = train(_digits_config(seed=3), tmp_path / "b", progress=False)
    other = train(_digits_config(seed=4), tmp_path / "a", progress=False)
    assert first.records == second.records
    assert torch.equal(_vector(first.model), _vector(second.model))
    assert other.records != first.records


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    config = _digits_config(steps=2, eval_every=1)
    train(config, tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, tmp_path, progress=False)
    train(config, tmp_path, progress=False, overwrite=True)
    run_dir = tmp_path / "digits" / "msvag-mb__lr0.3__seed0"
    saved = json.loads((run_dir / "config.json").read_text())
    # a run saved before a field existed resumes with that field's default
    del saved["world_size"]
    (run_dir / "config.json").write_text(json.dumps(saved))
    assert train(config, tmp_path, progress=False, resume=True).completed
    for key, value in (("beta", 0.5), ("unknown_field", 1)):
        changed = dict(saved, **{key: value})
        (run_dir / "config.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match="cannot resume"):
            train(config, tmp_path, progress=False, resume=True)


def test_divergence_is_recorded(tmp_path):
    result = train(_digits_config(optimizer="msgd", variance=None, lr=1e12, steps=20),
                   tmp_path, progress=False)
    assert result.diverged and not result.completed
    assert result.final["diverged"] is True and result.final["test_accuracy"] is None


def test_config_resolution():
    config = TrainConfig(problem="fmnist_2c2d", optimizer="adam", variance="minibatch").resolved()
    assert (config.lr, config.batch_size, config.steps) == (1e-3, 64, 6000)
    assert config.variance is None and config.engine is None  # Adam has no estimator
    assert TrainConfig(problem="cifar10_3c3d", optimizer="svag").resolved().lr == 6e-2
    with pytest.raises(ValueError, match="Invalid optimizer"):
        TrainConfig(optimizer="sgd").resolved()
    with pytest.raises(ValueError, match="Invalid problem"):
        TrainConfig(problem="mnist").resolved()
    with pytest.raises(ValueError, match="Invalid variance"):
        TrainConfig(variance="ema").resolved()


# -- command line -----------------------------------------------------------------------------
def test_cli_train_writes_config_and_records(tmp_path, capsys):
    code = train_main(["--problem", "fmnist_2c2d", "--optimizer", "msvag", "--variance",
                       "minibatch", "--engine", "backpack", "--steps", "2", "--eval-every",
                       "1", "--data", "synthetic", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    run_dir = tmp_path / "fmnist_2c2d" / "msvag-mb__lr0.3__seed0"
    config, records = load_run(run_dir)
    assert config.engine == "backpack" and config.batch_size == 64
    assert [r["step"] for r in records] == [0, 1, 2]
    assert {r["engine"] for r in records} == {"backpack"}
    assert "M-SVAG (mini-batch)" in capsys.readouterr().out


def test_cli_missing_data_file_message(tmp_path, capsys):
    code = train_main(["--problem", "fmnist_2c2d", "--data-dir", str(tmp_path), "--out",
                       str(tmp_path / "runs"), "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in error and str(tmp_path) in error
    assert "dataset-fashion-mnist" in error


def test_step_size_grid():
    assert step_size_grid(0.6, 5) == [0.6, 0.3, 0.1, 0.06, 0.03]
    assert step_size_grid(1.0, 3) == [1.0, 0.6, 0.3]
    assert step_size_grid(3e-3, 2) == [3e-3, 1e-3]
    with pytest.raises(ValueError, match="not on the grid"):
        step_size_grid(0.5, 3)
    assert default_lr_max("fmnist_2c2d", "msvag") == 3.0
    assert default_lr_max("fmnist_2c2d", "adam") == 0.01
    assert default_lr_max("fmnist_2c2d", "mssd") == 3e-3
    assert default_lr_max("tolstoi_char_rnn", "msvag") == 100.0


def test_tune_then_plot(tmp_path, capsys):
    out = tmp_path / "tune"
    args = ["--problem", "digits", "--optimizer", "msgd", "--steps", "40", "--eval-every",
            "20", "--lr-max", "1", "--grid-points", "3", "--seeds", "2", "--out", str(out),
            "--no-progress"]
    assert tune_main(args) == 0
    summary = json.loads((out / "digits" / "tune_msgd.json").read_text())
    assert summary["grid"] == [1.0, 0.6, 0.3]
    scores = summary["grid_best_test_accuracy"]
    finite = {lr: s for lr, s in scores.items() if s is not None}
    assert summary["winner_lr"] == float(max(finite, key=finite.get))
    winner_runs = [g for g in collect_groups(out) if g.lr == summary["winner_lr"]]
    assert len(winner_runs) == 1 and len(winner_runs[0].runs) == 2  # two seeds
    figure = tmp_path / "figure.png"
    assert plot_main([str(out), "--output", str(figure)]) == 0
    assert figure.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "M-SGD" in printed and "± " in printed
    # a run in progress is left out unless asked for
    train(_digits_config(optimizer="msgd", variance=None, lr=0.1, steps=40, eval_every=20),
          out, progress=False, stop_after=20)
    assert 0.1 not in {g.lr for g in collect_groups(out, include_unfinished=False)}
    assert 0.1 in {g.lr for g in collect_groups(out, include_unfinished=True)}


def test_run_group_mean_and_std():
    runs = [[{"step": 0, "test_accuracy": 0.1}, {"step": 10, "test_accuracy": 0.5}],
            [{"step": 0, "test_accuracy": 0.3}, {"step": 10, "test_accuracy": 0.7},
             {"step": 20, "test_accuracy": 0.9}]]
    group = RunGroup("p", "msgd", "M-SGD", 0.1, runs)
    steps, mean, std = group.curve("test_accuracy")
    assert steps.tolist() == [0, 10]  # only steps every seed reached
    assert mean.tolist() == pytest.approx([0.2, 0.6])
    assert std.tolist() == pytest.approx([math.sqrt(0.02)] * 2)
    assert group.score() == pytest.approx((0.5 + 0.9) / 2)
    worse = RunGroup("p", "msgd", "M-SGD", 1.0, [[{"step": 0, "test_accuracy": 0.2}]])
    diverged = RunGroup("p", "msgd", "M-SGD", 9.0, [[{"step": 0, "test_accuracy": 0.99},
                                                      {"step": 5, "diverged": True}]])
    assert best_step_sizes([worse, diverged, group]) == [group]


def test_ctrl_c_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from msvag_mb.runner import loop as training  # where the loop looks step_seed up

    config = _digits_config(steps=12, eval_every=5)
    full = train(config, tmp_path / "full", progress=False)
    real_step_seed = training.step_seed

    def interrupt_at_step_8(seed: int, step: int) -> int:
        if step == 8:
            raise KeyboardInterrupt
        return real_step_seed(seed, step)

    monkeypatch.setattr(training, "step_seed", interrupt_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "split", progress=False)
    monkeypatch.setattr(training, "step_seed", real_step_seed)
    resumed = train(config, tmp_path / "split", progress=False, resume=True)
    assert resumed.records == full.records
    assert torch.equal(_vector(resumed.model), _vector(full.model))


# -- monitoring from the command line ----------------------------------------------------------
def test_cli_monitor_records_then_plot_draws_it(tmp_path, capsys):
    args = ["--problem", "digits", "--variance", "minibatch", "--steps", "12", "--eval-every",
            "6", "--monitor", "4", "--out", str(tmp_path), "--no-progress"]
    assert train_main(args) == 0
    run_dir = tmp_path / "digits" / "msvag-mb__lr0.3__seed0"
    records = [json.loads(line) for line in (run_dir / "monitor.jsonl").read_text().splitlines()]
    layers = {name for name, _ in get_problem("digits").build_model().named_parameters()}
    assert {r["layer"] for r in records} == layers
    assert sorted({r["step"] for r in records}) == [0, 4, 8]  # steps 0, N, 2N of 12
    assert all(0.0 <= r["gamma_q05"] <= r["gamma_q50"] <= r["gamma_q95"] <= 1.0 for r in records)
    assert "monitor.jsonl" in capsys.readouterr().out
    # msvag-plot on the root: the runs' figure and each run's monitoring figure
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "figure.png").is_file()
    assert (run_dir / "monitor.png").stat().st_size > 10_000
    # on one run's folder or its log: only the monitoring figure
    (run_dir / "monitor.png").unlink()
    assert plot_main([str(run_dir)]) == 0 and (run_dir / "monitor.png").is_file()
    assert plot_main([str(run_dir / "monitor.jsonl"), "--output",
                      str(tmp_path / "m.png")]) == 0 and (tmp_path / "m.png").is_file()


def test_monitor_log_survives_resume(tmp_path):
    config = _digits_config(steps=12, eval_every=4)
    full = train(config, tmp_path / "full", progress=False, monitor=3)
    train(config, tmp_path / "resumed", progress=False, monitor=3, stop_after=4)
    resumed = train(config, tmp_path / "resumed", progress=False, monitor=3, resume=True)

    def log(result):
        return [json.loads(line)
                for line in (result.run_dir / "monitor.jsonl").read_text().splitlines()]
    assert log(resumed) == log(full)  # same steps, same values, no duplicates
    assert sorted({r["step"] for r in log(full)}) == [0, 3, 6, 9]


# "--monitor-every N": the spelling torchrun's own parser leaves alone
@pytest.mark.parametrize("flag", [["--monitor"], ["--monitor-every", "3"]])
def test_monitor_refuses_optimizer_without_adaptation(tmp_path, capsys, flag):
    code = train_main(["--problem", "digits", "--optimizer", "msgd", "--steps", "2",
                       *flag, "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "msgd has none" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["ghost_batch", "auto"])
def test_ghost_batches_are_refused_on_several_processes(engine):
    from msvag_mb.runner import make_gradient_variance

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 2))  # train-mode BatchNorm: ghost batches
    config = TrainConfig(problem="digits", variance="minibatch", engine=engine,
                         world_size=2).resolved()
    with pytest.raises(ValueError, match="one process only"):
        make_gradient_variance(config, model, torch.nn.CrossEntropyLoss())


# -- the option lists come from the registries ------------------------------------------------
def test_engine_choices_are_auto_and_the_registered_engines_for_one_process(capsys):
    import re

    from msvag_mb.engines import ENGINES

    with pytest.raises(SystemExit):
        train_main(["--help"])
    listed = re.search(r"--engine \{([^}]*)\}", capsys.readouterr().out).group(1).split(",")
    offered = {name for name, cls in ENGINES.items() if not cls.needs_distributed}
    assert sorted(listed) == sorted({"auto"} | offered)
    assert "rank_spread" not in listed and "ghost_batch" in listed


def test_which_optimizers_adapt_is_what_their_classes_declare():
    from msvag_mb.runner import OPTIMIZERS, adapts_to_variance

    adapting = {name for name in OPTIMIZERS if adapts_to_variance(name)}
    assert adapting == {"msvag", "svag", "adamstar"}


# -- issue 12: nothing lost, nothing half-done -------------------------------------------------
def _cli(*args: str, **popen) -> subprocess.Popen:
    """``python -m msvag_mb.cli ARGS`` (msvag-train) in a subprocess, one thread."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="0")
    return subprocess.Popen([sys.executable, "-m", "msvag_mb.cli", *args, "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **popen)


def _checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


def test_sigint_at_a_random_moment_saves_that_step_and_resume_equals_uninterrupted(tmp_path):
    """A real SIGINT to msvag-train at a random moment of training: the step under way is
    finished and checkpointed, the command to continue is printed, and continuing with it
    gives the records and parameters of an uninterrupted run, bitwise."""
    args = ["--problem", "digits", "--steps", "600", "--eval-every", "250", "--no-progress"]
    full = _cli(*args, "--out", str(tmp_path / "full"))
    cut = _cli(*args, "--out", str(tmp_path / "cut"))
    run_dir = tmp_path / "cut" / "digits" / "msvag-ma__lr0.3__seed0"
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():  # the step-0 checkpoint: training began
        assert cut.poll() is None and time.monotonic() < deadline, cut.communicate()
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 1.5))
    cut.send_signal(signal.SIGINT)
    out, err = cut.communicate(timeout=120)
    assert cut.returncode == 130, out + err
    assert "Traceback" not in err
    stopped = int(re.search(r"stopped at step (\d+) of 600", err).group(1))
    assert 0 <= stopped < 600 and _checkpoint(run_dir)["step"] == stopped
    again = re.search(r"to continue: (.*)", err).group(1).split()
    assert again[:3] == ["python", "-m", "msvag_mb.cli"] and again[-1] == "--resume"
    resumed = subprocess.run([sys.executable, *again[1:]],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped} of 600" in resumed.stdout
    full.communicate(timeout=300)
    assert full.returncode == 0
    full_dir = tmp_path / "full" / "digits" / "msvag-ma__lr0.3__seed0"
    assert load_run(run_dir)[1] == load_run(full_dir)[1]
    expected = _checkpoint(full_dir)["model"]
    assert all(torch.equal(t, expected[k]) for k, t in _checkpoint(run_dir)["model"].items())


def test_compare_honours_its_options_and_never_overwrites_a_run(tmp_path, capsys):
    out = str(tmp_path)
    quick = ["--steps", "4", "--eval-every", "2", "--out", out, "--no-progress"]
    assert train_main(["--beta", "0.5", *quick]) == 0  # M-SVAG (moving avg.), beta 0.5
    other = tmp_path / "digits" / "msvag-ma__lr0.3__seed0"
    kept = (other / "metrics.jsonl").read_bytes()
    assert train_main(["--compare", *quick]) == 0
    assert (other / "metrics.jsonl").read_bytes() == kept  # the beta-0.5 run is untouched
    assert load_run(other)[0].beta == 0.5
    beside = tmp_path / "digits" / "msvag-ma__lr0.3__seed0__steps4__eval2"
    assert load_run(beside)[0].beta == 0.9
    printed = capsys.readouterr().out
    assert "msvag-train: the comparison of M-SGD" in printed
    for number, method in enumerate(["M-SGD", "M-SVAG (moving avg.)", "M-SVAG (mini-batch)",
                                     "ADAM"], 1):
        assert f"== {number}/4: {method}, lr" in printed  # each method's block is labelled
    # every option reaches every method: --lr and --beta too
    assert train_main(["--compare", "--lr", "0.05", "--beta", "0.8", *quick]) == 0
    configs = [load_run(path.parent)[0] for path in (tmp_path / "digits").rglob("config.json")]
    chosen = [c for c in configs if c.lr == 0.05]
    assert sorted(c.label for c in chosen) == ["adam", "msgd", "msvag-ma", "msvag-mb"]
    assert {c.beta for c in chosen} == {0.8}
    # run again: the finished runs are reused, not trained again
    capsys.readouterr()
    assert train_main(["--compare", *quick]) == 0
    assert capsys.readouterr().out.count("finished already") == 4
    with pytest.raises(SystemExit):
        train_main(["--compare", "--optimizer", "msgd", *quick])
    assert "drop --optimizer" in capsys.readouterr().err


def test_runs_that_differ_in_any_setting_get_their_own_folders(tmp_path):
    first = train(_digits_config(steps=4, eval_every=2), tmp_path, progress=False)
    others = [train(_digits_config(**dict(dict(steps=4, eval_every=2), **change)), tmp_path,
                    progress=False, overwrite=True)  # overwrite: of the same config only
              for change in ({"batch_size": 16}, {"beta": 0.5}, {"steps": 6})]
    assert first.run_dir.name == "msvag-mb__lr0.3__seed0"  # the plain name stays loadable
    folders = {first.run_dir, *(result.run_dir for result in others)}
    assert len(folders) == 4
    assert load_run(first.run_dir)[1] == first.records  # not overwritten
    assert others[0].run_dir.name == "msvag-mb__lr0.3__seed0__bs16__steps4__eval2"
    # each resumes under its own arguments
    assert train(_digits_config(steps=4, eval_every=2, beta=0.5), tmp_path, progress=False,
                 resume=True).run_dir == others[1].run_dir


def test_a_record_line_cut_short_is_dropped_on_resume(tmp_path):
    config = _digits_config()
    full = train(config, tmp_path / "full", progress=False, monitor=3)
    part = train(config, tmp_path / "cut", progress=False, monitor=3, stop_after=15)
    for name in ("metrics.jsonl", "monitor.jsonl"):  # a kill (or a full disk) mid-line
        with open(part.run_dir / name, "a") as handle:
            handle.write('{"step": 20, "epoch": 0.5, "lr": 0.3, "train_lo')
    with pytest.warns(UserWarning, match="metrics.jsonl: dropped line"):
        assert load_run(part.run_dir)[1] == part.records  # msvag-plot reads it too
    with pytest.warns(UserWarning, match="dropped line"):
        resumed = train(config, tmp_path / "cut", progress=False, monitor=3, resume=True)
    assert resumed.records == full.records
    assert load_run(resumed.run_dir)[1] == full.records
    assert (resumed.run_dir / "monitor.jsonl").read_text() == \
        (full.run_dir / "monitor.jsonl").read_text()
    # a damaged line that is not the last: an error naming the file and the line
    lines = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (resumed.run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunFileError, match=r"metrics.jsonl, line 2, is not a JSON record"):
        load_run(resumed.run_dir)


def test_records_are_standard_json(tmp_path):
    from msvag_mb.runner.files import append_record, read_records

    path = tmp_path / "metrics.jsonl"
    append_record(path, {"step": 0, "test_loss": math.inf, "train_loss": -math.inf,
                         "l2_penalty": math.nan, "engine": "vmap"})

    def refuse(token):
        raise ValueError(f"non-standard JSON: {token}")
    line = path.read_text()
    json.loads(line, parse_constant=refuse)  # no Infinity, no NaN
    (record,) = read_records(path)
    assert record["test_loss"] == math.inf and record["train_loss"] == -math.inf
    assert math.isnan(record["l2_penalty"]) and record["engine"] == "vmap"


def test_resume_from_a_step_0_checkpoint_records_step_0_once(tmp_path):
    config = _digits_config()
    full = train(config, tmp_path / "full", progress=False)
    assert not train(config, tmp_path / "cut", progress=False, stop_after=0).completed
    resumed = train(config, tmp_path / "cut", progress=False, resume=True)
    assert [r["step"] for r in resumed.records] == [0, 10, 20, 30]
    assert resumed.records == full.records


def test_damaged_checkpoint_full_disk_and_unwritable_out_say_one_line(tmp_path, capsys):
    args = ["--problem", "digits", "--steps", "20", "--eval-every", "10", "--no-progress"]
    run_dir = tmp_path / "runs" / "digits" / "msvag-ma__lr0.3__seed0"
    assert train_main([*args, "--out", str(tmp_path / "runs")]) == 0
    data = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[:len(data) // 2])  # truncated
    assert train_main([*args, "--out", str(tmp_path / "runs"), "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(run_dir / "checkpoint.pt") in error and "--overwrite" in error
    # a full disk (here: a file size limit) while the checkpoint is written
    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    full = _cli(*args, "--out", str(tmp_path / "full"), preexec_fn=full_disk)
    _, err = full.communicate(timeout=300)
    assert full.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "could not write" in err and "checkpoint.pt" in err and "--resume" in err
    assert not list((tmp_path / "full").rglob("*.tmp"))
    # an --out that cannot be written (here: below a file): before training
    (tmp_path / "file").write_text("")
    assert train_main([*args, "--out", str(tmp_path / "file" / "runs")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--out" in error and "config.json" in error


def test_sizes_are_checked_by_name_and_a_refused_run_leaves_no_folder(tmp_path, capsys):
    out = ["--out", str(tmp_path), "--no-progress"]
    for option, value in (("--batch-size", "0"), ("--eval-every", "0"), ("--steps", "0")):
        assert train_main(["--problem", "digits", option, value, *out]) == 2
        assert f"Invalid {option} {value}" in capsys.readouterr().err
    assert train_main(["--problem", "digits", "--batch-size", "5000", *out]) == 2
    assert "batch size 5000" in capsys.readouterr().err
    assert not (tmp_path / "digits").exists()


def test_a_config_mismatch_names_the_field_that_differs(tmp_path):
    config = _digits_config(steps=2, eval_every=1)
    run = train(config, tmp_path, progress=False)
    saved = json.loads((run.run_dir / "config.json").read_text())
    (run.run_dir / "config.json").write_text(json.dumps(dict(saved, beta=0.5)))
    with pytest.raises(ValueError, match="cannot resume") as info:
        train(config, tmp_path, progress=False, resume=True)
    assert "beta: 0.5 there, 0.9 here" in str(info.value)
    assert "'problem'" not in str(info.value)  # not two whole dicts


def test_plot_of_unfinished_runs_only_says_so(tmp_path, capsys):
    train(_digits_config(steps=20), tmp_path, progress=False, stop_after=10)
    assert plot_main([str(tmp_path)]) == 2
    assert "--include-unfinished" in capsys.readouterr().err
    assert plot_main([str(tmp_path), "--include-unfinished"]) == 0


def test_tune_accepts_overwrite_and_warns_of_a_winner_at_the_grid_edge(tmp_path, capsys):
    args = ["--problem", "digits", "--optimizer", "msgd", "--steps", "4", "--eval-every", "2",
            "--lr-max", "1", "--grid-points", "2", "--seeds", "1", "--out", str(tmp_path),
            "--no-progress"]
    assert tune_main(args) == 0
    assert "warning: the winner" in capsys.readouterr().out  # two points: always an edge
    summary = json.loads((tmp_path / "digits" / "tune_msgd.json").read_text())
    assert summary["warning"].startswith("the winner")
    assert tune_main(args) == 0
    assert "finished already (step 4); --overwrite trains it again" in capsys.readouterr().out
    assert tune_main([*args, "--overwrite"]) == 0
    assert "finished already" not in capsys.readouterr().out  # trained again
    from msvag_mb.runner.tuning import edge_warning

    assert "raise --lr-max" in edge_warning([1.0, 0.6, 0.3], 1.0)
    assert "--grid-points" in edge_warning([1.0, 0.6, 0.3], 0.3)
    assert edge_warning([1.0, 0.6, 0.3], 0.6) is None


# -- friction a newcomer hit --------------------------------------------------------------------
def test_lines_per_evaluation_without_a_bar_and_the_mode_is_said(tmp_path, capsys):
    assert train_main(["--problem", "digits", "--steps", "20", "--eval-every", "10",
                       "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("msvag-train: one run, M-SVAG (moving avg.) on digits")
    assert "--compare" in printed.splitlines()[0]
    assert re.search(r"step +10 +train loss", printed) and re.search(r"step +20 ", printed)


def test_plot_legend_covers_no_curve_and_a_cut_axis_is_marked(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from msvag_mb.plotting import _ORDER, plot_groups

    groups = [RunGroup("digits", label, label, 0.1,
                       [[{"step": 10 * k, "train_loss": 2.0 / (k + 1) + i / 100,
                          "test_accuracy": 0.1 + 0.8 * k / (k + 2) + i / 100}
                         for k in range(21)]])
              for i, label in enumerate(_ORDER)]  # the 9-method plot
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_groups(groups, tmp_path / "figure.png")
    (figure,) = figures
    renderer = figure.canvas.get_renderer()
    legends = [ax.get_legend() for ax in figure.axes if ax.get_legend() is not None]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in figure.axes)
    accuracy_panel = figure.axes[1]
    assert accuracy_panel.get_ylim()[0] > 0.1  # zoomed as Fig. 5, cutting the early values
    assert any("early values below" in text.get_text() for text in accuracy_panel.texts)
