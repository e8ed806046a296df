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

import itertools
import math
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


@dataclass
class Trial:
    """One case made ready to run, in float64: the model, its inputs and targets, what brute
    force expects (``None`` where no per-example gradients exist, e.g. BatchNorm in train
    mode), a snapshot of the model, and hooks that note whether a backward pass reached a
    parameter. Shared by :func:`run_case` and ``tests/test_collect.py``."""

    model: nn.Module
    inputs: tuple
    targets: torch.Tensor
    expected: dict | None
    before: dict
    reached: list
    handles: list

    @classmethod
    def of(cls, case: Case) -> Trial:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(1)
        model = case.build().double()
        inputs = tuple(v.double() if v.is_floating_point() else v
                       for v in case.inputs(generator))
        targets = case.targets(generator)
        targets = targets.double() if targets.is_floating_point() else targets
        try:
            expected = brute_force(case, model, inputs, targets)
        except (RuntimeError, ValueError):
            expected = None  # the examples are not independent
        before = _snapshot(model)
        reached = []
        handles = [p.register_hook(lambda g, reached=reached: reached.append(1))
                   for p in model.parameters() if p.requires_grad]
        return cls(model, inputs, targets, expected, before, reached, handles)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def refused(self, error: UnsupportedModelError) -> str:
        """``"refused"``, once the refusal is shown to come before any gradient reached a
        parameter, to say why and to leave the model as it was."""
        self.remove_hooks()
        assert not self.reached, f"refused after the backward pass: {error}"
        _assert_unchanged(self.model, self.before)
        assert str(error), "a refusal must say why"
        return "refused"

    def exact(self) -> str:
        """``"exact"``, once ``p.grad`` equals ``loss.backward()``'s and ``p.grad_variance``
        brute force's, unused and frozen parameters keep ``p.grad is None``."""
        assert self.expected is not None, \
            "examples are not independent here: only a refusal is right"
        assert any(v[1] is not None and v[1].abs().max() > 0 for v in self.expected.values()), \
            "the comparison must be able to fail"
        names = {p: n for n, p in self.model.named_parameters()}
        for param, (grad, variance) in self.expected.items():
            if grad is None:
                assert param.grad is None, f"{names[param]}: unused, yet p.grad is set"
                continue
            assert param.grad is not None, f"{names[param]}: p.grad missing"
            torch.testing.assert_close(param.grad, grad, rtol=1e-9, atol=1e-12,
                                       msg=f"{names[param]}: p.grad differs from "
                                           "loss.backward()")
            torch.testing.assert_close(param.grad_variance, variance, rtol=1e-7, atol=1e-14,
                                       msg=f"{names[param]}: p.grad_variance differs from "
                                           "brute force")
        frozen = [p for p in self.model.parameters() if not p.requires_grad]
        assert all(p.grad is None for p in frozen)
        return "exact"


def run_case(case: Case, engine: str | msvag_mb.Engine) -> str:
    """``"exact"`` or ``"refused"``; raises AssertionError for anything else."""
    trial = Trial.of(case)
    try:
        gradient_variance = msvag_mb.GradientVariance(trial.model, case.loss(), engine=engine)
        gradient_variance.backward(trial.inputs, trial.targets)
    except UnsupportedModelError as error:
        return trial.refused(error)
    finally:
        trial.remove_hooks()
    return trial.exact()


def run_case_in_collect(case: Case, engine: str) -> str:
    """As :func:`run_case`, with the forward and the loss run by the caller inside
    ``gv.collect()`` (which leaves no ``torch.overrides`` mode behind when it refuses)."""
    trial = Trial.of(case)
    try:
        gradient_variance = msvag_mb.GradientVariance(trial.model, engine=engine)
        with gradient_variance.collect(batch_size=B):
            case.loss()(trial.model(*trial.inputs), trial.targets).backward()
    except UnsupportedModelError as error:
        assert not torch.overrides._get_current_function_mode_stack()
        return trial.refused(error)
    finally:
        trial.remove_hooks()
    return trial.exact()


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
    return cases + reuse_linear_cases()


def _block_three_times(s, x):
    for _ in range(3):  # one residual block, its Linears called three times
        x = x + s.block(x)
    return s.out(x)


def _tied_head(bias: bool) -> nn.Module:
    model = Lambda(lambda s, x: s.head(torch.tanh(s.mid(s.emb(x)))), emb=nn.Embedding(7, 4),
                   mid=nn.Linear(4, 4), head=nn.Linear(4, 7, bias=bias))
    model.head.weight = model.emb.weight
    return model


class _FunctionalHead(nn.Module):
    """Embedding, a Linear, and an output head tied by F.linear with a bare bias."""

    def __init__(self, sequence_first: bool = False):
        super().__init__()
        self.emb, self.mid = nn.Embedding(7, 4), nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.randn(7) * 0.1)
        self.sequence_first = sequence_first

    def forward(self, x):
        if self.sequence_first:  # (T, B) tokens, a view of the input
            h = torch.tanh(self.mid(self.emb(x.t())))
            return F.linear(h, self.emb.weight, self.bias).transpose(0, 1)
        return F.linear(torch.tanh(self.mid(self.emb(x))), self.emb.weight, self.bias)


def reuse_linear_cases() -> list[Case]:
    """Parameters used several times (issue 13): exact in ``extensions``."""
    tokens = lambda t: lambda g: (torch.randint(0, 7, (B, t), generator=g),)  # noqa: E731
    cases = []
    for t in (3, B):
        cases += [
            Case(f"linear-block-three-times-T{t}", lambda: Lambda(
                _block_three_times, block=nn.Sequential(nn.Linear(4, 4), nn.Tanh(),
                                                        nn.Linear(4, 4)),
                out=nn.Linear(4, 2)), _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"linear-called-twice-sequence-first-T{t}", lambda: Lambda(
                lambda s, x: s.lin(torch.tanh(s.lin(x.transpose(0, 1)))).transpose(0, 1),
                lin=nn.Linear(4, 4)), _randn(B, t, 4), _targets(B, t, 4)),
            Case(f"tied-embedding-head-module-T{t}", lambda: _tied_head(True), tokens(t),
                 _classes(7, B, t), loss=SequenceCE),
            Case(f"tied-embedding-head-functional-T{t}", lambda: _FunctionalHead(),
                 tokens(t), _classes(7, B, t), loss=SequenceCE),
            Case(f"tied-embedding-head-sequence-first-T{t}", lambda: _FunctionalHead(True),
                 tokens(t), _classes(7, B, t), loss=SequenceCE),
            Case(f"linear-weight-also-functional-T{t}", lambda: Lambda(
                lambda s, x: s.lin(x) + F.linear(torch.tanh(s.pre(x)), s.lin.weight),
                lin=nn.Linear(4, 4), pre=nn.Linear(4, 4)), _randn(B, t, 4), _targets(B, t, 4)),
            Case(f"linear-tied-transposed-T{t}", lambda: Lambda(  # a tied autoencoder
                lambda s, x: F.linear(torch.tanh(s.enc(x)), s.enc.weight.t()),
                enc=nn.Linear(4, 3)), _randn(B, t, 4), _targets(B, t, 4)),
        ]
    cases += [
        Case("linear-tied-module-no-bias", lambda: _tied_head(False),
             lambda g: (torch.randint(0, 7, (B, 3), generator=g),), _classes(7, B, 3),
             loss=SequenceCE),
        Case("matmul-bare-weight", lambda: _MatmulBare(), _randn(B, 3, 4), _targets(B, 3, 2)),
        Case("linear-called-twice-sum-loss", lambda: Lambda(
            lambda s, x: s.lin(torch.tanh(s.lin(x))), lin=nn.Linear(4, 4)),
            _randn(B, 4), _targets(B, 4), loss=lambda: nn.MSELoss(reduction="sum")),
    ]

    def attention_tied_to_linear():  # out_proj.weight is also a Linear's weight
        model = Lambda(lambda s, x: s.out(torch.tanh(s.head(s.attn(x, x, x)[0]))),
                       attn=nn.MultiheadAttention(4, 2, batch_first=True),
                       head=nn.Linear(4, 4), out=nn.Linear(4, 2))
        model.head.weight = model.attn.out_proj.weight
        return model

    def self_then_distinct(s, x):  # sequence-first: self-attention, then k and v apart
        h = torch.tanh(s.attn(*3 * [x.transpose(0, 1)])[0])
        k, v = s.k(x).transpose(0, 1), s.v(x).transpose(0, 1)
        return s.out(s.attn(h, k, v, need_weights=False)[0].transpose(0, 1))

    for t in (3, B):  # attention used several times (packed in-projection in row blocks)
        cases += [
            Case(f"mha-reused-self-then-distinct-sequence-first-T{t}", lambda: Lambda(
                self_then_distinct, attn=nn.MultiheadAttention(4, 2, add_bias_kv=True),
                k=nn.Linear(4, 4), v=nn.Linear(4, 4), out=nn.Linear(4, 2)),
                _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"encoder-layer-twice-norm_first-T{t}", lambda: Lambda(
                lambda s, x: s.out(s.layer(s.layer(x))), layer=nn.TransformerEncoderLayer(
                    4, 2, dim_feedforward=6, dropout=0.0, batch_first=True,
                    norm_first=True), out=nn.Linear(4, 2)), _randn(B, t, 4),
                _targets(B, t, 2)),
        ]
    cases.append(Case("mha-out-proj-tied-to-linear", attention_tied_to_linear,
                      _randn(B, 3, 4), _targets(B, 3, 2)))

    def lstm_weight_ih_tied():  # a second LSTM on the first's output shares weight_ih_l0
        model = Lambda(lambda s, x: s.out(s.second(s.first(x)[0])[0]),
                       first=nn.LSTM(4, 4, batch_first=True),
                       second=nn.LSTM(4, 4, batch_first=True), out=nn.Linear(4, 2))
        model.second.weight_ih_l0 = model.first.weight_ih_l0
        return model

    def encoder_then_decoder(s, x):  # one layer on two segments, the second from the state
        first, state = s.rnn(x[:, :3])
        return s.out(torch.cat([first, s.rnn(x[:, 3:], state)[0]], 1))

    cases += [  # recurrent layers used several times (sum over steps of outer products)
        Case("LSTM-called-twice-summed", lambda: Lambda(
            lambda s, x: s.out(s.rnn(x)[0] + s.rnn(torch.tanh(2 * x))[0]),
            rnn=nn.LSTM(3, 4, batch_first=True, proj_size=3), out=nn.Linear(3, 2)),
            _randn(B, 3, 3), _targets(B, 3, 2)),
        Case("GRU-bidirectional-encoder-then-decoder", lambda: Lambda(
            encoder_then_decoder, rnn=nn.GRU(3, 4, batch_first=True, bidirectional=True),
            out=nn.Linear(8, 2)), _randn(B, 6, 3), _targets(B, 6, 2)),
        Case("LSTM-weight_ih-tied-to-another-LSTM", lstm_weight_ih_tied, _randn(B, 3, 4),
             _targets(B, 3, 2)),
    ]
    return cases


class _MatmulBare(nn.Module):
    """``x @ W`` with a bare Parameter ``W`` (in, out), then a Linear."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3) * 0.5)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.weight))


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
    cases.extend(_conv3d_and_transposed_cases())
    return cases


def _conv3d_and_transposed_cases() -> list[Case]:
    """Conv3d and ConvTranspose1d/2d/3d beyond the settings of conv_cases: output padding
    with stride or with dilation, forward's output_size, non-square settings, patches
    large enough for the grouped-convolution path, and T == B traps."""
    cases = []
    transposed = [dict(stride=2, padding=1, output_padding=1), dict(stride=3, output_padding=2),
                  dict(dilation=2, output_padding=1),  # output_padding < dilation, stride 1
                  dict(stride=2, padding=2, dilation=2, groups=2, output_padding=1, bias=False),
                  dict(kernel_size=1, stride=2), dict(kernel_size=2, stride=2, padding=1)]
    convs = ((1, nn.ConvTranspose1d), (2, nn.ConvTranspose2d), (3, nn.ConvTranspose3d))
    for dim, conv in convs:
        size = {1: 5, 2: 4, 3: 3}[dim]
        for setting in transposed:
            label = ",".join(f"{k}={v}" for k, v in setting.items())

            def build(conv=conv, setting=setting, shape=(2, *([size] * dim))):
                setting = dict(setting)
                return _with_head(conv(2, 4, setting.pop("kernel_size", 3), **setting), shape)

            cases.append(Case(f"convT{dim}d-{label}", build, _randn(B, 2, *([size] * dim)),
                              _targets(B, 2)))
        # grouped-convolution path: out/groups * prod(k) >= 128
        cases.append(Case(f"convT{dim}d-large-patch", lambda conv=conv, dim=dim, size=size:
                          _with_head(conv(2, {1: 32, 2: 16, 3: 6}[dim], 4 - (dim == 3),
                                          stride=2, output_padding=1), (2, *([size] * dim))),
                          _randn(B, 2, *([size] * dim)), _targets(B, 2)))
        out = [2 * size + 2] * dim  # one more than the default: output_padding 1

        def output_size(conv=conv, dim=dim, out=out):
            return Lambda(lambda s, x: s.head(s.conv(x, output_size=out).flatten(1)),
                          conv=conv(2, 3, 3, stride=2), head=nn.Linear(3 * out[0] ** dim, 2))

        cases.append(Case(f"convT{dim}d-output_size", output_size,
                          _randn(B, 2, *([size] * dim)), _targets(B, 2)))
    non_square = dict(kernel_size=(3, 2, 1), stride=(2, 1, 3), padding=(1, 0, 0),
                      output_padding=(1, 0, 2), dilation=(1, 2, 1))
    for dim, conv in convs[1:]:
        setting = {k: v[:dim] for k, v in non_square.items()}
        cases.append(Case(f"convT{dim}d-non-square", lambda conv=conv, setting=setting, dim=dim:
                          _with_head(conv(2, 3, **setting), (2, *([4] * dim))),
                          _randn(B, 2, *([4] * dim)), _targets(B, 2)))
    conv3d = [dict(kernel_size=(3, 2, 1), stride=(2, 1, 1), padding=(1, 0, 0),
                   dilation=(1, 2, 1)),
              dict(in_channels=6, groups=1),  # 6 * 27 input values per patch: grouped path
              dict(in_channels=12, groups=2, padding=1, stride=2),
              dict(in_channels=6, groups=3, dilation=2, padding=2, bias=False)]
    for setting in conv3d:
        setting = {"in_channels": 2, "kernel_size": 3, **setting}
        label = ",".join(f"{k}={v}" for k, v in setting.items())
        channels = setting["in_channels"]
        cases.append(Case(f"conv3d-{label}", lambda setting=setting, channels=channels:
                          _with_head(nn.Conv3d(out_channels=6, **setting), (channels, 5, 4, 5)),
                          _randn(B, channels, 5, 4, 5), _targets(B, 2)))
    # every dim of size B: the batch axis is traced, not read off the shape
    cases.append(Case("conv3d-all-dims-equal-batch", lambda: _with_head(
        nn.Conv3d(B, B, 3, padding=1), (B, B, B, B), nn.ReLU(), nn.Conv3d(B, 2, 2)),
        _randn(B, B, B, B, B), _targets(B, 2)))
    cases.append(Case("convT1d-channels-and-length-equal-batch", lambda: _with_head(
        nn.ConvTranspose1d(B, B, 3, stride=2), (B, B), nn.ReLU(), nn.ConvTranspose1d(B, 2, 2)),
        _randn(B, B, B), _targets(B, 2)))
    cases.append(Case("convT1d-on-permuted-sequence-T=B", lambda: Lambda(
        lambda s, x: s.head(torch.tanh(s.conv(x.permute(0, 2, 1))).flatten(1)),
        conv=nn.ConvTranspose1d(3, 2, 3), head=nn.Linear(2 * (B + 2), 2)),
        _randn(B, B, 3), _targets(B, 2)))
    cases.append(Case("convT2d-per-frame", lambda: Lambda(  # frames merged into the batch
        lambda s, x: s.head(s.conv(x.flatten(0, 1)).view(x.shape[0], -1)),
        conv=nn.ConvTranspose2d(2, 3, 2), head=nn.Linear(B * 3 * 4 * 4, 2)),
        _randn(B, B, 2, 3, 3), _targets(B, 2)))
    cases.append(Case("conv-autoencoder", lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)),
        _randn(B, 2, 6, 6), _targets(B, 2, 6, 6)))
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
    cases.extend(_embedding_bag_cases())
    return cases


def _bags(g: torch.Generator, length: int = 5) -> torch.Tensor:
    """``(B, length)`` indices into 7 rows with repeated rows, padding entries (row 0) and a
    bag of padding only."""
    x = torch.randint(1, 7, (B, length), generator=g)
    x[0] = 0
    x[1, :2] = 0
    x[2, :3] = 3
    return x


def _embedding_bag_cases() -> list[Case]:
    """nn.EmbeddingBag: the modes with padding_idx, max_norm and per_sample_weights, 1-d
    input with offsets (include_last_offset), and inputs whose bags are not the examples."""
    cases = []
    settings = [dict(padding_idx=0), dict(max_norm=1.0), dict(padding_idx=0, max_norm=1.0),
                dict(scale_grad_by_freq=True), dict(sparse=True)]
    for mode in ("sum", "mean", "max"):
        for setting in settings[:3] if mode == "max" else settings:  # torch refuses the rest
            label = ",".join(f"{k}={v}" for k, v in setting.items())
            cases.append(Case(f"embedding-bag-{mode}-{label}", lambda mode=mode, setting=setting:
                              nn.Sequential(nn.EmbeddingBag(7, 3, mode=mode, **setting),
                                            nn.Linear(3, 2)),
                              lambda g: (_bags(g),), _targets(B, 2)))
        for last in (False, True):  # flat entries, offsets made in the model
            def flat(mode=mode, last=last):
                def forward(s, x):
                    offsets = torch.arange(0, x.numel() + last, x.shape[1])
                    return s.out(s.bag(x.reshape(-1), offsets=offsets))
                return Lambda(forward, out=nn.Linear(3, 2), bag=nn.EmbeddingBag(
                    7, 3, mode=mode, padding_idx=0, include_last_offset=last))

            cases.append(Case(f"embedding-bag-{mode}-1d-offsets-last{last}", flat,
                              lambda g: (_bags(g),), _targets(B, 2)))
    cases.append(Case("embedding-bag-per-sample-weights", lambda: Lambda(
        lambda s, x, w: s.out(s.bag(x, per_sample_weights=w)), out=nn.Linear(3, 2),
        bag=nn.EmbeddingBag(7, 3, mode="sum", padding_idx=0)),
        lambda g: (_bags(g), torch.rand(B, 5, generator=g)), _targets(B, 2)))
    cases.append(Case("embedding-bag-learned-per-sample-weights", lambda: Lambda(
        lambda s, x, f: s.out(s.bag(x.reshape(-1), torch.arange(0, x.numel(), x.shape[1]),
                                    torch.sigmoid(s.gate(f)).reshape(-1))),
        gate=nn.Linear(2, 1), out=nn.Linear(3, 2), bag=nn.EmbeddingBag(7, 3, mode="sum")),
        lambda g: (_bags(g), torch.randn(B, 5, 2, generator=g)), _targets(B, 2)))
    cases.append(Case("embedding-bag-width-equals-batch", lambda: nn.Sequential(
        nn.EmbeddingBag(7, B, mode="mean"), nn.Linear(B, 2)),
        lambda g: (_bags(g, B),), _targets(B, 2)))
    cases.append(Case("embedding-bag-frozen-width-equals-batch", lambda: nn.Sequential(
        nn.EmbeddingBag(7, B).requires_grad_(False), nn.Linear(B, B), nn.Tanh(),
        nn.Linear(B, 2)), lambda g: (_bags(g),), _targets(B, 2)))  # its output's layout
    # traps: the bags are positions, not examples (T == B)
    cases.append(Case("embedding-bag-transposed-T=B", lambda: Lambda(
        lambda s, x: s.out(s.bag(x.t()).view(x.shape[0], -1)), bag=nn.EmbeddingBag(7, 3),
        out=nn.Linear(3, 2)),
        lambda g: (_bags(g, B),), _targets(B, 2)))
    cases.append(Case("embedding-bag-1d-positions-T=B", lambda: Lambda(
        lambda s, x: s.out(s.bag(x.t().reshape(-1), torch.arange(0, x.numel(), x.shape[0]))
                           .view(x.shape[0], -1)),
        bag=nn.EmbeddingBag(7, 3), out=nn.Linear(3, 2)),
        lambda g: (_bags(g, B),), _targets(B, 2)))
    cases.append(Case("embedding-bag-1d-masked", lambda: Lambda(  # ragged: lengths not traced
        lambda s, x: s.out(s.bag(x[x != 0], torch.cat([torch.zeros(1, dtype=torch.long),
                                                       (x != 0).sum(1).cumsum(0)[:-1]]))),
        bag=nn.EmbeddingBag(7, 3), out=nn.Linear(3, 2)),
        lambda g: (_bags(g),), _targets(B, 2)))
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
    return cases + _more_recurrent_cases()


def _more_recurrent_cases() -> list[Case]:
    """Packed (sorted, unsorted) x initial state x direction x layout for every type;
    stacks combining options; eval-mode dropout; an unbatched input."""
    cases = []
    types = {"RNN": (nn.RNN, {}), "RNN-relu": (nn.RNN, {"nonlinearity": "relu"}),
             "GRU": (nn.GRU, {}), "LSTM": (nn.LSTM, {}), "LSTM-proj": (nn.LSTM, {"proj_size": 3})}
    for label, (rnn_type, extra) in types.items():
        for index, (sort, initial, bidirectional) in enumerate(itertools.product(
                (True, False), (False, True), (False, True))):
            options = dict(extra, bidirectional=bidirectional, batch_first=index % 2 == 0,
                           bias=index % 3 != 2, num_layers=1 + (index % 4 == 1))
            lengths = [6, 5, 3, 2] if sort else [3, 6, 2, 5]
            cases.append(Case(
                f"{label}-packed-sorted={sort}-h0={initial}-{_options_label(options)}",
                lambda rnn_type=rnn_type, options=options, sort=sort, initial=initial:
                    _PackedVariant(rnn_type, sort, initial, **options),
                lambda g, lengths=lengths: (torch.randn(B, 6, 3, generator=g),
                                            torch.tensor(lengths[:B])), _targets(B, 2)))
        stacked = dict(extra, num_layers=2, bidirectional=True)
        for options, eval_mode in ((dict(stacked), False), (dict(stacked, bias=False), False),
                                   (dict(stacked, dropout=0.5), True)):
            for batch_first, t in ((True, B), (False, B), (False, 3)):
                cases.append(Case(
                    f"{label}-stack-{_options_label(options)}-eval={eval_mode}-"
                    f"batch_first={batch_first}-T{t}",
                    lambda rnn_type=rnn_type, options=options, batch_first=batch_first,
                    eval_mode=eval_mode: _Stack(rnn_type, batch_first, eval_mode, **options),
                    _randn(B, t, 3), _targets(B, t, 2)))
        cases.append(Case(f"{label}-unbatched", lambda rnn_type=rnn_type, extra=extra:
                          _Unbatched(rnn_type, **extra), _randn(B, 5, 3), _targets(B, 2)))
    return cases


def _options_label(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


class _PackedVariant(nn.Module):
    """Packed sequences (hidden 5, at most 6 steps: the padded output's batch axis is the
    only one of size B), optionally with an initial state from the first step, read out
    from the padded output and the final states."""

    def __init__(self, rnn_type, enforce_sorted, initial_state, **options):
        super().__init__()
        self.rnn = rnn_type(3, 5, **options)
        self.enforce_sorted = enforce_sorted
        directions = 2 if self.rnn.bidirectional else 1
        width = options.get("proj_size") or 5
        self.states = self.rnn.num_layers * directions
        self.init = nn.Linear(3, self.states * width) if initial_state else None
        self.out = nn.Linear(directions * width, 2)
        self.head = nn.Linear(width, 2)

    def forward(self, x, lengths):
        batch_first = self.rnn.batch_first
        packed = nn.utils.rnn.pack_padded_sequence(
            x if batch_first else x.transpose(0, 1), lengths, batch_first=batch_first,
            enforce_sorted=self.enforce_sorted)
        hx = None
        if self.init is not None:
            hx = torch.tanh(self.init(x[:, 0])).view(x.shape[0], self.states, -1)
            hx = hx.transpose(0, 1)
            if isinstance(self.rnn, nn.LSTM):
                hx = (hx, torch.zeros(self.states, x.shape[0], 5, dtype=x.dtype))
        output, state = self.rnn(packed, hx)
        padded, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True,
                                                     total_length=x.shape[1])
        h = state[0] if isinstance(state, tuple) else state
        return self.out(padded).sum(1) + self.head(h[-1])


class _Stack(nn.Module):
    """A stacked recurrent layer on padded input, in either layout."""

    def __init__(self, rnn_type, batch_first, eval_mode, **options):
        super().__init__()
        self.rnn = rnn_type(3, 4, batch_first=batch_first, **options)
        width = (options.get("proj_size") or 4) * (2 if options.get("bidirectional") else 1)
        self.out = nn.Linear(width, 2)
        if eval_mode:
            self.eval()

    def forward(self, x):
        batch_first = self.rnn.batch_first
        h, _ = self.rnn(x if batch_first else x.transpose(0, 1))
        return self.out(h if batch_first else h.transpose(0, 1))


class _Unbatched(nn.Module):
    """Feeds the layer one unbatched sequence: refused by the per-example engines."""

    def __init__(self, rnn_type, **options):
        super().__init__()
        self.rnn = rnn_type(3, 4, **options)
        self.out = nn.Linear(options.get("proj_size") or 4, 2)

    def forward(self, x):
        h, _ = self.rnn(x[0])
        return self.out(h[-1]).expand(x.shape[0], -1)


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
    ] + _layer_norm_cases() + _rms_norm_cases() + _group_norm_cases() + _instance_norm_cases()


def _affine(norm: nn.Module, frozen: tuple[str, ...] = ()) -> nn.Module:
    """``norm`` with random affine parameters (not the 1 and 0 of the init), ``frozen``
    ones not trainable."""
    with torch.no_grad():
        for name, param in norm.named_parameters():
            param.copy_(torch.randn_like(param) * 0.5 + (1.0 if name == "weight" else 0.0))
            param.requires_grad_(name not in frozen)
    return norm


def _between(norm: nn.Module, features: int = 6) -> nn.Module:
    """``Linear(4, features)``, ``norm``, ``Linear(features, 2)``."""
    return nn.Sequential(nn.Linear(4, features), norm, nn.Linear(features, 2))


def _sequence_first(norm: nn.Module, features: int = 6) -> nn.Module:
    """``_between`` on the transposed ``(T, B, 4)`` input, transposed back."""
    return Lambda(lambda s, x: s.b(s.norm(s.a(x.transpose(0, 1)))).transpose(0, 1),
                  a=nn.Linear(4, features), norm=norm, b=nn.Linear(features, 2))


def _on_input_sequence_first(norm: nn.Module) -> nn.Module:
    """``norm`` straight on a view of the model's input, ``x.transpose(0, 1)``."""
    return Lambda(lambda s, x: s.out(s.norm(x.transpose(0, 1))).transpose(0, 1), norm=norm,
                  out=nn.Linear(4, 2))


def _trailing_norm_cases(prefix: str, norm, settings: dict) -> list[Case]:
    """LayerNorm and RMSNorm (``norm(shape, **setting)``) on the layouts the trace reports."""
    cases = []
    for label, setting in settings.items():
        cases.append(Case(f"{prefix}-{label}", lambda setting=setting: _between(_affine(
            norm(6, **setting))), _randn(B, 3, 4), _targets(B, 3, 2)))
    for t in (3, B):  # T == B: the examples' axis is traced, not guessed
        cases.append(Case(f"{prefix}-tokens-T{t}", lambda: _between(_affine(norm(6))),
                          _randn(B, t, 4), _targets(B, t, 2)))
        cases.append(Case(f"{prefix}-sequence-first-T{t}", lambda: _sequence_first(
            _affine(norm(6))), _randn(B, t, 4), _targets(B, t, 2)))
        cases.append(Case(f"{prefix}-on-input-sequence-first-T{t}", lambda: (
            _on_input_sequence_first(_affine(norm(4)))), _randn(B, t, 4), _targets(B, t, 2)))
    cases += [
        Case(f"{prefix}-2d-input", lambda: nn.Sequential(_affine(norm(4)), nn.Linear(4, 2)),
             _randn(B, 4), _targets(B, 2)),
        Case(f"{prefix}-4d-input", lambda: _between(_affine(norm(6))), _randn(B, 2, 3, 4),
             _targets(B, 2, 3, 2)),
        Case(f"{prefix}-shape-3x6", lambda: _between(_affine(norm((3, 6)))),
             _randn(B, 3, 4), _targets(B, 3, 2)),
        Case(f"{prefix}-shape-Bx6-4d-input", lambda: _between(_affine(norm((B, 6)))),
             _randn(B, 2, B, 4), _targets(B, 2, B, 2)),
        Case(f"{prefix}-no-affine", lambda: _between(norm(6, elementwise_affine=False)),
             _randn(B, 3, 4), _targets(B, 3, 2)),
        Case(f"{prefix}-frozen-T{B}", lambda: _between(_affine(norm(6)).requires_grad_(False)),
             _randn(B, B, 4), _targets(B, B, 2)),
        # normalising over the examples' axis mixes them: no per-example gradients
        Case(f"{prefix}-over-the-batch-axis", lambda: _on_input_sequence_first(
            _affine(norm((B, 4)))), _randn(B, 3, 4), _targets(B, 3, 2)),
        Case(f"{prefix}-called-twice", lambda: Lambda(
            lambda s, x: s.b(s.norm(torch.tanh(s.norm(s.a(x))))), a=nn.Linear(4, 6),
            norm=_affine(norm(6)), b=nn.Linear(6, 2)), _randn(B, 3, 4), _targets(B, 3, 2)),
    ]
    return cases


def _layer_norm_cases() -> list[Case]:
    cases = _trailing_norm_cases("layernorm", nn.LayerNorm, {
        "bias=False": dict(bias=False), "eps=0.5": dict(eps=0.5)})
    cases.append(Case("layernorm-frozen-weight", lambda: _between(_affine(
        nn.LayerNorm(6), frozen=("weight",))), _randn(B, 3, 4), _targets(B, 3, 2)))
    cases.append(Case("layernorm-frozen-bias-2d", lambda: nn.Sequential(_affine(
        nn.LayerNorm(4), frozen=("bias",)), nn.Linear(4, 2)), _randn(B, 4), _targets(B, 2)))
    return cases


def _rms_norm_cases() -> list[Case]:
    return _trailing_norm_cases("rmsnorm", nn.RMSNorm, {
        "eps=None": dict(), "eps=0.5": dict(eps=0.5), "eps=1e-9": dict(eps=1e-9)})


def _channel_norm_cases(prefix: str, norm) -> list[Case]:
    """GroupNorm and InstanceNorm (``norm(channels, positions_dims, **setting)``): examples
    along dim 0 of ``(B, C, *positions)``."""
    cases = []
    for length in (5, B):  # positions == B: only dim 0 may hold the examples
        cases.append(Case(f"{prefix}-1d-L{length}", lambda length=length: _with_head(
            nn.Conv1d(2, 4, 3), (2, length + 2), _affine(norm(4, 1))),
            _randn(B, 2, length + 2), _targets(B, 2)))
    cases += [
        Case(f"{prefix}-2d", lambda: _with_head(nn.Conv2d(2, 4, 3), (2, 5, 5),
                                               _affine(norm(4, 2))),
             _randn(B, 2, 5, 5), _targets(B, 2)),
        Case(f"{prefix}-3d-on-input", lambda: _with_head(_affine(norm(2, 3)), (2, 3, 3, 3)),
             _randn(B, 2, 3, 3, 3), _targets(B, 2)),
        Case(f"{prefix}-channels-equal-batch", lambda: _with_head(nn.Conv1d(
            2, B, 3), (2, 6), _affine(norm(B, 1))), _randn(B, 2, 6), _targets(B, 2)),
        Case(f"{prefix}-eps=0.5", lambda: _with_head(nn.Conv1d(2, 4, 3), (2, 6),
                                                    _affine(norm(4, 1, eps=0.5))),
             _randn(B, 2, 6), _targets(B, 2)),
        Case(f"{prefix}-frozen-weight", lambda: _with_head(nn.Conv1d(2, 4, 3), (2, 6), _affine(
            norm(4, 1), frozen=("weight",))), _randn(B, 2, 6), _targets(B, 2)),
        Case(f"{prefix}-no-affine", lambda: _with_head(nn.Conv1d(2, 4, 3), (2, 6),
                                                      norm(4, 1, affine=False)),
             _randn(B, 2, 6), _targets(B, 2)),
        Case(f"{prefix}-called-twice", lambda: Lambda(
            lambda s, x: s.out(s.norm(torch.tanh(s.norm(x))).flatten(1)),
            norm=_affine(norm(4, 1)), out=nn.Linear(4 * 3, 2)), _randn(B, 4, 3), _targets(B, 2)),
    ]
    return cases


def _group_norm_cases() -> list[Case]:
    cases = []
    for groups in (1, 2, 4):  # 4: one channel per group on 4 channels (instance norm)
        cases += _channel_norm_cases(f"groupnorm-{groups}groups", lambda c, _, groups=groups,
                                     **kw: nn.GroupNorm(math.gcd(groups, c), c, **kw))
    cases.append(Case("groupnorm-2d-input", lambda: _between(_affine(nn.GroupNorm(3, 6))),
                      _randn(B, 4), _targets(B, 2)))
    return cases


_INSTANCE_NORMS = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _instance_norm_cases() -> list[Case]:
    cases = _channel_norm_cases("instancenorm", lambda c, dims, affine=True, **kw: (
        _INSTANCE_NORMS[dims](c, affine=affine, **kw)))
    for dims, layer in _INSTANCE_NORMS.items():
        shape = (2, *([3] * dims))
        for train in (True, False):
            cases.append(Case(
                f"instancenorm{dims}d-running-stats-train={train}",
                lambda layer=layer, shape=shape, train=train: _with_head(_with_running_stats(
                    _affine(layer(2, affine=True, track_running_stats=True)), train), shape),
                _randn(B, *shape), _targets(B, 2)))
    cases.append(Case("instancenorm-running-stats-called-twice", lambda: Lambda(
        lambda s, x: s.out(s.norm(torch.tanh(s.norm(x))).flatten(1)), norm=_with_running_stats(
            _affine(nn.InstanceNorm1d(4, affine=True, track_running_stats=True)), True),
        out=nn.Linear(4 * 3, 2)), _randn(B, 4, 3), _targets(B, 2)))
    # a (B, B) input to InstanceNorm1d is its unbatched (C, L) form: examples as channels
    cases.append(Case("instancenorm1d-unbatched-input", lambda: nn.Sequential(
        nn.Linear(4, B), _affine(nn.InstanceNorm1d(B, affine=True)), nn.Linear(B, 2)),
        _randn(B, 4), _targets(B, 2)))
    return cases


def _with_running_stats(norm: nn.Module, train: bool) -> nn.Module:
    """``norm`` with random running statistics, in train or eval mode."""
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn_like(norm.running_mean))
        norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    return norm.train(train)


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
    return cases + _mha_option_cases() + _transformer_layer_cases()


class _Attention(nn.Module):
    """``pre`` Linear, ``nn.MultiheadAttention(4, 2, **options)``, a head; ``inputs``: how
    query, key and value are formed; ``call``: the call's options (``attn_mask`` by kind)."""

    def __init__(self, batch_first=True, inputs="self", call=(), **options):
        super().__init__()
        self.batch_first, self.inputs, self.call = batch_first, inputs, dict(call)
        self.pre = nn.Linear(4, 4)
        if inputs == "distinct":
            self.pre_k = nn.Linear(4, options.get("kdim") or 4)
            self.pre_v = nn.Linear(4, options.get("vdim") or 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first, **options)
        self.out = nn.Linear(4, 2)

    def forward(self, x, *masks):
        h = self.pre(x)
        q, k, v = {"self": lambda: (h, h, h),
                   "same-kv": lambda: (h, torch.tanh(h), None),
                   "distinct": lambda: (h, self.pre_k(x), self.pre_v(x))}[self.inputs]()
        v = k if v is None else v
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v)) if v is not k else \
                (q.transpose(0, 1), *(2 * [k.transpose(0, 1)]))
        call = dict(self.call)
        length = x.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        kind = call.pop("attn_mask", None)
        if kind == "per-example":  # (B, heads, T, T) -> (B * heads, T, T)
            call["attn_mask"] = masks[-1].reshape(-1, length, length)
        elif kind is not None:
            call["attn_mask"] = causal if kind == "bool" else causal.to(x.dtype) * -1e4
        if call.pop("key_padding_mask", False):
            call["key_padding_mask"] = masks[0]
        o, w = self.attn(q, k, v, **call)
        o = o if self.batch_first else o.transpose(0, 1)
        if w is not None:  # the weights enter the loss too
            w = (w * w).sum(-1) if w.dim() == 3 else (w * w).sum((1, -1))
            o = o + w.unsqueeze(-1)
        return self.out(o)


def _padding(t: int):
    """Inputs and a key padding mask (True: padded) hiding the last n % t positions."""
    def inputs(g):
        lengths = torch.tensor([t - n % t for n in range(B)])
        return (torch.randn(B, t, 4, generator=g), torch.arange(t) >= lengths[:, None])
    return inputs


def _mha_option_cases() -> list[Case]:
    settings = {
        "distinct": dict(inputs="distinct"), "same-kv": dict(inputs="same-kv"),
        "kdim-vdim": dict(inputs="distinct", kdim=3, vdim=5), "no-bias": dict(bias=False),
        "bias_kv": dict(add_bias_kv=True), "zero-attn": dict(add_zero_attn=True),
        "bias_kv-zero-attn-distinct": dict(inputs="distinct", add_bias_kv=True,
                                            add_zero_attn=True),
        "need-weights": dict(call=dict(need_weights=True)),
        "need-weights-per-head": dict(call=dict(need_weights=True, average_attn_weights=False)),
        "causal-bool": dict(call=dict(attn_mask="bool", need_weights=False)),
        "causal-float-weights": dict(call=dict(attn_mask="float", need_weights=True)),
        "is_causal": dict(call=dict(attn_mask="bool", is_causal=True, need_weights=False)),
        "dropout-eval": dict(dropout=0.5),
    }
    cases = []
    for name, setting in settings.items():
        for batch_first in (True, False):
            for t in (3, B):
                def build(setting=setting, batch_first=batch_first):
                    model = _Attention(batch_first=batch_first, **setting)
                    return model.eval() if "dropout" in setting else model
                cases.append(Case(f"mha-{name}-batch_first={batch_first}-T{t}", build,
                                  _randn(B, t, 4), _targets(B, t, 2)))
    for t in (3, B):
        for extra in ({}, dict(attn_mask="bool"), dict(need_weights=True)):
            call = dict(key_padding_mask=True, **extra)
            label = "-".join(f"{k}" for k in extra) or "only"
            cases.append(Case(f"mha-key-padding-{label}-T{t}", lambda call=call: _Attention(
                call=call), _padding(t), _targets(B, t, 2)))
        cases.append(Case(f"mha-attn-mask-per-example-T{t}", lambda: _Attention(
            call=dict(attn_mask="per-example")), lambda g, t=t: (
                torch.randn(B, t, 4, generator=g),
                torch.randn(B, 2, t, t, generator=g)), _targets(B, t, 2)))
    return cases


def _transformer_layer_cases() -> list[Case]:
    cases = []
    for norm_first in (False, True):
        for activation in ("relu", "gelu"):
            for batch_first in (True, False):
                def encoder(norm_first=norm_first, activation=activation,
                            batch_first=batch_first):
                    layer = nn.TransformerEncoderLayer(
                        4, 2, dim_feedforward=6, dropout=0.0, activation=activation,
                        batch_first=batch_first, norm_first=norm_first)
                    stack = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                    return Lambda(lambda s, x, pad: s.out(_sequence_call(
                        s.stack, x, batch_first, mask=_causal(x), src_key_padding_mask=pad,
                        is_causal=True)), stack=stack, out=nn.Linear(4, 2))

                def decoder(norm_first=norm_first, activation=activation,
                            batch_first=batch_first):
                    layer = nn.TransformerDecoderLayer(
                        4, 2, dim_feedforward=6, dropout=0.0, activation=activation,
                        batch_first=batch_first, norm_first=norm_first)
                    return Lambda(lambda s, x, pad: _decoder_call(s, x, pad, batch_first),
                                  layer=layer, memory=nn.Linear(4, 4), out=nn.Linear(4, 2))

                label = f"norm_first={norm_first}-{activation}-batch_first={batch_first}"
                for t in (3, B):
                    cases.append(Case(f"encoder-stack-{label}-T{t}", encoder, _padding(t),
                                      _targets(B, t, 2)))
                    cases.append(Case(f"decoder-layer-{label}-T{t}", decoder, _padding(t),
                                      _targets(B, t, 2)))
    cases.append(Case("encoder-layer-eval", lambda: Lambda(
        lambda s, x: s.out(s.layer(x)), layer=nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=6, batch_first=True), out=nn.Linear(4, 2)).eval(),
        _randn(B, B, 4), _targets(B, B, 2)))
    return cases


def _causal(x):
    """The causal mask of batch-first ``x`` (True: not attended)."""
    return torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)


def _sequence_call(layer, x, batch_first, **kwargs):
    """``layer`` on ``x`` ``(B, T, F)`` in its layout, the result batch-first again."""
    h = layer(x if batch_first else x.transpose(0, 1), **kwargs)
    return h if batch_first else h.transpose(0, 1)


def _decoder_call(s, x, pad, batch_first):
    memory = torch.tanh(s.memory(x))
    if not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)
    h = s.layer(x, memory, tgt_mask=_causal(x if batch_first else x.transpose(0, 1)),
                tgt_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True)
    return s.out(h if batch_first else h.transpose(0, 1))


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
        # operations along the examples' axis between layers (tests/test_layout_mixing.py)
        Case("rows-repeated-by-an-index", lambda: Lambda(  # sized to run on one example too
            lambda s, x: s.out(torch.tanh(s.first(x)[torch.tensor([0, 0, 2, 3])[:len(x)]
                                                   % len(x)])),
            first=nn.Linear(4, 4), out=nn.Linear(4, 2)), _randn(B, 4), _targets(B, 2)),
        Case("product-across-the-batch", lambda: Lambda(
            lambda s, x: s.out(torch.tanh(torch.ones(B, B, dtype=x.dtype) @ s.first(x))),
            first=nn.Linear(4, 4), out=nn.Linear(4, 2)), _randn(B, 4), _targets(B, 2)),
        Case("cumsum-along-steps-as-many-as-examples", lambda: Lambda(
            lambda s, x: s.out(torch.tanh(s.first(x).cumsum(1))),
            first=nn.Linear(4, 4), out=nn.Linear(4, 2)), _randn(B, B, 4), _targets(B, B, 2)),
    ] + reuse_trap_cases()


class _Bare(nn.Module):
    """``out(op(first(x), parameter))`` with a bare Parameter: ``pos`` (positions, sliced
    to T), ``gain`` (a scale), ``temperature`` (a divisor); sequence-first if asked."""

    def __init__(self, op: str, sequence_first: bool = False, tokens: bool = False):
        super().__init__()
        self.op, self.sequence_first = op, sequence_first
        self.first = nn.Embedding(7, 4) if tokens else nn.Linear(4, 4)
        self.pos = nn.Parameter(torch.randn(6, 4) * 0.3)
        self.gain = nn.Parameter(1.0 + torch.randn(4) * 0.3)
        self.temperature = nn.Parameter(2.0 + torch.rand(1, 4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.first(x.transpose(0, 1) if self.sequence_first else x)
        steps = h.shape[0 if self.sequence_first else 1]
        pos = self.pos[:steps].unsqueeze(1) if self.sequence_first else self.pos[:steps]
        h = {"pos": lambda: h + pos, "gain": lambda: h * self.gain,
             "divide": lambda: h / self.temperature,
             "all": lambda: (h - pos) * torch.sigmoid(self.gain) / self.temperature,
             "inside-and-functional": lambda: h * self.first.bias}[self.op]()
        out = self.out(torch.tanh(h))
        return out.transpose(0, 1) if self.sequence_first else out


def reuse_trap_cases() -> list[Case]:
    """Bare Parameters and a parameter used inside and outside its layer (issue 13); the
    positions with T == B (a shape-guessed batch axis would take them for examples)."""
    cases = []
    for t in (3, B):
        for op in ("pos", "gain", "divide", "all", "inside-and-functional"):
            cases.append(Case(f"bare-{op}-T{t}", lambda op=op: _Bare(op), _randn(B, t, 4),
                              _targets(B, t, 2)))
            cases.append(Case(f"bare-{op}-sequence-first-T{t}",
                              lambda op=op: _Bare(op, sequence_first=True),
                              _randn(B, t, 4), _targets(B, t, 2)))
        cases.append(Case(f"bare-positions-on-tokens-T{t}", lambda: _Bare("pos", tokens=True),
                          lambda g, t=t: (torch.randint(0, 7, (B, t), generator=g),),
                          _targets(B, t, 2)))

    def generic_tied_to_linear():  # the generic fallback's weight is a Linear's
        model = Lambda(lambda s, x: s.out(s.g(torch.tanh(s.lin(x)))), lin=nn.Linear(4, 4),
                       g=_Gated(4, 4), out=nn.Linear(4, 2))
        model.g.weight = model.lin.weight
        return model

    cases += [  # modules of the generic fallback used several times
        Case("generic-prelu-called-twice", lambda: Lambda(
            lambda s, x: s.out(s.act(s.mid(s.act(x)))), act=nn.PReLU(4),
            mid=nn.Linear(4, 4), out=nn.Linear(4, 2)), _randn(B, 4), _targets(B, 2)),
        Case("generic-bilinear-called-twice", lambda: Lambda(
            lambda s, x: (lambda h: s.out(s.bil(torch.tanh(s.bil(h, h)), h)))(s.pre(x)),
            pre=nn.Linear(3, 4), bil=nn.Bilinear(4, 4, 4), out=nn.Linear(4, 2)),
            _randn(B, 3, 3), _targets(B, 3, 2)),
        Case("generic-tied-to-linear", generic_tied_to_linear, _randn(B, 4), _targets(B, 2)),
    ]
    return cases


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


class _Gated(nn.Module):
    """Own parameters, a nonlinear forward, keyword arguments, examples on any axis."""

    def __init__(self, features=4, out=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, out) * 0.5)
        self.gate = nn.Parameter(torch.randn(out))

    def forward(self, x, scale=None, shift=0.0):
        h = torch.tanh(x @ self.weight) * torch.sigmoid(self.gate)
        return (h if scale is None else h * scale) + shift


class _TwoOutputs(nn.Module):
    """Returns two tensors that both reach the loss (their gradients are summed per
    example before squaring) and a non-tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 3) * 0.5)
        self.b = nn.Parameter(torch.randn(4, 3) * 0.5)

    def forward(self, x):
        return {"first": torch.tanh(x @ self.a), "second": (x @ self.b) ** 2, "note": "ok"}


class _Stateful(nn.Module):
    """Changes a buffer in place in its forward."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x @ self.weight


class _Branchy(nn.Module):
    """Data-dependent control flow (vmap cannot run it)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return x @ self.weight if x.sum() > 0 else -(x @ self.weight)


class _Noisy(nn.Module):
    """Dropout inside its own forward."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return F.dropout(x, 0.5, self.training) @ self.weight


class _ScaledConv(nn.Conv2d):
    """A subclass overriding a method the base's forward calls."""

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, weight * 2.0, bias)


def generic_cases() -> list[Case]:
    """Modules without an extension of their own: the generic per-example fallback."""
    cases = []
    for t in (3, B):
        cases += [
            Case(f"generic-custom-T{t}", lambda: nn.Sequential(nn.Linear(4, 4), _Gated(),
                                                                nn.Linear(3, 2)),
                 _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"generic-custom-sequence-first-T{t}", lambda: Lambda(
                lambda s, x: s.out(s.g(s.pre(x).transpose(0, 1))).transpose(0, 1),
                pre=nn.Linear(4, 4), g=_Gated(), out=nn.Linear(3, 2)),
                _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"generic-kwargs-T{t}", lambda: Lambda(
                lambda s, x: (lambda h: s.out(s.g(h, scale=torch.tanh(h)[..., :3],
                                                  shift=0.5)))(s.pre(x)),
                pre=nn.Linear(4, 4), g=_Gated(),
                out=nn.Linear(3, 2)), _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"generic-two-outputs-T{t}", lambda: Lambda(
                lambda s, x: (lambda o: s.out(o["first"] * o["second"]))(s.g(s.pre(x))),
                pre=nn.Linear(4, 4), g=_TwoOutputs(), out=nn.Linear(3, 2)),
                _randn(B, t, 4), _targets(B, t, 2)),
            Case(f"generic-bilinear-T{t}", lambda: Lambda(
                lambda s, x: (lambda h: s.out(s.bil(h, torch.tanh(h))))(s.pre(x)),
                pre=nn.Linear(4, 5), bil=nn.Bilinear(5, 5, 3), out=nn.Linear(3, 2)),
                _randn(B, t, 4), _targets(B, t, 2)),
        ]
    for parameters in (1, 3):
        cases.append(Case(f"generic-prelu-{parameters}", lambda parameters=parameters: _with_head(
            nn.Conv2d(2, 3, 3), (2, 5, 5), nn.PReLU(parameters)),
            _randn(B, 2, 5, 5), _targets(B, 2)))
    cases += [
        Case("generic-prelu-on-input", lambda: nn.Sequential(nn.PReLU(4), nn.Linear(4, 2)),
             _randn(B, 4), _targets(B, 2)),
        Case("generic-dropout-inside-eval", lambda: nn.Sequential(
            nn.Linear(4, 4), _Noisy(), nn.Linear(2, 2)).eval(), _randn(B, 4), _targets(B, 2)),
        Case("generic-buffer-in-place", lambda: nn.Sequential(nn.Linear(4, 4), _Stateful()),
             _randn(B, 4), _targets(B, 2)),
        Case("generic-data-dependent-branch", lambda: nn.Sequential(nn.Linear(4, 4),
                                                                    _Branchy()),
             _randn(B, 4), _targets(B, 2)),
        Case("generic-called-twice", lambda: Lambda(lambda s, x: s.g(torch.tanh(s.g(x))),
                                                     g=_Gated(4, 4)),
             _randn(B, 4), _targets(B, 4)),
        Case("mha-called-twice", lambda: Lambda(
            lambda s, x: s.out(s.attn(s.attn(x, x, x)[0], x, x)[0]),
            attn=nn.MultiheadAttention(4, 2, batch_first=True), out=nn.Linear(4, 2)),
            _randn(B, 3, 4), _targets(B, 3, 2)),
        Case("generic-conv-subclass", lambda: _with_head(_ScaledConv(2, 3, 3), (2, 5, 5)),
             _randn(B, 2, 5, 5), _targets(B, 2)),
        Case("linear-subclass-not-overriding", lambda: nn.Sequential(
            nn.modules.linear.NonDynamicallyQuantizableLinear(4, 3), nn.Tanh(),
            nn.Linear(3, 2)), _randn(B, 4), _targets(B, 2)),
        Case("generic-parameter-owning-child", lambda: _ScaledLinear(), _randn(B, 4),
             _targets(B, 2)),
    ]
    return cases


def independence_trap_cases() -> list[Case]:
    """Models whose examples are not independent: no per-example gradients exist, so every
    engine must refuse (a one-example re-run would silently compute something else)."""
    def mixing():  # a statistic over the examples' axis, outside any layer
        return Lambda(lambda s, x: s.out(torch.tanh(s.first(x) - 0.5 * s.first(x).mean(0))),
                      first=nn.Linear(4, 4), out=nn.Linear(4, 2))

    def positions_along_examples():  # (T, B, d) + (T, d) with T == B broadcasts over dim 0
        model = Lambda(lambda s, x: s.out(torch.tanh(s.first(x.transpose(0, 1)) + s.pos))
                       .transpose(0, 1), first=nn.Linear(4, 4), out=nn.Linear(4, 2))
        model.pos = nn.Parameter(torch.randn(B, 4))
        return model

    return [Case("mixes-the-examples", mixing, _randn(B, 4), _targets(B, 2)),
            Case("positions-broadcast-along-examples", positions_along_examples,
                 _randn(B, B, 4), _targets(B, B, 2))]


CASES = (linear_cases() + conv_cases() + embedding_cases() + recurrent_cases() + norm_cases()
         + attention_cases() + trap_cases() + generic_cases() + independence_trap_cases())

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
