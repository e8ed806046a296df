"""Variance estimators: strategies that tell an update rule how noisy its direction is.

Each estimator keeps a little per-parameter state and, once per step, returns an estimate
of the variance of either the bias-corrected momentum ``m_t`` (``of="mean"``, used by
M-SVAG and ADAM*) or the stochastic gradient ``g_t`` (``of="gradient"``, used by SVAG).
The update rules never know which estimator they were given, so a third estimator can be
written without touching the optimizers: subclass :class:`VarianceEstimator`, implement
:meth:`~VarianceEstimator.init_state` and :meth:`~VarianceEstimator.update`, and pass an
instance as ``variance=``.

Equations: ``../shared/ALGORITHMS.md`` (Balles & Hennig, *Dissecting Adam*, ICML 2018).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

VarianceTarget = Literal["mean", "gradient"]


def rho(beta: float, step: int) -> float:
    """Sum of squared EMA weights, ``rho(beta, t)`` (ALGORITHMS.md, "Shared quantities").

    ``var[m_t] = rho(beta, t) * sigma^2`` for independent gradients of common variance.
    ``rho(beta, 0) = 1`` and ``rho -> (1 - beta) / (1 + beta)`` as ``t`` grows.
    """
    beta_power = beta ** (step + 1)
    return (1.0 - beta) * (1.0 + beta_power) / ((1.0 + beta) * (1.0 - beta_power))


class Moments(NamedTuple):
    """What the update rule has already computed for one parameter at step ``t``."""

    grad: Tensor  # g_t, weight decay included
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
    """

    #: name accepted by the optimizers' ``variance=`` argument
    name: ClassVar[str]
    #: whether :meth:`update` needs the within-batch variance ``p.grad_variance``
    requires_batch_variance: ClassVar[bool] = False

    @abstractmethod
    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """Per-parameter state, created lazily at the parameter's first step."""

    @abstractmethod
    def update(
        self,
        state: dict,
        moments: Moments,
        batch_variance: Tensor | None,
        step: int,
        beta: float,
        of: VarianceTarget,
    ) -> Tensor:
        """Advance the state by one step and return the variance estimate.

        ``step`` is ``t`` (0 at the first step); ``batch_variance`` is ``s_hat_t`` when
        :attr:`requires_batch_variance`, else ``None``. Returns a non-negative tensor of the
        parameter's shape: an estimate of ``var[m_t]`` (``of="mean"``) or ``var[g_t]``.
        """

    def update_foreach(
        self,
        states: list[dict],
        moments: ForeachMoments,
        batch_variances: list[Tensor] | None,
        step: int,
        beta: float,
        of: VarianceTarget,
    ) -> list[Tensor]:
        """Multi-tensor :meth:`update`. The default loops; built-ins use ``torch._foreach``."""
        return [
            self.update(
                state,
                Moments(grad, mean, mean_squared),
                None if batch_variances is None else batch_variances[i],
                step,
                beta,
                of,
            )
            for i, (state, grad, mean, mean_squared) in enumerate(zip(states, *moments))
        ]


class MovingAverageVariance(VarianceEstimator):
    """Variance from exponential moving averages of ``g`` and ``g^2`` (paper Alg. 1).

    .. code-block:: text

        v~_t = beta v~_{t-1} + (1 - beta) g_t^2 ;  v_t = v~_t / (1 - beta^(t+1))
        s_t  = max(v_t - m_t^2, 0) / (1 - rho(beta, t))      Eq. (22), s_0 = 0
        var[g_t] ~ s_t ,   var[m_t] ~ rho(beta, t) s_t

    ``s_t`` is unbiased for ``sigma^2`` when the ``g_s`` are independent with a common
    variance (Assumption 1). At ``t = 0`` ``rho = 1`` makes Eq. (22) undefined; ``s_0 = 0``
    makes the first step a plain momentum step. The clamp removes float cancellation.
    """

    name = "moving_average"

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """``exp_avg_sq``: the running average ``v~`` of ``g^2``, zeros."""
        return {"exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}

    @staticmethod
    def _scale(beta: float, step: int, of: VarianceTarget) -> float:
        # var = max(v - m^2, 0) * scale, folding 1/(1-rho) (and rho) into one number
        r = rho(beta, step)
        return (r if of == "mean" else 1.0) / (1.0 - r)

    def update(self, state, moments, batch_variance, step, beta, of):
        """Update ``v~_t``; return ``rho(beta, t) s_t`` (``of="mean"``) or ``s_t`` (0 at t = 0)."""
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta).addcmul_(moments.grad, moments.grad, value=1.0 - beta)
        if step == 0:
            return torch.zeros_like(moments.mean)
        bias_correction = 1.0 - beta ** (step + 1)
        excess = (exp_avg_sq / bias_correction).sub_(moments.mean_squared).clamp_(min=0.0)
        return excess.mul_(self._scale(beta, step, of))

    def update_foreach(self, states, moments, batch_variances, step, beta, of):
        """Multi-tensor :meth:`update` with ``torch._foreach`` ops."""
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(exp_avg_sqs, beta)
        torch._foreach_addcmul_(exp_avg_sqs, moments.grad, moments.grad, value=1.0 - beta)
        if step == 0:
            return [torch.zeros_like(mean) for mean in moments.mean]
        bias_correction = 1.0 - beta ** (step + 1)
        excess = torch._foreach_div(exp_avg_sqs, bias_correction)
        torch._foreach_sub_(excess, moments.mean_squared)
        torch._foreach_clamp_min_(excess, 0.0)
        torch._foreach_mul_(excess, self._scale(beta, step, of))
        return excess


class MiniBatchVariance(VarianceEstimator):
    """Variance from the within-batch estimate ``s_hat_t`` (paper App. D, Alg. 5).

    .. code-block:: text

        r~_t = beta^2 r~_{t-1} + (1 - beta)^2 s_hat_t ;  r_t = r~_t / (1 - beta^(t+1))^2
        var[m_t] ~ r_t ,   var[g_t] ~ s_hat_t

    With independent batches ``E[r_t] = var[m_t]`` exactly, and ``r_0 = s_hat_0``: the
    first step is already variance-adapted. ``s_hat_t`` is ``p.grad_variance``, left on each
    parameter by :meth:`msvag_mb.GradientVariance.backward`.
    """

    name = "minibatch"
    requires_batch_variance = True

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """``variance_avg``: the running average ``r~`` of ``s_hat``, zeros."""
        return {"variance_avg": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, state, moments, batch_variance, step, beta, of):
        """Update ``r~_t``; return ``r_t`` (``of="mean"``) or ``s_hat_t`` (``of="gradient"``)."""
        variance_avg = state["variance_avg"]
        variance_avg.mul_(beta * beta).add_(batch_variance, alpha=(1.0 - beta) ** 2)
        if of == "gradient":
            return batch_variance
        return variance_avg / (1.0 - beta ** (step + 1)) ** 2

    def update_foreach(self, states, moments, batch_variances, step, beta, of):
        """Multi-tensor :meth:`update` with ``torch._foreach`` ops."""
        variance_avgs = [state["variance_avg"] for state in states]
        torch._foreach_mul_(variance_avgs, beta * beta)
        torch._foreach_add_(variance_avgs, batch_variances, alpha=(1.0 - beta) ** 2)
        if of == "gradient":
            return list(batch_variances)
        return torch._foreach_div(variance_avgs, (1.0 - beta ** (step + 1)) ** 2)


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
