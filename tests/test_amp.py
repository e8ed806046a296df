"""Mixed precision: GradientVariance.backward(..., scaler=GradScaler) on the CPU.

p.grad is in scaled units, p.grad_variance in squared scaled units, and the optimizer step
(through scaler.step, with or without an explicit scaler.unscale_) sees the unscaled
statistics; non-finite steps are skipped without touching the optimizer state; without a
scaler, NaN/Inf are a clear error that leaves p.grad and p.grad_variance as they were.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb.param_variance import read_grad_variance as batch_variance_of
from conftest import make_mlp, mlp_problem

SCALE = 2.0 ** 12
EXACT = dict(rtol=1e-12, atol=1e-14)


def unscaled_statistics(model, x, y, engine="vmap", reduction="mean"):
    twin = copy.deepcopy(model)
    msvag_mb.GradientVariance(twin, nn.CrossEntropyLoss(reduction=reduction),
                              engine=engine).backward(x, y)
    return [(p.grad, p.grad_variance) for p in twin.parameters()]


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(model.parameters())}
    return params, state


def assert_same_snapshot(first, second):
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    assert first[1].keys() == second[1].keys()
    for i in first[1]:
        assert first[1][i].keys() == second[1][i].keys()
        for key in first[1][i]:
            a, b = first[1][i][key], second[1][i][key]
            assert torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("engine", ["backpack", "vmap", "extensions"])
def test_statistics_are_in_scaled_units_and_loss_is_unscaled(engine, reduction):
    model, x, y = mlp_problem(batch=8)
    expected = unscaled_statistics(model, x, y, engine, reduction)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    loss = msvag_mb.GradientVariance(model, loss_fn, engine=engine).backward(
        x, y, scaler=scaler)
    torch.testing.assert_close(loss, loss_fn(model(x), y).detach(), **EXACT)
    for p, (grad, variance) in zip(model.parameters(), expected):
        # a power-of-two scale: exact up to the engine's own rounding
        torch.testing.assert_close(p.grad, grad * SCALE, **EXACT)
        torch.testing.assert_close(p.grad_variance, variance * SCALE ** 2, **EXACT)
        torch.testing.assert_close(batch_variance_of(p), variance, **EXACT)


@pytest.mark.parametrize("explicit_unscale", [False, True])
@pytest.mark.parametrize("optimizer", [msvag_mb.MSVAG, msvag_mb.SVAG, msvag_mb.AdamStar])
def test_scaler_steps_equal_unscaled_steps(optimizer, explicit_unscale):
    model, x, y = mlp_problem(batch=8)
    plain = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="vmap")
    plain_gv = msvag_mb.GradientVariance(plain, loss_fn, engine="vmap")
    opt = optimizer(model.parameters(), lr=0.05, variance="minibatch")
    plain_opt = optimizer(plain.parameters(), lr=0.05, variance="minibatch")
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=2)
    scales = []
    for step in range(4):
        batch = slice(2 * step, 2 * step + 4)
        plain_opt.zero_grad()
        plain_gv.backward(x[batch], y[batch])
        plain_opt.step()
        opt.zero_grad()
        gv.backward(x[batch], y[batch], scaler=scaler)
        if explicit_unscale:  # e.g. for gradient clipping between unscale_ and step
            scaler.unscale_(opt)
            for p, q in zip(model.parameters(), plain.parameters()):
                torch.testing.assert_close(p.grad, q.grad, **EXACT)
                torch.testing.assert_close(batch_variance_of(p), q.grad_variance, **EXACT)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales[-1] > SCALE  # the scale grew: steps with several scales were compared
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, **EXACT)


@pytest.mark.parametrize("engine", ["backpack", "vmap", "extensions"])
def test_bfloat16_autocast_with_grad_scaler(engine):
    """float32 model, bfloat16 autocast: statistics close to brute force under autocast."""
    torch.manual_seed(0)
    model = make_mlp().float()
    x, y = torch.randn(16, 6, dtype=torch.float32), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    per_example = []
    for n in range(16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x[n:n + 1]), y[n:n + 1])
        loss.backward()
        per_example.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    gv = msvag_mb.GradientVariance(model, loss_fn, engine=engine)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gv.backward(x, y, scaler=scaler)
    assert loss.dtype == torch.float32 and abs(float(loss) - 1.1) < 0.5
    # vmap computes its sums of squares outside autocast (float32); BackPACK's per-layer
    # einsums need autocast and work in bfloat16 (about 3 significant digits)
    tolerance = 0.05 if engine == "backpack" else 0.02
    for i, p in enumerate(model.parameters()):
        g = torch.stack([example[i] for example in per_example])
        assert p.grad.dtype == p.grad_variance.dtype == torch.float32
        scale = g.abs().max()
        torch.testing.assert_close(p.grad / SCALE, g.mean(0), rtol=0, atol=0.02 * scale)
        torch.testing.assert_close(batch_variance_of(p), g.var(0) / 16, rtol=0,
                                   atol=tolerance * float(g.var(0).max()) / 16)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == SCALE  # finite: no backoff
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_nan_under_scaler_skips_the_step_and_keeps_the_state():
    model, x, y = mlp_problem(batch=8)
    loss_fn = nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="backpack")
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    reference_gv = msvag_mb.GradientVariance(reference, loss_fn, engine="backpack")
    reference_opt = msvag_mb.MSVAG(reference.parameters(), lr=0.1, variance="minibatch")
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for current, current_gv, current_opt, current_scaler in (
            (model, gv, opt, scaler), (reference, reference_gv, reference_opt, None)):
        current_opt.zero_grad()
        current_gv.backward(x[:4], y[:4], scaler=current_scaler)
        if current_scaler is None:
            current_opt.step()
        else:
            current_scaler.step(current_opt)
            current_scaler.update()
    before = snapshot(model, opt)
    bad = x[4:].clone()
    bad[1, 2] = float("nan")
    opt.zero_grad()
    gv.backward(bad, y[4:], scaler=scaler)  # no error under a scaler
    assert any(not bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    scaler.step(opt)  # skipped
    scaler.update()
    assert scaler.get_scale() == SCALE / 2
    assert_same_snapshot(before, snapshot(model, opt))
    # the next finite step is the step the reference takes after its first one
    opt.zero_grad()
    gv.backward(x[4:], y[4:], scaler=scaler)
    scaler.step(opt)
    scaler.update()
    reference_opt.zero_grad()
    reference_gv.backward(x[4:], y[4:])
    reference_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **EXACT)
    for p, q in zip(model.parameters(), reference.parameters()):
        for key, value in reference_opt.state[q].items():
            mine = opt.state[p][key]
            if torch.is_tensor(value):
                torch.testing.assert_close(mine, value, **EXACT)
            else:
                assert mine == value


def test_overflow_of_the_variance_alone_makes_the_scaler_skip():
    """(scale g)^2 overflows float32 while scale * g does not: GradScaler only checks
    p.grad, so GradientVariance must put an Inf there."""
    torch.manual_seed(0)
    model = make_mlp().float()
    x, y = torch.randn(8, 6, dtype=torch.float32), torch.randint(0, 3, (8,))
    huge = 2.0 ** 70
    twin = copy.deepcopy(model)
    msvag_mb.GradientVariance(twin, nn.CrossEntropyLoss(), engine="vmap").backward(x, y)
    assert all(bool(torch.isfinite(q.grad * huge).all()) for q in twin.parameters())
    assert any(not bool(torch.isfinite(q.grad_variance * huge ** 2).all())
               for q in twin.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=huge)
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    gv = msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="vmap")
    before = snapshot(model, opt)
    gv.backward(x, y, scaler=scaler)
    assert any(bool(torch.isinf(p.grad).any()) for p in model.parameters())
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == huge / 2
    assert_same_snapshot(before, snapshot(model, opt))


def test_non_finite_without_scaler_raises_and_keeps_the_accumulated_statistics():
    model, x, y = mlp_problem(batch=8)
    gv = msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="vmap")
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    opt.zero_grad()
    gv.backward(x[:4], y[:4])
    kept = [(p.grad, p.grad.clone(), p.grad_variance.clone()) for p in model.parameters()]
    bad = x[4:].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or Inf.*GradScaler"):
        gv.backward(bad, y[4:])
    for p, (grad, grad_values, variance) in zip(model.parameters(), kept):
        assert p.grad is grad and torch.equal(p.grad, grad_values)
        assert torch.equal(p.grad_variance, variance)
    gv.backward(x[4:], y[4:])  # the cycle goes on: statistics of all 8 examples
    expected = unscaled_statistics(model, x, y)
    for p, (grad, variance) in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad)
        torch.testing.assert_close(p.grad_variance, variance)
    opt.step()


def test_accumulation_under_a_scaler():
    model, x, y = mlp_problem(batch=9)
    expected = unscaled_statistics(model, x, y)
    gv = msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="backpack")
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    opt.zero_grad()
    gv.backward(x[:4], y[:4], scaler=scaler)
    gv.backward(x[4:], y[4:], scaler=scaler)
    for p, (grad, variance) in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad * SCALE)
        torch.testing.assert_close(batch_variance_of(p), variance)
    with pytest.raises(ValueError, match="loss scale changed"):
        gv.backward(x[:4], y[:4])  # same cycle, but without the scaler
    other = torch.amp.GradScaler("cpu", init_scale=SCALE * 2)
    with pytest.raises(ValueError, match="loss scale changed"):
        gv.backward(x[:4], y[:4], scaler=other)
    for p, (grad, variance) in zip(model.parameters(), expected):  # refusals kept the state
        torch.testing.assert_close(p.grad, grad * SCALE)
    scaler.step(opt)


def test_disabled_scaler_is_no_scaler():
    model, x, y = mlp_problem(batch=6)
    expected = unscaled_statistics(model, x, y)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="vmap").backward(
        x, y, scaler=scaler)
    for p, (grad, variance) in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad, **EXACT)
        torch.testing.assert_close(p.grad_variance, variance, **EXACT)
        assert p.grad_variance_scale is None


def test_autocast_covers_the_forward_only_so_the_variance_keeps_its_digits():
    """High signal-to-noise: contributions 25 + k/8 (k = 0..7), exact in bfloat16, so the
    bfloat16 forward is exact; s_hat needs B sum c^2 - grad^2 to cancel about three
    digits, which sums of squares in bfloat16 (about 3 digits) cannot survive."""
    model = nn.Linear(1, 1).float()
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    x = torch.ones(8, 1, dtype=torch.float32)
    residual = 100.0 + 0.5 * torch.arange(8, dtype=torch.float64)
    y = (1.0 - residual).float().unsqueeze(1)
    g = 2.0 * residual  # per-example gradient of the weight (and the bias)
    exact_grad, exact_variance = g.mean(), g.var() / 8
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(), engine="vmap")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gv.backward(x, y)
        assert model(x).dtype == torch.bfloat16  # the forward did run in bfloat16
    torch.testing.assert_close(model.weight.grad.double().squeeze(), exact_grad)
    torch.testing.assert_close(model.weight.grad_variance.double().squeeze(),
                               exact_variance, rtol=1e-5, atol=0)
