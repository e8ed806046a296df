"""The normalisation layers' extensions (LayerNorm, RMSNorm, GroupNorm, InstanceNorm): the
``extensions`` engine is *exact* on every configuration of
:func:`test_exact_or_refused.norm_cases` that has per-example gradients (not merely
"exact or refused"), refuses the traps with the layer's name before the backward pass, and
no longer stops at the transformer problem's LayerNorms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msvag_mb.engines import UnsupportedModelError
from msvag_mb.engines.extensions_engine import ExtensionsEngine
from msvag_mb.extensions import EXTENSIONS
from msvag_mb.problems import get_problem
from msvag_mb.problems.transformer import CharTransformer

from test_exact_or_refused import B, Case, SequenceCE, norm_cases, run_case

NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
              nn.InstanceNorm3d)
PREFIXES = ("layernorm", "rmsnorm", "groupnorm", "instancenorm")

#: configurations without per-example gradients: refused, naming the layer
REFUSED = {
    "layernorm-over-the-batch-axis": "'norm'",   # normalises over the examples' axis
    "rmsnorm-over-the-batch-axis": "'norm'",
    "instancenorm1d-unbatched-input": "'1'",     # (B, B): the layer's unbatched (C, L) form
}

CASES = [case for case in norm_cases() if case.name.startswith(PREFIXES)]


def test_every_norm_type_is_registered():
    assert all(layer in EXTENSIONS for layer in NORM_TYPES)


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in REFUSED],
                         ids=lambda case: case.name)
def test_extensions_engine_is_exact(case):
    assert run_case(case, "extensions") == "exact"


@pytest.mark.parametrize("case", [c for c in CASES if c.name in REFUSED],
                         ids=lambda case: case.name)
def test_extensions_engine_refuses_the_traps_naming_the_layer(case, without_output_probes):
    assert run_case(case, "extensions") == "refused"  # before backward, model unchanged
    torch.manual_seed(0)
    model = case.build().double()
    inputs = tuple(v.double() for v in case.inputs(torch.Generator().manual_seed(1)))
    with pytest.raises(UnsupportedModelError, match=REFUSED[case.name]):
        ExtensionsEngine().compute(model, nn.MSELoss(), inputs, case.targets(
            torch.Generator()).double(), list(model.parameters()))


def test_unbatched_layer_norm_input_is_refused_clearly():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    x, y = torch.randn(B, 4), torch.randn(2)

    def unbatched(s, x):  # the mean over the examples reaches the LayerNorm as one row
        return s[2](s[1](s[0](x).mean(0)))

    model.forward = unbatched.__get__(model)
    with pytest.raises(UnsupportedModelError, match=r"'1' \(LayerNorm\) got an unbatched"):
        ExtensionsEngine().compute(model, nn.MSELoss(), x, y, list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_half_precision_rms_norm_uses_the_forward_eps():
    """``eps=None`` in float16: torch computes in float32 with float32's epsilon; the
    recomputed ``x_hat`` is the forward's (checked on tiny inputs, where eps matters)."""
    torch.manual_seed(0)
    norm = nn.RMSNorm(6).half()
    x = (torch.randn(B, 3, 6) * 1e-4).half()
    grad_output = torch.randn(B, 3, 6).half()
    extension = EXTENSIONS[nn.RMSNorm]
    ours = extension.sum_grad_squared(norm, x, grad_output, frozenset({"weight"}))["weight"]
    x_hat = norm(x).detach().float() / norm.weight.detach().float()
    expected = (grad_output.float() * x_hat).sum(1).square().sum(0)
    torch.testing.assert_close(ours.float(), expected, rtol=2e-2, atol=1e-3)


PER_EXAMPLE_LAYERS = {
    "layernorm": (lambda: nn.LayerNorm((3, 4)), (B, 2, 3, 4)),
    "layernorm-2d": (lambda: nn.LayerNorm(4), (B, 4)),
    "rmsnorm": (lambda: nn.RMSNorm(4, eps=0.1), (B, 3, 4)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (B, 4, 3, 2)),
    "instancenorm-running-stats": (lambda: nn.InstanceNorm1d(
        3, affine=True, track_running_stats=True), (B, 3, 5)),
}


@pytest.mark.parametrize("label", PER_EXAMPLE_LAYERS)
def test_per_example_contributions_match_one_backward_per_example(label):
    """What a layer called several times adds up before squaring: ``c_n`` itself."""
    build, shape = PER_EXAMPLE_LAYERS[label]
    torch.manual_seed(3)
    layer = build().double()
    x, grad_output = torch.randn(shape, dtype=torch.double), torch.randn(shape,
                                                                         dtype=torch.double)
    params = dict(layer.named_parameters())
    ours = EXTENSIONS[type(layer)].per_example_contributions(layer, x, grad_output,
                                                             frozenset(params))
    for n in range(B):
        grads = torch.autograd.grad(layer(x[n:n + 1]), list(params.values()),
                                    grad_output[n:n + 1])
        for name, grad in zip(params, grads):
            torch.testing.assert_close(ours[name][n], grad, rtol=1e-10, atol=1e-12)
    assert all(c.data_ptr() != grad_output.data_ptr() for c in ours.values())


def _transformer(frozen: tuple[str, ...]) -> CharTransformer:
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=7, width=8, layers=2, heads=2, context=6)
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return model


def test_transformer_is_not_refused_for_its_layer_norms():
    """The transformer problem's model: whatever the engine still refuses (the bare
    positional Parameter, the tied head), it is not a LayerNorm."""
    model = _transformer(())
    reason = ExtensionsEngine.unsupported_reason(model)
    assert reason is None or "LayerNorm" not in reason
    model = _transformer(("position",))
    x, y = torch.randint(7, (B, 5)), torch.randint(7, (B, 5))
    loss_fn = get_problem("tolstoi_char_transformer").loss_fn()
    try:
        ExtensionsEngine().compute(model, loss_fn, x, y, list(model.parameters()))
    except UnsupportedModelError as error:
        assert "LayerNorm" not in str(error) and ".ln" not in str(error), error


def test_transformer_with_frozen_embeddings_is_exact():
    """With the positional Parameter and the tied embedding frozen, every other layer of
    the transformer (LayerNorms, attention and MLP Linears) gets exact statistics."""
    case = Case("transformer-frozen-embeddings",
                lambda: _transformer(("position", "embedding.weight")),
                lambda g: (torch.randint(0, 7, (B, 5), generator=g),),
                lambda g: torch.randint(0, 7, (B, 5), generator=g), loss=SequenceCE)
    assert run_case(case, "extensions") == "exact"
