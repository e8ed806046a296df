"""The variance monitor: its gamma is the factor the optimizer really applied, its records
summarise that gamma correctly, its files are written and read back, and it costs nothing on
steps that are not due."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb import monitoring
from msvag_mb.monitoring import (
    VarianceMonitor,
    direction_statistics,
    is_supported,
    load_monitoring,
    plot_monitoring,
)

from conftest import mlp_problem

OPTIMIZERS = {"msvag": msvag_mb.MSVAG, "svag": msvag_mb.SVAG, "adamstar": msvag_mb.AdamStar}
LR, BETA = 0.05, 0.9


def train(name, variance, steps=6, foreach=False, weight_decay=0.0, monitor_kwargs=None,
          on_step=None):
    """A tiny MLP trained on batches drawn with replacement; ``on_step(opt, before)`` runs
    after every step with the parameters as they were before it."""
    model, inputs, targets = mlp_problem(batch=24)
    opt = OPTIMIZERS[name](model.parameters(), lr=LR, beta=BETA, variance=variance,
                           weight_decay=weight_decay, foreach=foreach)
    gv = msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="vmap")
    monitor = None
    if monitor_kwargs is not None:
        monitor = VarianceMonitor(opt, model, **monitor_kwargs)
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        index = torch.randint(0, len(inputs), (8,), generator=generator)
        opt.zero_grad()
        if variance == "minibatch":
            gv.backward(inputs[index], targets[index])
        else:
            nn.functional.cross_entropy(model(inputs[index]), targets[index]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if on_step is not None:
            on_step(opt, model, before)
    return model, opt, monitor


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("variance", ["moving_average", "minibatch"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gamma_is_the_factor_the_step_applied(name, variance, foreach, weight_decay):
    """delta theta / (lr * direction), with m tracked here independently of the optimizer."""
    own_mean = {}
    checked = []

    def on_step(opt, model, before):
        for param, theta_before in zip(model.parameters(), before):
            g = param.grad + weight_decay * theta_before
            t = opt.state[param]["step"] - 1
            m_tilde = own_mean.get(param, torch.zeros_like(g)) * BETA + (1 - BETA) * g
            own_mean[param] = m_tilde
            m = m_tilde / (1 - BETA ** (t + 1))
            delta = theta_before - param.detach()
            statistics = direction_statistics(opt, param)
            assert statistics.step == t
            torch.testing.assert_close(statistics.mean, m, rtol=1e-12, atol=1e-15)
            moving = m.abs() > 1e-6  # where the factor is identifiable from the step
            direction = g if name == "svag" else m
            moving &= direction.abs() > 1e-6
            if name == "adamstar":  # step = lr m / sqrt(m^2 + V) = lr sign(m) sqrt(gamma)
                applied = (delta / (LR * m)) ** 2 * m * m
            else:  # step = lr gamma m (MSVAG) or lr gamma g (SVAG)
                applied = delta / (LR * direction)
            torch.testing.assert_close(statistics.gamma[moving], applied[moving],
                                       rtol=1e-8, atol=1e-10)
            assert bool(((statistics.gamma >= 0) & (statistics.gamma <= 1)).all())
            checked.append(int(moving.sum()))

    train(name, variance, foreach=foreach, weight_decay=weight_decay, on_step=on_step)
    assert sum(checked) > 100  # the comparison really covered many elements


def test_first_moving_average_step_is_an_sgd_step():
    """rho(beta, 0) = 1: s_0 = 0, so gamma_0 = 1 wherever m_0 != 0 and the SNR is undefined."""
    _, _, monitor = train("msvag", "moving_average", steps=1,
                                monitor_kwargs=dict(every=1))
    for record in monitor.records:
        assert record["step"] == 0
        assert record["snr_median"] is None and record["snr_layer"] is None
        assert record["zero_variance_fraction"] == 1.0
        assert record["variance_mean"] == 0.0
        assert record["gamma_q05"] == pytest.approx(1.0)
        assert record["gamma_hist"][-1] == record["numel"]


@pytest.mark.parametrize("variance", ["moving_average", "minibatch"])
def test_records_summarise_gamma(variance):
    model, opt, monitor = train("msvag", variance, steps=4, monitor_kwargs=dict(every=1))
    last = {r["layer"]: r for r in monitor.records if r["step"] == 3}
    assert set(last) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        statistics = direction_statistics(opt, param)
        record = last[name]
        gamma = statistics.gamma.flatten()
        expected = torch.quantile(gamma, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
        actual = [record[k] for k in ("gamma_q05", "gamma_q25", "gamma_q50", "gamma_q75",
                                      "gamma_q95")]
        np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-12)
        assert record["gamma_mean"] == pytest.approx(float(gamma.mean()), rel=1e-12)
        counts, _ = np.histogram(gamma.numpy(), bins=10, range=(0.0, 1.0))
        assert record["gamma_hist"] == counts.tolist()
        m2, v = statistics.mean.flatten() ** 2, statistics.variance.flatten()
        snr = (m2[v > 0] / v[v > 0]).numpy()
        assert record["snr_median"] == pytest.approx(float(np.median(snr)), rel=1e-9)
        assert record["snr_mean"] == pytest.approx(float(snr.mean()), rel=1e-9)
        assert record["snr_layer"] == pytest.approx(float(m2.sum() / v.sum()), rel=1e-9)
        assert record["variance_mean"] == pytest.approx(float(v.mean()), rel=1e-12)
        # gamma = SNR / (1 + SNR) element-wise
        torch.testing.assert_close(gamma[v > 0], (m2 / v / (1 + m2 / v))[v > 0])
        assert record["estimator"] == variance and record["target"] == "mean"


def test_gradient_variance_matches_the_estimator_definitions():
    """var[g] estimate: s_t (moving average) or p.grad_variance (mini-batch); V = rho s / r."""
    _, opt, _ = train("msvag", "moving_average", steps=3)
    param = opt.param_groups[0]["params"][0]
    statistics = direction_statistics(opt, param)
    t = statistics.step
    torch.testing.assert_close(statistics.variance,
                               msvag_mb.rho(BETA, t) * statistics.gradient_variance)
    _, opt, _ = train("msvag", "minibatch", steps=3)
    param = opt.param_groups[0]["params"][0]
    statistics = direction_statistics(opt, param)
    assert statistics.gradient_variance is param.grad_variance
    torch.testing.assert_close(statistics.variance,
                               opt.state[param]["variance_avg"] / (1 - BETA ** 3) ** 2)


def test_monitoring_does_not_change_training():
    plain_model, plain_opt, _ = train("msvag", "moving_average", steps=5)
    model, opt, monitor = train("msvag", "moving_average", steps=5,
                                monitor_kwargs=dict(every=1))
    for a, b in zip(plain_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(plain_opt.state.values(), opt.state.values()):
        for key in a:
            torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]),
                                       rtol=0, atol=0)
    assert len(monitor.records) == 5 * 4


def test_files_written_and_read_back(tmp_path):
    kwargs = dict(every=2, jsonl=tmp_path / "log" / "monitor.jsonl",
                  csv=tmp_path / "log" / "monitor.csv")
    model, _, monitor = train("msvag", "minibatch", steps=5, monitor_kwargs=kwargs)
    monitor.close()
    layers = len(list(model.parameters()))
    lines = (tmp_path / "log" / "monitor.jsonl").read_text().splitlines()
    assert len(lines) == 3 * layers  # steps 0, 2, 4
    assert [json.loads(line)["step"] for line in lines[::layers]] == [0, 2, 4]
    from_jsonl = load_monitoring(tmp_path / "log" / "monitor.jsonl")
    from_csv = load_monitoring(tmp_path / "log" / "monitor.csv")
    assert from_jsonl == monitor.records == from_csv
    out = plot_monitoring(tmp_path / "log" / "monitor.csv", tmp_path / "plots" / "m.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    _, _, monitor = train("svag", "minibatch", steps=3,
                          monitor_kwargs=dict(every=1, tensorboard=tmp_path / "tb"))
    monitor.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_cheap_when_not_due(monkeypatch):
    """Steps that are not due only count: no state is read, nothing is computed."""
    calls = []
    original = monitoring.direction_statistics

    def counting(optimizer, param):
        calls.append(param)
        return original(optimizer, param)

    monkeypatch.setattr(monitoring, "direction_statistics", counting)
    model, _, monitor = train("msvag", "moving_average", steps=12,
                                monitor_kwargs=dict(every=5))
    layers = len(list(model.parameters()))
    assert monitor.steps_seen == 12
    assert len(calls) == 3 * layers  # steps 0, 5, 10
    assert sorted({r["step"] for r in monitor.records}) == [0, 5, 10]


def test_close_detaches_the_hook():
    model, opt, monitor = train("msvag", "moving_average", steps=2, monitor_kwargs=dict(every=1))
    monitor.close()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert monitor.steps_seen == 2


def test_refuses_what_it_cannot_monitor():
    params = [nn.Parameter(torch.zeros(3))]
    for opt in (msvag_mb.MSGD(params, lr=0.1), msvag_mb.MSSD(params, lr=0.1),
                torch.optim.Adam(params)):
        assert not is_supported(opt)
        with pytest.raises(TypeError, match="MSVAG, SVAG, AdamStar"):
            VarianceMonitor(opt)
    assert is_supported(msvag_mb.AdamStar(params, lr=0.1, variance="minibatch"))
    with pytest.raises(ValueError, match="every"):
        VarianceMonitor(msvag_mb.MSVAG(params, lr=0.1), every=0)


def test_svag_minibatch_needs_the_batch_variance():
    _, opt, _ = train("svag", "minibatch", steps=2)
    opt.zero_grad()  # removes p.grad_variance = s_hat_t, the variance SVAG divided by
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        direction_statistics(opt, opt.param_groups[0]["params"][0])


def test_large_layers_are_subsampled_for_quantiles():
    gamma = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    statistics = monitoring.DirectionStatistics(7, gamma.sqrt(), 1 - gamma, None, gamma)
    record = monitoring.summarize(statistics, max_elements=1000,
                                  generator=torch.Generator().manual_seed(0))
    assert sum(record["gamma_hist"]) == 5000  # the histogram uses every element
    assert record["gamma_q50"] == pytest.approx(0.5, abs=0.06)
    assert record["gradient_variance_mean"] is None


class CentredMovingAverage(msvag_mb.VarianceEstimator):
    """A user-written estimator: a moving average of (g_t - m_t)^2, bias-corrected, times
    rho(beta, t) for the variance of m_t. Only its formulas are written; the monitor asks
    them through the read-only estimate()."""

    name = "centred_moving_average"

    def init_state(self, param):
        return {"centred_sq": torch.zeros_like(param)}

    def coefficients(self, step, beta, target):
        scale = msvag_mb.rho(beta, step) if target == "mean" else 1.0
        return {"beta": beta, "one_minus_beta": 1.0 - beta,
                "scale": scale / (1.0 - beta ** (step + 1))}

    def advance(self, ops, state, moments, batch_variance, coefficients):
        centred = ops.add(moments.grad, moments.mean, -1.0)
        ops.addcmul_(ops.mul_(state["centred_sq"], coefficients["beta"]), centred, centred,
                     coefficients["one_minus_beta"])

    def variance(self, ops, state, moments, batch_variance, coefficients, target):
        return ops.mul(state["centred_sq"], coefficients["scale"])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_user_written_estimator_is_monitored(name):
    """The monitor accepts it, and its gamma is the factor the optimizer applied."""
    checked = []

    def on_step(opt, model, before):
        for param, theta_before in zip(model.parameters(), before):
            statistics = direction_statistics(opt, param)
            m, delta = statistics.mean, theta_before - param.detach()
            direction = param.grad if name == "svag" else m
            moving = (m.abs() > 1e-6) & (direction.abs() > 1e-6)
            if name == "adamstar":
                applied = (delta / (LR * m)) ** 2 * m * m
            else:
                applied = delta / (LR * direction)
            torch.testing.assert_close(statistics.gamma[moving], applied[moving],
                                       rtol=1e-6, atol=1e-8)
            checked.append(int(moving.sum()))

    estimator = CentredMovingAverage()
    _, opt, monitor = train(name, estimator, steps=4, monitor_kwargs=dict(every=1),
                            on_step=on_step)
    assert is_supported(opt) and sum(checked) > 100
    assert {r["estimator"] for r in monitor.records} == {"centred_moving_average"}
    assert all(r["gamma_mean"] is not None for r in monitor.records)


class UpdateOnly(msvag_mb.VarianceEstimator):
    """An estimator in the older form (update() only): it cannot estimate without
    advancing, so the monitor refuses it, naming the form it needs."""

    name = "update_only"

    def init_state(self, param):
        return {}

    def update(self, state, moments, batch_variance, step, beta, target):
        return torch.zeros_like(moments.mean)


def test_an_update_only_estimator_is_refused_by_name():
    opt = msvag_mb.MSVAG([nn.Parameter(torch.zeros(3))], lr=0.1, variance=UpdateOnly())
    assert not is_supported(opt)
    with pytest.raises(TypeError, match=r"advance\(\) and variance\(\)"):
        VarianceMonitor(opt)
