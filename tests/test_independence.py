"""The engines' output check: a model that mixes its examples is refused before any
backward pass, by every engine whose units are examples, in gv.backward and gv.collect();
the check itself leaves the model, its state and the random number generators as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb.engines import ENGINES
from msvag_mb.engines import independence
from msvag_mb.model_checks import UnsupportedModelError
from msvag_mb.problems.models import CharRNN

B = 4

#: operations along the examples' axis (dim 0) of a hidden (B, 5) tensor
MIXING = {
    "minus-batch-mean": lambda h: h - h.mean(0, keepdim=True),
    "batch-norm-by-hand": lambda h: h / h.norm(dim=0, keepdim=True),
    "cumsum": lambda h: h.cumsum(0),
    "roll-added": lambda h: h.roll(1, 0) + h,
    "repeated-rows": lambda h: h[torch.tensor([0, 0, 2, 3])],
    "sort": lambda h: h.sort(0).values,
    "minus-batch-max": lambda h: h - h.max(0, keepdim=True).values,
    "product-across-batch": lambda h: torch.ones(B, B, dtype=h.dtype) @ h,
    "softmax-over-batch": lambda h: h.softmax(0),
    "logsumexp-over-batch": lambda h: h - h.logsumexp(0, keepdim=True),
    "flip": lambda h: h.flip(0),
    "minus-batch-max-far": lambda h: h - (h * 0 + torch.tensor([[0.], [0.], [0.], [9.]],
                                                               dtype=h.dtype) * h).max(0).values,
}
#: the same operations along the features: the examples stay independent
INDEPENDENT = {
    "minus-feature-mean": lambda h: h - h.mean(1, keepdim=True),
    "cumsum-features": lambda h: h.cumsum(1),
    "roll-features": lambda h: h.roll(1, 1) + h,
    "sort-features": lambda h: h.sort(1).values,
    "softmax-features": lambda h: h.softmax(1),
}

PER_EXAMPLE = sorted(name for name, cls in ENGINES.items()
                     if cls.units_are_examples and not cls.needs_distributed)


class _Between(nn.Module):
    def __init__(self, between):
        super().__init__()
        self.between = between
        self.first, self.second = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.second(torch.tanh(self.between(self.first(x))))


def _data():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(B, 3, generator=generator, dtype=torch.double),
            torch.randn(B, 2, generator=generator, dtype=torch.double))


def _model(between):
    torch.manual_seed(0)
    return _Between(between).double()


def _brute_force_variance(model, x, y):
    """``(B sum_n c_n^2 - g^2) / (B - 1)`` from one ``autograd.grad`` per example."""
    params = list(model.parameters())
    per_example = []
    for n in range(B):
        loss = nn.functional.mse_loss(model(x)[n:n + 1], y[n:n + 1], reduction="sum")
        per_example.append(torch.autograd.grad(loss / (2 * B), params))
    result = []
    for i in range(len(params)):
        c = torch.stack([contributions[i] for contributions in per_example])
        g = c.sum(0)
        result.append(((B * c.square().sum(0) - g * g) / (B - 1)).clamp(min=0))
    return result


@pytest.mark.parametrize("engine", PER_EXAMPLE + ["auto"])
@pytest.mark.parametrize("name", sorted(MIXING))
def test_a_model_that_mixes_its_examples_is_refused_before_backward(name, engine):
    model = _model(MIXING[name])
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(), engine=engine)
    with pytest.raises(UnsupportedModelError, match="not independent|every engine|no engine"):
        gv.backward(x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("engine", [n for n in PER_EXAMPLE if ENGINES[n].serves_collect])
@pytest.mark.parametrize("name", sorted(MIXING))
def test_collect_refuses_a_model_that_mixes_its_examples(name, engine):
    model = _model(MIXING[name])
    x, y = _data()
    gv = msvag_mb.GradientVariance(model, engine=engine)
    with pytest.raises(UnsupportedModelError, match="not independent"):
        with gv.collect():
            nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("engine", PER_EXAMPLE + ["auto"])
@pytest.mark.parametrize("name", sorted(INDEPENDENT))
def test_the_same_operations_along_the_features_stay_exact(name, engine):
    model = _model(INDEPENDENT[name])
    x, y = _data()
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(), engine=engine)
    try:
        gv.backward(x, y)
    except UnsupportedModelError as error:  # an engine may refuse for its own reasons
        assert "not independent" not in str(error)
        return
    for param, expected in zip(model.parameters(), _brute_force_variance(model, x, y)):
        torch.testing.assert_close(param.grad_variance, expected, rtol=1e-9, atol=1e-12)


def test_a_model_that_cannot_run_one_example_is_checked_on_the_batch():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return self.linear(x).reshape(B, 2)  # a batch size written into the model

    model = FixedBatch().double()
    x, y = _data()
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(), engine="extensions")
    gv.backward(x, y)
    expected = _brute_force_variance(model, x, y)
    torch.testing.assert_close(model.linear.weight.grad_variance, expected[0])


def test_the_check_runs_once_per_input_signature():
    model = _model(lambda h: h)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    x, y = _data()
    gv = msvag_mb.GradientVariance(model, nn.MSELoss(), engine="extensions")
    gv.backward(x, y)
    assert calls == [B, B, B] + [1] * B + [B]  # the batch, two probes, each example, the step
    calls.clear()
    gv.zero_grad()
    gv.backward(x, y)
    assert calls == [B]
    for size in (3, 2):  # new shapes of the same structure: probed again
        calls.clear()
        gv.zero_grad()
        gv.backward(x[:size], y[:size])
        assert calls == [size] * (3 if size > 2 else 2) + [1] * size + [size]
    calls.clear()
    gv.zero_grad()
    gv.backward(torch.cat([x, x])[:5], torch.cat([y, y])[:5])  # after three: taken as checked
    assert calls == [5]


def test_the_check_leaves_modes_buffers_state_and_random_numbers_as_they_were():
    torch.manual_seed(0)
    model = CharRNN(vocab_size=11, hidden_size=6, embedding_dim=5).double().train()
    tokens = torch.randint(0, 11, (B, 7))
    model(tokens)  # a carried state from a previous batch
    state = [tuple(t.clone() for t in layer) for layer in model.get_state()]
    rng = torch.get_rng_state()
    independence.check_examples_independent(model, (tokens,), engine="extensions")
    assert model in independence._CHECKED  # it ran (and found the sequences independent)
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for layer, saved in zip(model.get_state(), state):
        assert all(torch.equal(a, b) for a, b in zip(layer, saved))

    norm = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double().train()
    buffers = [b.clone() for b in norm.buffers()]
    independence.check_examples_independent(norm, (_data()[0],), engine="extensions")
    assert all(torch.equal(a, b) for a, b in zip(norm.buffers(), buffers))
    assert norm.training


def test_outputs_without_examples_are_not_compared():
    class WithScalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            out = self.linear(x)
            return {"logits": out, "batch_mean": out.mean()}  # the scalar holds no examples

    model = WithScalar().double()
    assert independence.output_mismatch(model, (_data()[0],), {}) is None
