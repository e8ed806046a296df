"""The generic per-example fallback with parameters used several times (issue 13).

A module without an extension of its own (``nn.PReLU``, ``nn.Bilinear``, a user's module)
called twice in one forward pass, registered twice, applied as a block three times, its
parameter tied to an ``nn.Linear``'s weight, or also used outside it (``h *
module.gate``): each call keeps its own re-run and hands over its per-example
contributions (:class:`~msvag_mb.extensions.reuse.DenseUse`), added to those of the other
uses before squaring. The ``extensions`` engine must be EXACT on each (not refused),
against brute force in float64 (one ``torch.autograd.grad`` per example,
:func:`test_exact_or_refused.run_case`), ``engine="auto"`` must pick it, and the model
must be left without hooks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import msvag_mb
from msvag_mb.extensions import extension_for, generic
from msvag_mb.extensions.core import FALLBACK_EXTENSION
from msvag_mb.extensions.reuse import DenseUse

from test_exact_or_refused import (
    B,
    Case,
    Lambda,
    _Gated,
    _hooks,
    _randn,
    _targets,
    _TwoOutputs,
    run_case,
)


class _TiedToLinear(nn.Module):
    """A custom module whose ``weight`` is meant to be tied to an ``nn.Linear``'s (``out,
    in``); ``transposed``: it maps back, ``h @ W`` (a tied decoder)."""

    def __init__(self, transposed: bool = False):
        super().__init__()
        self.transposed = transposed
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.gain = nn.Parameter(1.0 + 0.3 * torch.randn(4))

    def forward(self, h):
        z = h @ self.weight if self.transposed else F.linear(h, self.weight)
        return torch.tanh(z) * self.gain


def _tied(transposed: bool) -> nn.Module:
    model = Lambda(lambda s, x: s.out(s.custom(torch.tanh(s.lin(x)))),
                   lin=nn.Linear(4, 4), custom=_TiedToLinear(transposed), out=nn.Linear(4, 2))
    model.custom.weight = model.lin.weight
    return model


def _prelu_cases() -> list[Case]:
    """``nn.PReLU(3)`` (one slope per channel, dim 1) called twice, on ``(B, 3)`` and on
    ``(B, 3, T)`` with T == B (the examples' axis is traced, not guessed)."""
    def build(length: int | None):
        def make():
            features = 3 * (length or 1)
            return Lambda(
                lambda s, x: s.out(s.act(s.mid(s.act(x).flatten(1)).view(x.shape)).flatten(1)),
                act=nn.PReLU(3), mid=nn.Linear(features, features), out=nn.Linear(features, 2))
        return make

    return [Case("generic-reuse-prelu-twice", build(None), _randn(B, 3), _targets(B, 2)),
            Case("generic-reuse-prelu-twice-TB", build(B), _randn(B, 3, B), _targets(B, 2))]


def _custom_cases() -> list[Case]:
    """A custom module with weights and a nonlinearity, called on different inputs."""
    cases = []
    for t in (3, B):
        cases += [
            Case(f"generic-reuse-custom-twice-T{t}", lambda: Lambda(
                lambda s, x: s.out(s.g(x) + s.g(torch.tanh(s.pre(x)))),
                pre=nn.Linear(4, 4), g=_Gated(4, 3), out=nn.Linear(3, 2)),
                _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"generic-reuse-custom-sequence-first-T{t}", lambda: Lambda(
                lambda s, x: s.out(s.g(s.g(x.transpose(0, 1)) + 0.5)).transpose(0, 1),
                g=_Gated(4, 4), out=nn.Linear(4, 2)), _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"generic-reuse-both-layouts-T{t}", lambda: Lambda(  # examples on 0, then 1
                lambda s, x: s.out(s.g(x) + s.g(torch.tanh(s.pre(x)).transpose(0, 1))
                                   .transpose(0, 1)),
                pre=nn.Linear(4, 4), g=_Gated(4, 3), out=nn.Linear(3, 2)),
                _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"generic-reuse-block-three-times-T{t}", lambda: Lambda(
                lambda s, x: s.out(s.g(s.g(s.g(x)))), g=_Gated(4, 4), out=nn.Linear(4, 2)),
                _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"generic-reuse-two-outputs-twice-T{t}", lambda: Lambda(
                lambda s, x: (lambda a, b: s.out(a["first"] * b["second"] + a["second"]))(
                    s.g(x), s.g(torch.tanh(s.pre(x)))),
                pre=nn.Linear(4, 4), g=_TwoOutputs(), out=nn.Linear(3, 2)),
                _randn(B, t, 4), _targets(B, t, 2)),
        ]
    return cases


def _bilinear_cases() -> list[Case]:
    return [
        Case("generic-reuse-bilinear-twice", lambda: Lambda(
            lambda s, x: (lambda h: s.out(s.bil(torch.tanh(s.bil(h, torch.tanh(h))), h)))(
                s.pre(x)),
            pre=nn.Linear(3, 4), bil=nn.Bilinear(4, 4, 4), out=nn.Linear(4, 2)),
            _randn(B, 3), _targets(B, 2)),
        Case("generic-reuse-bilinear-twice-T3", lambda: Lambda(
            lambda s, x: (lambda h: s.out(s.bil(h, s.bil(h, h))))(torch.tanh(s.pre(x))),
            pre=nn.Linear(3, 4), bil=nn.Bilinear(4, 4, 4), out=nn.Linear(4, 2)),
            _randn(B, 3, 3), _targets(B, 3, 2)),
    ]


def _tied_and_functional_cases() -> list[Case]:
    registered_twice = lambda: (lambda act: nn.Sequential(  # noqa: E731
        nn.Linear(4, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 2)))(nn.PReLU(4))
    return [
        Case("generic-reuse-tied-to-linear", lambda: _tied(False), _randn(B, 4),
             _targets(B, 2)),
        Case("generic-reuse-tied-to-linear-transposed", lambda: _tied(True), _randn(B, 3, 4),
             _targets(B, 3, 2)),
        Case("generic-reuse-also-functional", lambda: Lambda(  # the gate also used outside
            lambda s, x: s.out(s.g(x) * s.g.gate), g=_Gated(4, 3), out=nn.Linear(3, 2)),
            _randn(B, 4), _targets(B, 2)),
        Case("generic-reuse-twice-and-functional", lambda: Lambda(
            lambda s, x: s.out(s.g(torch.tanh(s.g(x) + s.g.gate)) / (2.0 + s.g.gate.exp())),
            g=_Gated(4, 4), out=nn.Linear(4, 2)), _randn(B, 3, 4), _targets(B, 3, 2)),
        Case("generic-reuse-registered-twice", registered_twice, _randn(B, 4), _targets(B, 2)),
        Case("generic-reuse-twice-sum-loss", lambda: Lambda(
            lambda s, x: s.g(torch.tanh(s.g(x))), g=_Gated(4, 4)),
            _randn(B, 4), _targets(B, 4), loss=lambda: nn.MSELoss(reduction="sum")),
    ]


CASES = _prelu_cases() + _custom_cases() + _bilinear_cases() + _tied_and_functional_cases()


def test_the_cases_use_the_fallback():
    for case in CASES:
        model = case.build()
        assert any(extension_for(m) is FALLBACK_EXTENSION[0] for m in model.modules()), \
            case.name


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_extensions_is_exact(case):
    assert run_case(case, "extensions") == "exact"


@pytest.mark.parametrize("case", CASES[::3], ids=lambda case: case.name)
def test_auto_picks_extensions_and_leaves_no_hooks(case):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = case.build().double()
    inputs = tuple(v.double() for v in case.inputs(generator))
    targets = case.targets(generator).double()
    hooks = _hooks(model)
    gv = msvag_mb.GradientVariance(model, case.loss(), engine="auto")
    gv.backward(inputs, targets)
    assert gv.engine_name == "extensions"
    assert all(p.grad_variance is not None for p in model.parameters())
    assert _hooks(model) == hooks


@pytest.mark.parametrize("name", ["generic-reuse-custom-twice-T3",
                                  "generic-reuse-tied-to-linear-transposed",
                                  "generic-reuse-two-outputs-twice-T4"])
def test_chunked_reruns_are_exact(monkeypatch, name):
    """Several chunks of examples per call: each call's contributions are the chunks'
    concatenated in example order."""
    monkeypatch.setattr(generic, "MEMORY_BUDGET_ELEMENTS", 20)  # one example per chunk
    assert run_case(next(c for c in CASES if c.name == name), "extensions") == "exact"


def test_reused_parameters_are_handed_over_as_contributions(monkeypatch):
    """Parameters used twice go to the accumulator as ``(B, *shape)`` contributions, one
    per call; none is emitted squared by the call itself."""
    handed: list[tuple[str, tuple]] = []
    original = generic.DenseUse

    def recording(values):
        handed.append(tuple(values.shape))
        return original(values)

    monkeypatch.setattr(generic, "DenseUse", recording)
    case = next(c for c in CASES if c.name == "generic-reuse-custom-twice-T3")
    assert run_case(case, "extensions") == "exact"
    assert sorted(handed) == sorted([(B, 4, 3), (B, 4, 3), (B, 3), (B, 3)])
    assert original is DenseUse


def test_single_use_keeps_squaring_per_chunk(monkeypatch):
    """A module called once hands over nothing (its statistics are squared chunk by chunk,
    without the B copies of its parameters)."""
    monkeypatch.setattr(generic, "DenseUse", lambda values: pytest.fail("handed over"))
    case = Case("generic-once", lambda: nn.Sequential(nn.Linear(4, 4), _Gated(4, 3),
                                                      nn.Linear(3, 2)),
                _randn(B, 4), _targets(B, 2))
    assert run_case(case, "extensions") == "exact"


def test_a_second_call_that_cannot_be_rerun_is_refused_before_backward():
    """The first call is fine, the second merges the examples with the time steps: refused
    during the forward pass, with the model left as it was (``auto`` goes to ``vmap``)."""
    case = Case("generic-reuse-second-call-merged", lambda: Lambda(
        lambda s, x: s.out(s.g(s.g(x).flatten(0, 1)).view(x.shape[0], -1, 4)),
        g=_Gated(4, 4), out=nn.Linear(4, 2)), _randn(B, 3, 4), _targets(B, 3, 2))
    assert run_case(case, "extensions") == "refused"
    assert run_case(case, "auto") == "exact"
