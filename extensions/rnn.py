"""``nn.RNN`` (tanh or relu): the cell equations for the shared recurrent machinery
(``recurrent.py``).

    h_t = phi(a_t),   a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh,   phi = tanh or relu

Both sides of ``a_t`` have the same gradient ``da_t = dh_t phi'(a_t)``, with ``phi'`` read
off the saved output (``1 - h_t^2``, or ``h_t > 0`` as torch's relu backward takes it), so
the backward needs no recomputation at all: per step one elementwise product and the
matmul ``dh_{t-1} = (output gradient at t - 1) + da_t W_hh``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core import register_extension
from .recurrent import (
    CellGradients,
    LayerWeights,
    RecurrentCell,
    RecurrentExtension,
    Steps,
    carry_back,
    fused_layer,
    initial_gradient,
    loop_threads,
    previous_hidden,
)


def tanh_slope(output: Tensor) -> Tensor:
    """``tanh'(a) = 1 - h^2`` from ``h = tanh(a)``, a new tensor."""
    return output.square().neg_().add_(1)


def relu_slope(output: Tensor) -> Tensor:
    """``relu'(a) = [h > 0]`` from ``h = relu(a)`` (as torch's relu backward), a new tensor."""
    return (output > 0).to(output.dtype)


#: nonlinearity -> (torch's fused kernel, the slope from the output)
NONLINEARITIES = {"tanh": (torch.rnn_tanh, tanh_slope), "relu": (torch.rnn_relu, relu_slope)}


class RNNCell(RecurrentCell):
    """The Elman cell with the nonlinearity ``nonlinearity`` (a key of :data:`NONLINEARITIES`)."""

    def __init__(self, nonlinearity: str) -> None:
        self.kernel, self.slope = NONLINEARITIES[nonlinearity]

    def run(self, x: Tensor, steps: Steps, weights: list[LayerWeights],
            state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """torch's fused one-layer kernel (all directions)."""
        output, h_last = fused_layer(self.kernel, x, steps, state[0], weights)
        return output, (h_last,)

    def backward(self, x: Tensor, output: Tensor, weights: LayerWeights,
                 state: tuple[Tensor, ...], grad_output: Tensor,
                 grad_final: tuple[Tensor | None, ...], steps: Steps) -> CellGradients:
        """Backpropagate through time (module docstring)."""
        length, batch, _ = output.shape
        d_pre = self.slope(output)  # (T, B, H): phi', then da in place
        dh = initial_gradient(grad_output, grad_final[0])
        with loop_threads(output.device):
            for t in range(length - 1, -1, -1):  # dh: gradient w.r.t. h_t, all paths
                active = steps.active(t)
                step = d_pre[t, :active].mul_(dh[:active])
                if active < batch:
                    d_pre[t, active:].zero_()  # inactive: no contribution
                dh = carry_back(dh, step, weights.weight_hh,
                                grad_output[t - 1] if t > 0 else None, active)
        return CellGradients(d_pre, None, x, previous_hidden(state[0], output), (dh,))


@register_extension
class RNNExtension(RecurrentExtension):
    """``nn.RNN``: every configuration, tanh or relu."""

    module_types = (nn.RNN,)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """``None`` for the nonlinearities torch has (``tanh``, ``relu``)."""
        if module.nonlinearity not in NONLINEARITIES:
            return (f"has nonlinearity={module.nonlinearity!r}, which this extension does "
                    "not know; use 'tanh' or 'relu', or engine='ghost_batch'.")
        return None

    def cell_for(self, module: nn.Module) -> RecurrentCell:
        """The Elman cell of the module's nonlinearity."""
        return RNNCell(module.nonlinearity)
