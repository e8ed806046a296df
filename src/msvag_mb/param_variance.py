"""The ``p.grad_variance`` contract: how a within-batch variance travels with ``p.grad``.

:class:`msvag_mb.GradientVariance` (the producer) attaches ``s_hat_t`` to every trainable
parameter as ``p.grad_variance``; the optimizers and the monitor (the consumers) read it
back. Both sides go through this module, so the rules are written once:

* :func:`set_grad_variance` ties the variance to the current ``p.grad`` (and records the
  GradScaler scale it is measured in);
* :func:`read_grad_variance` refuses a missing, stale (``p.grad`` replaced since) or
  misshapen variance and returns it in unscaled units;
* :func:`clear_grad_variance` removes it (``zero_grad`` and a new accumulation cycle);
* :func:`all_finite` / :func:`check_finite` are the one NaN/Inf test of gradients and
  variances.

This module imports nothing else from the package (a ground-floor module).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

GRAD_VARIANCE_HINT = (
    "variance='minibatch' reads the within-batch variance that "
    "msvag_mb.GradientVariance(model, loss_fn).backward(inputs, targets) leaves on every "
    "parameter as p.grad_variance: call it instead of loss.backward() (or use "
    "variance='moving_average', which needs nothing but p.grad)"
)

_ATTRIBUTES = ("grad_variance", "_grad_variance_of", "grad_variance_scale")


def read_grad_variance(param: Tensor) -> Tensor:
    """Return ``param.grad_variance`` after checking it belongs to the current ``param.grad``.

    The result is in the units of the unscaled gradient (see :func:`set_grad_variance`).
    """
    variance = getattr(param, "grad_variance", None)
    if variance is None:
        raise RuntimeError(f"p.grad_variance is missing for a parameter of shape "
                           f"{tuple(param.shape)}. {GRAD_VARIANCE_HINT}.")
    owner = getattr(param, "_grad_variance_of", None)
    if owner is not None and owner() is not param.grad:
        raise RuntimeError(
            "p.grad_variance is stale: p.grad was replaced after "
            "GradientVariance.backward (e.g. by model.zero_grad() and loss.backward()). "
            f"{GRAD_VARIANCE_HINT}."
        )
    if variance.shape != param.shape:
        raise RuntimeError(
            f"p.grad_variance has shape {tuple(variance.shape)} but the parameter has "
            f"shape {tuple(param.shape)}."
        )
    scale = getattr(param, "grad_variance_scale", None)
    if scale is not None:
        # Set by GradientVariance.backward(..., scaler=...): the variance is still in the
        # loss-scaled units while the step sees gradients that GradScaler has unscaled.
        variance = variance / (scale * scale)
    return variance


def grad_variance_or_none(param: Tensor) -> Tensor | None:
    """:func:`read_grad_variance`, or ``None`` where there is no valid variance."""
    try:
        return read_grad_variance(param)
    except RuntimeError:
        return None


def set_grad_variance(param: Tensor, variance: Tensor | None, scale: float | None = None) -> None:
    """Attach ``variance`` to ``param`` as ``param.grad_variance``, tied to ``param.grad``.

    ``scale`` is the GradScaler scale the variance was measured under (``None``: unscaled).
    """
    if variance is None:
        clear_grad_variance(param)
        return
    param.grad_variance = variance
    param._grad_variance_of = weakref.ref(param.grad) if param.grad is not None else None
    param.grad_variance_scale = scale


def clear_grad_variance(param: Tensor) -> None:
    """Remove ``grad_variance`` and its bookkeeping from ``param``."""
    for attribute in _ATTRIBUTES:
        if hasattr(param, attribute):
            delattr(param, attribute)


def all_finite(tensors: list[Tensor]) -> bool:
    """True if no element is NaN or Inf; one host sync in the usual case.

    A NaN or Inf element makes its tensor's sum NaN or Inf, so finite sums settle it (a
    sum is much cheaper than ``isfinite(t).all()`` on CPU). A non-finite sum may also come
    from large finite values that overflow; the exact per-element test decides then.
    """
    if not tensors:
        return True
    if bool(torch.stack([t.sum(dtype=torch.float32) for t in tensors]).isfinite().all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def check_finite(tensors: list[Tensor], what: str) -> None:
    """Raise ``FloatingPointError`` before any state changes if a tensor holds NaN or Inf."""
    if not all_finite(tensors):
        raise FloatingPointError(
            f"{what} contains NaN or Inf; the step was not taken and the optimizer state is "
            "unchanged. Lower the step size, check the data and the loss, or train with "
            "torch.amp.GradScaler, whose scaler.step(optimizer) skips such steps."
        )
