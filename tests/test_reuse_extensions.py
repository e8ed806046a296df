"""Parameters used several times in one forward pass, in the ``extensions`` engine (issue 13).

A layer called several times, a block applied three times, tied input and output
embeddings (module tying and ``F.linear(h, emb.weight)``), bare ``nn.Parameter``s in
``forward`` (positions, scales, divisors), a parameter used inside its layer and
functionally: the per-example contributions of all uses are added before squaring, and
the ``extensions`` engine must be EXACT (not refused) on each, against brute force in
float64 (:func:`test_exact_or_refused.run_case`). Also: the transformer problem's model,
``check_uses`` on nested outputs, the refusals that remain (before the backward pass),
and the single-use fast path left as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from msvag_mb.engines import UnsupportedModelError
from msvag_mb.engines.extensions_engine import ExtensionsEngine
from msvag_mb.extensions import EXTENSIONS, SumGradSquaredHooks, unsupported_layer
from msvag_mb.extensions.linear import LinearExtension
from msvag_mb.problems import get_problem
from msvag_mb.problems.transformer import CharTransformer

from test_exact_or_refused import (
    B,
    Case,
    Lambda,
    SequenceCE,
    _assert_unchanged,
    _snapshot,
    linear_cases,
    reuse_linear_cases,
    reuse_trap_cases,
    run_case,
)

EXISTING = ("linear-called-twice", "embedding-tied-module", "embedding-tied-functional",
            "bare-parameter", "parameter-used-in-forward", "module-registered-twice")


def _existing_cases() -> list[Case]:
    from test_exact_or_refused import CASES
    return [case for case in CASES if case.name in EXISTING]


@pytest.mark.parametrize("case", reuse_linear_cases() + reuse_trap_cases() + _existing_cases(),
                         ids=lambda case: case.name)
def test_reused_parameters_are_exact(case):
    assert run_case(case, "extensions") == "exact"


def test_positions_broadcast_along_the_examples_are_refused():
    """``(T, B, d) + pos`` with ``pos`` ``(T, d)`` and T == B: the positions line up with
    the examples' axis, where they would be indexed by example; refused, not guessed."""
    model = Lambda(
        lambda s, x: s.out(torch.tanh(s.first(x.transpose(0, 1)) + s.pos)).transpose(0, 1),
        first=nn.Linear(4, 4), out=nn.Linear(4, 2))
    model.pos = nn.Parameter(torch.randn(B, 4))
    _refused_before_backward(model, torch.randn(B, B, 4), torch.randn(B, B, 2),
                             match=r"'pos'.*varies along the examples' axis 1|"
                                   r"broadcasts a tensor along the examples' axis")


def _transformer(**kwargs) -> CharTransformer:
    torch.manual_seed(0)
    return CharTransformer(vocab_size=7, width=8, layers=2, heads=2, context=6, **kwargs)


@pytest.mark.parametrize("steps", [5, B])  # T == B: positions must not pass for examples
def test_char_transformer_is_exact(steps):
    """The transformer problem's model: tied head (``F.linear`` on the embedding's
    weight), a bare positional Parameter added to the token embeddings, LayerNorms,
    attention through the blocks' Linears."""
    if nn.LayerNorm not in EXTENSIONS:
        pytest.skip("nn.LayerNorm has no extension yet (another helper adds it)")
    case = Case(f"transformer-T{steps}", _transformer,
                lambda g: (torch.randint(0, 7, (B, steps), generator=g),),
                lambda g: torch.randint(0, 7, (B, steps), generator=g), loss=SequenceCE)
    assert run_case(case, "extensions") == "exact"


def test_char_transformer_problem_loss_and_auto():
    """With the problem's own loss, ``auto`` now picks the fast engine."""
    if nn.LayerNorm not in EXTENSIONS:
        pytest.skip("nn.LayerNorm has no extension yet (another helper adds it)")
    import msvag_mb

    model = _transformer().double()
    assert unsupported_layer(model) is None
    x, y = torch.randint(7, (B, 5)), torch.randint(7, (B, 5))
    gv = msvag_mb.GradientVariance(model, get_problem("tolstoi_char_transformer").loss_fn(),
                                   engine="auto")
    gv.backward(x, y)
    assert gv.engine_name == "extensions"
    assert all(p.grad_variance is not None for p in model.parameters())


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = self.lin(x)
        return {"first": self.lin(torch.tanh(h)) * self.scale, "hidden": [h]}


def test_check_uses_accepts_nested_outputs_and_repeated_calls():
    """``check_uses`` on the model's outputs (a dict with a list), then again on the
    loss: the second call adds only what it has not seen; the result is exact."""
    torch.manual_seed(4)
    model = _TwoOutputs().double()
    x, y = torch.randn(B, 4, dtype=torch.double), torch.randn(B, 4, dtype=torch.double)
    params = list(model.parameters())
    with SumGradSquaredHooks(model, params, B, inputs=(x,)) as hooks:
        out = model(x)
        hooks.check_uses(out)
        loss = F.mse_loss(out["first"], y)
        hooks.check_uses(loss)
        grads = torch.autograd.grad(loss, params)
    per_example = [torch.autograd.grad(F.mse_loss(model(x[n:n + 1])["first"], y[n:n + 1]),
                                       params) for n in range(B)]
    for i, param in enumerate(params):
        expected = torch.stack([g[i] / B for g in per_example]).square().sum(0)
        torch.testing.assert_close(hooks.sum_grad_squared[param], expected)
        torch.testing.assert_close(grads[i], sum(g[i] for g in per_example) / B)


def _refused_before_backward(model, x, y, loss_fn=None, match=""):
    loss_fn = loss_fn or nn.MSELoss()
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match=match):
        ExtensionsEngine().compute(model, loss_fn, x, y, list(model.parameters()))
    _assert_unchanged(model, before)


def test_a_term_without_examples_is_refused():
    """A penalty computed from parameters only and returned with the output."""
    model = Lambda(lambda s, x: (s.lin(x), s.lin.weight.square().sum()), lin=nn.Linear(4, 2))

    def loss_fn(output, target):
        return F.mse_loss(output[0], target) + output[1]

    loss_fn.reduction = "mean"
    _refused_before_backward(model, torch.randn(B, 4), torch.randn(B, 2), loss_fn,
                             match=r"parameter 'lin.weight' is used in a term computed from "
                                   r"parameters only")


@pytest.mark.parametrize("forward, match", [
    (lambda s, x: s.out(torch.maximum(s.lin(x), s.floor)), r"'floor'.*\(Maximum\)"),
    (lambda s, x: s.out(F.layer_norm(s.lin(x), (4,), weight=s.floor)),
     r"'floor'.*\(NativeLayerNorm\)"),
])
def test_unsupported_functional_uses_are_refused_naming_the_parameter(forward, match):
    model = Lambda(forward, lin=nn.Linear(4, 4), out=nn.Linear(4, 2))
    model.floor = nn.Parameter(torch.zeros(4))
    _refused_before_backward(model, torch.randn(B, 4), torch.randn(B, 2),
                             match=match + r".*engine='vmap'")


def test_single_use_parameters_keep_the_fast_path(monkeypatch):
    """Layers called once never form per-example contributions."""
    def forbidden(*args, **kwargs):
        raise AssertionError("per-example contributions formed for a single use")

    monkeypatch.setattr(LinearExtension, "per_example_contributions", forbidden)
    case = next(c for c in linear_cases() if c.name == "linear-tokens-T4")
    assert run_case(case, "extensions") == "exact"
