"""The generic per-example fallback, subclasses of registered layers, and attention.

``tests/test_exact_or_refused.py`` accepts *exact or refused*; here the ``extensions``
engine must be exact (not refused) on the cases it supports, and ``engine="auto"`` must
pick it for them. Dropout inside attention in train mode is checked against per-example
gradients of the same forward pass (the same masks).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb.engines import UnsupportedModelError
from msvag_mb.extensions import EXTENSIONS, ExampleLayouts, LayerContext, ParameterUses
from msvag_mb.extensions import extension_for, generic
from msvag_mb.extensions.attention import attention_forward
from msvag_mb.extensions.core import FALLBACK_EXTENSION

import test_exact_or_refused as cases
from test_exact_or_refused import B, CASES, run_case

#: cases that must be refused by the extensions engine (no exact per-example statistics
#: from the module alone)
REFUSED = {"generic-buffer-in-place", "generic-data-dependent-branch"}
SUPPORTED = [case for case in CASES
             if case.name.startswith(("mha-", "encoder-", "decoder-", "generic-",
                                      "linear-subclass"))
             and case.name not in REFUSED]


def test_the_supported_cases_are_found():
    assert len(SUPPORTED) > 100


@pytest.mark.parametrize("case", SUPPORTED, ids=lambda case: case.name)
def test_extensions_is_exact(case):
    assert run_case(case, "extensions") == "exact"


@pytest.mark.parametrize("case", [c for c in CASES if c.name in REFUSED],
                         ids=lambda case: case.name)
def test_extensions_refuses(case):
    assert run_case(case, "extensions") == "refused"


@pytest.mark.parametrize("case", SUPPORTED[::7], ids=lambda case: case.name)
def test_auto_picks_extensions(case):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = case.build().double()
    inputs = tuple(v.double() if v.is_floating_point() else v for v in case.inputs(generator))
    targets = case.targets(generator).double()
    gv = msvag_mb.GradientVariance(model, case.loss(), engine="auto")
    assert gv.engine_name == "extensions"
    gv.backward(inputs, targets)
    assert gv.engine_name == "extensions"


# -- which extension a module gets ------------------------------------------------------
class _OverridingLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x).tanh()


class _ReprLinear(nn.Linear):
    def extra_repr(self) -> str:
        return "custom"


def test_subclasses_use_their_base_extension_unless_they_change_the_forward():
    linear = EXTENSIONS[nn.Linear]
    assert extension_for(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)) is linear
    assert extension_for(_ReprLinear(2, 2)) is linear
    assert extension_for(_OverridingLinear(2, 2)) is FALLBACK_EXTENSION[0]
    assert extension_for(cases._ScaledConv(1, 1, 3)) is FALLBACK_EXTENSION[0]
    assert extension_for(nn.PReLU()) is FALLBACK_EXTENSION[0]
    assert extension_for(nn.ReLU()) is None  # no parameters: nothing to report


def test_the_fallback_refuses_modules_with_hooks_of_their_own():
    module = nn.PReLU()
    module.register_forward_pre_hook(lambda m, args: None)
    reason = FALLBACK_EXTENSION[0].unsupported_reason(module)
    assert reason is not None and "hooks" in reason


# -- the fallback's refusals name the module and the fix ----------------------------------
class _Centred(nn.Module):
    """Mixes the examples (subtracts half the batch mean)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        h = x @ self.weight
        return h - 0.5 * h.mean(0, keepdim=True)


_MIXES = "not independent"  # the engines' output check, before any layer's own


@pytest.mark.parametrize("module, words", [
    (lambda: cases._Noisy(), "random numbers"),
    (lambda: _Centred(), _MIXES),
    (lambda: cases._Branchy(), f"vmap|{_MIXES}"),  # its branch depends on the whole batch
    (lambda: cases._Stateful(), "buffers"),
], ids=["dropout", "mixes-examples", "branch", "buffer"])
def test_the_fallback_refuses_before_the_backward_pass(module, words):
    model = nn.Sequential(nn.Linear(4, 4), module()).double().train()
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(), engine="extensions")
    x, y = torch.randn(B, 4, dtype=torch.double), torch.randn(B, 2, dtype=torch.double)
    with pytest.raises(UnsupportedModelError, match=words) as error:
        gv.backward(x, y)
    if _MIXES not in str(error.value):  # the fallback's own refusal names the layer
        assert "'1'" in str(error.value) and "engine='vmap'" in str(error.value)
    assert all(p.grad is None for p in model.parameters())


def test_the_fallback_chunks_the_examples(monkeypatch):
    monkeypatch.setattr(generic, "MEMORY_BUDGET_ELEMENTS", 20)  # 15 elements per example
    case = next(c for c in CASES if c.name == "generic-custom-T3")
    assert run_case(case, "extensions") == "exact"


# -- dropout inside attention, in train mode -----------------------------------------------
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_dropout_in_train_mode_is_exact_for_the_masks_drawn(need_weights,
                                                                      batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(4, 2, dropout=0.4, batch_first=batch_first,
                                      add_bias_kv=True).double().train()
    x = torch.randn(B, 5, 4, dtype=torch.double, requires_grad=True)
    inputs = x if batch_first else x.transpose(0, 1)
    params = dict(attention.named_parameters())
    emitted: dict[str, torch.Tensor] = {}
    context = LayerContext(
        name="attention", batch_size=B, requested=frozenset(params),
        emit=lambda name, value: emitted.setdefault(name, value),
        layouts=ExampleLayouts(B, (x,)), uses=ParameterUses({}))
    output, _ = attention_forward(attention, context, inputs, inputs, inputs,
                                  need_weights=need_weights)
    output = output if batch_first else output.transpose(0, 1)
    losses = (output.tanh() ** 2).mean(dim=(1, 2))  # one per example
    torch.autograd.grad(losses.mean(), list(params.values()), retain_graph=True)
    assert set(emitted) == set(params)
    per_example = [torch.autograd.grad(losses[n] / B, list(params.values()),
                                       retain_graph=True) for n in range(B)]
    for i, name in enumerate(params):
        expected = sum(g[i] ** 2 for g in per_example)
        torch.testing.assert_close(emitted[name].view_as(expected), expected, rtol=1e-9,
                                   atol=1e-15)
    # the masks differ between examples: the test would catch a shared mask
    assert not torch.allclose(per_example[0][0], per_example[1][0])


# -- the transformer's fast path cannot bypass the hooks ------------------------------------
@pytest.mark.parametrize("length", [3, B])
@pytest.mark.parametrize("frozen_part", ["layer", "none"])
def test_eval_mode_encoder_layer(length, frozen_part):
    """In eval mode ``nn.TransformerEncoderLayer`` may run its fused fast path, which uses
    the weights without calling the submodules; it does only where no argument needs a
    gradient, i.e. where no statistics are wanted from it."""
    def build():
        model = cases.Lambda(lambda s, x: s.out(s.layer(x)), layer=nn.TransformerEncoderLayer(
            6, 2, dim_feedforward=6, batch_first=True), out=nn.Linear(6, 2)).eval()
        if frozen_part == "layer":
            model.layer.requires_grad_(False)
        return model

    case = cases.Case(f"encoder-eval-{frozen_part}", build, cases._randn(B, length, 6),
                      cases._targets(B, length, 2))
    outcome = run_case(case, "extensions")
    assert outcome == "exact" or (frozen_part == "layer" and length == B)
