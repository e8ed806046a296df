"""Every registered engine against brute force (one backward per example), the traps
each engine must refuse before backward, accumulation, and engine switching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb.engines import ENGINES, UnsupportedModelError
from conftest import PROBLEMS, CharModel, make_mlp, mlp_problem, sequence_loss

PER_EXAMPLE_ENGINES = sorted(name for name, cls in ENGINES.items() if cls.units_are_examples)


def loss_for(problem: str, reduction: str):
    if problem == "char_lstm":
        if reduction == "mean":
            return sequence_loss
        return lambda out, y: nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
    return nn.CrossEntropyLoss(reduction=reduction)


def brute_force(model, loss_fn, x, y, reduction):
    """(grad, variance of grad) from one backward per example, in float64."""
    batch = x.shape[0]
    per_example = []
    for n in range(batch):
        model.zero_grad()
        loss_fn(model(x[n:n + 1]), y[n:n + 1]).backward()
        per_example.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    results = []
    for i in range(len(per_example[0])):
        g = torch.stack([example[i] for example in per_example])  # g_n
        if reduction == "mean":  # p.grad = mean g_n; var[gbar] = var(g)/B
            results.append((g.mean(0), g.var(0) / batch))
        else:  # p.grad = sum g_n; var = B^2 var[gbar]
            results.append((g.sum(0), g.var(0) * batch))
    return results


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("engine", PER_EXAMPLE_ENGINES)
def test_engine_equals_brute_force(engine, problem, reduction):
    model, x, y = PROBLEMS[problem]()
    loss_fn = loss_for(problem, reduction)
    reason = ENGINES[engine].unsupported_reason(model)
    gv = msvag_mb.GradientVariance(model, loss_fn, engine=engine)
    if reason is not None:
        # an engine that cannot be exact must say so before any backward
        with pytest.raises(UnsupportedModelError, match="engine='"):
            gv.backward(x, y)
        assert all(p.grad is None for p in model.parameters())
        return  # refusing clearly is the correct behaviour for this engine and model
    expected = brute_force(model, loss_fn, x, y, reduction)
    loss = gv.backward(x, y)
    torch.testing.assert_close(loss, loss_fn(model(x), y).detach())
    for (name, p), (grad, variance) in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, grad, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(p.grad_variance, variance, rtol=1e-9, atol=1e-12, msg=name)


def test_auto_supports_every_test_model():
    for problem in sorted(PROBLEMS):
        model, x, y = PROBLEMS[problem]()
        loss_fn = loss_for(problem, "mean")
        gv = msvag_mb.GradientVariance(model, loss_fn, engine="auto")
        if problem == "char_lstm" and "extensions" not in ENGINES:
            with pytest.raises(UnsupportedModelError, match="auto"):
                gv.backward(x, y)
            continue
        expected = brute_force(model, loss_fn, x, y, "mean")
        gv.backward(x, y)
        for p, (grad, variance) in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad_variance, variance, rtol=1e-9, atol=1e-12)


def test_vmap_handles_tied_weights_and_backpack_refuses_them():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.second = nn.Linear(4, 4)
            self.second.weight = self.first.weight

        def forward(self, x):
            return self.second(torch.tanh(self.first(x)))

    torch.manual_seed(0)
    model, x, y = Tied(), torch.randn(5, 4), torch.randn(5, 4)
    loss_fn = nn.MSELoss()
    with pytest.raises(UnsupportedModelError, match="tied weights: 'first.weight' and "
                                                    "'second.weight'.*engine='vmap'"):
        msvag_mb.GradientVariance(model, loss_fn, engine="backpack").backward(x, y)
    expected = brute_force(model, loss_fn, x, y, "mean")
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="vmap")
    gv.backward(x, y)
    for p, (grad, variance) in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad)
        torch.testing.assert_close(p.grad_variance, variance)


def test_backpack_traps_are_refused_before_backward():
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss()
    inplace = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    with pytest.raises(UnsupportedModelError, match=r"layer '1' works in place.*inplace=False"):
        msvag_mb.GradientVariance(inplace, loss_fn, engine="backpack").backward(x, y)

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return x * self.weight

    custom = nn.Sequential(Scale(), nn.Linear(6, 3))
    with pytest.raises(UnsupportedModelError, match=r"layer '0' \(Scale\) is not supported"):
        msvag_mb.GradientVariance(custom, loss_fn, engine="backpack").backward(x, y)
    expected = brute_force(custom, loss_fn, x, y, "mean")
    gv = msvag_mb.GradientVariance(custom, loss_fn, engine="vmap")
    gv.backward(x, y)
    torch.testing.assert_close(custom[0].weight.grad_variance, expected[0][1])

    batchnorm = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    for engine in PER_EXAMPLE_ENGINES + ["auto"]:
        with pytest.raises(UnsupportedModelError, match="train mode.*GhostBatchEngine"):
            msvag_mb.GradientVariance(batchnorm, loss_fn, engine=engine).backward(x, y)
    assert all(p.grad is None for p in batchnorm.parameters())
    batchnorm.eval()
    gv = msvag_mb.GradientVariance(batchnorm, loss_fn, engine="backpack")
    expected = brute_force(batchnorm, loss_fn, x, y, "mean")
    gv.backward(x, y)
    for p, (grad, variance) in zip(batchnorm.parameters(), expected):
        torch.testing.assert_close(p.grad_variance, variance)


def test_lstm_traps():
    model, x, y = PROBLEMS["char_lstm"]()
    with pytest.raises(UnsupportedModelError, match="num_layers=2.*use_converter"):
        msvag_mb.GradientVariance(model, sequence_loss, engine="backpack").backward(x, y)
    # the refusal says what really happens in this torch version: vmap raises (no
    # batching rule for the fused RNN kernels), it does not return wrong numbers
    with pytest.raises(UnsupportedModelError, match="cannot run under torch.func.vmap.*LSTM"):
        msvag_mb.GradientVariance(model, sequence_loss, engine="vmap").backward(x, y)

    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)

        def forward(self, x):
            h0 = torch.ones(1, x.shape[0], 4)
            return self.lstm(x, (h0, h0))[0]

    with pytest.raises(UnsupportedModelError, match="initial state"):
        msvag_mb.GradientVariance(WithState(), nn.MSELoss(), engine="backpack").backward(
            torch.randn(3, 5, 3), torch.randn(3, 5, 4))


def test_batch_of_one_and_bad_loss_are_refused():
    model, x, y = mlp_problem()
    gv = msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="backpack")
    with pytest.raises(ValueError, match="batch of 1 example.*at least 2"):
        gv.backward(x[:1], y[:1])
    with pytest.raises(ValueError, match="reduction='none'.*reduction='mean'"):
        msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="Invalid engine: 'cuda'"):
        msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="cuda")


def test_nan_gradients_are_refused():
    model, x, y = mlp_problem()
    x[2, 0] = float("nan")
    gv = msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="backpack")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        gv.backward(x, y)


def test_switching_engines_on_one_model():
    model, x, y = PROBLEMS["cnn"]()
    loss_fn = nn.CrossEntropyLoss()
    results = {}
    for engine in ["backpack", "vmap", "backpack", "vmap"]:
        gv = msvag_mb.GradientVariance(model, loss_fn, engine=engine)
        gv.zero_grad()
        gv.backward(x, y)
        results.setdefault(engine, []).append([p.grad_variance.clone() for p in model.parameters()])
        for module in model.modules():
            assert not module._forward_hooks and not module._backward_hooks
    for a, b in zip(results["backpack"][1], results["vmap"][1]):
        torch.testing.assert_close(a, b)


def test_vmap_dropout_masks_are_independent_per_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 200, bias=False), nn.Dropout(0.5))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.ones(4, 1)
    y = torch.zeros(4, 200)
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(reduction="sum"), engine="vmap")
    gv.backward(x, y)
    # identical examples: variance is non-zero only because the masks differ
    assert (model[0].weight.grad_variance > 0).float().mean() > 0.5


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("engine", ["backpack", "vmap"])
def test_accumulation_equals_one_call_on_the_concatenation(engine, reduction):
    model, x, y = mlp_problem(batch=9)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    gv = msvag_mb.GradientVariance(model, loss_fn, engine=engine)
    opt.zero_grad()
    gv.backward(x, y)
    whole = [(p.grad.clone(), p.grad_variance.clone()) for p in model.parameters()]
    opt.zero_grad()
    for chunk in [slice(0, 4), slice(4, 5), slice(5, 9)]:  # unequal parts, one of size 1
        gv.backward(x[chunk], y[chunk])
    for p, (grad, variance) in zip(model.parameters(), whole):
        torch.testing.assert_close(p.grad, grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.grad_variance, variance, rtol=1e-9, atol=1e-12)
    opt.step()  # the accumulated statistics are accepted


def test_accumulation_needs_a_known_reduction():
    model, x, y = mlp_problem()
    gv = msvag_mb.GradientVariance(model, lambda out, t: nn.functional.cross_entropy(out, t),
                                   engine="vmap")
    gv.backward(x, y)
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        gv.backward(x, y)
    gv.zero_grad()
    gv.backward(x, y)  # a new cycle is fine


def test_foreign_gradients_are_not_mixed_in():
    model, x, y = mlp_problem()
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y).backward()
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="backpack")
    with pytest.raises(RuntimeError, match="zero_grad"):
        gv.backward(x, y)
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad(set_to_none=False)
    gv.backward(x, y)  # zeros are fine: a new cycle
    expected = brute_force(model, loss_fn, x, y, "mean")
    gv.backward(x, y)  # torch's zero_grad(set_to_none=True) between: new cycle as well
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    gv.backward(x, y)
    for p, (grad, variance) in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad)


def test_ghost_batch_groups_are_the_units():
    """With K groups of equal size the engine equals brute force over group gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    loss_fn = nn.CrossEntropyLoss()
    reference = [p.detach().clone() for p in model.parameters()]
    group_grads = []
    for k in range(4):
        model.zero_grad()
        loss_fn(model(x[3 * k:3 * k + 3]), y[3 * k:3 * k + 3]).backward()
        group_grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    gv = msvag_mb.GradientVariance(model, loss_fn, engine=msvag_mb.GhostBatchEngine(groups=4))
    gv.backward(x, y)
    for i, p in enumerate(model.parameters()):
        g = torch.stack([grads[i] for grads in group_grads])
        torch.testing.assert_close(p.grad, g.mean(0))
        torch.testing.assert_close(p.grad_variance, g.var(0) / 4)
        assert torch.equal(p.detach(), reference[i])
    with pytest.raises(ValueError, match="divisible by 4"):
        gv.zero_grad()
        gv.backward(x[:10], y[:10])


def test_vmap_exact_path_for_losses_that_do_not_split_per_example():
    """ignore_index with mean reduction: the batch loss is no mean of per-example losses."""
    model, x, y = mlp_problem(batch=6)
    y[1] = -100
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    engine = ENGINES["vmap"]()
    assert engine._per_example_losses(model, loss_fn, x, y, list(model.parameters())) is None
    # brute force on contributions: c_n = d/dtheta [loss_n / (number of counted examples)]
    counted = int((y != -100).sum())
    per_example = []
    for n in range(6):
        model.zero_grad()
        if y[n] != -100:
            (nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum")
             / counted).backward()
            per_example.append([p.grad.clone() for p in model.parameters()])
        else:
            per_example.append([torch.zeros_like(p) for p in model.parameters()])
    model.zero_grad()
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="vmap")
    gv.backward(x, y)
    for i, p in enumerate(model.parameters()):
        c = torch.stack([example[i] for example in per_example])
        grad = c.sum(0)
        variance = (6 * (c * c).sum(0) - grad * grad) / 5
        torch.testing.assert_close(p.grad, grad)
        torch.testing.assert_close(p.grad_variance, variance)


def test_finiteness_check_is_exact_when_a_sum_overflows():
    from msvag_mb.param_variance import all_finite as _all_finite

    huge = torch.full((4,), 3e38, dtype=torch.float32)  # finite, but the sum overflows
    assert _all_finite([torch.ones(3), huge])
    assert not _all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not _all_finite([huge, torch.tensor([float("-inf"), 0.0])])
    assert _all_finite([])


# -- declared capabilities ----------------------------------------------------------------

#: the capability names GradientVariance and the runner read, and their types
CAPABILITIES = {
    "units_are_examples": bool, "needs_distributed": bool, "supports_distributed": bool,
    "autocast_in_backward": bool, "min_units": int, "handles_train_mode_batchnorm": bool,
    "reruns_model": bool, "serves_collect": bool,
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engines_declare_their_capabilities(engine):
    cls = ENGINES[engine]
    for name, kind in CAPABILITIES.items():
        assert isinstance(getattr(cls, name), kind), (engine, name)
    assert cls.min_units >= 2
    assert not (cls.needs_distributed and not cls.supports_distributed)
    assert not (cls.needs_distributed and cls.units_are_examples)  # its units are ranks
    if cls.needs_distributed:
        return  # refused on one process whatever the model (test_distributed.py)
    # the BatchNorm declaration agrees with what the engine accepts
    batchnorm = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    refused = cls.unsupported_reason(batchnorm) is not None
    assert refused != cls.handles_train_mode_batchnorm


def test_an_engine_that_does_not_support_distributed_is_refused_with_ddp(tmp_path):
    import torch.distributed as dist

    assert not msvag_mb.GhostBatchEngine.supports_distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        model, x, y = mlp_problem(batch=8)
        ddp = nn.parallel.DistributedDataParallel(model)
        gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(),
                                       engine=msvag_mb.GhostBatchEngine(groups=2))
        with pytest.raises(ValueError, match="runs on one process only.*rank_spread"):
            gv.backward(x, y)
        assert all(p.grad is None for p in model.parameters())
        gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(), engine="vmap")
        expected = brute_force(model, nn.CrossEntropyLoss(), x, y, "mean")
        gv.backward(x, y)  # a per-example engine on a one-rank group: the local batch
        for p, (grad, variance) in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad_variance, variance)
    finally:
        dist.destroy_process_group()


def test_a_failed_call_restores_the_gradients_it_found():
    model, x, y = mlp_problem()
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad(set_to_none=False)  # zeros
    zeros = [p.grad for p in model.parameters()]
    x[0, 0] = float("nan")
    gv = msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="vmap")
    with pytest.raises(FloatingPointError):
        gv.backward(x, y)
    assert all(p.grad is g for p, g in zip(model.parameters(), zeros))
    assert not any(hasattr(p, "grad_variance") for p in model.parameters())


class _CarriedCounter(nn.Module):
    """Carries a state from call to call (the CarriesState protocol) and merges the
    examples with another axis before its Linear: the extensions and BackPACK engines
    refuse it only while running it."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.calls = 0

    def get_state(self):
        return self.calls

    def set_state(self, state):
        self.calls = state

    def forward(self, x):
        self.calls += 1
        pairs = x.unsqueeze(1).expand(-1, 2, -1).reshape(-1, x.shape[1])  # (2B, 3)
        return self.shared(pairs).view(x.shape[0], 2, -1).sum(1)


def test_auto_falls_back_when_an_engine_refuses_while_running():
    torch.manual_seed(3)
    model, x, y = _CarriedCounter(), torch.randn(5, 3), torch.randn(5, 3)
    expected = brute_force(model, nn.MSELoss(), x, y, "mean")
    model.calls = 0
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(), engine="auto")
    assert gv.engine_name == "extensions"  # what it tries first
    gv.backward(x, y)
    assert gv.engine_name == "vmap"  # what computed the statistics
    assert model.calls == 1  # the refused forward passes did not advance the state
    for p, (grad, variance) in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad)
        torch.testing.assert_close(p.grad_variance, variance)
    gv.zero_grad()
    with pytest.raises(UnsupportedModelError, match="no batch axis"):
        msvag_mb.GradientVariance(model, nn.MSELoss(), engine="extensions").backward(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_vmap_leaves_a_module_registered_twice_in_place():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    held = [id(p) for p in model.parameters()]
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    expected = brute_force(model, nn.MSELoss(), x, y, "mean")
    msvag_mb.GradientVariance(model, nn.MSELoss(), engine="vmap").backward(x, y)
    assert [id(p) for p in model.parameters()] == held
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    for p, (grad, variance) in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad)
        torch.testing.assert_close(p.grad_variance, variance)


# -- GradientVariance's own bookkeeping (issue 14) ----------------------------------------

def test_the_variance_is_written_into_the_engines_sum_only_where_that_is_safe():
    from msvag_mb.batch_statistics import single_batch_variance

    grad, units = torch.tensor([1.0, -2.0, 3.0]), 4
    expected = ((units * torch.tensor([2.0, 3.0, 4.0]) - grad * grad) / (units - 1)).clamp(min=0)
    owned = torch.tensor([2.0, 3.0, 4.0])
    variance, witness = single_batch_variance(grad, owned, units, overwrite=True)
    assert variance.data_ptr() == owned.data_ptr()  # no new gradient-sized tensor
    torch.testing.assert_close(variance, expected)
    torch.testing.assert_close(witness, variance.sum().float())  # nothing was clamped
    buffer = torch.tensor([2.0, 3.0, 4.0, 7.0])  # a view of a larger buffer: left alone
    variance, _ = single_batch_variance(grad, buffer[:3], units, overwrite=True)
    torch.testing.assert_close(variance, expected)
    assert buffer.tolist() == [2.0, 3.0, 4.0, 7.0]
    shared = torch.tensor([2.0, 3.0, 4.0])  # the sum is the gradient itself: left alone
    single_batch_variance(shared, shared, units, overwrite=True)
    assert shared.tolist() == [2.0, 3.0, 4.0]
    expanded = torch.tensor([2.0]).expand(3)  # overlapping memory: cannot be written
    variance, _ = single_batch_variance(grad, expanded, units, overwrite=True)
    assert expanded.tolist() == [2.0, 2.0, 2.0] and variance.shape == (3,)


@pytest.mark.parametrize("grad, sum_grad_squared", [
    ([float("nan"), 1.0], [1.0, 1.0]), ([float("inf"), 1.0], [1.0, 1.0]),
    ([1.0, 1.0], [float("inf"), 1.0]), ([1.0, 1.0], [float("nan"), 1.0]),
])
def test_one_sum_per_parameter_sees_every_nan_or_inf(grad, sum_grad_squared):
    from msvag_mb.batch_statistics import single_batch_variance
    from msvag_mb.param_variance import all_finite as _all_finite

    grad = torch.tensor(grad)
    variance, witness = single_batch_variance(grad, torch.tensor(sum_grad_squared), 4)
    assert not bool(torch.isfinite(witness))  # also where the clamp hid -Inf as 0
    assert not _all_finite([grad, variance], [witness])


def _counting_unsupported_reason(monkeypatch):
    """Count the calls of each auto candidate's unsupported_reason."""
    calls = {}
    for cls in msvag_mb.engines.auto_candidates():
        original = cls.unsupported_reason.__func__

        def counted(klass, model, original=original, name=cls.name):
            calls[name] = calls.get(name, 0) + 1
            return original(klass, model)

        monkeypatch.setattr(cls, "unsupported_reason", classmethod(counted))
    return calls


def test_auto_checks_the_model_once_and_its_fallbacks_only_when_needed(monkeypatch):
    model, x, y = mlp_problem()
    gv = msvag_mb.GradientVariance(model, nn.CrossEntropyLoss(), engine="auto")
    calls = _counting_unsupported_reason(monkeypatch)
    gv.backward(x, y)
    assert gv.engine_name == "extensions"
    assert calls == {"extensions": 1}  # not again inside compute; backpack, vmap never
    calls.clear()
    msvag_mb.ENGINES["extensions"]().compute(model, nn.CrossEntropyLoss(), x, y,
                                             list(model.parameters()))
    assert calls == {"extensions": 1}  # called on its own, the engine checks the model


class _OneSequenceForAll(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 3, num_layers=2, batch_first=True)

    def forward(self, x):  # one unbatched sequence for every example: all engines refuse
        return self.lstm(x[0])[0].expand(x.shape[0], -1, -1)


def test_auto_lists_the_fallbacks_it_checked_late_when_all_refuse():
    model, x, y = _OneSequenceForAll(), torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(), engine="auto")
    with pytest.raises(UnsupportedModelError,
                       match=r"(?s)before or while running.*extensions:.*backpack:.*vmap:"):
        gv.backward(x, y)
    assert all(p.grad is None and not hasattr(p, "grad_variance") for p in model.parameters())
