"""The fused step: one compiled elementwise kernel per parameter (``fused=True``).

The eager paths launch one kernel per operation (about ten passes over memory per step);
here ``torch.compile`` fuses the whole update of one parameter into a single loop that
reads ``theta, g, m~`` and the estimator state once and writes them once. Every
step-dependent number is passed as a 0-dim tensor so one compiled kernel serves all steps
(and, with ``dynamic=True``, all shapes). The maths is that of
:meth:`MomentumFamilyOptimizer._step_single_tensor`, the oracle it is tested against.
Only the built-in estimators are fused; the first call per configuration compiles
(seconds), so this pays off for long runs.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import Tensor

from .estimators import MiniBatchVariance, MovingAverageVariance, VarianceEstimator, rho

# positions in the scalar vector handed to the kernel
_BETA, _LR, _WEIGHT_DECAY, _BIAS_CORRECTION, _VARIANCE_SCALE = range(5)


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    second: Tensor | None,
    batch_variance: Tensor | None,
    scalars: Tensor,
    direction: str,
    estimator: str | None,
    target: str | None,
    use_weight_decay: bool,
) -> None:
    beta, lr = scalars[_BETA], scalars[_LR]
    bias_correction = scalars[_BIAS_CORRECTION]
    if use_weight_decay:
        grad = grad + scalars[_WEIGHT_DECAY] * param
    exp_avg.copy_(exp_avg + (1 - beta) * (grad - exp_avg))  # lerp, as the eager paths
    mean = exp_avg / bias_correction
    mean_squared = mean * mean
    variance = None
    if estimator == "moving_average":
        second.copy_(second * beta + (1 - beta) * grad * grad)
        # scale = rho/(1-rho) (of m) or 1/(1-rho) (of g); 0 at t = 0 where s_0 = 0
        variance = (second / bias_correction - mean_squared).clamp_min(0.0) * scalars[
            _VARIANCE_SCALE]
    elif estimator == "minibatch":
        second.copy_(second * (beta * beta) + (1 - beta) * (1 - beta) * batch_variance)
        variance = batch_variance if target == "gradient" else (
            second / (bias_correction * bias_correction))
    tiny = torch.finfo(param.dtype).tiny
    if direction == "mean":
        update = mean
    elif direction == "sign":
        update = torch.sign(mean)
    elif direction == "gamma_mean":
        update = mean_squared / (mean_squared + variance).clamp_min(tiny) * mean
    elif direction == "gamma_grad":
        update = mean_squared / (mean_squared + variance).clamp_min(tiny) * grad
    else:  # "adam_star"
        update = mean / (mean_squared + variance).clamp_min(tiny).sqrt()
    param.copy_(param - lr * update)


@functools.lru_cache(maxsize=None)
def _compiled(direction: str, estimator: str | None, target: str | None, use_weight_decay: bool):
    # Dynamo keeps one cache, with a small recompile limit, per *code object*; a private
    # copy of _update's code per configuration keeps the configurations from evicting
    # each other (10 optimizer/estimator pairs x weight decay on/off).
    name = f"_update_{direction}_{estimator}_{target}_{int(use_weight_decay)}"
    # the four static options are _update's last parameters: bind them as defaults
    specialised = types.FunctionType(
        _update.__code__.replace(co_name=name), _update.__globals__, name,
        (direction, estimator, target, use_weight_decay),
    )
    return torch.compile(specialised, dynamic=True, fullgraph=True)


def estimator_kind(estimator: VarianceEstimator | None) -> str | None:
    """The fused kernel's name for an estimator; refuses estimators it cannot fuse."""
    if estimator is None:
        return None
    for kind in (MovingAverageVariance, MiniBatchVariance):
        if type(estimator) is kind:
            return kind.name
    raise ValueError(
        f"fused=True supports the built-in estimators ('moving_average', 'minibatch'), not "
        f"{type(estimator).__name__}; use foreach=True for a custom estimator."
    )


def fused_step(
    params: list[Tensor],
    states: list[dict],
    batch_variances: list[Tensor] | None,
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    direction: str,
    estimator: VarianceEstimator | None,
    target: str | None,
) -> None:
    """Advance every parameter by one step with the compiled kernel."""
    kind = estimator_kind(estimator)
    kernel = _compiled(direction, kind, target, weight_decay != 0)
    second_key = {"moving_average": "exp_avg_sq", "minibatch": "variance_avg"}.get(kind)
    for i, (param, state) in enumerate(zip(params, states)):
        t = state["step"]
        variance_scale = 0.0
        if kind == "moving_average" and t > 0:
            r = rho(beta, t)
            variance_scale = (r if target == "mean" else 1.0) / (1.0 - r)
        scalars = torch.tensor(
            [beta, lr, weight_decay, 1.0 - beta ** (t + 1), variance_scale],
            dtype=torch.float64 if param.dtype == torch.float64 else torch.float32,
            device=param.device,
        )
        kernel(
            param.detach(), param.grad, state["exp_avg"],
            state.get(second_key) if second_key else None,
            None if batch_variances is None else batch_variances[i],
            scalars,
        )
        state["step"] = t + 1
