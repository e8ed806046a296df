"""Every problem builds with the paper's parameter count and trains 3 steps with every
optimizer and both variance estimators on synthetic data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from msvag_mb import GhostBatchEngine
from msvag_mb.problems import PROBLEMS, get_problem, l2_penalty, parameter_groups
from msvag_mb.problems.data import load_pydoc_text, synthetic_images, synthetic_text
from msvag_mb.problems.models import CarriesState, CharRNN, count_parameters
from msvag_mb.runner import TrainConfig, build_model, make_gradient_variance, train

PAPER_COUNTS = {
    "fmnist_2c2d": 3_274_634,
    "cifar10_3c3d": 895_210,
    "cifar100_wrn404": 8_972_340,
    "tolstoi_char_rnn": 285_523,
    "digits": 13_706,
}
#: (optimizer, variance): every optimizer, and both estimators where the variance matters
METHODS = [("msgd", None), ("mssd", None), ("adam", None)] + [
    (optimizer, variance)
    for optimizer in ("msvag", "svag", "adamstar")
    for variance in ("moving_average", "minibatch")
]


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_parameter_count(name):
    problem = get_problem(name)
    model = problem.build_model()
    assert count_parameters(model) == PAPER_COUNTS[name] == problem.parameters


def test_pydoc_char_rnn_is_the_p4_model_with_its_vocabulary():
    text = load_pydoc_text()
    model = get_problem("pydoc_char_rnn").build_model(text)
    vocab = len(text.vocabulary)
    # P4's count with 83 replaced by the vocabulary in the embedding and output layer
    assert count_parameters(model) == 285_523 + (vocab - 83) * (128 + 128 + 1)
    assert 400_000 < len(text.train) + len(text.test) < 600_000


def test_every_problem_is_tested():
    # the transformer's count is asserted in tests/test_transformer_problem.py
    assert set(PROBLEMS) == set(PAPER_COUNTS) | {"pydoc_char_rnn", "tolstoi_char_transformer"}


def test_output_shapes():
    shapes = {"fmnist_2c2d": (1, 28, 28), "cifar10_3c3d": (3, 32, 32),
              "cifar100_wrn404": (3, 32, 32), "digits": (1, 8, 8)}
    for name, shape in shapes.items():
        model = get_problem(name).build_model().eval()
        with torch.no_grad():
            assert model(torch.rand(2, *shape)).shape == (2, get_problem(name).num_outputs)
    rnn = get_problem("tolstoi_char_rnn").build_model()
    assert rnn(torch.randint(83, (3, 7))).shape == (3, 7, 83)


def test_schedules_scale_with_steps():
    assert get_problem("cifar100_wrn404").milestone_steps(80_000) == [24_000, 48_000, 64_000]
    assert get_problem("cifar100_wrn404").lr_factor == 0.2
    assert get_problem("tolstoi_char_rnn").milestone_steps(200_000) == [125_000]
    assert get_problem("tolstoi_char_rnn").milestone_steps(800) == [500]
    assert get_problem("fmnist_2c2d").milestone_steps(6000) == []


def test_l2_only_on_weights():
    model = get_problem("cifar100_wrn404").build_model()
    decay, no_decay = parameter_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    batchnorm = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                 for p in m.parameters()}
    assert batchnorm and batchnorm <= {id(p) for p in no_decay["params"]}
    assert id(model.fc.bias) in {id(p) for p in no_decay["params"]}
    assert id(model.fc.weight) in {id(p) for p in decay["params"]}
    assert all(p.dim() == 4 or p is model.fc.weight for p in decay["params"])
    weights = sum(float(p.detach().pow(2).sum()) for p in decay["params"])
    assert math.isclose(l2_penalty(model, 5e-4), 0.5 * 5e-4 * weights, rel_tol=1e-6)
    assert [problem.weight_decay for problem in map(get_problem, (
        "fmnist_2c2d", "cifar10_3c3d", "cifar100_wrn404", "tolstoi_char_rnn"))] == \
        [0.0, 0.002, 5e-4, 0.0]


def test_char_rnn_carries_its_state_and_forget_bias():
    model = CharRNN().eval()
    x = torch.randint(83, (2, 10))
    with torch.no_grad():
        full = model(x)
        model.reset_state()
        first = model(x[:, :4])
        second = model(x[:, 4:])
    # a carried state makes two windows equal one long window
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)
    hidden = model.lstm1.hidden_size
    forget = model.lstm1.bias_ih_l0[hidden:2 * hidden] + model.lstm1.bias_hh_l0[hidden:2 * hidden]
    assert torch.equal(forget, torch.ones(hidden))
    with pytest.raises(ValueError, match="reset_state"):
        model(torch.randint(83, (3, 4)))


def test_only_the_char_model_carries_state():
    carrying = {name for name, problem in PROBLEMS.items()
                if isinstance(problem.build_model(), CarriesState)}
    assert carrying == {"tolstoi_char_rnn", "pydoc_char_rnn"}
    assert not isinstance(nn.Linear(2, 2), CarriesState)


def _small_data(name: str):
    """Tiny synthetic data of the problem's shapes (fast)."""
    problem = get_problem(name)
    if problem.kind == "text":
        return synthetic_text(83, 8 * 50 * 3 + 1, 8 * 50 + 1, seed=0)
    shape = {"fmnist_2c2d": (1, 28, 28), "digits": (1, 8, 8)}.get(name, (3, 32, 32))
    return synthetic_images(shape, problem.num_outputs, 24, 8, seed=0)


def _three_steps(tmp_path, name, optimizer, variance, **overrides):
    problem = get_problem(name)
    data = _small_data(name)
    values = dict(problem=name, optimizer=optimizer, variance=variance, batch_size=8,
                  steps=3, eval_every=3, data="synthetic")
    values.update(overrides)
    result = train(TrainConfig(**values), tmp_path, data=data, progress=False)
    initial = build_model(problem, data, seed=0)
    assert [r["step"] for r in result.records] == [0, 3]
    assert not result.diverged and result.completed
    for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
        assert math.isfinite(result.final[key])
    moved = [not torch.equal(a, b) for a, b in zip(initial.parameters(),
                                                     result.model.parameters())]
    assert all(moved), "every parameter should have been updated"
    return result


@pytest.mark.parametrize("optimizer,variance", METHODS)
@pytest.mark.parametrize("name", ["fmnist_2c2d", "cifar10_3c3d", "tolstoi_char_rnn", "digits"])
def test_three_steps(tmp_path, name, optimizer, variance):
    _three_steps(tmp_path, name, optimizer, variance)


def test_three_steps_wrn_minibatch_uses_ghost_batches(tmp_path):
    result = _three_steps(tmp_path, "cifar100_wrn404", "msvag", "minibatch", ghost_groups=2)
    assert {r["engine"] for r in result.records} == {"ghost_batch"}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,variance", METHODS)
def test_three_steps_wrn(tmp_path, optimizer, variance):
    _three_steps(tmp_path, "cifar100_wrn404", optimizer, variance, ghost_groups=2)


def test_engine_choice_for_batchnorm_and_plain_models():
    wrn = get_problem("cifar100_wrn404")
    config = TrainConfig(problem=wrn.name, variance="minibatch").resolved()
    gv = make_gradient_variance(config, wrn.build_model(), wrn.loss_fn())
    assert isinstance(gv.select_engine(), GhostBatchEngine)
    assert gv.select_engine().groups == 8 == config.ghost_groups
    digits = get_problem("digits")
    config = TrainConfig(problem="digits", variance="minibatch", engine="backpack").resolved()
    gv = make_gradient_variance(config, digits.build_model(), digits.loss_fn())
    assert gv.engine_name == "backpack"
    bad = TrainConfig(problem=wrn.name, variance="minibatch", batch_size=12).resolved()
    with pytest.raises(ValueError, match="divisible"):
        make_gradient_variance(bad, wrn.build_model(), wrn.loss_fn())


def test_estimators_are_wired(tmp_path):
    """After one step, M-SVAG with moving averages equals M-SGD (s = 0 at t = 0, gamma = 1),
    while the mini-batch estimate already adapts the first step (docs/maths.md)."""
    params = {}
    for optimizer, variance in [("msgd", None), ("msvag", "moving_average"),
                                ("msvag", "minibatch")]:
        result = train(TrainConfig(problem="digits", optimizer=optimizer, variance=variance,
                                   lr=0.3, steps=1, eval_every=1),
                       tmp_path, progress=False)
        params[(optimizer, variance)] = torch.nn.utils.parameters_to_vector(
            result.model.parameters())
    sgd = params[("msgd", None)]
    assert torch.allclose(params[("msvag", "moving_average")], sgd, atol=1e-7)
    assert not torch.allclose(params[("msvag", "minibatch")], sgd, atol=1e-5)


def test_char_rnn_minibatch_variance_with_carried_state_matches_brute_force():
    """P4's model and loss under engine 'auto' (the extensions engine): with a carried
    state, p.grad_variance equals the brute-force variance over the B sequences."""
    from msvag_mb import GradientVariance

    problem = get_problem("tolstoi_char_rnn")
    torch.manual_seed(0)
    model = CharRNN(vocab_size=11, hidden_size=6, embedding_dim=5).double().eval()
    loss_fn = problem.loss_fn()
    batch, steps = 4, 7
    x, y = torch.randint(11, (batch, steps)), torch.randint(11, (batch, steps))
    with torch.no_grad():
        model(torch.randint(11, (batch, 3)))  # a non-zero carried state
    carried = model.get_state()
    per_sequence = []
    for i in range(batch):
        model.set_state([(h[:, i:i + 1], c[:, i:i + 1]) for h, c in carried])
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_sequence.append([p.grad.clone() for p in model.parameters()])
    model.set_state(carried)
    model.zero_grad()
    gv = GradientVariance(model, loss_fn, engine="auto")
    gv.backward(x, y)
    for index, param in enumerate(model.parameters()):
        grads = torch.stack([g[index] for g in per_sequence])
        assert torch.allclose(param.grad, grads.mean(0), atol=1e-10)
        assert torch.allclose(param.grad_variance, grads.var(0) / batch, atol=1e-10)
