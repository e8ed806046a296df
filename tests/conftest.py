"""Shared fixtures: tiny models and data, float64 by default for exact comparisons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

#: this repository's CI keeps the data files it cannot install (War and Peace) in the folder
#: ../shared/data beside the checkout; the loaders search the folders listed in
#: $MSVAG_DATA_DIR, so the tests point it there unless it is set (.ci/run sets it)
SIBLING_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("MSVAG_DATA_DIR", str(SIBLING_DATA))


class CharModel(nn.Module):
    """Embedding + 2-layer LSTM + per-step Linear: the P4 shape in miniature."""

    def __init__(self, vocab: int = 7, hidden: int = 5, num_layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 4)
        self.lstm = nn.LSTM(4, hidden, num_layers=num_layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x):
        out, _ = self.lstm(self.embedding(x))
        return self.decoder(out)


def sequence_loss(outputs, targets):
    """Mean cross-entropy over all B*T tokens (the examples are the B sequences)."""
    return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    )


def mlp_problem(batch: int = 6):
    torch.manual_seed(0)
    return make_mlp(), torch.randn(batch, 6), torch.randint(0, 3, (batch,))


def cnn_problem(batch: int = 5):
    torch.manual_seed(1)
    return make_cnn(), torch.randn(batch, 2, 8, 8), torch.randint(0, 3, (batch,))


def char_problem(batch: int = 4, steps: int = 6):
    torch.manual_seed(2)
    return CharModel(), torch.randint(0, 7, (batch, steps)), torch.randint(0, 7, (batch, steps))


PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem, "char_lstm": char_problem}


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def without_output_probes(monkeypatch):
    """The engines' output probes (msvag_mb.engines.independence) switched off, for tests
    of the refusals that come after them (a layer's own, in the forward pass)."""
    from msvag_mb.engines import independence

    monkeypatch.setattr(independence, "output_mismatch", lambda *args, **kwargs: None)
