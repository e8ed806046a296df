"""Engine 'extensions' on nn.RNN, nn.GRU and nn.LSTM: exact (never refused) on every
configuration it supports, against one backward per example in float64.

Configurations: cell type (RNN tanh and relu, GRU, LSTM, LSTM with proj_size) x
bidirectional x padded / packed sorted / packed unsorted x initial state passed or not,
with batch_first, bias and num_layers rotating through both values, T == B among them;
inter-layer dropout in train mode (against brute force replaying the masks the forward
drew), frozen parameters, gradients entering only through the final states. Refused,
before any backward: unbatched input, a batch of time steps, a packing whose traced
layout contradicts its batch_first.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb.engines.extensions_engine import ExtensionsEngine
from msvag_mb.extensions import recurrent
from msvag_mb.model_checks import UnsupportedModelError

B, FEATURES, HIDDEN = 4, 3, 5
RTOL, ATOL = 1e-9, 1e-13

#: cell type label -> (module type, extra keyword arguments)
CELLS = {
    "RNN-tanh": (nn.RNN, {}),
    "RNN-relu": (nn.RNN, {"nonlinearity": "relu"}),
    "GRU": (nn.GRU, {}),
    "LSTM": (nn.LSTM, {}),
    "LSTM-proj": (nn.LSTM, {"proj_size": 3}),
}


class Sequences(nn.Module):
    """A recurrent layer on padded or packed sequences, read out from every step's output
    and from the final states (so gradients enter through both), optionally from an
    initial state computed from the first step."""

    def __init__(self, rnn: nn.RNNBase, packing: str | None, initial_state: bool) -> None:
        super().__init__()
        self.rnn, self.packing = rnn, packing
        directions = 2 if rnn.bidirectional else 1
        self.states = rnn.num_layers * directions
        width = getattr(rnn, "proj_size", 0) or rnn.hidden_size
        self.out = nn.Linear(directions * width, 2)
        self.h0 = nn.Linear(FEATURES, self.states * width) if initial_state else None
        self.c0 = nn.Linear(FEATURES, self.states * rnn.hidden_size) \
            if initial_state and isinstance(rnn, nn.LSTM) else None

    def initial(self, x):
        if self.h0 is None:
            return None
        batch = x.shape[0]
        h0 = torch.tanh(self.h0(x[:, 0])).view(batch, self.states, -1).transpose(0, 1)
        if self.c0 is None:
            return h0
        return h0, self.c0(x[:, 0]).view(batch, self.states, -1).transpose(0, 1)

    def forward(self, x, lengths=None):
        batch_first = self.rnn.batch_first
        sequence = x if batch_first else x.transpose(0, 1)
        if self.packing is not None:
            sequence = nn.utils.rnn.pack_padded_sequence(
                sequence, lengths, batch_first=batch_first,
                enforce_sorted=self.packing == "sorted")
        output, state = self.rnn(sequence, self.initial(x))
        if self.packing is not None:
            output, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True,
                                                         total_length=x.shape[1])
        elif not batch_first:
            output = output.transpose(0, 1)
        states = state if isinstance(state, tuple) else (state,)
        final = sum(s.tanh().sum(0).sum(-1, keepdim=True) for s in states)
        return self.out(output) + final.unsqueeze(1)


def _lengths(packing: str | None, steps: int):
    if packing is None:
        return None
    return torch.tensor([steps, steps, steps - 1, 1] if packing == "sorted"
                        else [steps - 1, steps, 1, steps])


def loss_fn(output, target):
    return nn.functional.mse_loss(output, target, reduction="sum") / B


def brute_force(model, inputs, target):
    """``{param: (gradient, sum_n c_n**2)}`` from one backward per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    contributions = []
    for n in range(B):
        example = tuple(v[n:n + 1] for v in inputs)
        contributions.append(torch.autograd.grad(
            loss_fn(model(*example), target[n:n + 1]), params, allow_unused=True))
    return {p: (sum(c[i] for c in contributions), sum(c[i] ** 2 for c in contributions))
            for i, p in enumerate(params)}


def assert_exact(model, inputs, target):
    """The engine neither refuses nor differs from brute force; its loss is the plain
    model's (the unrolled forward computes what the module computes)."""
    plain = loss_fn(model(*inputs), target)
    result = ExtensionsEngine().compute(model, loss_fn, inputs, target,
                                        [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(result.loss, plain.detach(), rtol=1e-12, atol=1e-14)
    names = {p: n for n, p in model.named_parameters()}
    expected = brute_force(model, inputs, target)
    assert set(result.statistics) == set(expected)
    for param, (grad, sum_sq) in expected.items():
        assert sum_sq.abs().max() > 0, names[param]  # the comparison must be able to fail
        stats = result.statistics[param]
        torch.testing.assert_close(stats.grad, grad, rtol=RTOL, atol=ATOL, msg=names[param])
        torch.testing.assert_close(stats.sum_grad_squared, sum_sq, rtol=RTOL, atol=ATOL,
                                   msg=names[param])


def _configurations():
    """Every cell x direction x packing x initial state; batch_first, bias and two layers
    rotate so that each cell type meets each value of each."""
    rows = []
    for index, (cell, bidirectional, packing, initial) in enumerate(itertools.product(
            CELLS, (False, True), (None, "sorted", "unsorted"), (False, True))):
        rows.append(pytest.param(
            cell, bidirectional, packing, initial, index % 2 == 0, index % 3 != 1,
            1 + (index % 4 == 3 or bidirectional and index % 5 == 0),
            # T == B for padded input (traced); not for packed input, whose padded output
            # (pad_packed_sequence) cannot be traced by the Linear after it
            6 if packing else 3 + index % 2,
            id=f"{cell}-bi{int(bidirectional)}-{packing or 'padded'}-h0{int(initial)}"
               f"-bf{int(index % 2 == 0)}-bias{int(index % 3 != 1)}"))
    return rows


@pytest.mark.parametrize("cell, bidirectional, packing, initial, batch_first, bias, layers, "
                         "steps", _configurations())
def test_exact_on_every_configuration(cell, bidirectional, packing, initial, batch_first,
                                      bias, layers, steps):
    torch.manual_seed(3)
    module_type, extra = CELLS[cell]
    rnn = module_type(FEATURES, HIDDEN, num_layers=layers, batch_first=batch_first,
                      bias=bias, bidirectional=bidirectional, **extra)
    model = Sequences(rnn, packing, initial).double()
    x = torch.randn(B, steps, FEATURES, dtype=torch.float64)
    lengths = _lengths(packing, steps)
    inputs = (x,) if lengths is None else (x, lengths)
    target = torch.randn(B, steps, 2, dtype=torch.float64)
    assert_exact(model, inputs, target)


class SequenceFirstStack(nn.Module):
    """T == B, sequence-first, hidden == B: every layer's batch axis is traced."""

    def __init__(self, module_type, **kwargs) -> None:
        super().__init__()
        self.rnn = module_type(B, B, num_layers=2, bidirectional=True, **kwargs)
        self.out = nn.Linear(2 * (kwargs.get("proj_size") or B), B)

    def forward(self, x):
        output, _ = self.rnn(x.transpose(0, 1))
        return self.out(output).transpose(0, 1)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_as_many_steps_and_units_as_examples(cell):
    torch.manual_seed(4)
    module_type, extra = CELLS[cell]
    model = SequenceFirstStack(module_type, **extra).double()
    x = torch.randn(B, B, B, dtype=torch.float64)
    assert_exact(model, (x,), torch.randn(B, B, B, dtype=torch.float64))


def test_frozen_parameters_and_gradient_through_final_states_only():
    torch.manual_seed(5)

    class FinalState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(FEATURES, HIDDEN, num_layers=2, bidirectional=True)
            self.out = nn.Linear(HIDDEN, 2)

        def forward(self, x):
            return self.out(self.rnn(x.transpose(0, 1))[1][-2:].sum(0))  # top layer

    model = FinalState().double()
    model.rnn.weight_hh_l0.requires_grad_(False)
    model.rnn.bias_ih_l1_reverse.requires_grad_(False)
    x = torch.randn(B, 6, FEATURES, dtype=torch.float64)
    assert_exact(model, (x,), torch.randn(B, 2, dtype=torch.float64))


# -- inter-layer dropout in train mode ------------------------------------------------------

def _single_layer_copies(rnn: nn.RNNBase) -> list[nn.RNNBase]:
    """One-layer modules with the weights of each layer of ``rnn`` (the reference)."""
    copies = []
    for layer in range(rnn.num_layers):
        width = rnn.input_size if layer == 0 else rnn.hidden_size * (1 + rnn.bidirectional)
        copy = type(rnn)(width, rnn.hidden_size, bidirectional=rnn.bidirectional,
                         batch_first=True).double()
        for name, param in copy.named_parameters():
            source = getattr(rnn, name.replace("_l0", f"_l{layer}"))
            param.data = source.detach().clone()
        copies.append(copy)
    return copies


@pytest.mark.parametrize("module_type", [nn.RNN, nn.GRU, nn.LSTM])
def test_inter_layer_dropout_in_train_mode(module_type, monkeypatch):
    """Exact for the gradient of the forward that ran: brute force replays, per example,
    the masks the engine's forward drew."""
    torch.manual_seed(6)
    rnn = module_type(FEATURES, HIDDEN, num_layers=3, dropout=0.5, bidirectional=True,
                      batch_first=True).double().train()
    masks = []

    def recording_dropout(x, p):
        mask = torch.bernoulli(torch.full_like(x, 1 - p)) / (1 - p)
        masks.append(mask)
        return x * mask

    monkeypatch.setattr(recurrent, "inter_layer_dropout", recording_dropout)
    model = nn.Sequential(rnn)
    x = torch.randn(B, 5, FEATURES, dtype=torch.float64)
    target = torch.randn(B, 5, 2 * HIDDEN, dtype=torch.float64)

    result = ExtensionsEngine().compute(
        model, lambda out, t: loss_fn(out[0], t), x, target, list(rnn.parameters()))
    assert len(masks) == 2  # between three layers, time-major (T, B, F)
    copies = _single_layer_copies(rnn)
    for layer, copy in enumerate(copies):
        contributions = []
        for n in range(B):
            h = x[n:n + 1]
            for k, part in enumerate(copies):
                h = part(h)[0]
                if k < len(masks):
                    h = h * masks[k][:, n:n + 1].transpose(0, 1)
            contributions.append(torch.autograd.grad(loss_fn(h, target[n:n + 1]),
                                                     list(copy.parameters())))
        for i, (name, _) in enumerate(copy.named_parameters()):
            param = getattr(rnn, name.replace("_l0", f"_l{layer}"))
            stats = result.statistics[param]
            torch.testing.assert_close(stats.grad, sum(c[i] for c in contributions),
                                       rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(stats.sum_grad_squared,
                                       sum(c[i] ** 2 for c in contributions),
                                       rtol=RTOL, atol=ATOL)


def test_gradient_variance_with_dropout_is_not_refused():
    model = nn.Sequential(nn.GRU(FEATURES, HIDDEN, num_layers=2, dropout=0.3,
                                 batch_first=True))
    gv = msvag_mb.GradientVariance(model, lambda out, t: loss_fn(out[0], t),
                                   engine="extensions")
    gv.backward(torch.randn(B, 5, FEATURES), torch.randn(B, 5, HIDDEN))
    assert all(p.grad_variance is not None for p in model.parameters())


# -- refused, before the backward pass -----------------------------------------------------

class Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(FEATURES, HIDDEN)

    def forward(self, x):
        return self.rnn(x[0])[0].sum(0, keepdim=True).expand(x.shape[0], -1)


class PacksTimeSteps(nn.Module):
    """Packs (B, T, F) as sequence-first: the 'sequences' are the time steps."""

    def __init__(self, embedding: bool):
        super().__init__()
        self.embedding = nn.Embedding(7, FEATURES) if embedding else None
        self.rnn = nn.LSTM(FEATURES, HIDDEN)

    def forward(self, x):
        features = x if self.embedding is None else self.embedding(x)
        packed = nn.utils.rnn.pack_padded_sequence(
            features, torch.full((x.shape[1],), x.shape[0]))
        return self.rnn(packed)[1][0][-1].sum(0, keepdim=True).expand(x.shape[0], -1)


@pytest.mark.parametrize("make, inputs, message", [
    (Unbatched, lambda: torch.randn(B, 5, FEATURES), r"layer 'rnn' \(GRU\) got an unbatched"),
    # untraced (the input needs no gradient): the batch size tells
    (lambda: PacksTimeSteps(False), lambda: torch.randn(B, 5, FEATURES),
     r"got a batch of 5 sequences, not the 4 examples"),
    # traced through the embedding, also where T == B
    (lambda: PacksTimeSteps(True), lambda: torch.randint(0, 7, (B, B)),
     r"PackedSequence packed from a tensor of shape \(4, 4, 3\) along dim 1"),
])
def test_refused_before_backward(make, inputs, message, without_output_probes):
    torch.manual_seed(7)
    model = make()
    x = inputs()
    with pytest.raises(UnsupportedModelError, match=message):
        ExtensionsEngine().compute(model, lambda out, t: loss_fn(out, t), x,
                                   torch.randn(B, HIDDEN), list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("module_type", [nn.RNN, nn.GRU, nn.LSTM])
def test_every_parameter_gets_its_own_gradient(module_type):
    """b_ih and b_hh have equal gradients in RNN and LSTM cells; they must still be two
    tensors, since p.grad is modified in place (gradient clipping, GradScaler.unscale_)."""
    model = nn.Sequential(module_type(FEATURES, HIDDEN, batch_first=True))
    gv = msvag_mb.GradientVariance(model, lambda out, t: loss_fn(out[0], t),
                                   engine="extensions")
    gv.backward(torch.randn(B, 5, FEATURES), torch.randn(B, 5, HIDDEN))
    for attribute in ("grad", "grad_variance"):
        pointers = [getattr(p, attribute).data_ptr() for p in model.parameters()]
        assert len(set(pointers)) == len(pointers), attribute
