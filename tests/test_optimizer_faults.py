"""The optimizers under faults and bad input (issue 12, "Half-done optimizer state").

Every refusal happens before anything changes, and its message says what is wrong and the
valid range or the fix: a NaN in any param group, hyperparameters of a group outside their
range, a ``p.grad`` changed in place after ``GradientVariance.backward``, a state dict that
another estimator or optimizer saved. Pickling and ``torch.save`` work after a mini-batch
step.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb.param_variance import read_grad_variance, set_grad_variance
from conftest import mlp_problem

ADAPTIVE = (msvag_mb.MSVAG, msvag_mb.SVAG, msvag_mb.AdamStar)
ALL = (msvag_mb.MSGD, msvag_mb.MSSD, *ADAPTIVE)


def snapshot(opt):
    """Everything a step may change: parameters, per-parameter state, group values."""
    params = [p.detach().clone() for group in opt.param_groups for p in group["params"]]
    return params, copy.deepcopy(opt.state_dict())


def assert_unchanged(opt, before):
    params, state_dict = snapshot(opt)
    for a, b in zip(params, before[0]):
        assert torch.equal(a, b)
    assert state_dict["param_groups"] == before[1]["param_groups"]
    assert state_dict["state"].keys() == before[1]["state"].keys()
    for key, entry in state_dict["state"].items():
        assert entry.keys() == before[1]["state"][key].keys()
        for name, value in entry.items():
            old = before[1]["state"][key][name]
            assert torch.equal(value, old) if torch.is_tensor(value) else value == old


def two_groups(optimizer=msvag_mb.MSVAG, **kwargs):
    weight, bias = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = optimizer([{"params": [weight]}, {"params": [bias], "lr": 0.05}], lr=0.1, **kwargs)
    return weight, bias, opt


def minibatch_step(model, opt, gv, x, y):
    opt.zero_grad()
    gv.backward(x, y)
    opt.step()


# -- 6: a fault in a later group leaves no half-taken step --------------------------------
@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_in_a_later_group_changes_nothing(bad, path):
    weight, bias, opt = two_groups(**path)
    weight.grad, bias.grad = torch.ones(3), torch.ones(2)
    opt.step()
    before = snapshot(opt)
    weight.grad, bias.grad = torch.full((3,), 0.5), torch.tensor([bad, 1.0])
    with pytest.raises(FloatingPointError, match="the step was not taken and the optimizer "
                       "state is unchanged") as refusal:
        opt.step()
    assert_unchanged(opt, before)  # what the message says
    assert "a gradient (p.grad) of param group 1 contains NaN or Inf" in str(refusal.value)
    assert opt.state[weight]["step"] == opt.state[bias]["step"] == 1
    bias.grad = torch.ones(2)  # the step then goes ahead in both groups
    opt.step()
    assert opt.state[weight]["step"] == opt.state[bias]["step"] == 2


@pytest.mark.parametrize("foreach", [False, True])
def test_non_finite_variance_or_missing_variance_in_a_later_group_changes_nothing(foreach):
    weight, bias, opt = two_groups(variance="minibatch", foreach=foreach)
    for p in (weight, bias):
        p.grad = torch.ones_like(p)
        set_grad_variance(p, torch.ones_like(p))
    opt.step()
    before = snapshot(opt)
    set_grad_variance(bias, torch.tensor([1.0, float("nan")]))
    with pytest.raises(FloatingPointError, match="state is unchanged") as refusal:
        opt.step()
    assert_unchanged(opt, before)
    assert "(p.grad_variance) of param group 1" in str(refusal.value)
    bias.grad = torch.ones(2)  # replaced: the variance is stale for the second group only
    with pytest.raises(RuntimeError, match="stale"):
        opt.step()
    assert_unchanged(opt, before)


def test_sparse_gradient_in_a_later_group_changes_nothing():
    weight, bias, opt = two_groups()
    weight.grad, bias.grad = torch.ones(3), torch.ones(2)
    opt.step()
    before = snapshot(opt)
    bias.grad = torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, before)


# -- 7: param-group hyperparameters are checked as the constructor checks its arguments ----
GROUP_FAULTS = [
    ({"lr": -1.0}, r"Invalid learning rate in param group {i}: -1.0 \(must be a finite float "
                   r">= 0\)"),
    ({"lr": float("inf")}, r"Invalid learning rate in param group {i}: inf \(must be a finite"),
    ({"lr": float("nan")}, r"Invalid learning rate in param group {i}: nan"),
    ({"beta": 1.0}, r"Invalid beta parameter in param group {i}: 1.0 \(must be in \[0, 1\)\)"),
    ({"beta": -0.1}, r"Invalid beta parameter in param group {i}: -0.1 \(must be in \[0, 1\)"),
    ({"weight_decay": -0.5}, r"Invalid weight_decay value in param group {i}: -0.5 \(must be "
                             r"a finite float >= 0\)"),
    ({"fused": True, "foreach": True}, r"exclusive in param group {i}"),
]


@pytest.mark.parametrize("optimizer", ALL)
@pytest.mark.parametrize("values,message", GROUP_FAULTS)
def test_group_hyperparameters_are_refused_at_construction(optimizer, values, message):
    good, bad = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=message.format(i=1)):
        optimizer([{"params": [good]}, {"params": [bad], **values}], lr=0.1)


@pytest.mark.parametrize("optimizer", ALL)
@pytest.mark.parametrize("values,message", GROUP_FAULTS)
def test_group_hyperparameters_are_refused_by_add_param_group(optimizer, values, message):
    opt = optimizer([nn.Parameter(torch.ones(2))], lr=0.1)
    groups = copy.deepcopy(opt.state_dict()["param_groups"])
    with pytest.raises(ValueError, match=message.format(i=1)):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], **values})
    assert opt.state_dict()["param_groups"] == groups


def test_defaults_a_group_inherits_are_fine_and_valid_groups_are_accepted():
    opt = msvag_mb.MSVAG([nn.Parameter(torch.ones(2))], lr=0.1)
    opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": 0.0, "beta": 0.5,
                         "weight_decay": 1e-4})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="Invalid learning rate: inf"):
        msvag_mb.MSVAG([nn.Parameter(torch.ones(2))], lr=float("inf"))


# -- beta = 0 with the moving-average estimator (Eq. (22) divides by 1 - rho = 0) ----------
@pytest.mark.parametrize("optimizer", ADAPTIVE)
def test_beta_zero_with_the_moving_average_estimator_is_refused(optimizer):
    param = nn.Parameter(torch.ones(2))
    message = (r"Invalid beta parameter: 0.0 for variance='moving_average' \(must be in "
               r"\(0, 1\)\).*beta > 0")
    with pytest.raises(ValueError, match=message):
        optimizer([param], lr=0.1, beta=0.0, variance="moving_average")
    with pytest.raises(ValueError, match="in param group 0: 0.0 for variance='moving_average'"):
        optimizer([{"params": [param], "beta": 0.0}], lr=0.1)
    opt = optimizer([param], lr=0.1)
    with pytest.raises(ValueError, match="in param group 1: 0.0 for variance='moving_average'"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "beta": 0.0})


@pytest.mark.parametrize("optimizer", ADAPTIVE)
def test_beta_zero_works_where_it_is_defined(optimizer):
    """The mini-batch estimator needs no averaging: beta = 0 gives V_t = s_hat_t."""
    param = nn.Parameter(torch.ones(2))
    opt = optimizer([param], lr=0.1, beta=0.0, variance="minibatch")
    for _ in range(3):
        param.grad = torch.tensor([1.0, -2.0])
        set_grad_variance(param, torch.tensor([1.0, 0.0]))
        opt.step()
    assert torch.isfinite(param).all()
    for plain in (msvag_mb.MSGD, msvag_mb.MSSD):
        plain([nn.Parameter(torch.ones(1))], lr=0.1, beta=0.0)


# -- 8: p.grad changed in place after GradientVariance.backward ----------------------------
def gv_problem():
    model, x, y = mlp_problem(batch=8)
    loss_fn = nn.CrossEntropyLoss()
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="vmap")
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    return model, x, y, loss_fn, gv, opt


def test_loss_backward_accumulating_into_p_grad_after_gv_is_refused():
    model, x, y, loss_fn, gv, opt = gv_problem()
    minibatch_step(model, opt, gv, x[:4], y[:4])
    before = snapshot(opt)
    opt.zero_grad()
    gv.backward(x[4:], y[4:])
    loss_fn(model(x[4:]), y[4:]).backward()  # doubles p.grad in place
    with pytest.raises(RuntimeError, match="stale: p.grad was changed in place after "
                       "GradientVariance.backward"):
        opt.step()
    assert_unchanged(opt, before)
    opt.zero_grad()
    gv.backward(x[4:], y[4:])  # the way out: statistics and gradient of one cycle
    opt.step()


def test_an_in_place_change_of_p_grad_is_refused_and_the_monitor_sees_no_variance():
    model, x, y, _, gv, opt = gv_problem()
    opt.zero_grad()
    gv.backward(x, y)
    weight = next(model.parameters())
    read_grad_variance(weight)  # fine as left
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.raises(RuntimeError, match="changed in place"):
        read_grad_variance(weight)
    assert msvag_mb.param_variance.grad_variance_or_none(weight) is None
    with pytest.raises(RuntimeError, match="changed in place"):
        opt.step()


@pytest.mark.parametrize("explicit_unscale", [False, True])
def test_grad_scaler_unscaling_p_grad_is_not_an_in_place_change(explicit_unscale):
    """GradScaler.unscale_ rescales p.grad in place: the recorded scale accounts for it."""
    model, x, y, loss_fn, gv, opt = gv_problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for _ in range(2):
        opt.zero_grad()
        gv.backward(x, y, scaler=scaler)
        if explicit_unscale:
            scaler.unscale_(opt)
            for p in model.parameters():
                read_grad_variance(p)
        scaler.step(opt)
        scaler.update()
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())
    opt.zero_grad()
    gv.backward(x, y, scaler=scaler)
    scaler.scale(loss_fn(model(x), y)).backward()  # accumulating is refused under a scaler too
    with pytest.raises(RuntimeError, match="changed in place"):
        scaler.step(opt)


# -- 9: pickling and torch.save after a mini-batch step -----------------------------------
def test_model_optimizer_and_gradient_variance_pickle_after_a_minibatch_step():
    model, x, y, _, gv, opt = gv_problem()
    minibatch_step(model, opt, gv, x[:4], y[:4])
    opt.zero_grad()
    gv.backward(x[4:], y[4:])  # p.grad and p.grad_variance in place, as after training
    for thing in (model, opt, gv):
        pickle.dumps(thing)
        torch.save(thing, io.BytesIO())
    twin, twin_opt, twin_gv = pickle.loads(pickle.dumps((model, opt, gv)))
    assert isinstance(twin_opt.variance_estimator, msvag_mb.MiniBatchVariance)
    # the pickled trio goes on training exactly as the original
    opt.step()
    minibatch_step(model, opt, gv, x[:4], y[:4])
    twin_opt.zero_grad()
    twin_gv.backward(x[4:], y[4:])
    twin_opt.step()
    minibatch_step(twin, twin_opt, twin_gv, x[:4], y[:4])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_torch_save_of_the_whole_model_loads_and_the_stale_check_still_works():
    model, x, y, loss_fn, gv, opt = gv_problem()
    minibatch_step(model, opt, gv, x, y)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for p, q in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p, q)
    # the loaded parameters carry the old p.grad_variance but not its p.grad: stale for any
    # gradient they get later
    loaded_opt = msvag_mb.MSVAG(loaded.parameters(), lr=0.1, variance="minibatch")
    loss_fn(loaded(x), y).backward()
    with pytest.raises(RuntimeError, match="stale"):
        loaded_opt.step()
    loaded_opt.zero_grad()
    msvag_mb.GradientVariance(loaded, loss_fn, engine="vmap").backward(x, y)
    loaded_opt.step()


# -- 10: state dicts of another estimator, member or optimizer ----------------------------
def trained(optimizer, steps=3, seed=0, **kwargs):
    """An optimizer over one (3, 2) parameter after ``steps`` prescribed gradients."""
    generator = torch.Generator().manual_seed(seed)
    param = nn.Parameter(torch.zeros(3, 2))
    opt = optimizer([param], **kwargs)
    for _ in range(steps):
        param.grad = torch.randn(3, 2, generator=generator)
        set_grad_variance(param, torch.rand(3, 2, generator=generator))
        opt.step()
    return param, opt


def fresh(optimizer, **kwargs):
    param = nn.Parameter(torch.zeros(3, 2))
    opt = optimizer([param], **kwargs)
    param.grad = torch.ones(3, 2)
    set_grad_variance(param, torch.ones(3, 2))
    opt.step()  # some state, to show that a refusal keeps it
    return param, opt


REFUSED = [
    (msvag_mb.MSVAG, dict(variance="moving_average"), msvag_mb.MSVAG,
     dict(variance="minibatch"), r"saved by a member of the M-SVAG family with "
     r"variance='moving_average' \(state exp_avg_sq\); this optimizer needs variance_avg"),
    (msvag_mb.SVAG, dict(variance="minibatch"), msvag_mb.AdamStar,
     dict(variance="moving_average"), r"variance='minibatch' \(state variance_avg\); this "
     r"optimizer needs exp_avg_sq"),
    (msvag_mb.MSGD, {}, msvag_mb.MSVAG, dict(variance="moving_average"),
     r"no variance state \(MSGD or MSSD\); this optimizer needs exp_avg_sq"),
    (torch.optim.Adam, {}, msvag_mb.MSVAG, dict(variance="minibatch"),
     r"saved by torch.optim.Adam .*needs variance_avg"),
    (torch.optim.Adam, {}, msvag_mb.AdamStar, dict(variance="moving_average"),
     r"averages g\^2 \(exp_avg_sq\) with beta2 = 0.999"),
    (torch.optim.Adam, dict(betas=(0.8, 0.8)), msvag_mb.MSGD, {},
     r"exp_avg\) with beta1 = 0.8, param group 0 here has beta = 0.9: build MSGD with "
     r"beta=0.8"),
    (torch.optim.Adam, dict(maximize=True, betas=(0.9, 0.9)), msvag_mb.MSSD, {},
     "maximize=True"),
    (torch.optim.SGD, dict(momentum=0.9), msvag_mb.MSGD, {},
     r"saved neither by a member of the M-SVAG family nor by an Adam-type optimizer "
     r"\(param-group keys \[.*'momentum'.*\], state keys \['momentum_buffer'\]\)"),
]


@pytest.mark.parametrize("source,source_kwargs,target,target_kwargs,message", REFUSED)
def test_state_dicts_that_cannot_be_converted_are_refused_before_anything_changes(
        source, source_kwargs, target, target_kwargs, message):
    _, saver = trained(source, lr=0.01, **source_kwargs)
    _, opt = fresh(target, lr=0.1, **target_kwargs)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saver.state_dict())
    assert_unchanged(opt, before)


@pytest.mark.parametrize("source", ALL)
@pytest.mark.parametrize("target", [msvag_mb.MSGD, msvag_mb.MSSD])
def test_the_momentum_of_any_member_carries_over_to_msgd_and_mssd(source, target):
    _, saver = trained(source, lr=0.01, **({"variance": "minibatch"}
                                           if source in ADAPTIVE else {}))
    _, opt = fresh(target, lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(saver.state_dict())
    (state,) = opt.state.values()
    (saved,) = saver.state.values()
    assert state.keys() == {"step", "exp_avg"}
    assert state["step"] == 3 and torch.equal(state["exp_avg"], saved["exp_avg"])
    assert opt.param_groups[0]["lr"] == 0.01  # a member's hyperparameters, as torch loads
    dropped = [str(w.message) for w in caught if "dropped variance_avg" in str(w.message)]
    assert len(dropped) == (1 if source in ADAPTIVE else 0)


@pytest.mark.parametrize("variance", ["moving_average", "minibatch"])
def test_members_with_the_same_estimator_share_their_state_silently(variance):
    _, saver = trained(msvag_mb.MSVAG, lr=0.01, variance=variance)
    for target in (msvag_mb.SVAG, msvag_mb.AdamStar):
        _, opt = fresh(target, lr=0.1, variance=variance)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.load_state_dict(saver.state_dict())
        (state,), (saved,) = opt.state.values(), saver.state.values()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) if torch.is_tensor(saved[k])
                   else state[k] == saved[k] for k in saved)


@pytest.mark.parametrize("target", [msvag_mb.MSVAG, msvag_mb.SVAG, msvag_mb.AdamStar])
def test_adam_with_equal_betas_converts_exactly_to_the_moving_average_estimator(target):
    """Adam(betas=(b, b)) keeps exactly the moving-average members' exp_avg, exp_avg_sq."""
    _, adam = trained(torch.optim.Adam, lr=0.01, betas=(0.9, 0.9), foreach=False)
    _, own = trained(target, lr=0.01, beta=0.9, variance="moving_average", foreach=False)
    param, opt = fresh(target, lr=0.5, variance="moving_average", foreach=False)
    with pytest.warns(UserWarning, match=r"saved by torch.optim.Adam .*keeps its own "
                      r"hyperparameters"):
        opt.load_state_dict(adam.state_dict())
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["beta"] == 0.9
    (state,), (expected,) = opt.state.values(), own.state.values()
    assert state.keys() == expected.keys() and state["step"] == 3
    assert isinstance(state["step"], int)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key], expected[key]), key
    param.grad = torch.ones(3, 2)
    opt.step()
    assert opt.state[param]["step"] == 4


def test_a_loaded_group_outside_the_valid_range_is_refused():
    _, saver = trained(msvag_mb.MSVAG, lr=0.01)
    saved = saver.state_dict()
    saved["param_groups"][0]["beta"] = 1.0
    _, opt = fresh(msvag_mb.MSVAG, lr=0.1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"Invalid beta parameter in param group 0 of the "
                       r"loaded state dict: 1.0 \(must be in \[0, 1\)\)"):
        opt.load_state_dict(saved)
    assert_unchanged(opt, before)


def test_a_state_dict_of_another_model_is_refused():
    param = nn.Parameter(torch.zeros(6))
    saver = msvag_mb.MSVAG([param], lr=0.1)
    param.grad = torch.ones(6)
    saver.step()
    _, opt = fresh(msvag_mb.MSVAG, lr=0.1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"'exp_avg' of a parameter in param group 0 has "
                       r"shape \(6,\), the parameter \(3, 2\)"):
        opt.load_state_dict(saver.state_dict())
    assert_unchanged(opt, before)
