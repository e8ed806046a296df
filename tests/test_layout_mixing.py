"""Operations along the examples' axis: the layout trace refuses them, and the same
operations along another axis stay exact.

``b(tanh(f(a(x))))`` with ``a``, ``b`` Linear and ``f`` an operation between them that the
per-layer engines never see as a layer. Along dim 0 of a batch-first ``(B, F)`` tensor
(``h - h.mean(0)``, ``h.cumsum(0)``, ``h[idx]``, ``ones(B, B) @ h``, ...) ``f`` combines,
reorders or selects the examples: ``b``'s input rows are not the examples one by one, and
``engine="extensions"`` (and ``backpack``, which runs the same trace) must refuse before any
gradient is touched, in ``gv.backward`` and in ``gv.collect()``, with every check and with
the trace alone (the output-level independence check switched off). Along the features, or along the time axis of a ``(B, T, F)`` input with ``T == B``
(where the shape cannot tell the axes apart and only the trace can), the result must equal
brute force in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb.engines import UnsupportedModelError, independence
from msvag_mb.extensions.layout import MIXED, REDUCED, ExampleLayouts
from test_exact_or_refused import B, Case, Trial, run_case, run_case_in_collect

WIDTH = 5

# brute force runs the mixing models on one example alone, where a std over dim 0 has no
# degrees of freedom and a slice of the batch may be empty: expected, and never compared
pytestmark = pytest.mark.filterwarnings("ignore:.*degrees of freedom:UserWarning",
                                        "ignore:Using a target size:UserWarning")


def _index(*values):
    return torch.tensor(values)


def _rows(h, *values):
    """Row indices of h (the first ``len(h)`` of ``values``, so that brute force can run the
    model on one example)."""
    return torch.tensor(values)[:h.shape[0]] % h.shape[0]


def _gather_index(*shape, high):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(3))


_MASK = torch.tensor([[True, False, True, False, True]]).expand(B, WIDTH)

#: f(h) on h of shape (B, WIDTH), acting along the examples' axis
ALONG_EXAMPLES = {
    "minus-mean0": lambda h: h - h.mean(0, keepdim=True),
    "div-norm0": lambda h: h / h.norm(dim=0, keepdim=True),
    "div-vector-norm0": lambda h: h / torch.linalg.vector_norm(h, dim=0),
    "cumsum0": lambda h: h.cumsum(0),
    "cumprod0": lambda h: h.cumprod(0),
    "logcumsumexp0": lambda h: h.logcumsumexp(0),
    "cummax0": lambda h: h.cummax(0).values,
    "roll0-add": lambda h: h.roll(1, 0) + h,
    "roll0": lambda h: h.roll(1, 0),
    "roll-flat": lambda h: h.roll(1),
    "flip0": lambda h: h.flip(0),
    "duplicated-rows": lambda h: h[_rows(h, 0, 0, 2, 3)],
    "permuted-rows": lambda h: h[_rows(h, 3, 1, 0, 2)],
    "bool-rows": lambda h: h[_index(True, True, False, True)[:h.shape[0]]],
    "sort0": lambda h: h.sort(0).values,
    "topk0": lambda h: h.topk(2, 0).values,
    "minus-max0": lambda h: h - h.max(0, keepdim=True).values,
    "minus-min0": lambda h: h - h.min(0).values,
    "minus-amax0": lambda h: h - h.amax(0),
    "minus-amin0": lambda h: h - h.amin(0, keepdim=True),
    "minus-median0": lambda h: h - h.median(0).values,
    "minus-kthvalue0": lambda h: h - h.kthvalue(2, 0).values,
    "minus-mode0": lambda h: h - h.mode(0).values,
    "times-prod0": lambda h: h * h.prod(0),
    "ones-matmul": lambda h: torch.ones(B, B, dtype=h.dtype) @ h,
    "gram-matmul": lambda h: (h @ h.t()) @ h,
    "div-std0": lambda h: h / h.std(0, keepdim=True),
    "div-var0": lambda h: h / h.var(0),
    "std-mean0": lambda h: (h - torch.std_mean(h, 0)[1]) / torch.std_mean(h, 0)[0],
    "minus-logsumexp0": lambda h: h - h.logsumexp(0, keepdim=True),
    "softmax0": lambda h: h.softmax(0),
    "log-softmax0": lambda h: h.log_softmax(0),
    "index-select0": lambda h: h.index_select(0, _rows(h, 0, 0, 2, 3)),
    "gather0": lambda h: h.gather(0, _gather_index(B, WIDTH, high=B)),
    "repeat0": lambda h: h.repeat(2, 1)[2:2 + B],
    "slices-rolled": lambda h: torch.cat([h[1:], h[:1]]),
    "halves-swapped": lambda h: torch.cat(h.split(2)[::-1]),
    "masked-scatter-source": lambda h: torch.zeros_like(h).masked_scatter(_MASK, h),
    "renorm-over-examples": lambda h: h.renorm(2, 1, 0.5),
    "minus-mean-all": lambda h: h - h.mean(),
    "div-norm-all": lambda h: h / h.norm(),
    "times-sum-all": lambda h: h * h.sum(),
    "minus-std-all": lambda h: h - h.std(),
}

#: the same kinds of operation along the features (dim 1 or -1): each example stays apart
ALONG_FEATURES = {
    "minus-mean1": lambda h: h - h.mean(1, keepdim=True),
    "div-norm1": lambda h: h / h.norm(dim=1, keepdim=True),
    "normalize": lambda h: nn.functional.normalize(h, dim=-1),
    "cumsum1": lambda h: h.cumsum(1),
    "cumprod1": lambda h: h.cumprod(-1),
    "logcumsumexp1": lambda h: h.logcumsumexp(1),
    "cummax1": lambda h: h.cummax(1).values,
    "roll1-add": lambda h: h.roll(1, 1) + h,
    "roll0-by-batch": lambda h: h.roll(B, 0),
    "flip1": lambda h: h.flip(-1),
    "duplicated-features": lambda h: h[:, _index(0, 0, 2, 3, 4)],
    "bool-features": lambda h: h[:, _index(True, False, True, True, False)],
    "all-rows-by-arange": lambda h: h[torch.arange(h.shape[0])],
    "sort1": lambda h: h.sort(1, descending=True).values,
    "topk1": lambda h: h.topk(3, 1).values,
    "minus-max1": lambda h: h - h.max(1, keepdim=True).values,
    "minus-amax1": lambda h: h - h.amax(-1, keepdim=True),
    "minus-median1": lambda h: h - h.median(1, keepdim=True).values,
    "minus-kthvalue1": lambda h: h - h.kthvalue(2, 1, keepdim=True).values,
    "times-prod1": lambda h: h * h.prod(1, keepdim=True),
    "matmul-features": lambda h: h @ torch.ones(WIDTH, WIDTH, dtype=h.dtype),
    "div-std1": lambda h: h / h.std(1, keepdim=True),
    "std-mean1": lambda h: (h - torch.std_mean(h, 1, keepdim=True)[1])
    / torch.std_mean(h, 1, keepdim=True)[0],
    "minus-logsumexp1": lambda h: h - h.logsumexp(1, keepdim=True),
    "softmax1": lambda h: h.softmax(-1),
    "log-softmax1": lambda h: h.log_softmax(1),
    "index-select1": lambda h: h.index_select(1, _index(0, 0, 2, 3)),
    "index-select0-arange": lambda h: h.index_select(0, torch.arange(h.shape[0])),
    "repeat1": lambda h: h.repeat(1, 2),
    "repeat-new-dim": lambda h: h.repeat(2, 1, 1).sum(0),
    "slice1": lambda h: h[:, 1:],
    "slice0-whole": lambda h: h[0:B],
    "cat1": lambda h: torch.cat([h, h.flip(1)], 1),
    "split1": lambda h: h.split(2, 1)[1],
    "masked-fill": lambda h: h.masked_fill(_MASK[0], 0.0),
    "masked-scatter-constant": lambda h: h.masked_scatter(_MASK[0], torch.ones_like(h)),
    "renorm-per-example": lambda h: h.renorm(2, 0, 0.5),
}

#: on h of shape (B, T, WIDTH) with T == B, along the time axis (also sequence-first)
T = B
ALONG_TIME = {
    "cumsum-time": lambda h: h.cumsum(1),
    "flip-time": lambda h: h.flip(1),
    "roll-time": lambda h: h.roll(1, 1) - h,
    "softmax-time": lambda h: h.softmax(1),
    "sort-time": lambda h: h.sort(1).values,
    "minus-mean-time": lambda h: h - h.mean(1, keepdim=True),
    "max-time": lambda h: h.max(1).values,
    "duplicated-steps": lambda h: h[:, _index(0, 0, 2, 3)],
    "topk-time": lambda h: h.topk(2, 1).values,
    "logsumexp-time": lambda h: h.logsumexp(1),
    "sequence-first-cumsum": lambda h: h.transpose(0, 1).cumsum(0).transpose(0, 1),
    "sequence-first-steps": lambda h: h.transpose(0, 1)[_index(1, 0, 3, 3)].transpose(0, 1),
    "sequence-first-norm": lambda h: (h.transpose(0, 1) / h.transpose(0, 1).norm(dim=0))
    .transpose(0, 1),
}

#: on (B, T, WIDTH) with T == B, along the examples (directly, or in a sequence-first view)
ALONG_EXAMPLES_3D = {
    "cumsum-examples": lambda h: h.cumsum(0),
    "sequence-first-cumsum-examples": lambda h: h.transpose(0, 1).cumsum(1).transpose(0, 1),
    "sequence-first-minus-mean": lambda h: h - h.transpose(0, 1).mean(1, keepdim=True)
    .transpose(0, 1),
    "softmax-examples": lambda h: h.softmax(0),
    "steps-of-example-0": lambda h: h[0].expand(B, T, WIDTH),
}


#: f(h, index) with a per-example index given as a second model input: (shape, high)
WITH_INDEX = {
    "one-feature-per-example": (lambda h, j: h[torch.arange(h.shape[0]), j].unsqueeze(1),
                                (B,), WIDTH),
    "gather1": (lambda h, index: h.gather(1, index), (B, WIDTH), WIDTH),
    "last-step-per-example": (lambda h, last: h[torch.arange(h.shape[0]), last], (B,), T),
    "gather-time": (lambda h, index: h.gather(1, index), (B, T, WIDTH), T),
}


class Between(nn.Module):
    """``b(tanh(f(a(x), *index)))``."""

    def __init__(self, f, width: int) -> None:
        super().__init__()
        self.f = f
        self.a = nn.Linear(3, WIDTH)
        self.b = nn.Linear(width, 2)

    def forward(self, x, *index):
        return self.b(torch.tanh(self.f(self.a(x), *index)))


def _case(name: str, f, rank: int, index: tuple | None = None) -> Case:
    """A :class:`Case` of ``Between(f)`` on ``(B, 3)`` (rank 2) or ``(B, T, 3)`` inputs,
    and an integer index of ``index = (shape, high)`` where given."""
    steps = (T,) * (rank - 2)

    def inputs(g):
        x = torch.randn(B, *steps, 3, generator=g)
        return (x,) if index is None else (x, torch.randint(0, index[1], index[0],
                                                            generator=g))

    with torch.no_grad():
        h = torch.zeros(B, *steps, WIDTH, dtype=torch.double)
        out = f(h, *inputs(torch.Generator().manual_seed(1))[1:])
    return Case(name, lambda: Between(f, out.shape[-1]), inputs,
                lambda g: torch.randn(*out.shape[:-1], 2, generator=g))


MIXING_CASES = ([_case(n, f, 2) for n, f in ALONG_EXAMPLES.items()]
                + [_case(n, f, 3) for n, f in ALONG_EXAMPLES_3D.items()])
EXACT_CASES = ([_case(n, f, 2) for n, f in ALONG_FEATURES.items()]
               + [_case(n, f, 3) for n, f in ALONG_TIME.items()]
               + [_case(n, f, 2 + (n.endswith("time") or n.startswith("last")), (shape, high))
                  for n, (f, shape, high) in WITH_INDEX.items()])
_ids = {"ids": lambda case: case.name}


# -- the trace itself ----------------------------------------------------------------------
def _traced(case: Case):
    """The trace of ``f(a(x))`` (x needs a gradient: its layout is known from the start)."""
    model = case.build().double()
    x, *index = case.inputs(torch.Generator().manual_seed(1))
    x = x.double().requires_grad_()
    layouts = ExampleLayouts(B, [x, *index])
    return layouts, model.f(model.a(x), *index)


@pytest.mark.parametrize("case", MIXING_CASES, **_ids)
def test_the_trace_finds_the_examples_combined(case):
    layouts, h = _traced(case)
    assert layouts.layout(h) in (MIXED, REDUCED)
    assert layouts.combining_operation(h) is not None


@pytest.mark.parametrize("case", EXACT_CASES, **_ids)
def test_the_trace_follows_the_examples_along_other_axes(case):
    layouts, h = _traced(case)
    traced = layouts.layout(h)
    assert isinstance(traced, tuple) and traced[:2] == (0, 1), traced


# -- refused before any gradient -----------------------------------------------------------
@pytest.fixture(params=["all-checks", "trace-only"])
def checks(request, monkeypatch):
    """With every check, or with the trace alone (the output-level check of the
    examples' independence, msvag_mb.engines.independence, switched off)."""
    if request.param == "trace-only":
        monkeypatch.setattr(independence, "output_mismatch", lambda *args, **kwargs: None)
    return request.param


def _assert_names_the_fix(error: UnsupportedModelError, checks: str) -> None:
    message = str(error)
    assert "mixes" in message and "GhostBatchEngine(groups=K)" in message, message
    if checks == "trace-only":
        assert "layer 'b' (Linear)" in message, message
        assert "along the examples' axis" in message, message


@pytest.mark.parametrize("case", MIXING_CASES, **_ids)
def test_the_refusal_names_the_layer_the_operation_and_the_fix(case):
    layouts, h = _traced(case)
    with pytest.raises(UnsupportedModelError) as error:
        layouts.batch_axis(torch.tanh(h), "b", "Linear", range(h.dim() - 1))
    _assert_names_the_fix(error.value, "trace-only")
    assert "Backward" in str(error.value)  # the operation, by its autograd node


@pytest.mark.parametrize("engine", ["extensions", "backpack"])
@pytest.mark.parametrize("case", MIXING_CASES, **_ids)
def test_refused_in_backward(case, engine, checks):
    trial = Trial.of(case)
    try:
        with pytest.raises(UnsupportedModelError) as error:
            gv = msvag_mb.GradientVariance(trial.model, case.loss(), engine=engine)
            gv.backward(trial.inputs, trial.targets)
    finally:
        trial.remove_hooks()
    trial.refused(error.value)  # before any gradient reached a parameter, model untouched
    _assert_names_the_fix(error.value, checks)


@pytest.mark.parametrize("engine", ["extensions", "backpack"])
@pytest.mark.parametrize("case", MIXING_CASES, **_ids)
def test_refused_in_collect(case, engine, checks):
    trial = Trial.of(case)
    try:
        with pytest.raises(UnsupportedModelError) as error:
            gv = msvag_mb.GradientVariance(trial.model, engine=engine)
            with gv.collect(batch_size=B):
                case.loss()(trial.model(*trial.inputs), trial.targets).backward()
    finally:
        trial.remove_hooks()
    trial.refused(error.value)
    _assert_names_the_fix(error.value, checks)


# -- exact along the other axes ------------------------------------------------------------
@pytest.mark.parametrize("case", EXACT_CASES, **_ids)
def test_exact_in_backward(case):
    assert run_case(case, "extensions") == "exact"


@pytest.mark.parametrize("case", EXACT_CASES, **_ids)
def test_exact_in_collect(case):
    assert run_case_in_collect(case, "extensions") == "exact"
