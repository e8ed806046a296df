"""Recurrent layers whose parameters are used several times in one forward pass (issue 13).

An ``nn.LSTM``/``GRU``/``RNN`` called on two inputs, an encoder run on a second sequence
from the first one's final state, packed sequences, bidirectional and projected layers,
a weight tied to another recurrent layer's or also used outside the layer: the
per-example contributions of every use (``sum_t`` of outer products of gate gradients
with inputs or previous hidden states) are added before squaring, and the ``extensions``
engine must be EXACT against brute force in float64 (one ``torch.autograd.grad`` per
example, :func:`test_exact_or_refused.run_case`), for ``engine="auto"`` too. A parameter
used once keeps the single-use maths; one Parameter under two names of the same module
is refused before the backward pass.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from msvag_mb.engines import UnsupportedModelError
from msvag_mb.engines.extensions_engine import ExtensionsEngine
from msvag_mb.extensions import recurrent

from test_exact_or_refused import (
    B,
    Case,
    Lambda,
    _assert_unchanged,
    _randn,
    _snapshot,
    _targets,
    run_case,
)

TYPES = {"LSTM": (nn.LSTM, {}), "GRU": (nn.GRU, {}), "RNN": (nn.RNN, {}),
         "RNN-relu": (nn.RNN, {"nonlinearity": "relu"})}


def _width(rnn: nn.RNNBase) -> int:
    return (getattr(rnn, "proj_size", 0) or rnn.hidden_size) * (1 + rnn.bidirectional)


def _called_twice(rnn_type, batch_first: bool = True, **options) -> nn.Module:
    """The layer on ``x`` and on ``tanh(2 x)``, outputs summed, a Linear per step."""
    def forward(s, x):
        x = x if batch_first else x.transpose(0, 1)
        first, _ = s.rnn(x)
        second, _ = s.rnn(torch.tanh(2 * x))
        h = first + second
        return s.out(h if batch_first else h.transpose(0, 1))

    rnn = rnn_type(3, 4, batch_first=batch_first, **options)
    return Lambda(forward, rnn=rnn, out=nn.Linear(_width(rnn), 2))


def _encoder_then_decoder(rnn_type, **options) -> nn.Module:
    """One layer run on the first half of each sequence, then on the second half from
    the first run's final state (a shared cell over two segments)."""
    def forward(s, x):
        first, state = s.rnn(x[:, :3])
        second, _ = s.rnn(x[:, 3:], state)
        return s.out(torch.cat([first, second], 1))

    rnn = rnn_type(3, 4, batch_first=True, **options)
    return Lambda(forward, rnn=rnn, out=nn.Linear(_width(rnn), 2))


class _PackedTwice(nn.Module):
    """The layer on two packings of the input with different lengths (unsorted, inputs
    of the model: one length per example), read out from both padded outputs and the
    final states."""

    def __init__(self, rnn_type, **options):
        super().__init__()
        self.rnn = rnn_type(3, 5, batch_first=True, **options)
        self.out = nn.Linear(_width(self.rnn), 2)

    def forward(self, x, *all_lengths):
        total = 0
        for lengths in all_lengths:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                       enforce_sorted=False)
            output, state = self.rnn(packed)
            padded, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True,
                                                         total_length=x.shape[1])
            h = state[0] if isinstance(state, tuple) else state
            total = total + self.out(padded).sum(1) + h.sum(0).sum(-1, keepdim=True)
        return total


def _two_packings(g: torch.Generator) -> tuple:
    return (torch.randn(B, 6, 3, generator=g), torch.tensor([3, 6, 2, 5][:B]),
            torch.tensor([6, 1, 4, 4][:B]))


def _tied(rnn_type, name: str = "weight_ih_l0", **options) -> nn.Module:
    """Two layers of one type in sequence whose parameter ``name`` is one Parameter."""
    def forward(s, x):
        h, _ = s.first(x)
        h, _ = s.second(torch.tanh(h))
        return s.out(h)

    first = rnn_type(4, 4, batch_first=True, **options)
    second = rnn_type(_width(first), 4, batch_first=True, **options)
    setattr(second, name, getattr(first, name))
    return Lambda(forward, first=first, second=second, out=nn.Linear(_width(second), 2))


def _input_tied(rnn_type, **options) -> nn.Module:
    """A layer on ``x``, a second on its output: ``weight_ih_l0`` tied (both inputs have
    4 features)."""
    def forward(s, x):
        h, _ = s.first(s.pre(x))
        h, _ = s.second(h)
        return s.out(h)

    first = rnn_type(4, 4, batch_first=True, **options)
    second = rnn_type(4, 4, batch_first=True, **options)
    second.weight_ih_l0 = first.weight_ih_l0
    return Lambda(forward, pre=nn.Linear(4, 4), first=first, second=second,
                  out=nn.Linear(4, 2))


def _also_functional(rnn_type, **options) -> nn.Module:
    """``weight_hh_l0`` used by the layer and by ``F.linear`` on the layer's output (its
    forward direction's half)."""
    def forward(s, x):
        h, _ = s.rnn(x)
        forward_direction = h[..., :s.rnn.weight_hh_l0.shape[1]]
        return s.out(torch.tanh(F.linear(forward_direction, s.rnn.weight_hh_l0)))

    rnn = rnn_type(3, 4, batch_first=True, **options)
    gates = rnn.weight_hh_l0.shape[0]
    return Lambda(forward, rnn=rnn, out=nn.Linear(gates, 2))


def _type_cases(label: str, rnn_type, extra: dict) -> list[Case]:
    def case(name, build, steps=3, features=3, **options):
        return Case(f"{label}-{name}", lambda: build(rnn_type, **{**extra, **options}),
                    _randn(B, steps, features), _targets(B, steps, 2))

    def packed(name, **options):
        return Case(f"{label}-{name}", lambda: _PackedTwice(rnn_type, **{**extra, **options}),
                    _two_packings, _targets(B, 2))

    return [
        case("called-twice", _called_twice),
        case("called-twice-T=B", _called_twice, steps=B),
        case("called-twice-sequence-first-T=B", _called_twice, steps=B, batch_first=False),
        case("called-twice-no-bias", _called_twice, bias=False),
        case("called-twice-bidirectional-stacked", _called_twice, bidirectional=True,
             num_layers=2),
        case("called-twice-stacked-dropout-eval",
             lambda *a, **k: _called_twice(*a, **k).eval(), num_layers=2, dropout=0.5),
        case("encoder-then-decoder", _encoder_then_decoder, steps=6),
        case("encoder-then-decoder-bidirectional", _encoder_then_decoder, steps=6,
             bidirectional=True),
        case("also-functional", _also_functional),
        packed("packed-twice"),
        packed("packed-twice-bidirectional-stacked", bidirectional=True, num_layers=2),
        case("tied-weight_ih_l0", _input_tied, features=4),
        *(case(f"tied-{name}", lambda *a, name=name, **k: _tied(*a, name=name, **k),
               features=4) for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0")),
        case("tied-weight_hh_l0_reverse",
             lambda *a, **k: _tied(*a, name="weight_hh_l0_reverse", **k), features=4,
             bidirectional=True),
    ]


def _cases() -> list[Case]:
    cases = [c for label, (rnn_type, extra) in TYPES.items()
             for c in _type_cases(label, rnn_type, extra)]
    for proj in ({"proj_size": 3}, {"proj_size": 3, "bidirectional": True, "num_layers": 2}):
        cases += [c for c in _type_cases(f"LSTM-{recurrent_label(proj)}", nn.LSTM, proj)
                  if "tied" not in c.name]
    cases.append(Case("LSTM-proj_size=2-tied-weight_hr_l0", lambda: _tied(
        nn.LSTM, "weight_hr_l0", proj_size=2), _randn(B, 3, 4), _targets(B, 3, 2)))
    return cases


def recurrent_label(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_reused_recurrent_parameters_are_exact(case):
    assert run_case(case, "extensions") == "exact"


@pytest.mark.parametrize("case", [c for c in CASES if "called-twice" in c.name][:6],
                         ids=lambda case: case.name)
def test_auto_serves_reused_recurrent_layers(case):
    """vmap refuses recurrent layers and BackPACK reuse: auto must end in extensions."""
    assert run_case(case, "auto") == "exact"


def test_a_frozen_parameter_of_a_reused_layer_stays_without_gradient():
    def build():
        model = _called_twice(nn.GRU, bidirectional=True)
        model.rnn.weight_hh_l0.requires_grad_(False)
        model.rnn.bias_ih_l0_reverse.requires_grad_(False)
        return model

    assert run_case(Case("GRU-called-twice-frozen", build, _randn(B, 3, 3),
                         _targets(B, 3, 2)), "extensions") == "exact"


def test_a_sum_reduced_loss():
    case = Case("LSTM-called-twice-sum", lambda: _called_twice(nn.LSTM, proj_size=2),
                _randn(B, 3, 3), _targets(B, 3, 2), loss=lambda: nn.MSELoss(reduction="sum"))
    assert run_case(case, "extensions") == "exact"


@pytest.mark.parametrize("rnn_type", [nn.LSTM, nn.GRU, nn.RNN])
def test_one_parameter_under_two_names_of_one_module_is_refused(rnn_type):
    """``weight_hh_l1 = weight_hh_l0``: one use per call would miss the second name's."""
    rnn = rnn_type(4, 4, num_layers=2, batch_first=True)
    rnn.weight_hh_l1 = rnn.weight_hh_l0
    model = Lambda(lambda s, x: s.out(s.rnn(x)[0]), rnn=rnn, out=nn.Linear(4, 2))
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"'weight_hh_l0' and 'weight_hh_l1'"):
        ExtensionsEngine().compute(model, nn.MSELoss(), torch.randn(B, 3, 4),
                                   torch.randn(B, 3, 2), list(model.parameters()))
    _assert_unchanged(model, before)


def test_single_use_parameters_keep_the_squared_path(monkeypatch):
    """A layer called once never forms per-example contributions; in a tied pair only the
    tied parameter does."""
    formed = []

    class Recording(recurrent.ProductUse):
        def __init__(self, left, right):
            formed.append(tuple(left.shape))
            super().__init__(left, right)

    monkeypatch.setattr(recurrent, "ProductUse", Recording)
    single = Case("LSTM-once", lambda: Lambda(lambda s, x: s.out(s.rnn(x)[0]),
                                              rnn=nn.LSTM(3, 4, batch_first=True),
                                              out=nn.Linear(4, 2)),
                  _randn(B, 3, 3), _targets(B, 3, 2))
    assert run_case(single, "extensions") == "exact"
    assert formed == []
    tied = Case("LSTM-tied-weight_ih_l0", lambda: _input_tied(nn.LSTM), _randn(B, 3, 4),
                _targets(B, 3, 2))
    assert run_case(tied, "extensions") == "exact"
    assert formed == [(B, 3, 16)] * 2  # weight_ih_l0 of each layer, nothing else
