"""``tolstoi_char_transformer``: the model's shape, causality and tied head, the CLI on
synthetic data with every estimator, and the exactness of its mini-batch variance."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from msvag_mb.cli import train_main
from msvag_mb.engines import ENGINES
from msvag_mb.problems import get_problem
from msvag_mb.problems.models import CarriesState, count_parameters
from msvag_mb.problems.transformer import CharTransformer
from msvag_mb.runner import TrainConfig, make_gradient_variance

NAME = "tolstoi_char_transformer"

# torch.func has no batching rule for the CPU attention kernel yet and loops over examples
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def tiny_model(vocab: int = 7) -> CharTransformer:
    torch.manual_seed(0)
    return CharTransformer(vocab_size=vocab, width=8, layers=2, heads=2, context=6)


def test_parameter_count():
    problem = get_problem(NAME)
    model = problem.build_model()
    width, vocab, context, layers = 128, 83, 64, 4
    block = (2 * 2 * width                      # two LayerNorms
             + width * 3 * width + 3 * width    # q, k, v
             + width * width + width            # attention output
             + width * 4 * width + 4 * width    # MLP in
             + 4 * width * width + width)       # MLP out
    expected = vocab * width + context * width + layers * block + 2 * width  # tied head
    assert count_parameters(model) == expected == 812_160 == problem.parameters
    assert problem.num_outputs == 83 and problem.seq_len == 64 and problem.batch_size == 32


def test_forward_shapes_and_windows():
    problem = get_problem(NAME)
    model = problem.build_model().eval()
    data = problem.load_data(synthetic=True)
    x, y = problem.batches(data, problem.batch_size, seed=0).train_batch(0)
    assert x.shape == y.shape == (32, 64)  # CharBatches with the problem's seq_len
    with torch.no_grad():
        assert model(x[:2]).shape == (2, 64, 83)
        assert model(x[:3, :10]).shape == (3, 10, 83)  # shorter windows use the first positions
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 65, dtype=torch.long))
    assert not isinstance(model, CarriesState)


def test_causal():
    model = tiny_model().eval()
    x = torch.randint(7, (2, 6))
    changed = x.clone()
    changed[:, 3] = (x[:, 3] + 1) % 7
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.equal(before[:, :3], after[:, :3])  # earlier positions do not see token 3
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_head_is_the_embedding_parameter():
    model = tiny_model().eval()
    weight = model.embedding.weight
    assert [p for p in model.parameters() if p.shape == weight.shape] == [weight]
    x = torch.tensor([[0, 1, 2, 3]])  # token 6 is not in the input: only the head reads row 6
    with torch.no_grad():
        before = model(x)
        weight[6] += torch.randn(weight.shape[1])
        after = model(x)
    assert torch.equal(before[..., :6], after[..., :6])
    assert not torch.allclose(before[..., 6], after[..., 6])
    model.zero_grad()
    model(x).sum().backward()
    assert weight.grad[6].abs().sum() > 0  # the head's gradient lands on the embedding


@pytest.mark.parametrize("optimizer", [["msgd"], ["adam"], ["msvag", "--variance", "minibatch"],
                                       ["msvag", "--variance", "moving_average"]])
def test_cli_synthetic(tmp_path, optimizer):
    code = train_main(["--problem", NAME, "--data", "synthetic", "--steps", "3",
                       "--eval-every", "3", "--batch-size", "8", "--optimizer", *optimizer,
                       "--out", str(tmp_path),
                       "--no-progress", "--threads", "1"])
    assert code == 0
    (metrics,) = tmp_path.glob(f"{NAME}/*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3]
    assert all(r["test_loss"] == r["test_loss"] for r in records)  # finite, not NaN
    assert not any(r.get("diverged") for r in records)


def test_minibatch_variance_is_exact():
    """The runner's GradientVariance (engine 'auto') against per-sequence gradients, float64."""
    problem = get_problem(NAME)
    model, loss_fn = tiny_model().double(), problem.loss_fn()
    batch = 4
    x, y = torch.randint(7, (batch, 5)), torch.randint(7, (batch, 5))
    per_sequence = []
    for i in range(batch):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_sequence.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    config = TrainConfig(problem=NAME, variance="minibatch", optimizer="msvag").resolved()
    gv = make_gradient_variance(config, model, loss_fn)
    gv.backward(x, y)
    assert ENGINES[gv.engine_name].units_are_examples  # per-example, not ghost batches
    for index, param in enumerate(model.parameters()):
        grads = torch.stack([g[index] for g in per_sequence])
        assert torch.allclose(param.grad, grads.mean(0), rtol=1e-10, atol=1e-14)
        assert torch.allclose(param.grad_variance, grads.var(0) / batch, rtol=1e-8, atol=1e-16)
