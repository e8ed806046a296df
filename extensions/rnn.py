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
    backprop_through_time,
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

    @classmethod
    def for_module(cls, module: nn.RNNBase) -> "RNNCell":
        """The cell of the module's nonlinearity."""
        return cls(module.nonlinearity)

    def backward(self, x: Tensor, output: Tensor, weights: LayerWeights,
                 state: tuple[Tensor, ...], grad_output: Tensor,
                 grad_final: tuple[Tensor | None, ...], steps: Steps) -> CellGradients:
        """Backpropagate through time (module docstring)."""
        d_pre = self.slope(output)  # (T, B, H): phi', then da in place

        def step(t: int, active: int, dh: Tensor) -> tuple[Tensor, None]:
            return d_pre[t, :active].mul_(dh), None

        dh0 = backprop_through_time(step, d_pre, grad_output, grad_final[0],
                                    weights.weight_hh, steps)
        return CellGradients(d_pre, None, x, previous_hidden(state[0], output), (dh0,))


@register_extension
class RNNExtension(RecurrentExtension):
    """``nn.RNN``: every configuration, tanh or relu."""

    module_types = (nn.RNN,)
    cell_type = RNNCell

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """``None`` for the nonlinearities torch has (``tanh``, ``relu``), and what every
        recurrent module is refused for."""
        if module.nonlinearity not in NONLINEARITIES:
            return (f"has nonlinearity={module.nonlinearity!r}, which this extension does "
                    "not know; use 'tanh' or 'relu', or engine='ghost_batch'.")
        return super().unsupported_reason(module)
