"""The optimizers against the plain float64 transcription of docs/maths.md, and the
behaviour PyTorch users expect from a torch.optim optimizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb.param_variance import set_grad_variance
from msvag_mb.reference import run_reference

ADAPTIVE = {"msvag": msvag_mb.MSVAG, "svag": msvag_mb.SVAG, "adamstar": msvag_mb.AdamStar}
PLAIN = {"msgd": msvag_mb.MSGD, "mssd": msvag_mb.MSSD}
CONFIGS = [(name, None) for name in PLAIN] + [
    (name, variance) for name in ADAPTIVE for variance in ("moving_average", "minibatch")
]


def make_optimizer(name, params, variance=None, **kwargs):
    if name in PLAIN:
        return PLAIN[name](params, **kwargs)
    return ADAPTIVE[name](params, variance=variance, **kwargs)


def prescribed_sequence(steps=12, shape=(3, 4), seed=0):
    """Gradients with a sign change, an exact zero element, and within-batch variances."""
    rng = np.random.default_rng(seed)
    gradients = [rng.normal(0.3, 1.0, size=shape) for _ in range(steps)]
    for g in gradients:
        g[0, 0] = 0.0  # m stays 0 there: no step, no NaN
    batch_variances = [rng.uniform(0.0, 0.5, size=shape) for _ in range(steps)]
    for s in batch_variances:
        s[0, 0] = 0.0
    return gradients, batch_variances


def run_optimizer(name, variance, theta0, gradients, batch_variances, foreach,
                  dtype=torch.float64, **kwargs):
    param = nn.Parameter(torch.tensor(theta0, dtype=dtype))
    path = {"fused": dict(fused=True)}.get(foreach, dict(foreach=foreach))
    opt = make_optimizer(name, [param], variance, **path, **kwargs)
    iterates = []
    for g, s in zip(gradients, batch_variances):
        opt.zero_grad()
        param.grad = torch.tensor(g, dtype=dtype)
        if variance == "minibatch":
            set_grad_variance(param, torch.tensor(s, dtype=dtype))
        opt.step()
        iterates.append(param.detach().to(torch.float64).numpy().copy())
    return iterates


@pytest.mark.parametrize("foreach", [False, True, "fused"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("name,variance", CONFIGS)
def test_trajectory_equals_transcription(name, variance, weight_decay, foreach):
    gradients, batch_variances = prescribed_sequence()
    theta0 = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    kwargs = dict(lr=0.1, beta=0.9, weight_decay=weight_decay)
    expected = run_reference(name, theta0, gradients, variance=variance,
                             batch_variances=batch_variances, **kwargs)
    actual = run_optimizer(name, variance, theta0, gradients, batch_variances, foreach, **kwargs)
    for t, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12, err_msg=f"step {t}")


@pytest.mark.parametrize("name,variance", CONFIGS)
def test_foreach_equals_single_tensor_with_many_parameters(name, variance):
    """Several shapes, a zero-size tensor and a parameter without gradient."""
    torch.manual_seed(0)
    shapes = [(5,), (3, 4), (0,), (2, 3, 2), (7,)]

    def build():
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(*shape)) for shape in shapes]

    runs = {}
    for foreach in (False, True):
        params = build()
        opt = make_optimizer(name, params, variance, lr=0.05, foreach=foreach)
        generator = torch.Generator().manual_seed(1)
        for _ in range(6):
            opt.zero_grad()
            for i, p in enumerate(params):
                if i == 4:
                    continue  # never gets a gradient: must be skipped, state not created
                p.grad = torch.randn(p.shape, generator=generator)
                if variance == "minibatch":
                    set_grad_variance(
                        p, torch.rand(p.shape, generator=generator))
            opt.step()
        runs[foreach] = (params, opt)
    (single, opt_single), (multi, opt_multi) = runs[False], runs[True]
    for a, b in zip(single, multi):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    assert multi[4] not in opt_multi.state
    for p_single, p_multi in zip(single, multi):
        if p_single in opt_single.state:
            for key, value in opt_single.state[p_single].items():
                other = opt_multi.state[p_multi][key]
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(value, other, rtol=0, atol=1e-15)
                else:
                    assert value == other


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", ["msvag", "adamstar", "svag"])
def test_zero_variance_gives_the_base_step(name, foreach):
    """With s_hat = 0: M-SVAG is M-SGD, SVAG is SGD on g, ADAM* is M-SSD."""
    gradients, _ = prescribed_sequence(steps=5)
    zeros = [np.zeros_like(g) for g in gradients]
    theta0 = np.zeros((3, 4))
    actual = run_optimizer(name, "minibatch", theta0, gradients, zeros, foreach, lr=0.1)
    base = {"msvag": "msgd", "adamstar": "mssd"}.get(name)
    if base is None:
        expected = list(np.cumsum([-0.1 * g for g in gradients], axis=0))
    else:
        expected = run_reference(base, theta0, gradients, lr=0.1)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_first_moving_average_step_is_sgd_and_minibatch_step_is_adapted(foreach):
    g = np.array([1.0, -2.0, 0.5])
    s_hat = np.array([1.0, 4.0, 0.0])
    ma = run_optimizer("msvag", "moving_average", np.zeros(3), [g], [s_hat], foreach, lr=1.0)
    np.testing.assert_allclose(ma[0], -g)  # s_0 = 0: gamma = 1
    mb = run_optimizer("msvag", "minibatch", np.zeros(3), [g], [s_hat], foreach, lr=1.0)
    np.testing.assert_allclose(mb[0], -g * g**2 / (g**2 + s_hat))  # r_0 = s_hat_0


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name,variance", CONFIGS)
def test_zero_gradients_do_not_move_and_stay_finite(name, variance, foreach):
    zeros = [np.zeros(4)] * 3
    iterates = run_optimizer(name, variance, np.ones(4), zeros, zeros, foreach, lr=0.3)
    for it in iterates:
        np.testing.assert_array_equal(it, np.ones(4))


@pytest.mark.parametrize("variance", ["moving_average", "minibatch"])
def test_adaptation_factor_in_unit_interval(variance):
    """|step| <= lr |m| elementwise and finite, even for huge variances and tiny means."""
    rng = np.random.default_rng(3)
    gradients = [rng.normal(0, 1, 50) * 10.0 ** rng.integers(-30, 10, 50) for _ in range(8)]
    variances = [10.0 ** rng.uniform(-40, 20, 50) for _ in range(8)]
    for foreach in (False, True):
        adapted = run_optimizer("msvag", variance, np.zeros(50), gradients, variances, foreach,
                                lr=1.0)
        plain = run_optimizer("msgd", None, np.zeros(50), gradients, variances, foreach, lr=1.0)
        steps_adapted = np.diff([np.zeros(50)] + adapted, axis=0)
        steps_plain = np.diff([np.zeros(50)] + plain, axis=0)
        assert np.all(np.isfinite(steps_adapted))
        assert np.all(np.abs(steps_adapted) <= np.abs(steps_plain) * (1 + 1e-12))
        assert np.all(steps_adapted * steps_plain >= 0)  # gamma >= 0: same direction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,variance", CONFIGS)
def test_low_precision_parameters_follow_the_reference(name, variance, dtype):
    gradients, batch_variances = prescribed_sequence(steps=6)
    theta0 = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    expected = run_reference(name, theta0, gradients, lr=0.01, variance=variance,
                             batch_variances=batch_variances)
    for foreach in (False, True, "fused"):
        actual = run_optimizer(name, variance, theta0, gradients, batch_variances, foreach,
                               dtype=dtype, lr=0.01)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        np.testing.assert_allclose(actual[-1], expected[-1], rtol=tolerance, atol=tolerance)
        param = nn.Parameter(torch.zeros(2, dtype=dtype))
        path = {"fused": dict(fused=True)}.get(foreach, dict(foreach=foreach))
        opt = make_optimizer(name, [param], variance, lr=0.01, **path)
        param.grad = torch.ones(2, dtype=dtype)
        if variance == "minibatch":
            set_grad_variance(param, torch.ones(2, dtype=dtype))
        opt.step()
        assert all(v.dtype == dtype for v in opt.state[param].values()
                   if isinstance(v, torch.Tensor))


def _train(model, opt, gv, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        x = torch.randn(8, 6, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        opt.zero_grad()
        if gv is not None:
            gv.backward(x, y)
        else:
            loss_fn(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name,variance", CONFIGS)
def test_state_dict_round_trip_is_bit_exact(name, variance):
    """5 steps, save, load into a fresh optimizer and model, 5 more == 10 straight."""
    from conftest import make_mlp

    def setup(model):
        opt = make_optimizer(name, model.parameters(), variance, lr=0.05, weight_decay=0.01)
        gv = (msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="backpack")
              if variance == "minibatch" else None)
        return opt, gv

    torch.manual_seed(0)
    straight = make_mlp()
    resumed = copy.deepcopy(straight)
    opt, gv = setup(straight)
    _train(straight, opt, gv, 10, seed=5)

    opt, gv = setup(resumed)
    generator_seed = 5
    _train(resumed, opt, gv, 5, seed=generator_seed)
    saved_model = copy.deepcopy(resumed.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    torch.manual_seed(123)
    fresh = make_mlp()
    fresh.load_state_dict(saved_model)
    fresh_opt, fresh_gv = setup(fresh)
    fresh_opt.load_state_dict(saved_opt)
    # continue the same data stream: replay the first 5 draws, then train 5
    generator = torch.Generator().manual_seed(generator_seed)
    for _ in range(5):
        torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(5):
        x = torch.randn(8, 6, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        fresh_opt.zero_grad()
        if fresh_gv is not None:
            fresh_gv.backward(x, y)
        else:
            loss_fn(fresh(x), y).backward()
        fresh_opt.step()
    for a, b in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_param_groups_scheduler_and_closure():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.ones(3))
    bias = nn.Parameter(torch.ones(2))
    opt = msvag_mb.MSGD([{"params": [weight], "lr": 0.1},
                         {"params": [bias], "lr": 1.0, "weight_decay": 0.5}], lr=0.2, beta=0.0)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = (weight.sum() + bias.sum())
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 5.0
    # beta = 0: m = g; bias has weight decay: g = 1 + 0.5 * 1
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.9))
    torch.testing.assert_close(bias.detach(), torch.full((2,), 1.0 - 1.5))
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.step(closure)
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.85))


class HalfVariance(msvag_mb.VarianceEstimator):
    """A user-written third estimator: var[m_t] = s_hat_t / 2, no state."""

    name = "half"
    requires_batch_variance = True

    def init_state(self, param):
        return {}

    def update(self, state, moments, batch_variance, step, beta, target):
        return batch_variance / 2


@pytest.mark.parametrize("foreach", [False, True])
def test_custom_estimator_plugs_in(foreach):
    param = nn.Parameter(torch.zeros(3))
    opt = msvag_mb.MSVAG([param], lr=1.0, beta=0.0, variance=HalfVariance(), foreach=foreach)
    param.grad = torch.tensor([1.0, 2.0, -1.0])
    set_grad_variance(param, torch.tensor([2.0, 0.0, 6.0]))
    opt.step()
    g = torch.tensor([1.0, 2.0, -1.0])
    expected = -g * g**2 / (g**2 + torch.tensor([1.0, 0.0, 3.0]))
    torch.testing.assert_close(param.detach(), expected)


def test_fused_refuses_what_it_cannot_fuse():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="foreach=True for a custom estimator"):
        msvag_mb.MSVAG(p, lr=0.1, variance=HalfVariance(), fused=True)
    with pytest.raises(ValueError, match="exclusive"):
        msvag_mb.MSVAG(p, lr=0.1, fused=True, foreach=True)


class DampedBatchVariance(msvag_mb.VarianceEstimator):
    """A user-written estimator in the element-wise form: a plain (linear-weight) moving
    average of s_hat, bias-corrected, times ``factor`` when the variance of m_t is asked.

    Written once against ``ops``; nothing else is needed for the per-tensor, foreach and
    fused paths and the monitor."""

    name = "damped_batch"
    requires_batch_variance = True

    def __init__(self, factor=0.5):
        self.factor = factor

    def init_state(self, param):
        return {"s_avg": torch.zeros_like(param)}

    def coefficients(self, step, beta, target):
        scale = self.factor if target == "mean" else 1.0
        return {"beta": beta, "one_minus_beta": 1.0 - beta,
                "scale": scale / (1.0 - beta ** (step + 1))}

    def advance(self, ops, state, moments, batch_variance, coefficients):
        s_avg = ops.mul_(state["s_avg"], coefficients["beta"])
        ops.add_(s_avg, batch_variance, coefficients["one_minus_beta"])

    def variance(self, ops, state, moments, batch_variance, coefficients, target):
        return ops.mul(state["s_avg"], coefficients["scale"])


def damped_reference(name, theta0, gradients, batch_variances, lr, beta, factor,
                     weight_decay):
    """The float64 NumPy transcription of DampedBatchVariance inside each member."""
    theta = np.array(theta0, dtype=np.float64)
    m_tilde, s_tilde, iterates = np.zeros_like(theta), np.zeros_like(theta), []
    for t, (g, s_hat) in enumerate(zip(gradients, batch_variances)):
        g = g + weight_decay * theta
        m_tilde = beta * m_tilde + (1 - beta) * g
        s_tilde = beta * s_tilde + (1 - beta) * s_hat
        m = m_tilde / (1 - beta ** (t + 1))
        variance = (factor if name != "svag" else 1.0) * s_tilde / (1 - beta ** (t + 1))
        denominator = np.maximum(m * m + variance, np.finfo(np.float64).tiny)
        direction = {"msvag": m * m / denominator * m, "svag": m * m / denominator * g,
                     "adamstar": m / np.sqrt(denominator)}[name]
        theta = theta - lr * direction
        iterates.append(theta.copy())
    return iterates


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_user_written_estimator_runs_identically_on_every_path(name, weight_decay):
    gradients, batch_variances = prescribed_sequence()
    theta0 = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    kwargs = dict(lr=0.1, beta=0.9, weight_decay=weight_decay)
    expected = damped_reference(name, theta0, gradients, batch_variances, factor=0.3,
                                **kwargs)
    runs = {}
    for path in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
        param = nn.Parameter(torch.tensor(theta0))
        opt = ADAPTIVE[name]([param], variance=DampedBatchVariance(0.3), **path, **kwargs)
        iterates = []
        for g, s in zip(gradients, batch_variances):
            opt.zero_grad()
            param.grad = torch.tensor(g)
            set_grad_variance(param, torch.tensor(s))
            opt.step()
            iterates.append(param.detach().numpy().copy())
        runs[next(iter(path.items()))] = (iterates, opt.state[param]["s_avg"].clone())
        for t, (a, e) in enumerate(zip(iterates, expected)):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12, err_msg=f"{path} step {t}")
    single, multi = runs[("foreach", False)], runs[("foreach", True)]
    for a, b in zip(single[0], multi[0]):
        np.testing.assert_array_equal(a, b)  # the same ops in the same order
    torch.testing.assert_close(single[1], multi[1], rtol=0, atol=0)
    torch.testing.assert_close(single[1], runs[("fused", True)][1], rtol=1e-12, atol=1e-14)


def test_fused_kernel_reads_each_instance_s_coefficients():
    """Two instances of one estimator class share a compiled kernel but not their numbers."""
    finals = []
    for factor in (0.0, 4.0, 0.0):
        param = nn.Parameter(torch.ones(5, dtype=torch.float64))
        opt = msvag_mb.MSVAG([param], lr=0.1, variance=DampedBatchVariance(factor), fused=True)
        for _ in range(3):
            param.grad = torch.full((5,), 0.5, dtype=torch.float64)
            set_grad_variance(param, torch.ones(5, dtype=torch.float64))
            opt.step()
        finals.append(param.detach().clone())
    torch.testing.assert_close(finals[0], torch.full((5,), 1.0 - 3 * 0.1 * 0.5,
                                                     dtype=torch.float64))  # V = 0: M-SGD
    assert bool((finals[1] > finals[0]).all())  # a large V shortens the step
    torch.testing.assert_close(finals[2], finals[0], rtol=0, atol=0)


def test_directions_and_estimators_have_their_maths_in_one_place():
    """The optimizers hold a Direction; the fused module writes no formula of its own."""
    import inspect

    from msvag_mb import directions, fused

    for cls in (msvag_mb.MSGD, msvag_mb.MSSD, *ADAPTIVE.values()):
        assert isinstance(cls.direction, directions.Direction)
        assert cls.variance_target == cls.direction.target
    source = inspect.getsource(fused)
    for name in ("moving_average", "minibatch", "gamma_mean", "adam_star", "sign("):
        assert name not in source, name

def test_invalid_arguments_are_refused_with_the_valid_range():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        msvag_mb.MSVAG(p, lr=-1.0)
    with pytest.raises(ValueError, match=r"Invalid beta parameter: 1.0 \(must be in \[0, 1\)\)"):
        msvag_mb.MSVAG(p, lr=0.1, beta=1.0)
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        msvag_mb.MSVAG(p, lr=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="Invalid variance estimator: 'batch'"):
        msvag_mb.MSVAG(p, lr=0.1, variance="batch")
    with pytest.raises(TypeError):
        msvag_mb.MSGD(p, lr=0.1, variance="minibatch")


@pytest.mark.parametrize("foreach", [False, True])
def test_minibatch_without_grad_variance_names_the_fix(foreach):
    param = nn.Parameter(torch.zeros(3))
    opt = msvag_mb.MSVAG([param], lr=0.1, variance="minibatch", foreach=foreach)
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"GradientVariance\(model, loss_fn\)\.backward"):
        opt.step()
    assert len(opt.state[param]) == 0


def test_stale_grad_variance_is_detected():
    model = nn.Linear(3, 2)
    loss_fn = nn.MSELoss()
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="backpack")
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    gv.backward(x, y)
    opt.step()
    model.zero_grad()  # torch's, not ours: grad_variance survives
    loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match="stale"):
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_are_refused_without_touching_state(bad, foreach):
    param = nn.Parameter(torch.zeros(3))
    opt = msvag_mb.MSVAG([param], lr=0.1, foreach=foreach)
    param.grad = torch.ones(3)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    param.grad = torch.tensor([1.0, bad, 0.0])
    with pytest.raises(FloatingPointError, match="GradScaler"):
        opt.step()
    after = opt.state_dict()
    assert after["state"][0]["step"] == before["state"][0]["step"] == 1
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    assert torch.isfinite(param).all()


def test_zero_grad_clears_grad_variance():
    param = nn.Parameter(torch.zeros(3))
    opt = msvag_mb.MSVAG([param], lr=0.1, variance="minibatch")
    param.grad = torch.ones(3)
    set_grad_variance(param, torch.ones(3))
    opt.zero_grad()
    assert param.grad is None and not hasattr(param, "grad_variance")
