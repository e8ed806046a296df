r"""The update rule of the M-SVAG family, written once: the momentum and the directions.

Every member takes the step ``theta_{t+1} = theta_t - lr * d_t`` (``docs/maths.md``,
Eq. (M6)) from the moving average of the gradient (Eq. (M1)),

.. code-block:: text

    g_t  = grad f(theta_t) + lambda theta_t
    m~_t = beta m~_{t-1} + (1 - beta) g_t ;  m_t = m~_t / (1 - beta^(t+1))

and a :class:`Direction` ``d_t``: ``m_t`` (M-SGD), ``sign(m_t)`` (M-SSD), ``gamma_t m_t``
(M-SVAG), ``gamma_t g_t`` (SVAG) or ``m_t / sqrt(m_t^2 + V_t)`` (ADAM*), where
``gamma_t = m_t^2 / (m_t^2 + V_t)`` (Eq. (25)) and ``V_t`` is the variance estimate a
variance-adapted direction asks for (its :attr:`Direction.target`).

Like the estimators, these formulas are written against the ops of :mod:`msvag_mb.ops`, so
the per-tensor path, the ``foreach`` path, the compiled kernel of :mod:`msvag_mb.fused` and
the monitor all run this very code.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .estimators import ForeachMoments, Moments, VarianceTarget
from .ops import Ops


def step_coefficients(lr: float, beta: float, weight_decay: float, step: int) -> dict[str, float]:
    """The numbers the momentum and the step need at step ``t = step``."""
    return {"neg_lr": -lr, "weight_decay": weight_decay, "one_minus_beta": 1.0 - beta,
            "bias_correction": 1.0 - beta ** (step + 1)}


def advance_momentum_(ops: Ops, param, grad, exp_avg, coefficients: dict,
                      use_weight_decay: bool) -> Moments | ForeachMoments:
    """Add the weight decay to ``g_t``, advance ``m~`` in place; return the moments."""
    if use_weight_decay:  # L2 enters g, not the variance
        grad = ops.add(grad, param, coefficients["weight_decay"])
    ops.lerp_(exp_avg, grad, coefficients["one_minus_beta"])  # m~_t
    return momentum_moments(ops, grad, exp_avg, coefficients)


def momentum_moments(ops: Ops, grad, exp_avg, coefficients: dict) -> Moments | ForeachMoments:
    """``(g_t, m_t, m_t^2)`` from an advanced ``m~_t`` (read-only)."""
    mean = ops.div(exp_avg, coefficients["bias_correction"])  # m_t
    return (ForeachMoments if ops.foreach else Moments)(grad, mean, ops.mul(mean, mean))


def descend_(ops: Ops, param, direction, coefficients: dict) -> None:
    """``theta_{t+1} = theta_t - lr * d_t``, in place."""
    ops.add_(param, direction, coefficients["neg_lr"])


def adaptation_factor(ops: Ops, moments: Moments, variance) -> Tensor:
    """``gamma = m^2 / (m^2 + V)`` (Eq. (25)), a new tensor; 0 where both vanish.

    ``m^2 + V = 0`` only where ``m = 0`` (``V >= 0``); there the numerator is 0 too and the
    element must not move: clamping to the smallest normal number makes ``0/tiny = 0``.
    """
    denominator = ops.clamp_tiny_(ops.add(moments.mean_squared, variance))
    return ops.div(moments.mean_squared, denominator)


class Direction:
    """One member's direction ``d_t``, written once against ``ops``.

    :attr:`target` is the variance the direction needs (``None``: none); :meth:`__call__`
    gets the moments and, where it has a target, the estimate of that variance.
    """

    #: the direction's name (also names its compiled kernel)
    name: ClassVar[str]
    #: the variance :meth:`__call__` needs: of ``m_t`` (``"mean"``), of ``g_t``, or none
    target: ClassVar[VarianceTarget | None] = None

    def __call__(self, ops: Ops, moments: Moments, variance) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MomentumDirection(Direction):
    """``d_t = m_t`` (M-SGD, Eq. (M7))."""

    name = "mean"

    def __call__(self, ops, moments, variance):
        return moments.mean


class SignDirection(Direction):
    """``d_t = sign(m_t)`` (M-SSD, Eq. (M8)); ``sign(0) = 0``."""

    name = "sign"

    def __call__(self, ops, moments, variance):
        return ops.sign(moments.mean)


class AdaptedMomentumDirection(Direction):
    """``d_t = gamma_t m_t`` with ``V_t`` an estimate of ``var[m_t]`` (M-SVAG, Eq. (25))."""

    name = "gamma_mean"
    target = "mean"

    def __call__(self, ops, moments, variance):
        return ops.mul_(adaptation_factor(ops, moments, variance), moments.mean)


class AdaptedGradientDirection(Direction):
    """``d_t = gamma_t g_t`` with ``S_t`` an estimate of ``var[g_t]`` (SVAG, Eq. (23))."""

    name = "gamma_grad"
    target = "gradient"

    def __call__(self, ops, moments, variance):
        return ops.mul_(adaptation_factor(ops, moments, variance), moments.grad)


class AdamStarDirection(Direction):
    """``d_t = m_t / sqrt(m_t^2 + V_t) = sign(m_t) sqrt(gamma_t)`` (ADAM*, Eq. (M9))."""

    name = "adam_star"
    target = "mean"

    def __call__(self, ops, moments, variance):
        denominator = ops.sqrt_(ops.clamp_tiny_(ops.add(moments.mean_squared, variance)))
        return ops.div(moments.mean, denominator)
