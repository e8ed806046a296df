"""``nn.MultiheadAttention`` used several times in one forward pass (issue 13).

A block applied repeatedly (weights shared across depth), one attention module called on
several inputs, ``out_proj.weight`` tied to a Linear: each call of the layer hands over
its per-example contributions (the packed in-projection in row blocks where query, key
and value differ), added to the other uses' before squaring. Checked in float64 against
brute force: ``sum_n c_n**2`` from the hooks against per-example gradients of the same
forward pass (one ``torch.autograd.grad`` per example), and ``p.grad`` and
``p.grad_variance`` of ``GradientVariance(engine="extensions")`` against
:func:`test_exact_or_refused.run_case`'s oracle; ``engine="auto"`` picks ``extensions``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import msvag_mb
from msvag_mb.extensions import SumGradSquaredHooks, unsupported_layer
from msvag_mb.extensions.reuse import DenseUse, ProductUse, RowBlocksUse

from test_exact_or_refused import B, Case, Lambda, _padding, _randn, _targets, run_case


class _ReusedAttention(nn.Module):
    """``pre`` Linear, then ``calls`` residual applications of one
    ``nn.MultiheadAttention(4, 2, **options)``, a head. ``inputs``: ``"self"`` (query,
    key and value one tensor: the packed in-projection in one map), ``"same-kv"`` (key is
    value: the q and kv row blocks), ``"distinct"`` (three blocks, or the separate
    projections with ``kdim``/``vdim``). ``weights``: the attention weights enter the
    loss; ``"last-only"``: the last call's weights and not its output (its value block
    and ``out_proj`` get no gradient from that call)."""

    def __init__(self, inputs="self", batch_first=True, calls=2, weights=None, **options):
        super().__init__()
        self.inputs, self.batch_first, self.calls, self.weights = (inputs, batch_first,
                                                                   calls, weights)
        self.pre = nn.Linear(4, 4)
        self.pre_k = nn.Linear(4, options.get("kdim") or 4)
        self.pre_v = nn.Linear(4, options.get("vdim") or 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first, **options)
        self.out = nn.Linear(4, 2)

    def _sequence(self, t):
        return t if self.batch_first else t.transpose(0, 1)

    def _keys_values(self, x, h):
        if self.inputs == "self":
            return h, h
        if self.inputs == "same-kv":
            kv = self._sequence(torch.tanh(self.pre_k(x)))
            return kv, kv
        return self._sequence(self.pre_k(x)), self._sequence(self.pre_v(x))

    def forward(self, x):
        h = self._sequence(self.pre(x))
        for call in range(self.calls):
            k, v = self._keys_values(x, h)
            o, w = self.attn(h, k, v, need_weights=self.weights is not None)
            last_only = self.weights == "last-only" and call == self.calls - 1
            h = torch.zeros_like(h) if last_only else h + o
            if w is not None:  # (B, L, S) whatever the layout
                h = h + self._sequence((w * w).sum(-1, keepdim=True))
            h = torch.tanh(h)
        return self.out(self._sequence(h))


class _TiedOutProjection(nn.Module):
    """Attention (called ``calls`` times) whose ``out_proj.weight`` is also a Linear's
    weight (``head``), optionally with the bias tied too."""

    def __init__(self, calls=1, tie_bias=False):
        super().__init__()
        self.calls = calls
        self.pre = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 4)
        self.head.weight = self.attn.out_proj.weight
        if tie_bias:
            self.head.bias = self.attn.out_proj.bias
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.pre(x)
        for _ in range(self.calls):
            h = torch.tanh(h + self.attn(h, h, h, need_weights=False)[0])
        return self.out(torch.tanh(self.head(h)))


def _encoder_twice(norm_first, batch_first, masks=False):
    """One ``nn.TransformerEncoderLayer`` applied twice (weights shared across depth)."""
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                       batch_first=batch_first, norm_first=norm_first)

    def forward(s, x, *pad):
        h = x if batch_first else x.transpose(0, 1)
        options = {}
        if masks:
            length = x.shape[1]
            options = dict(src_mask=torch.triu(torch.ones(length, length, dtype=torch.bool),
                                               1),
                           src_key_padding_mask=pad[0], is_causal=True)
        h = s.layer(s.layer(h, **options), **options)
        return s.out(h if batch_first else h.transpose(0, 1))

    return Lambda(forward, layer=layer, out=nn.Linear(4, 2))


def reuse_attention_cases() -> list[Case]:
    """The attention layer used several times: every case must be exact in
    ``extensions``."""
    settings = {
        "self": dict(), "self-three-calls": dict(calls=3), "same-kv": dict(inputs="same-kv"),
        "distinct": dict(inputs="distinct"),
        "kdim-vdim": dict(inputs="distinct", kdim=3, vdim=5),
        "bias_kv": dict(add_bias_kv=True),
        "bias_kv-zero-attn-distinct": dict(inputs="distinct", add_bias_kv=True,
                                            add_zero_attn=True),
        "no-bias-distinct": dict(inputs="distinct", bias=False),
        "weights": dict(inputs="distinct", weights="all"),
        "weights-last-only": dict(inputs="distinct", weights="last-only"),
        "weights-last-only-kdim-vdim": dict(inputs="distinct", weights="last-only", kdim=3,
                                            vdim=5),
    }
    cases = []
    for name, setting in settings.items():
        for batch_first in (True, False):
            for t in (3, B):
                cases.append(Case(
                    f"mha-reused-{name}-batch_first={batch_first}-T{t}",
                    lambda setting=setting, batch_first=batch_first: _ReusedAttention(
                        batch_first=batch_first, **setting),
                    _randn(B, t, 4), _targets(B, t, 2)))
    for calls, tie_bias in ((1, False), (1, True), (2, False)):
        cases.append(Case(f"mha-out-proj-tied-to-linear-calls{calls}-bias{tie_bias}",
                          lambda calls=calls, tie_bias=tie_bias: _TiedOutProjection(
                              calls, tie_bias), _randn(B, 3, 4), _targets(B, 3, 2)))
    for norm_first in (False, True):
        for batch_first in (True, False):
            label = f"norm_first={norm_first}-batch_first={batch_first}"
            for t in (3, B):
                cases.append(Case(f"encoder-layer-twice-{label}-T{t}",
                                  lambda n=norm_first, b=batch_first: _encoder_twice(n, b),
                                  _randn(B, t, 4), _targets(B, t, 2)))
            cases.append(Case(f"encoder-layer-twice-masks-{label}",
                              lambda n=norm_first, b=batch_first: _encoder_twice(n, b, True),
                              _padding(3), _targets(B, 3, 2)))
    return cases


CASES = reuse_attention_cases()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_gradient_variance_is_exact(case):
    """``p.grad`` and ``p.grad_variance`` of the ``extensions`` engine against brute
    force (and the model left as it was)."""
    assert run_case(case, "extensions") == "exact"


def _inputs(case: Case):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = case.build().double()
    inputs = tuple(v.double() if v.is_floating_point() else v for v in case.inputs(generator))
    return model, inputs, case.targets(generator).double()


def _brute_force_squares(model, inputs, targets, params):
    """``sum_n c_n**2`` with ``c_n`` the gradient of example n's summed squared error,
    taken through the same batched forward pass (one ``autograd.grad`` per example)."""
    output = model(*inputs)
    squares = [torch.zeros_like(p) for p in params]
    for n in range(B):
        loss = F.mse_loss(output[n], targets[n], reduction="sum")
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for total, grad in zip(squares, grads):
            if grad is not None:
                total.add_(grad.square())
    return squares


@pytest.mark.parametrize("case", CASES[::3], ids=lambda case: case.name)
def test_hooks_sum_grad_squared_matches_per_example_gradients(case):
    """The hooks' ``sum_n c_n**2`` for a summed loss: the per-example contributions of all
    calls (and of the tied Linear) added before squaring."""
    model, inputs, targets = _inputs(case)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = _brute_force_squares(model, inputs, targets, params)
    with SumGradSquaredHooks(model, params, B, inputs=inputs) as hooks:
        loss = F.mse_loss(model(*inputs), targets, reduction="sum")
        hooks.check_uses(loss)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    names = {p: n for n, p in model.named_parameters()}
    attention = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    assert any(hooks._reuse.is_reused(p) for p in attention.parameters())
    for param, value, grad in zip(params, expected, grads):
        if grad is None:  # unused (pre_k, pre_v in self-attention)
            assert param not in hooks.sum_grad_squared, names[param]
            continue
        torch.testing.assert_close(hooks.sum_grad_squared[param], value, rtol=1e-9,
                                   atol=1e-13, msg=names[param])


def test_tied_out_projection_is_no_longer_refused_before_running():
    assert unsupported_layer(_TiedOutProjection()) is None


@pytest.mark.parametrize("norm_first", [False, True])
def test_auto_picks_extensions_for_a_reused_encoder_layer(norm_first):
    """Before, the second call refused ``extensions`` and ``auto`` ran ``vmap``."""
    model, inputs, targets = _inputs(Case("", lambda: _encoder_twice(norm_first, True),
                                          _randn(B, 3, 4), _targets(B, 3, 2)))
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(), engine="auto")
    gv.backward(inputs, targets)
    assert gv.engine_name == "extensions"
    assert all(p.grad_variance is not None for p in model.parameters())


# -- the row blocks' use ---------------------------------------------------------------
def test_row_blocks_place_each_block_at_its_rows():
    torch.manual_seed(3)
    g_q, g_kv, x = torch.randn(3, 2, 2), torch.randn(3, 2, 4), torch.randn(3, 2, 5)
    use = RowBlocksUse(torch.Size((6, 5)))
    use.place(2, ProductUse(g_kv, x))
    use.place(0, ProductUse(g_q, x))
    expected = torch.cat([g_q.transpose(1, 2) @ x, g_kv.transpose(1, 2) @ x], dim=1)
    torch.testing.assert_close(use.per_example(0, 3), expected)
    bias = RowBlocksUse(torch.Size((6,)))
    bias.place(4, DenseUse(torch.ones(3, 2)))  # rows 0-3 got no gradient from this call
    torch.testing.assert_close(bias.per_example(1, 3),
                               torch.tensor([[0.0, 0, 0, 0, 1, 1]]).expand(2, 6))


@pytest.mark.parametrize("setting", [dict(inputs="distinct"), dict(inputs="same-kv"),
                                     dict(inputs="distinct", kdim=3, vdim=5)],
                         ids=lambda setting: "-".join(f"{k}={v}" for k, v in setting.items()))
def test_blocks_without_gradient_in_a_single_call_are_exact(setting):
    """One call whose loss sees only the attention weights: the value block and
    ``out_proj`` get no gradient, the in-projection's statistic is closed with zeros in
    the value rows (it used to be missing, and refused after the backward pass)."""
    case = Case("weights-only", lambda: _ReusedAttention(calls=1, weights="last-only",
                                                         **setting),
                _randn(B, 3, 4), _targets(B, 3, 2))
    assert run_case(case, "extensions") == "exact"
