"""Variance estimators: strategies that tell an update rule how noisy its direction is.

Each estimator keeps a little per-parameter state and, once per step, estimates the
variance of either the bias-corrected momentum ``m_t`` (``target="mean"``, asked by M-SVAG
and ADAM*) or of the stochastic gradient ``g_t`` (``target="gradient"``, asked by SVAG).
The update rules never know which estimator they were given.

An estimator's formulas are written once, in three small methods, against the element-wise
ops of :mod:`msvag_mb.ops`:

* :meth:`~VarianceEstimator.coefficients`: the step-dependent numbers (bias corrections,
  ``rho``), computed on the host once per step;
* :meth:`~VarianceEstimator.advance`: move the state from step ``t - 1`` to ``t``, in place;
* :meth:`~VarianceEstimator.variance`: the estimate at step ``t``, reading the state only.

From these the per-tensor path, the ``foreach`` path, the compiled kernel of
``fused=True`` and :class:`msvag_mb.monitoring.VarianceMonitor` (through the read-only
:meth:`~VarianceEstimator.estimate`) are all built, so a new estimator is one subclass
that works on every path. Equations: ``docs/maths.md`` (the estimators' sections;
Balles & Hennig, *Dissecting Adam*, ICML 2018, Eq. (22) and App. D).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from .ops import FOREACH, TENSOR, Ops

#: which variance an update rule asks for: of ``m_t`` (``"mean"``) or of ``g_t``
VarianceTarget = Literal["mean", "gradient"]


def rho(beta: float, step: int) -> float:
    """Sum of squared EMA weights, ``rho(beta, t)`` (``docs/maths.md``, Eq. (M3)).

    ``var[m_t] = rho(beta, t) * sigma^2`` for independent gradients of common variance.
    ``rho(beta, 0) = 1`` and ``rho -> (1 - beta) / (1 + beta)`` as ``t`` grows.
    """
    beta_power = beta ** (step + 1)
    return (1.0 - beta) * (1.0 + beta_power) / ((1.0 + beta) * (1.0 - beta_power))


class Moments(NamedTuple):
    """What the update rule has already computed for one parameter at step ``t``."""

    grad: Tensor  # g_t, weight decay included (None where the monitor asks)
    mean: Tensor  # m_t, the bias-corrected EMA of g
    mean_squared: Tensor  # m_t ** 2


class ForeachMoments(NamedTuple):
    """:class:`Moments` for a list of parameters (same device, dtype and step)."""

    grad: list[Tensor]
    mean: list[Tensor]
    mean_squared: list[Tensor]


class VarianceEstimator(ABC):
    """Strategy interface: estimate ``var[m_t]`` or ``var[g_t]`` once per step.

    State tensors returned by :meth:`init_state` live in ``optimizer.state[p]`` beside the
    optimizer's own, so ``state_dict``/``load_state_dict`` and device moves just work.

    A subclass writes :meth:`init_state`, :meth:`coefficients`, :meth:`advance` and
    :meth:`variance`; in the last two, ``state`` maps the names of :meth:`init_state` to
    tensors (one parameter) or to lists of tensors (the ``foreach`` path), ``moments`` and
    ``batch_variance`` are tensors or lists alike, and every operation goes through
    ``ops``. ``coefficients`` holds Python floats on the eager paths and 0-dim tensors in
    the compiled kernel: use them only as operands of ``ops``, never in an ``if``. Numbers
    that configure an instance belong in :meth:`coefficients` too.

    (An older subclass that overrides :meth:`update` alone still works on the per-tensor
    and ``foreach`` paths, but neither ``fused=True`` nor the monitor can use it.)
    """

    #: name accepted by the optimizers' ``variance=`` argument
    name: ClassVar[str]
    #: whether the estimate needs the within-batch variance ``p.grad_variance``
    requires_batch_variance: ClassVar[bool] = False
    #: why the formulas are undefined at ``beta = 0`` (``None``: they work on all of
    #: ``[0, 1)``); the optimizers refuse ``beta = 0`` with this reason
    beta_zero_reason: ClassVar[str | None] = None

    @abstractmethod
    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """Per-parameter state, created lazily at the parameter's first step."""

    # -- the formulas: what a subclass writes ------------------------------------------------
    def coefficients(self, step: int, beta: float, target: VarianceTarget) -> dict[str, float]:
        """The numbers :meth:`advance` and :meth:`variance` need at step ``t = step``."""
        return {}

    def advance(self, ops: Ops, state: dict, moments: Moments,
                batch_variance: Tensor | None, coefficients: dict) -> None:
        """Move ``state`` from step ``t - 1`` to ``t`` in place (default: no state)."""

    def variance(self, ops: Ops, state: dict, moments: Moments, batch_variance: Tensor | None,
                 coefficients: dict, target: VarianceTarget) -> Tensor | None:
        """The estimate at step ``t`` from the advanced ``state``; must not change anything.

        Returns a non-negative tensor of the parameter's shape, which may be a state tensor
        or ``batch_variance`` itself (callers only read it): an estimate of ``var[m_t]``
        (``target="mean"``) or of ``var[g_t]`` (``"gradient"``). ``batch_variance`` is
        ``s_hat_t`` when :attr:`requires_batch_variance`, else ``None``; it is also
        ``None`` when the monitor asks after ``p.grad_variance`` is gone, and the estimate
        is then ``None`` if it needs it. ``moments.grad`` is ``None`` when the monitor asks.
        """
        raise NotImplementedError(
            f"{type(self).__name__} implements neither variance() nor update(); write its "
            "formulas as coefficients(), advance() and variance() (see VarianceEstimator)."
        )

    @classmethod
    def elementwise(cls) -> bool:
        """True if the formulas are written as :meth:`advance`/:meth:`variance`, which
        ``fused=True`` and the monitor need (False: a subclass overriding :meth:`update`)."""
        return cls.variance is not VarianceEstimator.variance

    # -- what the optimizers and the monitor call ----------------------------------------------
    def update(self, state: dict, moments: Moments, batch_variance: Tensor | None, step: int,
               beta: float, target: VarianceTarget) -> Tensor:
        """Advance ``state`` (``optimizer.state[p]``) by one step; return the estimate.

        ``step`` is ``t`` (0 at the first step); ``batch_variance`` is ``s_hat_t`` when
        :attr:`requires_batch_variance`, else ``None``. Returns a non-negative tensor of the
        parameter's shape: an estimate of ``var[m_t]`` (``target="mean"``) or ``var[g_t]``.
        """
        coefficients = self.coefficients(step, beta, target)
        self.advance(TENSOR, state, moments, batch_variance, coefficients)
        return self.variance(TENSOR, state, moments, batch_variance, coefficients, target)

    def estimate(self, state: dict, moments: Moments, batch_variance: Tensor | None, step: int,
                 beta: float, target: VarianceTarget) -> Tensor | None:
        """The estimate of step ``t = step`` from a state already advanced to ``t``.

        Read-only: what :meth:`update` returned at that step (the monitor's question).
        ``None`` if it needs ``batch_variance`` and that is ``None``.
        """
        if not self.elementwise():
            raise NotImplementedError(
                f"{type(self).__name__} overrides update() only, which cannot estimate "
                "without advancing its state; write advance() and variance() instead."
            )
        coefficients = self.coefficients(step, beta, target)
        return self.variance(TENSOR, state, moments, batch_variance, coefficients, target)

    def update_foreach(self, states: list[dict], moments: ForeachMoments,
                       batch_variances: list[Tensor] | None, step: int, beta: float,
                       target: VarianceTarget) -> list[Tensor]:
        """Multi-tensor :meth:`update`: the same formulas with ``torch._foreach`` ops."""
        if not self.elementwise():
            return [
                self.update(state, Moments(grad, mean, mean_squared),
                            None if batch_variances is None else batch_variances[i],
                            step, beta, target)
                for i, (state, grad, mean, mean_squared) in enumerate(zip(states, *moments))
            ]
        columns = {key: [state[key] for state in states] for key in states[0]}
        coefficients = self.coefficients(step, beta, target)
        self.advance(FOREACH, columns, moments, batch_variances, coefficients)
        return self.variance(FOREACH, columns, moments, batch_variances, coefficients, target)


class MovingAverageVariance(VarianceEstimator):
    """Variance from exponential moving averages of ``g`` and ``g^2`` (paper Alg. 1).

    .. code-block:: text

        v~_t = beta v~_{t-1} + (1 - beta) g_t^2 ;  v_t = v~_t / (1 - beta^(t+1))    (M10)
        s_t  = max(v_t - m_t^2, 0) / (1 - rho(beta, t))      Eq. (22), s_0 = 0
        var[g_t] ~ s_t ,   var[m_t] ~ rho(beta, t) s_t

    ``s_t`` is unbiased for ``sigma^2`` when the ``g_s`` are independent with a common
    variance (Assumption 1). At ``t = 0`` ``rho = 1`` makes Eq. (22) undefined; ``s_0 = 0``
    makes the first step a plain momentum step. The clamp removes float cancellation.
    Equations: ``docs/maths.md``, "The moving-average estimator".
    """

    name = "moving_average"
    beta_zero_reason = (
        "with beta = 0 its averages hold the current gradient only, rho(0, t) = 1 at every "
        "step and Eq. (22) divides by 1 - rho = 0 (docs/maths.md: the estimator needs "
        "beta > 0); use beta > 0, or variance='minibatch', which works without averaging"
    )

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """``exp_avg_sq``: the running average ``v~`` of ``g^2``, zeros."""
        return {"exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def coefficients(self, step, beta, target):
        """``scale`` folds ``1/(1 - rho)`` (and ``rho`` for ``"mean"``) into one number;
        0 at ``t = 0``, where ``s_0 = 0``."""
        scale = 0.0
        if step > 0:
            r = rho(beta, step)
            scale = (r if target == "mean" else 1.0) / (1.0 - r)
        return {"beta": beta, "one_minus_beta": 1.0 - beta,
                "bias_correction": 1.0 - beta ** (step + 1), "scale": scale}

    def advance(self, ops, state, moments, batch_variance, coefficients):
        """``v~_t = beta v~_{t-1} + (1 - beta) g_t^2``."""
        exp_avg_sq = ops.mul_(state["exp_avg_sq"], coefficients["beta"])
        ops.addcmul_(exp_avg_sq, moments.grad, moments.grad, coefficients["one_minus_beta"])

    def variance(self, ops, state, moments, batch_variance, coefficients, target):
        """``max(v_t - m_t^2, 0) * scale``: ``rho s_t`` (``"mean"``) or ``s_t``."""
        excess = ops.div(state["exp_avg_sq"], coefficients["bias_correction"])
        excess = ops.clamp_min_(ops.sub_(excess, moments.mean_squared), 0.0)
        return ops.mul_(excess, coefficients["scale"])


class MiniBatchVariance(VarianceEstimator):
    """Variance from the within-batch estimate ``s_hat_t`` (paper App. D, Alg. 5).

    .. code-block:: text

        r~_t = beta^2 r~_{t-1} + (1 - beta)^2 s_hat_t ;  r_t = r~_t / (1 - beta^(t+1))^2   (M15)
        var[m_t] ~ r_t ,   var[g_t] ~ s_hat_t

    With independent batches ``E[r_t] = var[m_t]`` exactly, and ``r_0 = s_hat_0``: the
    first step is already variance-adapted. ``s_hat_t`` is ``p.grad_variance``, left on each
    parameter by :meth:`msvag_mb.GradientVariance.backward`. Equations: ``docs/maths.md``,
    "The mini-batch estimator".
    """

    name = "minibatch"
    requires_batch_variance = True

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """``variance_avg``: the running average ``r~`` of ``s_hat``, zeros."""
        return {"variance_avg": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def coefficients(self, step, beta, target):
        """``beta^2``, ``(1 - beta)^2`` and the squared bias correction of ``r_t``."""
        return {"beta_squared": beta * beta, "weight": (1.0 - beta) ** 2,
                "bias_correction_squared": (1.0 - beta ** (step + 1)) ** 2}

    def advance(self, ops, state, moments, batch_variance, coefficients):
        """``r~_t = beta^2 r~_{t-1} + (1 - beta)^2 s_hat_t``."""
        variance_avg = ops.mul_(state["variance_avg"], coefficients["beta_squared"])
        ops.add_(variance_avg, batch_variance, coefficients["weight"])

    def variance(self, ops, state, moments, batch_variance, coefficients, target):
        """``r_t`` (``"mean"``) or ``s_hat_t`` itself (``"gradient"``)."""
        if target == "gradient":
            return batch_variance
        return ops.div(state["variance_avg"], coefficients["bias_correction_squared"])


VARIANCE_ESTIMATORS: dict[str, type[VarianceEstimator]] = {
    MovingAverageVariance.name: MovingAverageVariance,
    MiniBatchVariance.name: MiniBatchVariance,
}


def make_variance_estimator(variance: str | VarianceEstimator) -> VarianceEstimator:
    """Resolve the optimizers' ``variance=`` argument to an estimator instance."""
    if isinstance(variance, VarianceEstimator):
        return variance
    if isinstance(variance, str) and variance in VARIANCE_ESTIMATORS:
        return VARIANCE_ESTIMATORS[variance]()
    raise ValueError(
        f"Invalid variance estimator: {variance!r}. Use one of "
        f"{sorted(VARIANCE_ESTIMATORS)} or a msvag_mb.VarianceEstimator instance."
    )
