"""Engine 'extensions' (msvag_mb.extensions) against brute force, layer by layer.

Brute force: one backward per example. Example n's contribution is
``c_n = grad(loss_fn(model(x[n:n+1]), y[n:n+1])) * scale`` with ``scale = 1/B`` for a loss
that averages over the B examples (also over B*T tokens of equal-length sequences) and 1
for a sum; stateful models use row n of their initial state. Everything in float64 with
relative tolerance 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msvag_mb.model_checks import UnsupportedModelError
from msvag_mb.engines.extensions_engine import ExtensionsEngine
from msvag_mb.engines.vmap_engine import VmapEngine
from msvag_mb.extensions import EXTENSIONS
from msvag_mb.extensions import conv as conv_extension
from msvag_mb.problems.models import CharRNN, SequenceCrossEntropy

RTOL, ATOL = 1e-10, 1e-14


def brute_force(model, loss_fn, x, y, scale, before_example=None):
    """``{param: (sum_n c_n, sum_n c_n**2)}`` from one backward per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    contributions = {p: [] for p in params}
    for n in range(x.shape[0]):
        if before_example is not None:
            before_example(n)
        grads = torch.autograd.grad(loss_fn(model(x[n:n + 1]), y[n:n + 1]), params,
                                    allow_unused=True)
        for p, g in zip(params, grads):
            contributions[p].append(torch.zeros_like(p) if g is None else g * scale)
    return {p: (torch.stack(c).sum(0), torch.stack(c).square().sum(0))
            for p, c in contributions.items()}


def compute(model, loss_fn, x, y, before_batch=None):
    assert ExtensionsEngine.unsupported_reason(model) is None
    if before_batch is not None:
        before_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    return ExtensionsEngine().compute(model, loss_fn, x, y, params)


def assert_matches_brute_force(model, loss_fn, x, y, reduction="mean", before_batch=None,
                               before_example=None):
    scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0
    result = compute(model, loss_fn, x, y, before_batch)
    expected = brute_force(model, loss_fn, x, y, scale, before_example)
    names = {p: n for n, p in model.named_parameters()}
    assert set(result.statistics) == set(expected)
    for p, (grad, sum_sq) in expected.items():
        stats = result.statistics[p]
        assert sum_sq.abs().max() > 0, names[p]  # the comparison must be able to fail
        torch.testing.assert_close(stats.grad, grad, rtol=RTOL, atol=ATOL, msg=names[p])
        torch.testing.assert_close(stats.sum_grad_squared, sum_sq, rtol=RTOL, atol=ATOL,
                                   msg=names[p])
    assert result.units == x.shape[0]
    return result


def classification(target_shape, classes, reduction="mean"):
    """A cross-entropy loss (mean over all targets, or sum) and random targets."""
    y = torch.randint(0, classes, tuple(target_shape))
    if y.dim() == 1:
        return nn.CrossEntropyLoss(reduction=reduction), y
    return (lambda out, t: nn.functional.cross_entropy(out.reshape(-1, classes), t.reshape(-1),
                                                       reduction=reduction)), y


# -- Linear ---------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("extra_dims", [(), (3,), (2, 3)])
def test_linear(extra_dims, bias, reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias))
    x = torch.randn(6, *extra_dims, 4)
    loss_fn, y = classification(x.shape[:-1], 3, reduction)
    assert_matches_brute_force(model, loss_fn, x, y, reduction)


def test_linear_followed_by_inplace_activation():
    """A tensor hook on the layer output still sees the gradient w.r.t. the pre-ReLU value."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3),
                          nn.Dropout(0.0))
    x = torch.randn(7, 4)
    loss_fn, y = classification([7], 3)
    assert_matches_brute_force(model, loss_fn, x, y)


# -- Convolutions ---------------------------------------------------------------------

CONV_CONFIGS = [
    dict(),
    dict(padding=1),
    dict(padding=2, stride=2),
    dict(padding=1, dilation=2),
    dict(stride=2, groups=2),
    dict(padding="same", dilation=2),
    dict(padding="same", kernel_size=4),  # asymmetric 'same' padding
    dict(padding=1, padding_mode="circular"),
    dict(padding=2, padding_mode="reflect", groups=2),
    dict(bias=False, padding=1, stride=(2, 1)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}"
                                                                      for k, v in c.items()))
def test_conv(dims, config, monkeypatch):
    """Both ways of forming per-example weight gradients (grouped conv, unfold + bmm)."""
    config = dict(config)
    if dims == 1 and isinstance(config.get("stride"), tuple):
        config["stride"] = config["stride"][0]
    kernel_size = config.pop("kernel_size", 3)
    conv_type = nn.Conv1d if dims == 1 else nn.Conv2d
    torch.manual_seed(2)
    model = nn.Sequential(conv_type(4, 6, kernel_size, **config), nn.Tanh(), nn.Flatten(),
                          nn.LazyLinear(3))
    x = torch.randn(5, 4, *(8,) * dims)
    model(x)  # materialise the LazyLinear
    loss_fn, y = classification([5], 3)
    expected = brute_force(model, loss_fn, x, y, 1.0 / 5)
    taken = []
    for path in ("_per_example_by_grouped_conv", "_per_example_by_unfold"):
        original = getattr(conv_extension, path)
        monkeypatch.setattr(conv_extension, path, lambda *args, _path=path, _original=original:
                            taken.append(_path) or _original(*args))
    for threshold, path in ((0, "_per_example_by_grouped_conv"),
                            (10**9, "_per_example_by_unfold")):
        monkeypatch.setattr(conv_extension, "GROUPED_MIN_PATCH", threshold)
        taken.clear()
        result = compute(model, loss_fn, x, y)
        assert taken and set(taken) == {path}
        for p, (grad, sum_sq) in expected.items():
            torch.testing.assert_close(result.statistics[p].grad, grad, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(result.statistics[p].sum_grad_squared, sum_sq,
                                       rtol=RTOL, atol=ATOL)


# -- Embedding ------------------------------------------------------------------------

@pytest.mark.parametrize("num_embeddings", [6, 500])  # dense and unique-key paths
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_repeated_indices_and_padding(num_embeddings, padding_idx):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(num_embeddings, 4, padding_idx=padding_idx),
                          nn.Linear(4, 3))
    x = torch.randint(0, 6, (5, 7))
    x[0, :4] = 2  # one example looks up the same row four times
    x[1, :3] = 1  # and another one the padding row (if any) three times
    loss_fn, y = classification(x.shape, 3)
    result = assert_matches_brute_force(model, loss_fn, x, y)
    if padding_idx is not None:
        assert result.statistics[model[0].weight].sum_grad_squared[padding_idx].eq(0).all()


# -- BatchNorm (eval) -----------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("layout", ["1d_features", "1d_sequence", "2d"])
def test_batchnorm_eval(layout, reduction):
    torch.manual_seed(4)
    if layout == "2d":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(),
                              nn.Linear(3 * 4 * 4, 3))
        x = torch.randn(6, 2, 6, 6)
    elif layout == "1d_sequence":
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Flatten(),
                              nn.Linear(3 * 4, 3))
        x = torch.randn(6, 2, 6)
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
        x = torch.randn(6, 4)
    model(torch.randn_like(x).mul(2).add(1))  # non-trivial running statistics
    model.eval()
    loss_fn, y = classification([6], 3, reduction)
    assert_matches_brute_force(model, loss_fn, x, y, reduction)


# -- LSTM -----------------------------------------------------------------------------

class StatefulCharModel(nn.Module):
    """Embedding + LSTM + per-step Linear with an (optional) carried initial state.

    Sequence-first (``batch_first=False``) runs the embedding and the decoder on ``(T, B)``
    layouts too, so their batch axis is dim 1.
    """

    def __init__(self, num_layers: int, batch_first: bool, bias: bool = True,
                 vocab: int = 7, hidden: int = 5) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(vocab, 4)
        self.lstm = nn.LSTM(4, hidden, num_layers=num_layers, batch_first=batch_first,
                            bias=bias)
        self.decoder = nn.Linear(hidden, vocab)
        self.state = None  # (h0, c0), each (num_layers, B, hidden), or None for zeros

    def forward(self, tokens):
        if not self.batch_first:
            tokens = tokens.t()
        out, _ = self.lstm(self.embedding(tokens), self.state)
        logits = self.decoder(out)
        return logits if self.batch_first else logits.transpose(0, 1)


def sequence_loss(reduction):
    return lambda out, y: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                      y.reshape(-1), reduction=reduction)


@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm(num_layers, batch_first, initial_state):
    # half of the configurations with a sum-reduced loss (covering each option with both)
    reduction = "sum" if (num_layers + batch_first + initial_state) % 2 else "mean"
    torch.manual_seed(5)
    batch, steps = 4, 6
    model = StatefulCharModel(num_layers, batch_first)
    x, y = torch.randint(0, 7, (batch, steps)), torch.randint(0, 7, (batch, steps))
    state = tuple(torch.randn(num_layers, batch, 5) for _ in range(2))

    def full_state():
        model.state = state if initial_state else None

    def example_state(n):
        model.state = tuple(s[:, n:n + 1] for s in state) if initial_state else None

    assert_matches_brute_force(model, sequence_loss(reduction), x, y, reduction,
                               before_batch=full_state, before_example=example_state)


class FinalStateClassifier(nn.Module):
    """Classifies from the final states: gradients enter through ``h_n`` and ``c_n`` as
    well as through the output sequence."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        out, (h_n, c_n) = self.lstm(x)
        return self.head(h_n[-1] + c_n.tanh().sum(0) + out.mean(1))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_gradient_through_final_states(num_layers):
    torch.manual_seed(8)
    model = FinalStateClassifier(num_layers)
    x = torch.randn(5, 6, 3)
    loss_fn, y = classification([5], 4)
    assert_matches_brute_force(model, loss_fn, x, y)


def test_lstm_without_bias_and_with_frozen_parameters():
    torch.manual_seed(6)
    model = StatefulCharModel(2, batch_first=True, bias=False)
    model.lstm.weight_hh_l0.requires_grad_(False)
    model.embedding.weight.requires_grad_(False)
    x, y = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    result = assert_matches_brute_force(model, sequence_loss("mean"), x, y)
    assert model.lstm.weight_hh_l0 not in result.statistics


def test_p4_char_rnn_with_carried_state():
    """The problem set's CharRNN: two nn.LSTM layers fed the state carried from the
    previous batch (dropout off, so brute force can replay the same function)."""
    torch.manual_seed(7)
    model = CharRNN(vocab_size=9, hidden_size=6, embedding_dim=5, dropout=0.0)
    first, x, y = (torch.randint(0, 9, (4, 5)) for _ in range(3))
    model(first)  # carries a non-zero state into the batch below
    carried = model.get_state()

    def example_state(n):
        model.set_state([tuple(s[:, n:n + 1] for s in layer) for layer in carried])

    assert_matches_brute_force(model, SequenceCrossEntropy(), x, y,
                               before_batch=lambda: model.set_state(carried),
                               before_example=example_state)


# -- every registered layer type -------------------------------------------------------

class FirstOutput(nn.Module):
    """``module(x)[0]``: the output sequence of a recurrent layer."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)[0]


def _eval_batchnorm(module: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    with torch.no_grad():  # non-trivial running statistics
        module.running_mean.uniform_(-1.0, 1.0)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(module).eval()


#: a small instance of each layer type in :data:`msvag_mb.extensions.EXTENSIONS`, alone in
#: a model, and a batch of its inputs: ``type -> () -> (model, inputs)``
class SelfAttention(nn.Module):
    """``attention(x, x, x)[0]``: a self-attention layer's output sequence."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return self.attention(x, x, x)[0]


REGISTERED_LAYER_FACTORIES = {
    nn.MultiheadAttention: lambda: (SelfAttention(nn.MultiheadAttention(
        4, 2, batch_first=True, add_bias_kv=True)), torch.randn(5, 3, 4)),
    nn.Linear: lambda: (nn.Sequential(nn.Linear(4, 3)), torch.randn(5, 4)),
    nn.Conv1d: lambda: (nn.Sequential(nn.Conv1d(2, 3, 3, padding=1)), torch.randn(5, 2, 6)),
    nn.Conv2d: lambda: (nn.Sequential(nn.Conv2d(2, 3, 3, stride=2)), torch.randn(5, 2, 7, 7)),
    nn.Conv3d: lambda: (nn.Sequential(nn.Conv3d(2, 3, 2, padding=1, groups=1)),
                        torch.randn(5, 2, 3, 4, 3)),
    nn.ConvTranspose1d: lambda: (nn.Sequential(nn.ConvTranspose1d(2, 3, 3, stride=2,
                                                                  output_padding=1)),
                                 torch.randn(5, 2, 6)),
    nn.ConvTranspose2d: lambda: (nn.Sequential(nn.ConvTranspose2d(4, 2, 3, groups=2,
                                                                  padding=1)),
                                 torch.randn(5, 4, 4, 3)),
    nn.ConvTranspose3d: lambda: (nn.Sequential(nn.ConvTranspose3d(2, 2, 2, stride=2)),
                                 torch.randn(5, 2, 2, 3, 2)),
    nn.EmbeddingBag: lambda: (nn.Sequential(nn.EmbeddingBag(6, 3, mode="mean")),
                              torch.randint(0, 6, (5, 4))),
    nn.Embedding: lambda: (nn.Sequential(nn.Embedding(6, 3)), torch.randint(0, 6, (5, 4))),
    nn.LSTM: lambda: (FirstOutput(nn.LSTM(3, 4, num_layers=2, batch_first=True)),
                      torch.randn(5, 6, 3)),
    nn.GRU: lambda: (FirstOutput(nn.GRU(3, 4, num_layers=2, bidirectional=True,
                                        batch_first=True)), torch.randn(5, 6, 3)),
    nn.RNN: lambda: (FirstOutput(nn.RNN(3, 4, nonlinearity="relu", batch_first=True)),
                     torch.randn(5, 6, 3)),
    nn.BatchNorm1d: lambda: (_eval_batchnorm(nn.BatchNorm1d(3)), torch.randn(5, 3, 4)),
    nn.BatchNorm2d: lambda: (_eval_batchnorm(nn.BatchNorm2d(3)), torch.randn(5, 3, 4, 4)),
    nn.BatchNorm3d: lambda: (_eval_batchnorm(nn.BatchNorm3d(2)), torch.randn(5, 2, 3, 3, 3)),
    nn.LayerNorm: lambda: (nn.Sequential(nn.LayerNorm(4)), torch.randn(5, 3, 4)),
    nn.RMSNorm: lambda: (nn.Sequential(nn.RMSNorm((3, 4))), torch.randn(5, 3, 4)),
    nn.GroupNorm: lambda: (nn.Sequential(nn.GroupNorm(2, 4)), torch.randn(5, 4, 3, 3)),
    nn.InstanceNorm1d: lambda: (nn.Sequential(nn.InstanceNorm1d(3, affine=True)),
                                torch.randn(5, 3, 6)),
    nn.InstanceNorm2d: lambda: (nn.Sequential(nn.InstanceNorm2d(3, affine=True)),
                                torch.randn(5, 3, 4, 4)),
    nn.InstanceNorm3d: lambda: (nn.Sequential(nn.InstanceNorm3d(2, affine=True,
                                                                track_running_stats=True)),
                                torch.randn(5, 2, 3, 3, 3)),
}


@pytest.mark.parametrize("layer_type", sorted(EXTENSIONS, key=lambda t: t.__name__),
                         ids=lambda t: t.__name__)
def test_every_registered_layer_type_matches_brute_force(layer_type):
    """Loops over the extensions' registry: a newly registered layer type is tested here
    (against one backward per example, float64) as soon as it has a factory above, and
    fails until it has one."""
    factory = REGISTERED_LAYER_FACTORIES.get(layer_type)
    assert factory is not None, (
        f"{layer_type.__name__} has an extension but no factory in "
        "REGISTERED_LAYER_FACTORIES (tests/test_extensions.py): add a small instance")
    torch.manual_seed(10)
    model, x = factory()
    layers = [m for m in model.modules() if type(m) is layer_type]
    assert layers, f"the factory of {layer_type.__name__} builds no such layer"
    y = torch.randn_like(model(x))
    result = assert_matches_brute_force(model, nn.MSELoss(), x, y)
    assert set(result.statistics) == set(model.parameters())


# -- losses that do not split into per-example means -----------------------------------

def test_class_weights_and_ignore_index_match_vmap_exact_path():
    """The layer maths only needs each example's output gradient, so any loss of the
    batch output is handled; compared with the vmap engine's expanded-parameter path."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 5, 4))
    x, y = torch.randn(6, 2, 5), torch.tensor([0, 1, 3, 3, 2, 1])
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0]), ignore_index=2)
    params = list(model.parameters())
    ours = ExtensionsEngine().compute(model, loss_fn, x, y, params)
    reference = VmapEngine()._expanded_parameters(model, loss_fn, x, y, params)
    for p in params:
        torch.testing.assert_close(ours.statistics[p].sum_grad_squared,
                                   reference.statistics[p].sum_grad_squared, rtol=RTOL,
                                   atol=ATOL)


# -- refusals -------------------------------------------------------------------------

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 3)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(self.first(x))


class ScaleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


def _hooked(module: nn.Module) -> nn.Module:
    module.register_forward_hook(lambda m, args, output: None)
    return module


def _train_mode_bn():
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False), nn.Linear(3, 2))


def _bn_without_running_stats():
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()


REFUSED_MODELS = {
    "train_batchnorm": (_train_mode_bn,
                        r"BatchNorm layer '1' is in train mode.*model\.eval\(\).*"
                        r"GhostBatchEngine"),
    "batchnorm_batch_stats": (_bn_without_running_stats,
                              r"layer '1' \(BatchNorm1d\) has track_running_stats=False"),
    # without an extension of its own a module gets the generic fallback, which refuses
    # hooks of the module's own before the model runs
    "no_extension": (lambda: nn.Sequential(nn.Linear(3, 3), nn.Sequential(_hooked(ScaleLayer()))),
                     r"layer '1\.0' \(ScaleLayer\) has no extension of its own and hooks "
                     r"of its own.*engine='vmap'"),
    "sparse_embedding": (lambda: nn.Sequential(nn.Embedding(5, 3, sparse=True)),
                         r"layer '0' \(Embedding\) has sparse=True"),
    "embedding_frequency_scaling": (
        lambda: nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True)),
        r"layer '0' \(Embedding\) has scale_grad_by_freq=True"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_MODELS))
def test_refusals_name_the_layer_and_the_fix(case):
    make_model, message = REFUSED_MODELS[case]
    model = make_model()
    assert ExtensionsEngine.unsupported_reason(model) is not None
    with pytest.raises(UnsupportedModelError, match=message):
        ExtensionsEngine().compute(model, nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 3),
                                   list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)

    def forward(self, x):
        return self.shared(torch.tanh(self.shared(x)))


class FunctionalUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return nn.functional.linear(x, self.layer.weight)


class MergesExamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):  # (B, T, 3) -> (B*T, 3): the examples are no longer an axis
        return self.layer(x.flatten(0, 1)).view(x.shape)


@pytest.mark.parametrize("model_type, message", [
    (MergesExamples, r"layer 'layer' got an input of shape \(8, 3\) with no batch axis"),
])
def test_runtime_refusals(model_type, message):
    model = model_type()
    assert ExtensionsEngine.unsupported_reason(model) is None  # only visible when run
    x = torch.randn(4, 2, 3)
    with pytest.raises(UnsupportedModelError, match=message):
        ExtensionsEngine().compute(model, nn.MSELoss(), x, torch.randn_like(x),
                                   list(model.parameters()))
    assert_no_hooks(model)


@pytest.mark.parametrize("model_type", [Tied, CalledTwice, FunctionalUse])
def test_reused_parameters_are_exact(model_type):
    """Tied weights, a layer called twice and a functional use of a layer's weight: the
    contributions of every use are added per example before squaring (tests/
    test_reuse_extensions.py has more)."""
    torch.manual_seed(12)
    model = model_type().double()
    for module in model.modules():  # FunctionalUse leaves its layer's bias unused
        if isinstance(module, nn.Linear) and model_type is FunctionalUse:
            module.bias.requires_grad_(False)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert_matches_brute_force(model, nn.MSELoss(), x, torch.randn_like(x))
    assert_no_hooks(model)


class CopiedTokensCharModel(StatefulCharModel):
    """Sequence-first, but the embedding gets a *copy* of the transposed tokens: integer
    tensors need no gradient, so the copy cannot be traced back to the model's input."""

    def forward(self, tokens):
        out, _ = self.lstm(self.embedding(tokens.t().contiguous()), self.state)
        return self.decoder(out).transpose(0, 1)


def test_ambiguous_batch_axis_with_sequence_first_lstm_is_refused():
    model = CopiedTokensCharModel(1, batch_first=False)
    x = torch.randint(0, 7, (5, 5))  # B == T: (T, B) and (B, T) look alike
    with pytest.raises(UnsupportedModelError, match="batch axis is ambiguous"):
        ExtensionsEngine().compute(model, sequence_loss("mean"), x, x,
                                   list(model.parameters()))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_sequence_first_with_as_many_steps_as_examples_is_exact(num_layers):
    """B == T: the batch axis is traced (the embedding gets a view of the input, tokens.t(),
    the LSTM declares its layout, the decoder gets the LSTM's output), not guessed."""
    torch.manual_seed(11)
    model = StatefulCharModel(num_layers, batch_first=False)
    x, y = torch.randint(0, 7, (5, 5)), torch.randint(0, 7, (5, 5))
    assert_matches_brute_force(model, sequence_loss("mean"), x, y)


# -- no state left behind --------------------------------------------------------------

def assert_no_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks", "_forward_hooks_with_kwargs"):
            assert not getattr(module, hooks), (module, hooks)
        assert "forward" not in module.__dict__, module


def test_no_hooks_left_and_vmap_works_afterwards():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(9, 4))
    lstm = StatefulCharModel(2, batch_first=True)
    x, y = torch.randn(5, 2, 5), torch.randint(0, 4, (5,))
    tokens = torch.randint(0, 7, (5, 6))
    compute(model, nn.CrossEntropyLoss(), x, y)
    compute(lstm, sequence_loss("mean"), tokens, tokens)
    assert_no_hooks(model)
    assert_no_hooks(lstm)
    assert not any(p.grad is not None for p in model.parameters())

    params = {n: p.detach() for n, p in model.named_parameters()}

    def example_loss(params, xn, yn):
        out = torch.func.functional_call(model, params, (xn.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yn.unsqueeze(0))

    per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(
        params, x, y)
    expected = brute_force(model, nn.CrossEntropyLoss(), x, y, 1.0 / 5)
    for name, p in model.named_parameters():
        torch.testing.assert_close((per_example[name] / 5).square().sum(0), expected[p][1])


def test_no_hooks_left_after_an_error_in_forward():
    model = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 2, batch_first=True))
    with pytest.raises(RuntimeError):
        ExtensionsEngine().compute(model, nn.MSELoss(), torch.randn(4, 5, 4),
                                   torch.randn(4, 5, 2), list(model.parameters()))
    assert_no_hooks(model)


def test_parameter_without_gradient_is_omitted():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    result = ExtensionsEngine().compute(model, nn.MSELoss(), torch.randn(4, 3),
                                        torch.randn(4, 2), list(model.parameters()))
    assert set(result.statistics) == {model.used.weight, model.used.bias}


# -- where the examples are -------------------------------------------------------------

def _traced_axis(make):
    """The batch axis ExampleLayouts gives the tensor ``make(x, lin)`` (B == T == 4)."""
    from msvag_mb.extensions.layout import ExampleLayouts

    x, lin = torch.randn(4, 4, 3), nn.Linear(3, 4)
    layouts = ExampleLayouts(4, (x,))
    hidden = lin(x)
    layouts.register(hidden, 0)  # as the Linear's extension does
    tensor = make(x, hidden)
    return layouts.batch_axis(tensor, "layer", "Linear", range(tensor.dim() - 1))


@pytest.mark.parametrize("make, axis", [
    (lambda x, h: x, 0),
    (lambda x, h: x.transpose(0, 1), 1),  # a view of the input: its strides
    (lambda x, h: x.permute(1, 0, 2)[..., :], 1),
    (lambda x, h: torch.tanh(h).transpose(0, 1) * 2, 1),  # through the autograd graph
    (lambda x, h: h.flatten(0, 1).view(4, 4, 4).transpose(1, 0), 1),  # merged, then apart
    (lambda x, h: torch.cat([h, torch.relu(h)], dim=2).transpose(0, 1).sum(2, keepdim=True)
     .expand(4, 4, 4), 1),
])
def test_batch_axis_is_traced_not_guessed(make, axis):
    assert _traced_axis(make) == axis


@pytest.mark.parametrize("make, message", [
    (lambda x, h: x.transpose(0, 1).contiguous(), "batch axis is ambiguous"),  # a copy
    (lambda x, h: h.flatten(0, 1), r"no batch axis of size 4 of its own"),
    (lambda x, h: h + h.transpose(0, 1), "combines tensors whose examples lie along"),
    (lambda x, h: h.transpose(0, 2)[:, :, :], r"examples along dim 2"),  # the features' dim
])
def test_a_batch_axis_that_cannot_be_known_is_refused(make, message):
    with pytest.raises(UnsupportedModelError, match=message):
        _traced_axis(make)
