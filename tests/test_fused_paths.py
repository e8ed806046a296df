"""The compiled step (msvag_mb.fused) against the per-tensor reference path: the gathered
call of small tensors, the direct call of the compiled graph, the default path without
flags, and the fallback where the kernel does not compile. Never timed (the ratios to
torch.optim.Adam are measured side by side in benchmarks/bench_step.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb import fused
from msvag_mb.ops import KERNEL, TENSOR, StepNumber
from msvag_mb.param_variance import set_grad_variance

MEMBERS = [(msvag_mb.MSGD, None), (msvag_mb.MSSD, None)] + [
    (cls, variance) for cls in (msvag_mb.MSVAG, msvag_mb.SVAG, msvag_mb.AdamStar)
    for variance in ("moving_average", "minibatch")]
IDS = [f"{cls.__name__}-{variance}" for cls, variance in MEMBERS]

#: one large tensor (own call), N-D and 1-D small ones (gathered), a zero-size one, and one
#: that never gets a gradient
SHAPES = [(fused.GATHER_BELOW + 3,), (5, 7), (2, 3, 4), (0,), (9,), (1,), (4,)]
NO_GRAD = 6


def make(cls, variance, params, **options):
    own = {} if variance is None else {"variance": variance}
    return cls(params, **own, **options)


def build(shapes=SHAPES, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
            for shape in shapes]


def feed(params, generator, variance_dtype=None):
    """Fresh gradients and within-batch variances (none for the parameter NO_GRAD)."""
    for i, param in enumerate(params):
        if i == NO_GRAD:
            continue
        param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        dtype = variance_dtype or param.dtype
        set_grad_variance(param, torch.rand(param.shape, generator=generator, dtype=dtype))


def run(cls, variance, options, steps=5, groups=None, dtype=torch.float64,
        variance_dtype=None, shapes=SHAPES):
    """Train ``steps`` steps on fixed random data; return the parameters and optimizer."""
    params = build(shapes, dtype)
    spec = params if groups is None else groups(params)
    optimizer = make(cls, variance, spec, lr=0.05, weight_decay=0.01, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        feed(params, generator, variance_dtype)
        optimizer.step()
    return params, optimizer


def assert_same_run(a, b, rtol, atol):
    (params_a, opt_a), (params_b, opt_b) = a, b
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=rtol, atol=atol)
        assert (pa in opt_a.state) == (pb in opt_b.state)
        if pa in opt_a.state:
            state_a, state_b = opt_a.state[pa], opt_b.state[pb]
            assert state_a.keys() == state_b.keys()
            for key, value in state_a.items():
                if isinstance(value, torch.Tensor):
                    assert value.shape == pa.shape and state_b[key].dtype == value.dtype
                    torch.testing.assert_close(value, state_b[key], rtol=rtol, atol=atol)
                else:
                    assert value == state_b[key]


@pytest.mark.parametrize("cls,variance", MEMBERS, ids=IDS)
def test_compiled_step_equals_the_reference_path_on_mixed_shapes(cls, variance):
    """Large and small, N-D and 1-D, zero-size and gradient-less parameters, two groups."""
    def groups(params):
        return [{"params": params[:3]}, {"params": params[3:], "lr": 0.2, "weight_decay": 0.0}]

    reference = run(cls, variance, dict(foreach=False), groups=groups)
    compiled = run(cls, variance, dict(fused=True), groups=groups)
    assert_same_run(reference, compiled, rtol=1e-12, atol=1e-14)
    params, optimizer = compiled
    assert params[NO_GRAD] not in optimizer.state  # never had a gradient: no state
    assert optimizer.state[params[3]]["step"] == 5  # the zero-size one steps all the same


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cls,variance", MEMBERS[2:4], ids=IDS[2:4])
def test_compiled_step_in_low_precision_follows_the_reference(cls, variance, dtype, tolerance):
    """The kernel computes in float32 and rounds once; the eager ops round after each op."""
    reference = run(cls, variance, dict(foreach=False), dtype=dtype)
    compiled = run(cls, variance, dict(fused=True), dtype=dtype)
    assert_same_run(reference, compiled, rtol=tolerance, atol=tolerance)


def test_dtypes_in_one_group_and_a_float32_variance_of_bfloat16_parameters():
    """Each (dtype, variance dtype) pair is its own bucket and kernel."""
    def groups(params):
        params[1].data = params[1].data.float()
        params[2].data = params[2].data.bfloat16()
        return params

    for variance_dtype in (None, torch.float32):
        reference = run(msvag_mb.MSVAG, "minibatch", dict(foreach=False), groups=groups,
                        variance_dtype=variance_dtype)
        compiled = run(msvag_mb.MSVAG, "minibatch", dict(fused=True), groups=groups,
                       variance_dtype=variance_dtype)
        assert_same_run(reference, compiled, rtol=2e-2, atol=2e-2)
        for param, other in zip(*(run_[0] for run_ in (reference, compiled))):
            assert param.dtype == other.dtype


def test_gathered_and_own_calls_give_the_same_bits(monkeypatch):
    """Whether a tensor is gathered with others or gets its own call changes nothing."""
    shapes = [(300,), (17, 5), (64,), (3, 3, 3)]
    runs = []
    for gather_below in (1 << 30, 2):  # everything gathered; every tensor its own call
        monkeypatch.setattr(fused, "GATHER_BELOW", gather_below)
        runs.append(run(msvag_mb.MSVAG, "moving_average", dict(fused=True), shapes=shapes,
                        dtype=torch.float32))
    assert_same_run(*runs, rtol=0, atol=0)


def test_non_contiguous_parameters_are_gathered():
    def groups(params):
        generator = torch.Generator().manual_seed(4)
        params[0].data = torch.randn(fused.GATHER_BELOW + 5, 2, dtype=torch.float64,
                                     generator=generator).t()
        assert not params[0].is_contiguous()
        return params

    shapes = [(2, fused.GATHER_BELOW + 5), (4,)]
    reference = run(msvag_mb.AdamStar, "minibatch", dict(foreach=False), groups=groups,
                    shapes=shapes)
    compiled = run(msvag_mb.AdamStar, "minibatch", dict(fused=True), groups=groups,
                   shapes=shapes)
    assert_same_run(reference, compiled, rtol=1e-12, atol=1e-14)


def count_calls(monkeypatch):
    calls = []
    call = fused._Kernel.__call__

    def counted(self, row, scalars, estimator):
        calls.append(row[0].numel())
        return call(self, row, scalars, estimator)

    monkeypatch.setattr(fused._Kernel, "__call__", counted)
    return calls


def test_two_hundred_small_tensors_take_one_call(monkeypatch):
    shapes = [(768,), (2304,), (3072,), (768,)] * 50
    params = build(shapes, torch.float32)
    optimizer = msvag_mb.MSVAG(params, lr=0.1, variance="minibatch", fused=True)
    feed(params, torch.Generator().manual_seed(0))
    optimizer.step()
    calls = count_calls(monkeypatch)
    optimizer.step()
    assert calls == [sum(p.numel() for p in params if p.grad is not None)]


def test_without_flags_the_step_is_compiled_on_cpu(monkeypatch):
    calls = count_calls(monkeypatch)
    default = run(msvag_mb.MSVAG, "moving_average", {})
    assert calls, "the default path did not call the compiled kernel"
    calls.clear()
    for eager in (dict(fused=False), dict(foreach=False), dict(foreach=True)):
        run(msvag_mb.MSVAG, "moving_average", eager, steps=1)
    assert not calls
    assert_same_run(run(msvag_mb.MSVAG, "moving_average", dict(foreach=False)), default,
                    rtol=1e-12, atol=1e-14)


def test_torch_compile_disable_keeps_the_default_eager(monkeypatch):
    calls = count_calls(monkeypatch)
    with torch._dynamo.config.patch(disable=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's own choice: no warning
        run(msvag_mb.MSGD, None, {}, steps=2)
    assert not calls


@pytest.fixture
def fresh_kernels(monkeypatch):
    """Empty kernel caches, restored after the test (the failures stay in the test)."""
    monkeypatch.setattr(fused, "_KERNELS", {})
    monkeypatch.setattr(fused, "_FAILED", {})
    monkeypatch.setattr(fused, "_BROKEN_DEVICES", set())


@pytest.mark.parametrize("fused_option", [None, True])
def test_a_kernel_that_does_not_compile_falls_back_with_one_warning(
        monkeypatch, fresh_kernels, fused_option):
    def broken(self, row, scalars, estimator):
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(fused._Kernel, "first_call", broken)
    options = {} if fused_option is None else dict(fused=True)
    with pytest.warns(RuntimeWarning, match="did not compile.*simulated") as caught:
        fallback = run(msvag_mb.SVAG, "minibatch", options)
    assert len([w for w in caught if "did not compile" in str(w.message)]) == 1
    assert_same_run(run(msvag_mb.SVAG, "minibatch", dict(foreach=False)), fallback,
                    rtol=1e-12, atol=1e-14)
    device = torch.device("cpu")
    assert fused.use_fused(None, None, None, device) is False  # the default stays eager
    assert fused.use_fused(True, None, None, device) is True


def test_without_a_cxx_compiler_the_step_falls_back(monkeypatch, fresh_kernels):
    """A real failure: Inductor cannot find its C++ compiler (caches off, so it must)."""
    from torch._inductor import config as inductor_config

    broken = {"cpp.cxx": (None, "/nonexistent/g++"), "force_disable_caches": True}
    with inductor_config.patch(broken), pytest.warns(RuntimeWarning, match="did not compile"):
        fallback = run(msvag_mb.MSSD, None, {}, steps=3)
    assert_same_run(run(msvag_mb.MSSD, None, dict(foreach=False), steps=3), fallback,
                    rtol=0, atol=0)


class AttributeVariance(msvag_mb.VarianceEstimator):
    """Against the convention, a number of the instance read inside the formulas."""

    name = "attribute"
    requires_batch_variance = True

    def __init__(self, scale):
        self.scale = scale

    def init_state(self, param):
        return {}

    def variance(self, ops, state, moments, batch_variance, coefficients, target):
        return ops.mul(batch_variance, self.scale)


def test_direct_calls_follow_a_changed_instance_attribute():
    """The direct call of the graph is only taken while Dynamo's guards would pass."""
    results = []
    for options in (dict(foreach=False), dict(fused=True)):
        params = build([(6,), (fused.GATHER_BELOW,)])
        estimator = AttributeVariance(0.5)
        optimizer = msvag_mb.MSVAG(params, lr=0.1, variance=estimator, **options)
        generator = torch.Generator().manual_seed(3)
        for step in range(6):
            if step == 3:
                estimator.scale = 4.0
            feed(params, generator)
            optimizer.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_many_optimizers_share_one_graph():
    for _ in range(12):  # more than Dynamo's recompile limit (8)
        run(msvag_mb.MSVAG, "minibatch", dict(fused=True), steps=2)
    graphs = [len(kernel.graphs) for (config, _), kernel in fused._KERNELS.items()
              if kernel is not None and config.estimator_type is msvag_mb.MiniBatchVariance
              and config.dtypes == (torch.float64, torch.float64)
              and config.direction is msvag_mb.MSVAG.direction]
    assert graphs and all(count == 1 for count in graphs)


def test_the_kernel_divides_by_a_step_number_through_its_reciprocal():
    x = torch.tensor([3.0, -6.0], dtype=torch.float64)
    number = StepNumber(torch.tensor(1.5, dtype=torch.float64),
                        torch.tensor(1 / 1.5, dtype=torch.float64))
    torch.testing.assert_close(KERNEL.div(x, number), x * (1 / 1.5), rtol=0, atol=0)
    torch.testing.assert_close(KERNEL.div(x, x), TENSOR.div(x, x))
    torch.testing.assert_close(KERNEL.add(x, x, number), x + 1.5 * x)
    torch.testing.assert_close(1.0 - number, torch.tensor(-0.5, dtype=torch.float64))
