"""The paper's four test problems (App. A), two small real stand-ins and a transformer, by name.

``PROBLEMS`` maps a name to a :class:`Problem`: how to build its model, load its data
(real files or synthetic tensors of the same shapes), batch it, and its paper settings
(batch size, steps, step-size schedule, L2, the paper's tuned step sizes). Details and the
places where we deviate from the paper's text are in ``docs/problems.md``.

==============================  ==========================  ==========  =====  =======  ==========
name                            model                       parameters  batch  steps    schedule
==============================  ==========================  ==========  =====  =======  ==========
``fmnist_2c2d``                 2 conv + 2 fc               3,274,634   64     6,000    constant
``cifar10_3c3d``                3 conv + 3 fc, L2 0.002     895,210     128    40,000   constant
``cifar100_wrn404``             WRN-40-4, L2 5e-4, BN       8,972,340   128    80,000   x0.2 at 30/60/80%
``tolstoi_char_rnn``            2-layer LSTM char model     285,523     50     200,000  x0.1 at 62.5%
``digits``                      small CNN (sklearn digits)  13,706      32     1,000    constant
``pydoc_char_rnn``              P4 model, CPython docs      vocab-dep.  50     2,000    x0.1 at 62.5%
``tolstoi_char_transformer``    4-block char transformer    812,160     32     2,000    constant
==============================  ==========================  ==========  =====  =======  ==========
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import data as data_module
from .data import (
    CharBatches,
    DataNotFoundError,
    ImageBatches,
    ImageData,
    TextData,
    augment_cifar,
    per_image_standardization,
)
from .models import (
    CIFAR3C3D,
    CharRNN,
    DigitsCNN,
    FashionMNIST2C2D,
    SequenceCrossEntropy,
    WideResNet,
    count_parameters,
)
from .transformer import CharTransformer, synthetic_war_and_peace

Data = ImageData | TextData
Batches = ImageBatches | CharBatches


@dataclass(frozen=True)
class Problem:
    """One test problem: model, data, and the paper's training protocol.

    Attributes:
        name: registry key.
        kind: ``"image"`` (classification of images) or ``"text"`` (character model).
        build: ``build(num_outputs) -> nn.Module`` (classes or vocabulary size).
        load_real: ``load_real(data_dir, download) -> ImageData | TextData``.
        synthetic: ``synthetic(seed) -> ImageData | TextData`` of the real shapes.
        batch_size, steps, eval_every: the paper's protocol (defaults of the runner).
        weight_decay: L2 factor λ on weights (conv/fc kernels; never biases or BatchNorm).
        milestones: fractions of the run's steps where the step size is multiplied by
            ``lr_factor`` (scale with ``--steps``).
        augment: DeepOBS's CIFAR augmentation on training batches.
        standardize: per-image standardisation of every batch.
        seq_len: window length for text problems.
        ghost_groups: groups of the ghost-batch engine for the mini-batch estimator, for
            models with BatchNorm in train mode (``None``: per-example engines apply).
        lrs: the paper's tuned step sizes per optimizer (App. A.2), or our defaults for
            the stand-ins.
        parameters: the expected parameter count (``None`` when it depends on the data).
        num_outputs: classes or vocabulary size of the real data (builds the model
            without loading data).
    """

    name: str
    description: str
    kind: str
    build: Callable[[int], nn.Module]
    load_real: Callable[..., Data]
    synthetic: Callable[[int], Data]
    batch_size: int
    steps: int
    eval_every: int
    weight_decay: float = 0.0
    milestones: tuple[float, ...] = ()
    lr_factor: float = 1.0
    augment: bool = False
    standardize: bool = False
    seq_len: int | None = None
    ghost_groups: int | None = None
    lrs: dict[str, float] = field(default_factory=dict)
    parameters: int | None = None
    num_outputs: int = 10

    def load_data(self, data_dir=None, download: bool = False,
                  synthetic: bool = False, seed: int = 0) -> Data:
        """Real data (files from ``data_dir``) or synthetic tensors of the same shapes."""
        if synthetic:
            return self.synthetic(seed)
        return self.load_real(data_dir, download)

    def build_model(self, data: Data | None = None) -> nn.Module:
        """The model; for text problems the vocabulary size comes from ``data``."""
        if self.kind == "text":
            return self.build(len(data.vocabulary) if data is not None else self.num_outputs)
        return self.build(data.num_classes if data is not None else self.num_outputs)

    def batches(self, data: Data, batch_size: int, seed: int) -> Batches:
        """The runner's batch provider for ``data``."""
        if self.kind == "text":
            return CharBatches(data, batch_size, self.seq_len or 50)
        return ImageBatches(
            data, batch_size, seed,
            augment=augment_cifar if self.augment else None,
            preprocess=per_image_standardization if self.standardize else None,
        )

    def loss_fn(self) -> nn.Module:
        """Mean-reduced cross-entropy (over B·T tokens for text problems)."""
        return SequenceCrossEntropy() if self.kind == "text" else nn.CrossEntropyLoss()

    def milestone_steps(self, steps: int) -> list[int]:
        """Step-size decay points for a run of ``steps`` steps."""
        return [int(round(fraction * steps)) for fraction in self.milestones]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (conv/fc/LSTM/embedding kernels, ``dim > 1``) with L2
    ``weight_decay``, and biases and BatchNorm parameters (``dim <= 1``) without.

    L2 goes into the optimizer (gradient ``+ λθ``), not the loss, so the loss stays a mean
    of per-example terms and the within-batch variance is untouched (docs/problems.md).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def l2_penalty(model: nn.Module, weight_decay: float) -> float:
    """The paper's regulariser ``0.5 λ Σ‖W‖²`` over the decayed weights (for reporting)."""
    if weight_decay == 0:
        return 0.0
    with torch.no_grad():
        total = sum(float(p.pow(2).sum()) for p in model.parameters() if p.dim() > 1)
    return 0.5 * weight_decay * total


def _tolstoi_synthetic(seed: int) -> TextData:
    # enough characters for a few 50x50 windows in train and test
    return data_module.synthetic_text(83, 4 * 2500 + 1, 2 * 2500 + 1, seed)


PROBLEMS: dict[str, Problem] = {
    problem.name: problem
    for problem in [
        Problem(
            name="fmnist_2c2d",
            description="P1: Fashion-MNIST, 2 conv + 2 fc layers",
            kind="image",
            build=FashionMNIST2C2D,
            load_real=data_module.load_fashion_mnist,
            synthetic=lambda seed: data_module.synthetic_images((1, 28, 28), 10, 640, 128, seed),
            batch_size=64, steps=6000, eval_every=300,
            lrs={"msgd": 0.1, "adam": 1e-3, "mssd": 3e-4, "msvag": 0.3},
            parameters=3_274_634,
        ),
        Problem(
            name="cifar10_3c3d",
            description="P2: CIFAR-10, 3 conv + 3 fc layers, L2 0.002",
            kind="image",
            build=CIFAR3C3D,
            load_real=lambda data_dir=None, download=False: data_module.load_cifar(
                10, data_dir, download),
            synthetic=lambda seed: data_module.synthetic_images((3, 32, 32), 10, 640, 128, seed),
            batch_size=128, steps=40_000, eval_every=1000, weight_decay=0.002,
            augment=True, standardize=True,
            lrs={"msgd": 3e-2, "adam": 6e-4, "mssd": 1e-4, "msvag": 6e-2},
            parameters=895_210,
        ),
        Problem(
            name="cifar100_wrn404",
            description="P3: CIFAR-100, WRN-40-4 with BatchNorm, L2 5e-4",
            kind="image",
            build=lambda classes: WideResNet(40, 4, classes),
            load_real=lambda data_dir=None, download=False: data_module.load_cifar(
                100, data_dir, download),
            synthetic=lambda seed: data_module.synthetic_images((3, 32, 32), 100, 256, 32, seed),
            batch_size=128, steps=80_000, eval_every=2000, weight_decay=5e-4,
            milestones=(0.3, 0.6, 0.8), lr_factor=0.2,  # 24k, 48k, 64k of 80k
            augment=True, standardize=True, ghost_groups=8,
            lrs={"msgd": 3e-2, "adam": 3e-4, "mssd": 1e-4, "msvag": 3e-2},
            parameters=8_972_340, num_outputs=100,
        ),
        Problem(
            name="tolstoi_char_rnn",
            description="P4: War and Peace, 2-layer LSTM character model",
            kind="text",
            build=CharRNN,
            load_real=data_module.load_war_and_peace,
            synthetic=_tolstoi_synthetic,
            batch_size=50, steps=200_000, eval_every=5000, seq_len=50,
            milestones=(0.625,), lr_factor=0.1,  # 125k of 200k
            lrs={"msgd": 3.0, "adam": 3e-3, "mssd": 1e-3, "msvag": 10.0},
            parameters=285_523, num_outputs=83,
        ),
        Problem(
            name="digits",
            description="scikit-learn's 8x8 digits, small CNN (fast real stand-in)",
            kind="image",
            build=DigitsCNN,
            load_real=lambda data_dir=None, download=False: data_module.load_digits_data(),
            synthetic=lambda seed: data_module.synthetic_images((1, 8, 8), 10, 320, 64, seed),
            batch_size=32, steps=1000, eval_every=100,
            lrs={"msgd": 0.3, "adam": 3e-3, "mssd": 3e-3, "msvag": 0.3},
            parameters=13_706,
        ),
        Problem(
            name="pydoc_char_rnn",
            description="P4's model on CPython's bundled documentation text",
            kind="text",
            build=CharRNN,
            load_real=lambda data_dir=None, download=False: data_module.load_pydoc_text(),
            synthetic=_tolstoi_synthetic,
            batch_size=50, steps=2000, eval_every=250, seq_len=50,
            milestones=(0.625,), lr_factor=0.1,
            lrs={"msgd": 3.0, "adam": 3e-3, "mssd": 1e-3, "msvag": 10.0},
            num_outputs=103,  # distinct characters of pydoc_data.topics (CPython 3.11)
        ),
        Problem(
            name="tolstoi_char_transformer",
            description=(
                "P4's data with a decoder-only transformer (4 pre-norm blocks of width 128, "
                "4 heads, context 64, tied head); not in the paper: steps, schedule and "
                "step sizes are our placeholders until tuned (issue 15)"),
            kind="text",
            build=CharTransformer,
            load_real=data_module.load_war_and_peace,
            synthetic=synthetic_war_and_peace,
            batch_size=32, steps=2000, eval_every=500, seq_len=64,
            lrs={"msgd": 0.3, "adam": 1e-3, "mssd": 3e-4, "msvag": 0.3},
            parameters=812_160, num_outputs=83,
        ),
    ]
}


def get_problem(name: str) -> Problem:
    """The problem called ``name``; the error lists the valid names."""
    try:
        return PROBLEMS[name]
    except KeyError:
        raise ValueError(f"Invalid problem: {name!r}. Use one of {sorted(PROBLEMS)}.") from None


__all__ = [
    "PROBLEMS",
    "DataNotFoundError",
    "Problem",
    "count_parameters",
    "get_problem",
    "l2_penalty",
    "parameter_groups",
]
