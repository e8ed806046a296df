"""The ``extensions`` engine on Conv3d, ConvTranspose1d/2d/3d and EmbeddingBag: exact.

The configurations are those of ``tests/test_exact_or_refused.py`` (float64, brute force
with one backward per example); there any refusal passes, here the ones the extensions
support must be *exact*, along both ways of forming the per-example weights (grouped
convolution and unfold + bmm; the dense and the per-pair coefficient buffer of the bags)
and with chunks of one example, and the traps must be refused with the fix.
"""

from __future__ import annotations

import pytest
import torch

import msvag_mb
from msvag_mb.engines import UnsupportedModelError
from msvag_mb.extensions import conv, conv_transpose, embedding_bag

from test_exact_or_refused import CASES, run_case

BY_NAME = {case.name: case for case in CASES}

#: cases the extensions refuse by design: examples merged or not the bags, or coupled
REFUSED = {
    "convT2d-per-frame", "embedding-bag-transposed-T=B", "embedding-bag-1d-positions-T=B",
    "embedding-bag-1d-masked", "embedding-bag-sum-scale_grad_by_freq=True",
    "embedding-bag-mean-scale_grad_by_freq=True", "embedding-bag-sum-sparse=True",
    "embedding-bag-mean-sparse=True",
}
CONV = sorted(name for name in BY_NAME
              if name.startswith(("conv3d", "convT", "conv-autoencoder")) and name not in REFUSED)
BAGS = sorted(name for name in BY_NAME
              if name.startswith("embedding-bag") and name not in REFUSED)


def test_the_configurations_are_there():
    assert len(CONV) > 60 and len(BAGS) > 20
    assert REFUSED <= set(BY_NAME)


@pytest.mark.parametrize("name", CONV + BAGS)
def test_exact(name):
    assert run_case(BY_NAME[name], "extensions") == "exact"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_before_backward(name):
    assert run_case(BY_NAME[name], "extensions") == "refused"


def _forced(monkeypatch, module, path: str, threshold_names: tuple[str, ...], grouped: bool):
    """Force the grouped (or the unfold) path of ``module``; returns the paths taken."""
    taken = []
    original = getattr(module, path)
    monkeypatch.setattr(module, path, lambda *args: taken.append(path) or original(*args))
    for name in threshold_names:
        monkeypatch.setattr(module, name, 0 if grouped else 10 ** 9)
    return taken


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "unfold"])
@pytest.mark.parametrize("name", [n for n in CONV if n.startswith(("conv3d", "convT"))][::3])
def test_both_ways_and_one_example_chunks(name, grouped, monkeypatch):
    if name.startswith("conv3d"):
        module, thresholds = conv, ("GROUPED_MIN_PATCH", "GROUPED_MIN_PATCH_3D")
    else:
        module, thresholds = conv_transpose, ("GROUPED_MIN_PATCH",)
    path = "_per_example_by_grouped_conv" if grouped else "_per_example_by_unfold"
    taken = _forced(monkeypatch, module, path, thresholds, grouped)
    monkeypatch.setattr(module, "CACHE_BUDGET_ELEMENTS", 1)  # one example per chunk
    assert run_case(BY_NAME[name], "extensions") == "exact"
    # B == 4 examples: one chunk per example and layer, all along the forced path
    assert taken and len(taken) % 4 == 0


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "per-pair"])
@pytest.mark.parametrize("name", [n for n in BAGS if "max-" not in n])
def test_bags_dense_and_per_pair(name, dense, monkeypatch):
    monkeypatch.setattr(embedding_bag, "DENSE_ROWS_FACTOR", 10 ** 9 if dense else 0)
    assert run_case(BY_NAME[name], "extensions") == "exact"


def test_bags_that_are_not_examples_name_the_fix(without_output_probes):
    case = BY_NAME["embedding-bag-1d-positions-T=B"]
    model = case.build()
    tokens = case.inputs(torch.Generator().manual_seed(1))
    gradient_variance = msvag_mb.GradientVariance(model, case.loss(), engine="extensions")
    with pytest.raises(UnsupportedModelError, match=r"layer 'bag' \(EmbeddingBag\).*2-d"):
        gradient_variance.backward(tokens, torch.zeros(tokens[0].shape[0], 2))


def test_output_padding_is_read_off_the_shapes():
    layer = torch.nn.ConvTranspose2d(2, 3, (3, 2), stride=(3, 2), padding=(1, 0),
                                     dilation=(1, 3), output_padding=(2, 1))
    x = torch.randn(2, 2, 4, 5)
    assert conv_transpose.output_padding_of(layer, x, layer(x)) == [2, 1]
    y = layer(x, output_size=[11, 12])  # output_padding (1, 0) for this call
    assert conv_transpose.output_padding_of(layer, x, y) == [1, 0]
