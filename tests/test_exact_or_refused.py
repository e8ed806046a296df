"""Exact or refused: every per-example engine on many layer configurations and user traps.

Each case is a tiny float64 model with batch-first inputs (examples on dim 0, as
``GradientVariance`` documents). For every engine whose units are examples (derived from the
registry's declared capabilities) and for ``engine="auto"``, the only acceptable outcomes
are:

* **exact**: ``p.grad`` equals what ``loss.backward()`` gives and ``p.grad_variance`` equals
  brute force (one autograd call per example); unused parameters keep ``p.grad is None``;
* **refused before backward**: an :class:`UnsupportedModelError` raised before any gradient
  reached a parameter, leaving grads, variances, parameters, hooks and modules as before.

Anything else (a wrong number, a crash inside torch or BackPACK, a refusal after the backward
pass, a changed model) fails. ``test_a_broken_engine_fails_the_check`` shows the check has
the power to fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import msvag_mb
from msvag_mb.engines import ENGINES, UnsupportedModelError

B = 4


# -- the check ---------------------------------------------------------------------------
@dataclass
class Case:
    """A model factory, its inputs (a tuple, examples on dim 0) and targets, and a loss."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    targets: Callable[[torch.Generator], torch.Tensor]
    loss: Callable[[], nn.Module] = field(default=lambda: nn.MSELoss())


def _example(values: tuple, n: int) -> tuple:
    return tuple(v[n:n + 1] for v in values)


def brute_force(case: Case, model: nn.Module, inputs: tuple, targets: torch.Tensor):
    """``p.grad`` of the batch and the within-batch variance from per-example gradients."""
    loss_fn = case.loss()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = torch.autograd.grad(loss_fn(model(*inputs), targets), params, allow_unused=True)
    per_example = []
    for n in range(B):
        loss = loss_fn(model(*_example(inputs, n)), targets[n:n + 1])
        per_example.append(torch.autograd.grad(loss, params, allow_unused=True))
    scale = 1.0 / B if loss_fn.reduction == "mean" else float(B)
    expected = {}
    for i, (param, grad) in enumerate(zip(params, batch)):
        if grad is None:
            expected[param] = (None, None)
            continue
        g = torch.stack([torch.zeros_like(param) if e[i] is None else e[i]
                         for e in per_example])
        expected[param] = (grad, g.var(0) * scale)
    return expected


def _hooks(model: nn.Module) -> list:
    counts = []
    for module in model.modules():
        counts.append(tuple(len(getattr(module, attr)) for attr in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
            "_backward_pre_hooks", "_state_dict_hooks")))
    return counts


def _snapshot(model: nn.Module) -> dict:
    return {
        "parameters": [(name, p, p.detach().clone()) for name, p in model.named_parameters()],
        "modules": [(name, type(m), m) for name, m in model.named_modules()],
        "hooks": _hooks(model),
        "forwards": [m.forward for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert [(n, id(p)) for n, p, _ in after["parameters"]] == \
        [(n, id(p)) for n, p, _ in before["parameters"]], "parameters were replaced"
    for (_, p, _), (_, _, old) in zip(after["parameters"], before["parameters"]):
        assert torch.equal(p.detach(), old), "a parameter's value changed"
        assert p.grad is None, "a refused call left a gradient"
        assert getattr(p, "grad_variance", None) is None, "a refused call left a variance"
    assert [(n, t, id(m)) for n, t, m in after["modules"]] == \
        [(n, t, id(m)) for n, t, m in before["modules"]], "modules were changed"
    assert after["hooks"] == before["hooks"], "hooks were left behind"
    assert after["forwards"] == before["forwards"], "a forward was left replaced"


def run_case(case: Case, engine: str | msvag_mb.Engine) -> str:
    """``"exact"`` or ``"refused"``; raises AssertionError for anything else."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = case.build().double()
    inputs = tuple(v.double() if v.is_floating_point() else v for v in case.inputs(generator))
    targets = case.targets(generator)
    targets = targets.double() if targets.is_floating_point() else targets
    try:
        expected = brute_force(case, model, inputs, targets)
    except (RuntimeError, ValueError):
        expected = None  # no per-example gradients exist (e.g. BatchNorm in train mode)
    before = _snapshot(model)
    reached = []
    handles = [p.register_hook(lambda g, reached=reached: reached.append(1))
               for p in model.parameters() if p.requires_grad]
    gradient_variance = None
    try:
        gradient_variance = msvag_mb.GradientVariance(model, case.loss(), engine=engine)
        gradient_variance.backward(inputs, targets)
    except UnsupportedModelError as error:
        for handle in handles:
            handle.remove()
        assert not reached, f"refused after the backward pass: {error}"
        _assert_unchanged(model, before)
        assert str(error), "a refusal must say why"
        return "refused"
    finally:
        for handle in handles:
            handle.remove()
    assert expected is not None, "examples are not independent here: only a refusal is right"
    assert any(v[1] is not None and v[1].abs().max() > 0 for v in expected.values()), \
        "the comparison must be able to fail"
    names = {p: n for n, p in model.named_parameters()}
    for param, (grad, variance) in expected.items():
        if grad is None:
            assert param.grad is None, f"{names[param]}: unused, yet p.grad is set"
            continue
        assert param.grad is not None, f"{names[param]}: p.grad missing"
        torch.testing.assert_close(param.grad, grad, rtol=1e-9, atol=1e-12,
                                   msg=f"{names[param]}: p.grad differs from loss.backward()")
        torch.testing.assert_close(param.grad_variance, variance, rtol=1e-7, atol=1e-14,
                                   msg=f"{names[param]}: p.grad_variance differs from brute "
                                       "force")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    return "exact"


# -- the cases ---------------------------------------------------------------------------
def _randn(*shape):
    return lambda g: (torch.randn(*shape, generator=g),)


def _targets(*shape):
    return lambda g: torch.randn(*shape, generator=g)


def _classes(num, *shape):
    return lambda g: torch.randint(0, num, shape, generator=g)


class SequenceCE(nn.Module):
    """Cross-entropy over (B, T, C) logits and (B, T) targets, mean over all tokens."""

    reduction = "mean"

    def forward(self, logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Lambda(nn.Module):
    """A module around a forward function, with named submodules."""

    def __init__(self, forward, **modules):
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)
        self._forward = forward

    def forward(self, *args):
        return self._forward(self, *args)


def linear_cases() -> list[Case]:
    cases = []
    for bias in (True, False):
        cases.append(Case(f"linear-bias{bias}", lambda bias=bias: nn.Sequential(
            nn.Linear(5, 3, bias=bias), nn.Tanh(), nn.Linear(3, 2, bias=bias)),
            _randn(B, 5), _targets(B, 2)))
    for t in (3, B):  # T == B is the trap of a shape-guessed batch axis
        cases.append(Case(f"linear-tokens-T{t}", lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(),
                                                                      nn.Linear(3, 2)),
                          _randn(B, t, 4), _targets(B, t, 2)))
        cases.append(Case(f"linear-sequence-first-T{t}", lambda: Lambda(
            lambda s, x: s.lin(x.transpose(0, 1)).transpose(0, 1), lin=nn.Linear(4, 2)),
            _randn(B, t, 4), _targets(B, t, 2)))
        cases.append(Case(f"linear-flatten01-T{t}", lambda t=t: Lambda(
            lambda s, x: s.lin(x.flatten(0, 1)).view(x.shape[0], x.shape[1], -1),
            lin=nn.Linear(4, 2)), _randn(B, t, 4), _targets(B, t, 2)))
    cases.append(Case("linear-called-twice", lambda: Lambda(
        lambda s, x: s.lin(torch.tanh(s.lin(x))), lin=nn.Linear(4, 4)),
        _randn(B, 4), _targets(B, 4)))

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    cases.append(Case("linear-subclass", lambda: nn.Sequential(MyLinear(4, 3)),
                      _randn(B, 4), _targets(B, 3)))
    cases.append(Case("linear-sum-loss", lambda: nn.Sequential(nn.Linear(4, 3)),
                      _randn(B, 4), _targets(B, 3), loss=lambda: nn.MSELoss(reduction="sum")))
    # widths equal to the batch size: the batch axis is traced, not read off the shape
    cases.append(Case("linear-width-equals-batch", lambda: nn.Sequential(
        nn.Linear(B, B), nn.ReLU(), nn.Linear(B, B), nn.Sigmoid(), nn.Linear(B, 2)),
        _randn(B, B), _targets(B, 2)))
    cases.append(Case("linear-4d-input", lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(),
                                                              nn.Linear(3, 2)),
                      _randn(B, 2, 3, 4), _targets(B, 2, 3, 2)))
    for t in (3, B):
        cases.append(Case(f"linear-hidden-sequence-first-T{t}", lambda: Lambda(
            lambda s, x: s.b(torch.tanh(s.a(x)).transpose(0, 1) * 2.0).transpose(0, 1),
            a=nn.Linear(4, B), b=nn.Linear(B, 2)), _randn(B, t, 4), _targets(B, t, 2)))
        cases.append(Case(f"linear-sequence-first-sum-loss-T{t}", lambda: Lambda(
            lambda s, x: s.lin(x.permute(1, 0, 2)).permute(1, 0, 2), lin=nn.Linear(4, 2)),
            _randn(B, t, 4), _targets(B, t, 2), loss=lambda: nn.MSELoss(reduction="sum")))
    for f in (3, B):  # the examples along the features' axis: the layer would mix them
        cases.append(Case(f"linear-on-transposed-input-F{f}", lambda f=f: Lambda(
            lambda s, x: s.lin(x.t()).t(), lin=nn.Linear(B, B)), _randn(B, f),
            _targets(B, f)))
    return cases


def conv_cases() -> list[Case]:
    cases = []
    settings = [
        dict(), dict(stride=2), dict(padding=1), dict(dilation=2), dict(groups=2),
        dict(bias=False), dict(padding="same"), dict(padding="same", dilation=2),
        dict(padding=1, padding_mode="reflect"), dict(padding=1, padding_mode="circular"),
        dict(padding=1, padding_mode="replicate"), dict(padding="valid"),
        dict(stride=2, padding=2, dilation=2, groups=2, bias=False),
        dict(padding=2, padding_mode="circular", stride=2),
    ]
    for dim, conv in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        size = {1: 9, 2: 6, 3: 5}[dim]
        for setting in settings:
            label = ",".join(f"{k}={v}" for k, v in setting.items()) or "default"

            def build(conv=conv, setting=setting, shape=(2, *([size] * dim))):
                return _with_head(conv(2, 4, 3, **setting), shape)

            cases.append(Case(f"conv{dim}d-{label}", build, _randn(B, 2, *([size] * dim)),
                              _targets(B, 2)))
    transposed = [dict(), dict(stride=2), dict(stride=2, output_padding=1), dict(padding=1),
                  dict(groups=2), dict(dilation=2), dict(bias=False)]
    for dim, conv in ((1, nn.ConvTranspose1d), (2, nn.ConvTranspose2d), (3, nn.ConvTranspose3d)):
        size = {1: 5, 2: 4, 3: 3}[dim]
        for setting in transposed:
            label = ",".join(f"{k}={v}" for k, v in setting.items()) or "default"

            def build(conv=conv, setting=setting, shape=(2, *([size] * dim))):
                return _with_head(conv(2, 4, 3, **setting), shape)

            cases.append(Case(f"convT{dim}d-{label}", build, _randn(B, 2, *([size] * dim)),
                              _targets(B, 2)))
    # Opacus-style non-square settings
    for dim, conv in ((1, nn.Conv1d), (2, nn.Conv2d)):
        setting = dict(kernel_size=(3, 2)[:dim], stride=(2, 1)[:dim], padding=(1, 0)[:dim])
        cases.append(Case(f"conv{dim}d-non-square", lambda conv=conv, setting=setting, dim=dim:
                          _with_head(conv(2, 3, **setting), (2, *([7] * dim))),
                          _randn(B, 2, *([7] * dim)), _targets(B, 2)))
    cases.append(Case("conv2d-channels-equal-batch", lambda: _with_head(
        nn.Conv2d(B, B, 3, padding=1), (B, B, B), nn.ReLU(), nn.Conv2d(B, B, 3),
        nn.MaxPool2d(2)), _randn(B, B, B, B), _targets(B, 2)))
    cases.append(Case("conv1d-on-permuted-sequence", lambda: Lambda(
        lambda s, x: s.head(torch.tanh(s.conv(x.permute(0, 2, 1))).flatten(1)),
        conv=nn.Conv1d(3, 2, 3), head=nn.Linear(2 * 4, 2)), _randn(B, 6, 3), _targets(B, 2)))
    cases.append(Case("conv2d-per-frame", lambda: Lambda(  # frames merged into the batch
        lambda s, x: s.head(s.conv(x.flatten(0, 1)).view(x.shape[0], -1)),
        conv=nn.Conv2d(2, 3, 3), head=nn.Linear(3 * 3 * 3 * 3, 2)),
        _randn(B, 3, 2, 5, 5), _targets(B, 2)))
    return cases


def _with_head(body: nn.Module, shape: tuple, *between: nn.Module) -> nn.Module:
    """``body``, then ``between``, flattened into a Linear with 2 outputs."""
    trunk = nn.Sequential(body, *between, nn.Flatten())
    with torch.no_grad():
        width = trunk(torch.zeros(1, *shape)).shape[1]
    return nn.Sequential(*trunk, nn.Linear(width, 2))


def embedding_cases() -> list[Case]:
    cases = []
    settings = [dict(), dict(padding_idx=0), dict(max_norm=1.0), dict(scale_grad_by_freq=True),
                dict(sparse=True)]
    for setting in settings:
        label = ",".join(f"{k}={v}" for k, v in setting.items()) or "default"

        def build(setting=setting):
            return Lambda(lambda s, x: s.out(s.emb(x)), emb=nn.Embedding(7, 3, **setting),
                          out=nn.Linear(3, 7))

        cases.append(Case(f"embedding-{label}", build, lambda g: (torch.randint(
            0, 7, (B, 3), generator=g),), _classes(7, B, 3), loss=SequenceCE))
    for t in (3, B):
        cases.append(Case(f"embedding-sequence-first-T{t}", lambda: Lambda(
            lambda s, x: s.out(s.emb(x.t().contiguous())).transpose(0, 1),
            emb=nn.Embedding(7, 3), out=nn.Linear(3, 7)),
            lambda g, t=t: (torch.randint(0, 7, (B, t), generator=g),),
            _classes(7, B, t), loss=SequenceCE))
    cases.append(Case("embedding-1d-indices", lambda: nn.Sequential(nn.Embedding(B, 3),
                                                                   nn.Linear(3, 2)),
                      lambda g: (torch.randint(0, B, (B,), generator=g),), _targets(B, 2)))
    for t in (3, B):
        cases.append(Case(f"embedding-sequence-first-view-T{t}", lambda: Lambda(
            lambda s, x: s.out(torch.tanh(s.emb(x.t()))).transpose(0, 1),
            emb=nn.Embedding(7, 3), out=nn.Linear(3, 7)),
            lambda g, t=t: (torch.randint(0, 7, (B, t), generator=g),),
            _classes(7, B, t), loss=SequenceCE))
        cases.append(Case(f"embedding-positions-T{t}", lambda t=t: Lambda(
            lambda s, x: s.out(torch.tanh(s.tok(x) + s.pos(torch.arange(x.shape[1])))),
            tok=nn.Embedding(7, 3), pos=nn.Embedding(t, 3), out=nn.Linear(3, 7)),
            lambda g, t=t: (torch.randint(0, 7, (B, t), generator=g),),
            _classes(7, B, t), loss=SequenceCE))
    for mode in ("sum", "mean", "max"):
        cases.append(Case(f"embedding-bag-{mode}", lambda mode=mode: nn.Sequential(
            nn.EmbeddingBag(7, 3, mode=mode), nn.Linear(3, 2)),
            lambda g: (torch.randint(0, 7, (B, 3), generator=g),), _targets(B, 2)))
    cases.append(Case("embedding-tied-module", lambda: _tied_module(), lambda g: (
        torch.randint(0, 7, (B, 3), generator=g),), _classes(7, B, 3), loss=SequenceCE))
    cases.append(Case("embedding-tied-functional", lambda: Lambda(
        lambda s, x: F.linear(torch.tanh(s.emb(x)), s.emb.weight), emb=nn.Embedding(7, 3)),
        lambda g: (torch.randint(0, 7, (B, 3), generator=g),), _classes(7, B, 3),
        loss=SequenceCE))
    return cases


def _tied_module() -> nn.Module:
    model = Lambda(lambda s, x: s.out(torch.tanh(s.emb(x))), emb=nn.Embedding(7, 3),
                   out=nn.Linear(3, 7, bias=False))
    model.out.weight = model.emb.weight
    return model


def recurrent_cases() -> list[Case]:
    cases = []
    for rnn_type in (nn.RNN, nn.GRU, nn.LSTM):
        kinds = [dict(), dict(num_layers=2), dict(bidirectional=True), dict(bias=False)]
        if rnn_type is nn.RNN:
            kinds.append(dict(nonlinearity="relu"))
        if rnn_type is nn.LSTM:
            kinds.append(dict(proj_size=2))
        for kind in kinds:
            for batch_first in (True, False):
                label = ",".join(f"{k}={v}" for k, v in kind.items()) or "default"

                def build(rnn_type=rnn_type, kind=kind, batch_first=batch_first):
                    def forward(s, x):
                        h, _ = s.rnn(x if batch_first else x.transpose(0, 1))
                        return s.out(h if batch_first else h.transpose(0, 1))
                    rnn = rnn_type(3, 4, batch_first=batch_first, **kind)
                    width = (2 if kind.get("proj_size") else 4) * (
                        2 if kind.get("bidirectional") else 1)
                    return Lambda(forward, rnn=rnn, out=nn.Linear(width, 2))

                for t in (3, B):
                    cases.append(Case(
                        f"{rnn_type.__name__}-{label}-batch_first={batch_first}-T{t}", build,
                        _randn(B, t, 3), _targets(B, t, 2)))
    for rnn_type in (nn.RNN, nn.GRU, nn.LSTM):
        for batch_first in (True, False):
            for t in (3, B):
                cases.append(Case(
                    f"{rnn_type.__name__}-initial-state-batch_first={batch_first}-T{t}",
                    lambda rnn_type=rnn_type, batch_first=batch_first: _WithInitialState(
                        rnn_type, batch_first), _randn(B, t, 3), _targets(B, t, 2)))
        cases.append(Case(f"{rnn_type.__name__}-packed", lambda rnn_type=rnn_type: _Packed(
            rnn_type), lambda g: (torch.randn(B, 5, 3, generator=g),
                                  torch.tensor([5, 2, 4, 3][:B])), _targets(B, 2)))
    return cases


class _WithInitialState(nn.Module):
    """The initial state from a Linear of the first step: gradients reach it."""

    def __init__(self, rnn_type, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.init = nn.Linear(3, 4)
        self.rnn = rnn_type(3, 4, batch_first=batch_first)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h0 = torch.tanh(self.init(x[:, 0])).unsqueeze(0)
        state = (h0, torch.zeros_like(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        h, _ = self.rnn(x if self.batch_first else x.transpose(0, 1), state)
        return self.out(h if self.batch_first else h.transpose(0, 1))


class _Packed(nn.Module):
    """Variable-length sequences: packed, run, classified from the last state."""

    def __init__(self, rnn_type):
        super().__init__()
        self.rnn = rnn_type(3, 4, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, state = self.rnn(packed)
        h = state[0] if isinstance(state, tuple) else state
        return self.out(h[-1])


def norm_cases() -> list[Case]:
    def eval_mode(module):
        return module.eval()

    return [
        Case("layernorm", lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)),
             _randn(B, 3, 4), _targets(B, 3, 2)),
        Case("groupnorm", lambda: _with_head(nn.Conv2d(2, 4, 3), (2, 5, 5), nn.GroupNorm(2, 4)),
             _randn(B, 2, 5, 5), _targets(B, 2)),
        Case("instancenorm-affine", lambda: _with_head(
            nn.Conv2d(2, 4, 3), (2, 5, 5), nn.InstanceNorm2d(4, affine=True)),
            _randn(B, 2, 5, 5), _targets(B, 2)),
        Case("batchnorm-eval", lambda: eval_mode(_with_head(
            nn.Conv2d(2, 4, 3), (2, 5, 5), nn.BatchNorm2d(4))),
            _randn(B, 2, 5, 5), _targets(B, 2)),
        Case("layernorm-sequence-first", lambda: Lambda(
            lambda s, x: s.b(s.norm(s.a(x.transpose(0, 1)))).transpose(0, 1),
            a=nn.Linear(4, 6), norm=nn.LayerNorm(6), b=nn.Linear(6, 2)),
            _randn(B, B, 4), _targets(B, B, 2)),
        Case("batchnorm-eval-channels-equal-batch", lambda: eval_mode(nn.Sequential(
            nn.Conv1d(2, B, 3), nn.BatchNorm1d(B), nn.Flatten(), nn.Linear(B * 4, 2))),
            _randn(B, 2, 6), _targets(B, 2)),
        Case("batchnorm-train", lambda: nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)), _randn(B, 4), _targets(B, 2)),
    ]


def attention_cases() -> list[Case]:
    cases = []
    for batch_first in (True, False):
        def mha(batch_first=batch_first):
            def forward(s, x):
                x = x if batch_first else x.transpose(0, 1)
                h, _ = s.attn(x, x, x, need_weights=False)
                return s.out(h if batch_first else h.transpose(0, 1))
            return Lambda(forward, attn=nn.MultiheadAttention(4, 2, batch_first=batch_first),
                          out=nn.Linear(4, 2))

        def encoder(batch_first=batch_first):
            def forward(s, x):
                x = x if batch_first else x.transpose(0, 1)
                h = s.layer(x)
                return s.out(h if batch_first else h.transpose(0, 1))
            layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0,
                                               batch_first=batch_first)
            return Lambda(forward, layer=layer, out=nn.Linear(4, 2))

        for t in (3, B):
            cases.append(Case(f"mha-batch_first={batch_first}-T{t}", mha, _randn(B, t, 4),
                              _targets(B, t, 2)))
            cases.append(Case(f"encoder-batch_first={batch_first}-T{t}", encoder,
                              _randn(B, t, 4), _targets(B, t, 2)))
    return cases


def trap_cases() -> list[Case]:
    def registered_twice():
        lin = nn.Linear(6, 6)  # a fresh module per build: no state shared between runs
        return nn.Sequential(lin, nn.Tanh(), lin)

    def frozen():
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        model[0].requires_grad_(False)
        return model

    def frozen_other_width():  # widths other than B: nothing to trace
        model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
        model[0].requires_grad_(False)
        return model

    def frozen_unsupported_other_width():
        model = Lambda(lambda s, x: s.out(torch.tanh(s.odd(x))), odd=nn.Bilinear(5, 5, 3),
                       out=nn.Linear(3, 2))
        model.odd = _BilinearSelf(model.odd)
        model.odd.requires_grad_(False)
        return model

    def frozen_unsupported():
        model = Lambda(lambda s, x: s.out(torch.tanh(s.odd(x))), odd=nn.Bilinear(4, 4, 4),
                       out=nn.Linear(4, 2))
        model.odd = _BilinearSelf(model.odd)
        model.odd.requires_grad_(False)
        return model

    return [
        Case("module-registered-twice", registered_twice, _randn(B, 6), _targets(B, 6)),
        Case("inplace-relu", lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True),
                                                   nn.Linear(4, 2)),
             _randn(B, 4), _targets(B, 2)),
        Case("frozen-layer", frozen, _randn(B, 4), _targets(B, 2)),
        Case("frozen-layer-other-width", frozen_other_width, _randn(B, 5), _targets(B, 2)),
        Case("frozen-unsupported-layer-other-width", frozen_unsupported_other_width,
             _randn(B, 5), _targets(B, 2)),
        Case("weight-norm", lambda: nn.Sequential(
            nn.utils.weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2)),
            _randn(B, 4), _targets(B, 2)),
        Case("parametrized-weight", _parametrized, _randn(B, 4), _targets(B, 2)),
        Case("parameter-used-in-forward", lambda: Lambda(
            lambda s, x: s.lin(x) + s.lin.bias * s.lin.weight.sum(), lin=nn.Linear(4, 2)),
            _randn(B, 4), _targets(B, 2)),
        Case("frozen-unsupported-layer", frozen_unsupported, _randn(B, 4), _targets(B, 2)),
        Case("unused-parameter", lambda: Lambda(lambda s, x: s.used(x), used=nn.Linear(4, 2),
                                                unused=nn.Linear(4, 2)),
             _randn(B, 4), _targets(B, 2)),
        Case("bare-parameter", lambda: _ScaledLinear(), _randn(B, 3, 4), _targets(B, 3, 2)),
        Case("positional-embedding", lambda: _Positional(), _randn(B, 3, 4), _targets(B, 3, 2)),
        Case("dropout-free-cnn", lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(3 * 3 * 3, 10)), _randn(B, 1, 6, 6), _classes(10, B),
            loss=lambda: nn.CrossEntropyLoss()),
    ]


def _parametrized() -> nn.Module:
    class Symmetric(nn.Module):
        def forward(self, weight):
            return (weight + weight.t()) / 2

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    nn.utils.parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model


class _BilinearSelf(nn.Module):
    def __init__(self, bilinear):
        super().__init__()
        self.bilinear = bilinear

    def forward(self, x):
        return self.bilinear(x, x)


class _ScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(2) * 1.5)

    def forward(self, x):
        return self.lin(x) * self.scale


class _Positional(nn.Module):
    def __init__(self):
        super().__init__()
        self.position = nn.Parameter(torch.randn(3, 4) * 0.1)
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(torch.tanh(x + self.position))


CASES = (linear_cases() + conv_cases() + embedding_cases() + recurrent_cases() + norm_cases()
         + attention_cases() + trap_cases())

#: engines whose statistics are per example (ghost batches and rank spreads have other units)
PER_EXAMPLE_ENGINES = sorted(
    name for name, cls in ENGINES.items()
    if getattr(cls, "units_are_examples", True) and not getattr(cls, "needs_distributed", False)
)


@pytest.mark.parametrize("engine", PER_EXAMPLE_ENGINES + ["auto"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_exact_or_refused(case, engine):
    run_case(case, engine)


def test_auto_serves_the_common_layers_exactly():
    """'auto' must end in a correct engine whenever one exists; these all have one."""
    served = ["linear-bias" + "True", "conv2d-default", "embedding-default",
              "LSTM-default-batch_first=True-T3", "layernorm", "dropout-free-cnn"]
    for case in CASES:
        if case.name in served:
            assert run_case(case, "auto") == "exact", case.name


def test_auto_refuses_only_where_every_engine_does():
    """'auto' must end in a correct engine whenever one exists, also when the first
    candidates refuse only while running the model (a layer called twice, examples merged
    by flatten(0, 1), a parameter used outside its layer)."""
    for case in CASES:
        if run_case(case, "auto") == "refused":
            for engine in PER_EXAMPLE_ENGINES:
                assert run_case(case, engine) == "refused", (case.name, engine)


def test_a_broken_engine_fails_the_check():
    """An engine with 1/B in place of 1/(B-1) must not pass as exact."""
    base = ENGINES[PER_EXAMPLE_ENGINES[0]]

    class Biased(base):
        def compute(self, *args, **kwargs):
            result = super().compute(*args, **kwargs)
            units = getattr(result, "units", None) or getattr(result, "batch_size")
            for stats in result.statistics.values():
                # s_hat = (B S - g^2)/(B-1) -> ((B-1) S' ... ) : shrink the spread by (B-1)/B
                stats.sum_grad_squared.mul_((units - 1) / units).add_(
                    stats.grad * stats.grad / units ** 2)
            return result

    case = next(c for c in CASES if c.name == "linear-biasTrue")
    with pytest.raises(AssertionError):
        run_case(case, Biased())
