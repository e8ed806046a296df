"""The ``p.grad_variance`` contract: how a within-batch variance travels with ``p.grad``.

:class:`msvag_mb.GradientVariance` (the producer) attaches ``s_hat_t`` to every trainable
parameter as ``p.grad_variance``; the optimizers and the monitor (the consumers) read it
back. Both sides go through this module, so the rules are written once:

* :func:`set_grad_variance` ties the variance to the current ``p.grad``, its identity and
  its version counter (and records the GradScaler scale it is measured in);
* :func:`read_grad_variance` refuses a missing, stale (``p.grad`` replaced, or changed in
  place, since) or misshapen variance and returns it in unscaled units;
* :func:`clear_grad_variance` removes it (``zero_grad`` and a new accumulation cycle);
* :func:`all_finite` / :func:`check_finite` are the one NaN/Inf test of gradients and
  variances.

What stays on the parameter is picklable (``grad_variance``, ``grad_variance_scale`` and
the version of ``p.grad`` it belongs to), so ``torch.save(model)`` and pickling a model, an
optimizer or a ``GradientVariance`` work at any point; the tie to the ``p.grad`` object
itself is kept beside the parameters, in a table that holds neither the parameters nor the
gradients alive. A parameter that comes back from a pickle (or a copy) has no tie: its
variance is stale for any ``p.grad`` it gets later.

This module imports nothing else from the package (a ground-floor module).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

GRAD_VARIANCE_HINT = (
    "variance='minibatch' reads the within-batch variance that "
    "msvag_mb.GradientVariance(model, loss_fn).backward(inputs, targets) leaves on every "
    "parameter as p.grad_variance: call it instead of loss.backward() (or use "
    "variance='moving_average', which needs nothing but p.grad)"
)

#: ``param -> weakref(p.grad)``: the gradient object each variance belongs to. Not an
#: attribute of the parameter, since a weakref there makes pickling the model fail.
_TIES: WeakIdKeyDictionary = WeakIdKeyDictionary()

#: the version counter of ``p.grad`` when the variance was set (``None``: set while
#: ``p.grad`` was None, or the attribute is absent: ``p.grad_variance`` was assigned by hand;
#: neither is checked)
_VERSION = "_grad_variance_version"

_ATTRIBUTES = ("grad_variance", _VERSION, "grad_variance_scale")


def _check_tie(param: Tensor) -> None:
    """Raise if ``param.grad`` is not the gradient, unchanged, that the variance was set for."""
    version = getattr(param, _VERSION, None)
    if version is None:
        return
    tie = _TIES.get(param)
    grad = param.grad
    if grad is None or tie is None or tie() is not grad:
        raise RuntimeError(
            "p.grad_variance is stale: p.grad was replaced after GradientVariance.backward "
            "(e.g. by model.zero_grad() and loss.backward(), or the parameter was copied or "
            f"unpickled since). {GRAD_VARIANCE_HINT}."
        )
    if grad._version != version:
        raise RuntimeError(
            "p.grad_variance is stale: p.grad was changed in place after "
            "GradientVariance.backward (e.g. loss.backward() accumulated into it, or "
            "gradient clipping rescaled it), so the variance no longer describes it. To "
            "accumulate several batches, call GradientVariance.backward once per batch (it "
            f"combines them itself) before optimizer.step(). {GRAD_VARIANCE_HINT}."
        )


def read_grad_variance(param: Tensor) -> Tensor:
    """Return ``param.grad_variance`` after checking it belongs to the current ``param.grad``.

    The result is in the units of the unscaled gradient (see :func:`set_grad_variance`).
    """
    variance = getattr(param, "grad_variance", None)
    if variance is None:
        raise RuntimeError(f"p.grad_variance is missing for a parameter of shape "
                           f"{tuple(param.shape)}. {GRAD_VARIANCE_HINT}.")
    _check_tie(param)
    if variance.shape != param.shape:
        raise RuntimeError(
            f"p.grad_variance has shape {tuple(variance.shape)} but the parameter has "
            f"shape {tuple(param.shape)}."
        )
    scale = getattr(param, "grad_variance_scale", None)
    if scale is not None:
        # Set by GradientVariance.backward(..., scaler=...): the variance is still in the
        # loss-scaled units while the step sees gradients that GradScaler has unscaled
        # (GradScaler.unscale_ rescales p.grad in place without bumping its version).
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

    The tie is to the ``p.grad`` object and to its version counter now: replacing
    ``p.grad`` or changing it in place afterwards makes the variance stale. ``scale`` is the
    GradScaler scale the variance was measured under (``None``: unscaled).
    """
    if variance is None:
        clear_grad_variance(param)
        return
    grad = param.grad
    param.grad_variance = variance
    param.grad_variance_scale = scale
    setattr(param, _VERSION, None if grad is None else grad._version)
    if grad is None:
        _TIES.pop(param, None)
    else:
        _TIES[param] = weakref.ref(grad)


def clear_grad_variance(param: Tensor) -> None:
    """Remove ``grad_variance`` and its bookkeeping from ``param``."""
    tied = hasattr(param, _VERSION)  # set with every tie: skip the table when absent
    for attribute in _ATTRIBUTES:
        if hasattr(param, attribute):
            delattr(param, attribute)
    if tied:
        _TIES.pop(param, None)


def all_finite(tensors: list[Tensor], sums: list[Tensor] | None = None) -> bool:
    """True if no element is NaN or Inf; one host sync in the usual case.

    A NaN or Inf element makes its tensor's sum NaN or Inf, so finite sums settle it (a
    sum is much cheaper than ``isfinite(t).all()`` on CPU). A non-finite sum may also come
    from large finite values that overflow; the exact per-element test decides then.
    ``sums``: such sums already taken (float32, of ``tensors`` or of tensors that any NaN
    or Inf in them reaches), used in place of summing ``tensors`` again.
    """
    if not tensors:
        return True
    if sums is None:
        sums = [t.sum(dtype=torch.float32) for t in tensors]
    if bool(torch.stack(sums).isfinite().all()):
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
