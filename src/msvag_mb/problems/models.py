"""The networks of the paper's four test problems (App. A) and two small stand-ins.

Each definition follows ``docs/problems.md`` (the paper-era DeepOBS code); the parameter
counts are asserted in ``tests/test_problems.py``. TensorFlow's ``'SAME'`` padding is asymmetric
for stride 2 (extra pixel at the bottom/right); PyTorch's symmetric padding gives the same
shapes with windows shifted by one pixel, which we accept.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class CarriesState(Protocol):
    """A model that carries a state from one batch to the next (stateful truncated BPTT).

    ``model(x)`` starts from the carried state and carries its (detached) final state on.
    The runner starts each training epoch and each evaluation pass from a zero state
    (:meth:`reset_state`), restores the training state after an evaluation and saves the
    state in checkpoints (:meth:`get_state`, :meth:`set_state`). Under ``torchrun`` the
    state must be a list with, per layer, ``None`` or a tuple of tensors holding the
    examples along dim 1 (as ``nn.LSTM``'s ``(h, c)``): the checkpoint keeps the global
    batch's. :class:`CharRNN` is one.
    """

    def get_state(self) -> Any:
        """The carried state (for checkpoints and evaluation)."""

    def set_state(self, state: Any) -> None:
        """Restore a state from :meth:`get_state`."""

    def reset_state(self) -> None:
        """Forget the carried state: the next call starts from zeros."""


def truncated_normal_(tensor: Tensor, std: float) -> Tensor:
    """TensorFlow's ``truncated_normal_initializer``: normal, redrawn outside ±2σ."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class FashionMNIST2C2D(nn.Module):
    """P1 ``fmnist_2c2d``: two conv layers, two fully connected layers (3,274,634 params).

    conv5x5(1->32, same) - ReLU - maxpool2 - conv5x5(32->64, same) - ReLU - maxpool2 -
    fc(3136->1024) - ReLU - fc(1024->10). Init: truncated normal σ=0.05, biases 0.05.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Linear(1024, num_classes)
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                truncated_normal_(module.weight, 0.05)
                nn.init.constant_(module.bias, 0.05)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, classes)`` of images ``x``."""
        return self.classifier(self.features(x))


class CIFAR3C3D(nn.Module):
    """P2 ``cifar10_3c3d``: three conv layers, three fully connected (895,210 params).

    conv5x5(3->64, valid) - ReLU - maxpool3x3/2(same) - conv3x3(64->96, valid) - ReLU -
    pool - conv3x3(96->128, same) - ReLU - pool - fc(1152->512) - ReLU - fc(512->256) -
    ReLU - fc(256->classes). Glorot-uniform weights, zero biases. The 'same' 3x3/2 pools
    use padding 1 (symmetric; TensorFlow pads only bottom/right): 28->14, 12->6, 6->3.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(64, 96, 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(3 * 3 * 128, 512), nn.ReLU(),
            nn.Linear(512, 256), nn.ReLU(),
            nn.Linear(256, num_classes),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, classes)`` of images ``x``."""
        return self.classifier(self.features(x))


class _PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 (no conv biases).

    With ``projection`` (the first block of each group), a 1x1 conv shortcut is applied to
    the BN-ReLU output; otherwise the shortcut is the identity on the block's input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 projection: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5, momentum=0.1)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if projection else None
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + residual


class WideResNet(nn.Module):
    """P3 ``cifar100_wrn404``: WRN-depth-k, pre-activation, no dropout.

    Stem conv3x3(3->16), three groups of ``(depth-4)/6`` blocks with widths 16k, 32k, 64k
    and strides 1, 2, 2, then BN-ReLU, 8x8 average pool, fc. He-normal conv init.
    WRN-40-4 on CIFAR-100 has 8,972,340 parameters.
    """

    def __init__(self, depth: int = 40, widen_factor: int = 4, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Invalid WRN depth: {depth} (must be 6n + 4, e.g. 16, 28, 40)")
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_channels = 16
        for width, stride in zip(widths, (1, 2, 2)):
            for index in range(blocks_per_group):
                layers.append(_PreActBlock(in_channels, width, stride if index == 0 else 1,
                                           projection=index == 0))
                in_channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_channels, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)  # 8x8 average pool on 32x32 inputs
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, classes)`` of images ``x`` of shape ``(B, 3, 32, 32)``."""
        out = self.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


class DigitsCNN(nn.Module):
    """Small CNN for scikit-learn's 8x8 digits (the fast real stand-in), 13,706 params.

    conv3x3(1->16) - ReLU - maxpool2 - conv3x3(16->32) - ReLU - maxpool2 - fc(128->64) -
    ReLU - fc(64->10), PyTorch's default init.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * 2 * 32, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, classes)`` of images ``x``."""
        return self.classifier(self.features(x))


class CharRNN(nn.Module):
    """P4 ``tolstoi_char_rnn``: embedding, two LSTM layers of 128, linear output per step.

    The LSTM state is carried *inside* the module (stateful truncated BPTT): each call
    starts from the detached final ``(h, c)`` of the previous call, so ``model(x)`` maps a
    batch ``x`` of shape ``(B, T)`` to logits ``(B, T, V)`` and per-example gradient engines
    see an ordinary ``model(inputs)`` whose LSTMs receive a carried initial state.
    :meth:`reset_state` starts from zeros (start of each epoch and evaluation pass): a
    :class:`CarriesState`.

    Dropout (training only) follows TensorFlow's ``DropoutWrapper(input_keep_prob=0.8,
    output_keep_prob=0.8)`` around each of the two cells: on each layer's input (for layer 1,
    the embedding output) and on each layer's output (for layer 2, the top output), with an
    independent mask per time step. It is done by our own ``nn.Dropout`` modules, not
    ``nn.LSTM(dropout=...)``, which would drop only between layers.

    Init as TensorFlow's defaults: Glorot-uniform embedding, LSTM kernels (over the
    concatenated ``[input, hidden] x 4H`` kernel, as TensorFlow stores it) and output
    weights; zero biases except ``+1`` on the forget gate (``forget_bias=1``). PyTorch's LSTM
    has two bias vectors (hence 285,523 rather than 284,499 parameters); the +1 is put on
    ``bias_ih`` only, so the effective forget bias is exactly 1.
    """

    def __init__(self, vocab_size: int = 83, hidden_size: int = 128, embedding_dim: int = 128,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm1 = nn.LSTM(embedding_dim, hidden_size, batch_first=True)
        self.lstm2 = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.drop_in1 = nn.Dropout(dropout)
        self.drop_out1 = nn.Dropout(dropout)
        self.drop_in2 = nn.Dropout(dropout)
        self.drop_out2 = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size, vocab_size)
        self._state: list[tuple[Tensor, Tensor] | None] = [None, None]
        nn.init.xavier_uniform_(self.embedding.weight)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        for lstm in (self.lstm1, self.lstm2):
            fan_in = lstm.input_size + lstm.hidden_size
            fan_out = 4 * lstm.hidden_size
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(lstm.weight_ih_l0, -limit, limit)
            nn.init.uniform_(lstm.weight_hh_l0, -limit, limit)
            nn.init.zeros_(lstm.bias_ih_l0)
            nn.init.zeros_(lstm.bias_hh_l0)
            with torch.no_grad():  # PyTorch gate order: input, forget, cell, output
                lstm.bias_ih_l0[lstm.hidden_size:2 * lstm.hidden_size].fill_(1.0)

    def reset_state(self) -> None:
        """Forget the carried state: the next call starts from zeros."""
        self._state = [None, None]

    def get_state(self) -> list[tuple[Tensor, Tensor] | None]:
        """The carried ``(h, c)`` of both layers (for checkpoints and evaluation)."""
        return list(self._state)

    def set_state(self, state: list[tuple[Tensor, Tensor] | None]) -> None:
        """Restore a state from :meth:`get_state`."""
        if len(state) != 2:
            raise ValueError(f"expected the states of 2 layers, got {len(state)}")
        self._state = list(state)

    def _initial(self, layer: int, batch_size: int, like: Tensor) -> tuple[Tensor, Tensor]:
        carried = self._state[layer]
        if carried is None:
            zeros = like.new_zeros(1, batch_size, self.lstm1.hidden_size)
            return zeros, zeros.clone()
        if carried[0].shape[1] != batch_size:
            raise ValueError(
                f"CharRNN carries a state for a batch of {carried[0].shape[1]} sequences but "
                f"got {batch_size}; call model.reset_state() when the batch layout changes "
                "(the state of row i continues sequence i of the previous batch)."
            )
        return carried

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` of token ids ``(B, T)``, starting from the carried state and
        carrying the new (detached) one on.
        """
        if tokens.dim() != 2:
            raise ValueError(
                f"CharRNN expects token ids of shape (B, T), got {tuple(tokens.shape)}")
        batch_size = tokens.shape[0]
        x = self.drop_in1(self.embedding(tokens))
        x, state1 = self.lstm1(x, self._initial(0, batch_size, x))
        x = self.drop_in2(self.drop_out1(x))
        x, state2 = self.lstm2(x, self._initial(1, batch_size, x))
        x = self.drop_out2(x)
        # truncated BPTT: the next batch continues from this state without backpropagating
        self._state = [tuple(s.detach() for s in state1), tuple(s.detach() for s in state2)]
        return self.output(x)


class SequenceCrossEntropy(nn.Module):
    """Cross-entropy of logits ``(B, T, V)`` against targets ``(B, T)``, mean over B·T.

    Equal to the mean over the B sequences of each sequence's token-mean loss, so the
    sequences are the examples of the per-example statistics (docs/maths.md).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over all ``B T`` tokens."""
        return nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
