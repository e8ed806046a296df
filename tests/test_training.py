"""The runner and the command-line tools: learning, resume, determinism, files, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from msvag_mb.cli import default_lr_max, plot_main, step_size_grid, train_main, tune_main
from msvag_mb.plotting import RunGroup, best_step_sizes, collect_groups
from msvag_mb.problems import get_problem
from msvag_mb.problems.data import synthetic_text
from msvag_mb.training import TrainConfig, load_run, train


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
    from msvag_mb import training

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
    from msvag_mb.training import make_gradient_variance

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 2))  # train-mode BatchNorm: ghost batches
    config = TrainConfig(problem="digits", variance="minibatch", engine=engine,
                         world_size=2).resolved()
    with pytest.raises(ValueError, match="one process only"):
        make_gradient_variance(config, get_problem("digits"), model, torch.nn.CrossEntropyLoss())
