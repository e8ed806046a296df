"""Mixed precision around an engine: the user's autocast and a ``torch.amp.GradScaler``.

* Autocast belongs to the forward pass (model and loss) only. The engines' own sums of
  squares run outside it, in the parameters' precision, since
  ``s_hat = (B sum c^2 - grad^2)/(B-1)`` cancels digits (a bfloat16 einsum would leave
  about two); the backward replays the forward's casts either way. An engine that declares
  ``autocast_in_backward`` (BackPACK) keeps the user's autocast around its whole call.
* A GradScaler multiplies the loss by its scale, exactly as ``scaler.scale(loss)``; the
  scale is recorded with the variance (:func:`msvag_mb.param_variance.set_grad_variance`).

tests/test_amp.py checks both against brute force.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from .engines.base import Engine, EngineResult, LossFunction, ParameterStatistics


def current_scale(scaler: torch.amp.GradScaler | None) -> float | None:
    """The scaler's current scale (initialising it), or None without an enabled scaler."""
    if scaler is None or not scaler.is_enabled():
        return None
    if scaler._scale is None:
        # the same lazy initialisation scaler.scale(loss) performs on its first call
        scaler.scale(torch.ones((), device=_scaler_device(scaler)))
    return scaler.get_scale()


def unscaled_since_update(scaler: torch.amp.GradScaler | None) -> bool:
    """Whether ``scaler.unscale_`` (or ``scaler.step``) ran for an optimizer since the last
    ``scaler.update()``: ``p.grad`` may then hold unscaled values although GradScaler's
    in-place unscale leaves its version counter as it was."""
    if scaler is None or not scaler.is_enabled():
        return False
    from torch.amp.grad_scaler import OptState

    return any(state["stage"] is not OptState.READY
               for state in scaler._per_optimizer_states.values())


def _scaler_device(scaler: torch.amp.GradScaler) -> torch.device:
    device = getattr(scaler, "_device", "cuda")
    return torch.device(device)


def scaled_loss(loss_fn: LossFunction, scaler: torch.amp.GradScaler) -> LossFunction:
    """``loss_fn`` multiplied by the scaler's scale, exactly as ``scaler.scale(loss)``."""

    def scaled(outputs, targets):
        return scaler.scale(loss_fn(outputs, targets))

    return scaled


def active_autocast(device_type: str) -> tuple[str, torch.dtype] | None:
    """``(device_type, dtype)`` of an enclosing ``torch.autocast``, or None."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


class AutocastForward(nn.Module):
    """Runs ``module``'s forward under autocast, so engines can do the rest outside it.

    Holds ``module`` as its only child: parameters, hooks and per-layer engines see the
    very same modules (qualified names gain a ``module.`` prefix).
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args):
        """``module(*args)`` under ``torch.autocast(device_type, dtype)``."""
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args)


def autocast_loss(loss_fn: LossFunction, device_type: str, dtype: torch.dtype) -> LossFunction:
    """``loss_fn`` under autocast, as under the user's (e.g. cross_entropy upcasts there)."""

    def loss_under_autocast(outputs, targets):
        with torch.autocast(device_type, dtype=dtype):
            return loss_fn(outputs, targets)

    return loss_under_autocast


def engine_call_setup(
    engine: Engine, model: nn.Module, loss_fn: LossFunction, device_type: str,
    scaler: torch.amp.GradScaler | None, scale: float | None,
) -> tuple[nn.Module, LossFunction, ContextManager]:
    """``(model, loss_fn, context)`` to run ``engine.compute`` with, inside ``context``.

    Under the user's autocast (for an engine that does not need it in backward) the forward
    and the loss run under autocast and everything else outside it; with an enabled scaler
    the loss is scaled.
    """
    autocast = active_autocast(device_type)
    context: ContextManager = contextlib.nullcontext()
    if autocast is not None and not engine.autocast_in_backward:
        model = AutocastForward(model, *autocast)
        loss_fn = autocast_loss(loss_fn, *autocast)
        context = torch.autocast(device_type, enabled=False)
    if scale is not None:
        loss_fn = scaled_loss(loss_fn, scaler)
    return model, loss_fn, context


def in_parameter_dtype(result: EngineResult) -> EngineResult:
    """Engines' statistics in each parameter's dtype (BackPACK keeps autocast's bfloat16)."""
    for param, stats in result.statistics.items():
        if stats.grad.dtype != param.dtype or stats.sum_grad_squared.dtype != param.dtype:
            result.statistics[param] = ParameterStatistics(
                stats.grad.to(param.dtype), stats.sum_grad_squared.to(param.dtype))
    return result
