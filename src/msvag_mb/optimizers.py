r"""The M-SVAG family as ``torch.optim`` optimizers.

Every member shares one skeleton (paper Fig. 1): an exponential moving average ``m_t`` of the
gradient, a *direction* (``m_t``, ``sign(m_t)`` or ``g_t``) and, for the variance-adapted
members, an element-wise factor computed from a :class:`~msvag_mb.estimators.VarianceEstimator`.
Each class implements its direction twice: per tensor (the readable reference, the oracle in
the tests) and with ``torch._foreach`` ops (one pass over all tensors of a device and dtype).

Equations: ``../shared/ALGORITHMS.md``. ``t`` counts steps from 0.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import fused as fused_module
from .estimators import (
    ForeachMoments,
    Moments,
    VarianceEstimator,
    VarianceTarget,
    make_variance_estimator,
)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

_GRAD_VARIANCE_HINT = (
    "variance='minibatch' reads the within-batch variance that "
    "msvag_mb.GradientVariance(model, loss_fn).backward(inputs, targets) leaves on every "
    "parameter as p.grad_variance: call it instead of loss.backward() (or use "
    "variance='moving_average', which needs nothing but p.grad)"
)


def batch_variance_of(param: Tensor) -> Tensor:
    """Return ``param.grad_variance`` after checking it belongs to the current ``param.grad``."""
    variance = getattr(param, "grad_variance", None)
    if variance is None:
        raise RuntimeError(f"p.grad_variance is missing for a parameter of shape "
                           f"{tuple(param.shape)}. {_GRAD_VARIANCE_HINT}.")
    owner = getattr(param, "_grad_variance_of", None)
    if owner is not None and owner() is not param.grad:
        raise RuntimeError(
            "p.grad_variance is stale: p.grad was replaced after "
            "GradientVariance.backward (e.g. by model.zero_grad() and loss.backward()). "
            f"{_GRAD_VARIANCE_HINT}."
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


def set_grad_variance(param: Tensor, variance: Tensor | None, scale: float | None = None) -> None:
    """Attach ``variance`` to ``param`` as ``param.grad_variance``, tied to ``param.grad``."""
    if variance is None:
        clear_grad_variance(param)
        return
    param.grad_variance = variance
    param._grad_variance_of = weakref.ref(param.grad) if param.grad is not None else None
    param.grad_variance_scale = scale


def clear_grad_variance(param: Tensor) -> None:
    """Remove ``grad_variance`` and its bookkeeping from ``param``."""
    for attribute in ("grad_variance", "_grad_variance_of", "grad_variance_scale"):
        if hasattr(param, attribute):
            delattr(param, attribute)


class MomentumFamilyOptimizer(Optimizer):
    """Shared machinery of :class:`MSGD`, :class:`MSSD`, :class:`MSVAG`, :class:`SVAG` and
    :class:`AdamStar`: argument checks, state, the two execution paths, closures.

    Subclasses set :attr:`variance_target` and implement :meth:`_direction` (one tensor)
    and :meth:`_direction_foreach` (lists). The step is ``theta -= lr * direction``.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: step size alpha (>= 0).
        beta: averaging constant in [0, 1) of all moving averages.
        variance: ``None`` for members without variance adaptation (required there);
            otherwise ``"moving_average"`` (the default when ``None``), ``"minibatch"`` or
            a :class:`~msvag_mb.VarianceEstimator` instance.
        weight_decay: L2 coefficient added to the gradient, not to the variance.
        foreach: use the multi-tensor path (default: on accelerators).
        fused: one ``torch.compile``-d kernel per parameter (exclusive with ``foreach``).
        check_finite: refuse NaN/Inf gradients or variances before touching the state.
    """

    #: which variance the update needs: ``"mean"`` (of m_t), ``"gradient"`` (of g_t) or None
    variance_target: ClassVar[VarianceTarget | None] = None
    #: the direction's name in the compiled kernel of :mod:`msvag_mb.fused`
    fused_direction: ClassVar[str]

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        beta: float = 0.9,
        variance: str | VarianceEstimator | None = None,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        fused: bool = False,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(lr, (int, float)) or not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (must be a float >= 0)")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter: {beta} (must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if self.variance_target is None:
            if variance is not None:
                raise ValueError(
                    f"{type(self).__name__} does not adapt to the gradient variance; "
                    "remove the variance= argument (or use MSVAG/SVAG/AdamStar)."
                )
            self.variance_estimator: VarianceEstimator | None = None
        else:
            self.variance_estimator = make_variance_estimator(
                "moving_average" if variance is None else variance
            )
        if fused and foreach:
            raise ValueError("fused=True and foreach=True are exclusive; choose one")
        if fused:
            fused_module.estimator_kind(self.variance_estimator)  # refuse unfusable early
        defaults = dict(
            lr=lr, beta=beta, weight_decay=weight_decay, foreach=foreach, fused=fused,
            check_finite=check_finite,
        )
        super().__init__(params, defaults)

    # -- the direction: what each member defines -------------------------------------------
    def _direction(self, moments: Moments, variance: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _direction_foreach(
        self, moments: ForeachMoments, variances: list[Tensor] | None
    ) -> list[Tensor]:
        raise NotImplementedError

    # -- torch.optim plumbing -----------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``p.grad`` (as torch) and remove ``p.grad_variance`` from every parameter."""
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for param in group["params"]:
                clear_grad_variance(param)

    def _init_state(self, param: Tensor) -> dict:
        state = self.state[param]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if self.variance_estimator is not None:
                state.update(self.variance_estimator.init_state(param))
        return state

    def _needs_batch_variance(self) -> bool:
        return self.variance_estimator is not None and (
            self.variance_estimator.requires_batch_variance
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for param in params:
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            batch_variances = (
                [batch_variance_of(p) for p in params] if self._needs_batch_variance() else None
            )
            if group.get("check_finite", True):
                _check_finite([p.grad for p in params], "a gradient (p.grad)")
                if batch_variances is not None:
                    _check_finite(batch_variances, "a within-batch variance (p.grad_variance)")
            states = [self._init_state(p) for p in params]
            if group.get("fused", False):
                fused_module.fused_step(
                    params, states, batch_variances, lr=group["lr"], beta=group["beta"],
                    weight_decay=group["weight_decay"], direction=self.fused_direction,
                    estimator=self.variance_estimator, target=self.variance_target,
                )
                continue
            use_foreach = group.get("foreach")
            if use_foreach is None:
                # as torch.optim: the multi-tensor path by default on accelerators only
                use_foreach = all(p.device.type != "cpu" for p in params)
            if use_foreach:
                self._step_foreach(group, params, states, batch_variances)
            else:
                self._step_single_tensor(group, params, states, batch_variances)
        return loss

    def _step_single_tensor(self, group, params, states, batch_variances) -> None:
        """Reference path: one parameter at a time, in the paper's notation."""
        lr, beta, weight_decay = group["lr"], group["beta"], group["weight_decay"]
        for i, (param, state) in enumerate(zip(params, states)):
            t = state["step"]
            grad = param.grad
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)  # L2 enters g, not the variance
            exp_avg = state["exp_avg"]
            exp_avg.lerp_(grad, 1.0 - beta)  # m~_t = beta m~_{t-1} + (1-beta) g_t
            mean = exp_avg / (1.0 - beta ** (t + 1))  # m_t
            moments = Moments(grad, mean, mean * mean)
            variance = None
            if self.variance_estimator is not None:
                variance = self.variance_estimator.update(
                    state, moments, None if batch_variances is None else batch_variances[i],
                    t, beta, self.variance_target,
                )
            param.add_(self._direction(moments, variance), alpha=-lr)
            state["step"] = t + 1

    def _step_foreach(self, group, params, states, batch_variances) -> None:
        """Fast path: ``torch._foreach`` ops over tensors sharing device, dtype and step."""
        lr, beta, weight_decay = group["lr"], group["beta"], group["weight_decay"]
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, (param, state) in enumerate(zip(params, states)):
            buckets[(param.device, param.dtype, state["step"])].append(i)
        for (_, _, t), indices in buckets.items():
            bucket_params = [params[i] for i in indices]
            bucket_states = [states[i] for i in indices]
            grads = [p.grad for p in bucket_params]
            if weight_decay != 0:
                grads = torch._foreach_add(grads, bucket_params, alpha=weight_decay)
            exp_avgs = [state["exp_avg"] for state in bucket_states]
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta)
            means = torch._foreach_div(exp_avgs, 1.0 - beta ** (t + 1))
            moments = ForeachMoments(grads, means, torch._foreach_mul(means, means))
            variances = None
            if self.variance_estimator is not None:
                variances = self.variance_estimator.update_foreach(
                    bucket_states, moments,
                    None if batch_variances is None else [batch_variances[i] for i in indices],
                    t, beta, self.variance_target,
                )
            torch._foreach_add_(bucket_params, self._direction_foreach(moments, variances),
                                alpha=-lr)
            for state in bucket_states:
                state["step"] = t + 1


def _check_finite(tensors: list[Tensor], what: str) -> None:
    """Raise before any state changes if one of ``tensors`` holds NaN or Inf."""
    # One reduction per tensor and a single host sync: NaN and Inf survive a sum.
    totals = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    if not bool(torch.isfinite(totals).all()):
        raise FloatingPointError(
            f"{what} contains NaN or Inf; the step was not taken and the optimizer state is "
            "unchanged. Lower the step size, check the data and the loss, or train with "
            "torch.amp.GradScaler, whose scaler.step(optimizer) skips such steps."
        )


def _adaptation_factor(moments: Moments, variance: Tensor) -> Tensor:
    """``gamma = m^2 / (m^2 + V)`` (Eq. 25), a new tensor; 0 where both vanish."""
    denominator = _safe_denominator_(moments.mean_squared + variance)
    return moments.mean_squared.div(denominator)


def _adaptation_factor_foreach(moments: ForeachMoments, variances: list[Tensor]) -> list[Tensor]:
    """:func:`_adaptation_factor` for lists of tensors."""
    denominators = _safe_denominator_foreach_(torch._foreach_add(moments.mean_squared, variances))
    return torch._foreach_div(moments.mean_squared, denominators)


def _safe_denominator_(tensor: Tensor) -> Tensor:
    # m^2 + var = 0 only where m = 0 (var >= 0); there the numerator is 0 too and the
    # element must not move: clamping to the smallest normal number makes 0/tiny = 0.
    return tensor.clamp_(min=torch.finfo(tensor.dtype).tiny)


def _safe_denominator_foreach_(tensors: list[Tensor]) -> list[Tensor]:
    for dtype_tensors in _by_dtype(tensors):
        torch._foreach_clamp_min_(dtype_tensors, torch.finfo(dtype_tensors[0].dtype).tiny)
    return tensors


def _by_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        groups[tensor.dtype].append(tensor)
    return list(groups.values())


class MSGD(MomentumFamilyOptimizer):
    r"""M-SGD: momentum SGD in the averaged form of the paper (Fig. 1, top left).

    .. code-block:: text

        input: theta_0, step size alpha (lr), beta, weight decay lambda
        m~_{-1} = 0
        for t = 0, 1, ...:
            g_t  = grad f(theta_t) + lambda theta_t
            m~_t = beta m~_{t-1} + (1 - beta) g_t ;  m_t = m~_t / (1 - beta^(t+1))
            theta_{t+1} = theta_t - alpha m_t

    Because ``m_t`` is an average (not a sum) of gradients, ``lr`` is about ``1/(1-beta)``
    times a usual heavy-ball learning rate.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: step size alpha.
        beta: momentum / averaging constant in [0, 1) (default 0.9).
        weight_decay: L2 coefficient added to the gradient (default 0).
        foreach: use the multi-tensor path (default: on accelerators).
        fused: one ``torch.compile``-d kernel per parameter (compiles on first use).
        check_finite: refuse NaN/Inf gradients before touching the state (default True).
    """

    fused_direction = "mean"

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool = False, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, None, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)

    def _direction(self, moments, variance):
        return moments.mean

    def _direction_foreach(self, moments, variances):
        return moments.mean


class MSSD(MomentumFamilyOptimizer):
    r"""M-SSD: momentum stochastic sign descent (Fig. 1, bottom left).

    .. code-block:: text

        input: theta_0, step size alpha (lr), beta, weight decay lambda
        m~_{-1} = 0
        for t = 0, 1, ...:
            g_t  = grad f(theta_t) + lambda theta_t
            m~_t = beta m~_{t-1} + (1 - beta) g_t ;  m_t = m~_t / (1 - beta^(t+1))
            theta_{t+1} = theta_t - alpha sign(m_t)                    (sign(0) = 0)

    Every element moves by exactly ``alpha`` (or not at all where ``m_t = 0``), so ``lr`` is
    a per-element distance, not a multiple of the gradient. The bias correction does not
    change ``sign(m_t)``; it is kept so that the state matches the other members.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: step size alpha (the distance every element moves per step).
        beta: momentum / averaging constant in [0, 1) (default 0.9).
        weight_decay: L2 coefficient added to the gradient before the average (default 0).
        foreach: use the multi-tensor path (default: on accelerators).
        fused: one ``torch.compile``-d kernel per parameter (compiles on first use).
        check_finite: refuse NaN/Inf gradients before touching the state (default True).
    """

    fused_direction = "sign"

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool = False, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, None, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)

    def _direction(self, moments, variance):
        return torch.sign(moments.mean)

    def _direction_foreach(self, moments, variances):
        return torch._foreach_sign(moments.mean)


class MSVAG(MomentumFamilyOptimizer):
    r"""M-SVAG: momentum SGD with stochastic variance adaptation (paper Alg. 1 and Alg. 5).

    .. code-block:: text

        input: theta_0, step size alpha (lr), beta, weight decay lambda, a variance estimator
        m~_{-1} = 0
        for t = 0, 1, ...:
            g_t  = grad f(theta_t) + lambda theta_t
            m~_t = beta m~_{t-1} + (1 - beta) g_t ;  m_t = m~_t / (1 - beta^(t+1))
            V_t  = estimate of var[m_t]:
                moving_average (Alg. 1):  v~_t = beta v~_{t-1} + (1 - beta) g_t^2
                                          v_t  = v~_t / (1 - beta^(t+1))
                                          s_t  = max(v_t - m_t^2, 0) / (1 - rho(beta, t))  (s_0 = 0)
                                          V_t  = rho(beta, t) s_t
                minibatch (Alg. 5):       r~_t = beta^2 r~_{t-1} + (1 - beta)^2 s_hat_t
                                          V_t  = r~_t / (1 - beta^(t+1))^2
            gamma_t = m_t^2 / (m_t^2 + V_t)                        Eq. (25), no epsilon
            theta_{t+1} = theta_t - alpha gamma_t m_t

    ``rho(beta, t) = (1-beta)(1+beta^(t+1)) / ((1+beta)(1-beta^(t+1)))``. ``s_hat_t`` is
    ``p.grad_variance`` from :class:`msvag_mb.GradientVariance`. Where ``m_t = 0`` and
    ``V_t = 0`` the element does not move. ``gamma`` lies in ``[0, 1]``.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: step size alpha.
        beta: averaging constant in [0, 1) (default 0.9).
        variance: ``"moving_average"`` (default), ``"minibatch"`` or a
            :class:`~msvag_mb.VarianceEstimator` instance.
        weight_decay: L2 coefficient added to the gradient, not to the variance (default 0).
        foreach: use the multi-tensor path (default: on accelerators).
        fused: one ``torch.compile``-d kernel per parameter (compiles on first use).
        check_finite: refuse NaN/Inf gradients or variances before touching the state.
    """

    variance_target = "mean"

    fused_direction = "gamma_mean"

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 variance: str | VarianceEstimator = "moving_average",
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool = False, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, variance, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)

    def _direction(self, moments, variance):
        return _adaptation_factor(moments, variance).mul_(moments.mean)  # gamma * m

    def _direction_foreach(self, moments, variances):
        directions = _adaptation_factor_foreach(moments, variances)
        torch._foreach_mul_(directions, moments.mean)
        return directions


class SVAG(MomentumFamilyOptimizer):
    r"""SVAG: stochastic variance-adapted gradient, without momentum (paper Alg. 3).

    .. code-block:: text

        input: theta_0, step size alpha (lr), beta, weight decay lambda, a variance estimator
        m~_{-1} = 0
        for t = 0, 1, ...:
            g_t  = grad f(theta_t) + lambda theta_t
            m~_t = beta m~_{t-1} + (1 - beta) g_t ;  m_t = m~_t / (1 - beta^(t+1))
            S_t  = estimate of var[g_t]:
                moving_average (Alg. 3):  v~_t = beta v~_{t-1} + (1 - beta) g_t^2
                                          v_t  = v~_t / (1 - beta^(t+1))
                                          S_t  = max(v_t - m_t^2, 0) / (1 - rho(beta, t))
                                                 Eq. (22), S_0 = 0
                minibatch:                S_t  = s_hat_t
            gamma_t = m_t^2 / (m_t^2 + S_t)                             no epsilon
            theta_{t+1} = theta_t - alpha gamma_t g_t

    ``m_t`` estimates the true gradient and ``S_t`` the variance of one stochastic
    gradient; the step follows the current gradient ``g_t``, not ``m_t``.
    ``rho(beta, t) = (1-beta)(1+beta^(t+1)) / ((1+beta)(1-beta^(t+1)))``; ``s_hat_t`` is
    ``p.grad_variance`` from :class:`msvag_mb.GradientVariance`. Where ``m_t = 0`` and
    ``S_t = 0`` the element does not move. ``gamma`` lies in ``[0, 1]``.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: step size alpha.
        beta: averaging constant in [0, 1) of ``m_t`` (and ``v_t``) (default 0.9).
        variance: ``"moving_average"`` (default), ``"minibatch"`` or a
            :class:`~msvag_mb.VarianceEstimator` instance (asked for ``var[g_t]``).
        weight_decay: L2 coefficient added to the gradient, not to the variance (default 0).
        foreach: use the multi-tensor path (default: on accelerators).
        fused: one ``torch.compile``-d kernel per parameter (compiles on first use).
        check_finite: refuse NaN/Inf gradients or variances before touching the state.
    """

    variance_target = "gradient"

    fused_direction = "gamma_grad"

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 variance: str | VarianceEstimator = "moving_average",
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool = False, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, variance, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)

    def _direction(self, moments, variance):
        return _adaptation_factor(moments, variance).mul_(moments.grad)  # gamma * g

    def _direction_foreach(self, moments, variances):
        directions = _adaptation_factor_foreach(moments, variances)
        torch._foreach_mul_(directions, moments.grad)
        return directions


class AdamStar(MomentumFamilyOptimizer):
    r"""ADAM*: Adam rebuilt from the paper's parts (App. C.2, Alg. 4).

    The sign direction with the variance adaptation written for ``m_t`` (beta1 = beta2 =
    beta, the Eq. (22) bias correction, no epsilon):

    .. code-block:: text

        input: theta_0, step size alpha (lr), beta, weight decay lambda, a variance estimator
        m~_{-1} = 0
        for t = 0, 1, ...:
            g_t  = grad f(theta_t) + lambda theta_t
            m~_t = beta m~_{t-1} + (1 - beta) g_t ;  m_t = m~_t / (1 - beta^(t+1))
            V_t  = estimate of var[m_t]:
                moving_average:  v~_t = beta v~_{t-1} + (1 - beta) g_t^2
                                 v_t  = v~_t / (1 - beta^(t+1))
                                 s_t  = max(v_t - m_t^2, 0) / (1 - rho(beta, t))  (s_0 = 0)
                                 V_t  = rho(beta, t) s_t
                minibatch:       r~_t = beta^2 r~_{t-1} + (1 - beta)^2 s_hat_t
                                 V_t  = r~_t / (1 - beta^(t+1))^2
            eta_t^2 = V_t / m_t^2
            theta_{t+1} = theta_t - alpha sign(m_t) / sqrt(1 + eta_t^2)
                        = theta_t - alpha m_t / sqrt(m_t^2 + V_t)

    Adam itself differs in three places: ``beta2 != beta1``, its second moment ``v_t`` in
    place of ``m_t^2 + V_t``, and an epsilon. ``rho`` and ``s_hat_t`` as in
    :class:`MSVAG`. Where ``m_t = 0`` and ``V_t = 0`` the element does not move.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: step size alpha (at most the distance an element moves per step).
        beta: averaging constant in [0, 1) of all moving averages (default 0.9).
        variance: ``"moving_average"`` (default), ``"minibatch"`` or a
            :class:`~msvag_mb.VarianceEstimator` instance (asked for ``var[m_t]``).
        weight_decay: L2 coefficient added to the gradient, not to the variance (default 0).
        foreach: use the multi-tensor path (default: on accelerators).
        fused: one ``torch.compile``-d kernel per parameter (compiles on first use).
        check_finite: refuse NaN/Inf gradients or variances before touching the state.
    """

    variance_target = "mean"

    fused_direction = "adam_star"

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 variance: str | VarianceEstimator = "moving_average",
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool = False, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, variance, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)

    def _direction(self, moments, variance):
        denominator = _safe_denominator_(moments.mean_squared + variance).sqrt_()
        return moments.mean / denominator

    def _direction_foreach(self, moments, variances):
        denominators = _safe_denominator_foreach_(torch._foreach_add(moments.mean_squared, variances))
        torch._foreach_sqrt_(denominators)
        return torch._foreach_div(moments.mean, denominators)
