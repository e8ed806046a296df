r"""The M-SVAG family as ``torch.optim`` optimizers.

Every member shares one skeleton (paper Fig. 1): an exponential moving average ``m_t`` of the
gradient, a *direction* (``m_t``, ``sign(m_t)`` or ``g_t``) and, for the variance-adapted
members, an element-wise factor computed from a :class:`~msvag_mb.estimators.VarianceEstimator`.
The formulas live in :mod:`msvag_mb.directions` and :mod:`msvag_mb.estimators`, written once
against the ops of :mod:`msvag_mb.ops`; this module runs them on three paths: per tensor
(the readable one, the oracle in the tests), with ``torch._foreach`` ops (one pass over all
tensors of a device and dtype) and fused (:mod:`msvag_mb.fused`).

Equations: ``docs/maths.md`` ("The family"). ``t`` counts steps from 0.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import directions
from . import fused as fused_module
from .directions import Direction, advance_momentum_, descend_, step_coefficients
from .estimators import (
    VARIANCE_ESTIMATORS,
    VarianceEstimator,
    VarianceTarget,
    make_variance_estimator,
)
from .ops import FOREACH, TENSOR
from .param_variance import all_finite, check_finite, clear_grad_variance, read_grad_variance

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

#: the optimizer's own entries of ``optimizer.state[p]``; the others are the estimator's
OWN_STATE = ("step", "exp_avg")
#: the per-parameter state of an Adam-type optimizer (``torch.optim.Adam``, ``AdamW``)
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _finite_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _state_keys(estimator: VarianceEstimator | None) -> frozenset[str]:
    """The names of the estimator's entries in ``optimizer.state[p]``."""
    if estimator is None:
        return frozenset()
    return frozenset(estimator.init_state(torch.zeros(0)))


def _estimator_label(estimator: VarianceEstimator | None) -> str:
    if estimator is None:
        return "no variance estimator"
    return f"variance={getattr(estimator, 'name', type(estimator).__name__)!r}"


def _saved_estimator_label(keys: frozenset[str]) -> str:
    """Name the estimator whose state entries are ``keys`` (in a saved state dict)."""
    if not keys:
        return "no variance state (MSGD or MSSD)"
    for name, estimator_type in VARIANCE_ESTIMATORS.items():
        if _state_keys(estimator_type()) == keys:
            return f"variance={name!r} (state {', '.join(sorted(keys))})"
    return f"a variance estimator with state {', '.join(sorted(keys))}"


def _as_step(value: Any) -> int:
    """A saved step counter as this family keeps it: a Python int (Adam's is a tensor)."""
    return int(value.item()) if torch.is_tensor(value) else int(value)


@dataclass(frozen=True)
class _Saver:
    """Who saved a state dict, as far as its contents tell."""

    description: str  #: for messages: "torch.optim.Adam", "a member of the family with ..."
    family: bool  #: a member of this family: its hyperparameters and state apply here


class MomentumFamilyOptimizer(Optimizer):
    """Shared machinery of :class:`MSGD`, :class:`MSSD`, :class:`MSVAG`, :class:`SVAG` and
    :class:`AdamStar`: argument checks, state, the three execution paths, closures.

    Subclasses set :attr:`direction`, a :class:`msvag_mb.directions.Direction`; the step is
    ``theta -= lr * direction``. Its ``target`` becomes :attr:`variance_target`.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: step size alpha (finite, >= 0).
        beta: averaging constant in [0, 1) of all moving averages; in (0, 1) with an
            estimator that declares ``beta_zero_reason`` (``"moving_average"``).
        variance: ``None`` for members without variance adaptation (required there);
            otherwise ``"moving_average"`` (the default when ``None``), ``"minibatch"`` or
            a :class:`~msvag_mb.VarianceEstimator` instance.
        weight_decay: L2 coefficient added to the gradient, not to the variance.
        foreach: use the multi-tensor path (default: on accelerators).
        fused: the compiled kernel of :mod:`msvag_mb.fused` (exclusive with ``foreach``);
            default (``None``, ``foreach`` not given either): compiled where torch.compile
            works, else the eager path after one warning; ``False``: eager.
        check_finite: refuse NaN/Inf gradients or variances before touching the state.
    """

    #: the step direction, written once in :mod:`msvag_mb.directions`
    direction: ClassVar[Direction]
    #: the variance the direction asks the estimator for (``direction.target``): ``"mean"``
    #: (of m_t), ``"gradient"`` (of g_t) or None (no variance adaptation)
    variance_target: ClassVar[VarianceTarget | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "direction" in cls.__dict__:
            cls.variance_target = cls.direction.target

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        beta: float = 0.9,
        variance: str | VarianceEstimator | None = None,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        check_finite: bool = True,
    ) -> None:
        self.variance_estimator = self._resolve_estimator(variance)
        defaults = dict(
            lr=lr, beta=beta, weight_decay=weight_decay, foreach=foreach, fused=fused,
            check_finite=check_finite,
        )
        self._check_hyperparameters(defaults, "")
        # torch.optim.Optimizer.__init__ adds every group through add_param_group (below),
        # which checks each group's values, the defaults it inherits included
        super().__init__(params, defaults)

    def _resolve_estimator(self, variance) -> VarianceEstimator | None:
        if self.variance_target is None:
            if variance is not None:
                raise ValueError(
                    f"{type(self).__name__} does not adapt to the gradient variance; "
                    "remove the variance= argument (or use MSVAG/SVAG/AdamStar)."
                )
            return None
        return make_variance_estimator("moving_average" if variance is None else variance)

    def _check_hyperparameters(self, values: dict[str, Any], where: str) -> None:
        """Refuse values outside their valid range; ``where`` names the group (or "")."""
        lr, beta, weight_decay = values["lr"], values["beta"], values["weight_decay"]
        if not _finite_number(lr) or lr < 0:
            raise ValueError(f"Invalid learning rate{where}: {lr!r} (must be a finite float "
                             ">= 0)")
        if not _finite_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter{where}: {beta!r} (must be in [0, 1))")
        reason = getattr(self.variance_estimator, "beta_zero_reason", None)
        if beta == 0 and reason is not None:
            raise ValueError(
                f"Invalid beta parameter{where}: {beta!r} for "
                f"{_estimator_label(self.variance_estimator)} (must be in (0, 1)): {reason}."
            )
        if not _finite_number(weight_decay) or weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value{where}: {weight_decay!r} (must be a "
                             "finite float >= 0)")
        if values.get("fused") and values.get("foreach"):
            raise ValueError(f"fused=True and foreach=True are exclusive{where}; choose one")
        if values.get("fused"):
            fused_module.check_fusable(self.variance_estimator)  # refuse unfusable early

    def _label(self) -> str:
        if self.variance_estimator is None:
            return type(self).__name__
        return f"{type(self).__name__}({_estimator_label(self.variance_estimator)})"

    # -- torch.optim plumbing -----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, after checking the group's hyperparameters (its own
        and the defaults it inherits) as the constructor checks its arguments."""
        if isinstance(param_group, dict):
            self._check_hyperparameters({**self.defaults, **param_group},
                                        f" in param group {len(self.param_groups)}")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        """torch's pickled state plus the estimator (torch keeps only groups and state)."""
        state = super().__getstate__()
        state["variance_estimator"] = self.variance_estimator
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, for a state dict of any member of the family or of an
        Adam-type optimizer, checked (and converted where that is exact) before anything
        changes.

        * Saved by a member with the same estimator state (any member: the state means the
          same in all): loaded as torch does, the saved hyperparameters included (checked).
        * Saved by another member: ``step`` and the momentum ``exp_avg`` mean the same in all
          and carry over; the saver's estimator state is dropped where this optimizer needs
          none (a warning says so), and the load is refused where it needs an estimator
          state that the saver did not keep (it cannot be computed from the others).
        * Saved by ``torch.optim.Adam``/``AdamW``: ``exp_avg`` (and ``exp_avg_sq``, which is
          the moving-average estimator's) are the same averages when Adam's ``betas`` equal
          this group's ``beta``; its ``step`` tensor becomes an int. This optimizer keeps its
          own hyperparameters (Adam's ``lr``, ``betas``, ``eps`` do not apply). Refused
          where a needed entry was averaged with another constant.
        * Anything else is refused, naming what the state dict holds.
        """
        converted, saver, dropped = self._converted_state_dict(state_dict)
        super().load_state_dict(converted)
        if saver is not None and (not saver.family or dropped):
            kept = "" if saver.family else (
                "; this optimizer keeps its own hyperparameters (the saved lr, betas, eps, ... "
                "do not apply to it)")
            lost = f"; dropped {', '.join(sorted(dropped))} (not used here)" if dropped else ""
            warnings.warn(
                f"{self._label()}.load_state_dict: the state dict was saved by "
                f"{saver.description}; converted step and exp_avg (and the estimator's "
                f"state, where needed) exactly{lost}{kept}.", UserWarning, stacklevel=2)

    def _converted_state_dict(self, state_dict: dict[str, Any]):
        """``(the state dict to load, its saver, the state entries dropped)``; raises
        ``ValueError`` for what cannot be converted exactly. A dict whose groups do not
        match this optimizer's goes to torch's own checks unchanged."""
        saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if (not isinstance(saved_groups, list) or not isinstance(saved_state, dict)
                or len(saved_groups) != len(self.param_groups)
                or any(len(group["params"]) != len(saved.get("params", ()))
                       for group, saved in zip(self.param_groups, saved_groups))):
            return state_dict, None, frozenset()
        saver = self._identify_saver(saved_groups, saved_state)
        groups, state, dropped = [], dict(saved_state), set()
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            values = self._loaded_group(index, group, saved, saver)
            groups.append(values)
            for param, key in zip(group["params"], saved["params"]):
                if key in saved_state:
                    state[key] = self._loaded_entry(saved_state[key], saver, saved, values,
                                                    param, index)
                    dropped |= saved_state[key].keys() - state[key].keys()
        return {**state_dict, "param_groups": groups, "state": state}, saver, frozenset(dropped)

    def _identify_saver(self, saved_groups: list[dict], saved_state: dict) -> _Saver:
        """Who saved the state dict, from its param-group and state keys; refuse others."""
        keys = set().union(*(entry.keys() for entry in saved_state.values()
                             if isinstance(entry, dict)))
        if all("beta" in group and "betas" not in group for group in saved_groups):
            estimator_keys = frozenset(keys - set(OWN_STATE))
            return _Saver("a member of the M-SVAG family with "
                          + _saved_estimator_label(estimator_keys), True)
        if all("betas" in group for group in saved_groups) and keys <= set(ADAM_STATE):
            decoupled = any(group.get("decoupled_weight_decay") for group in saved_groups)
            name = "torch.optim.AdamW" if decoupled else "torch.optim.Adam"
            return _Saver(f"{name} (state {', '.join(sorted(keys)) or 'empty'})", False)
        group_keys = set().union(*(group.keys() for group in saved_groups))
        raise ValueError(
            f"{self._label()}.load_state_dict: this state dict was saved neither by a member "
            "of the M-SVAG family nor by an Adam-type optimizer (param-group keys "
            f"{sorted(group_keys - {'params', 'param_names'})}, state keys {sorted(keys)}); "
            f"its state cannot be converted. Start {type(self).__name__} afresh instead of "
            "loading it."
        )

    def _loaded_group(self, index: int, group: dict, saved: dict, saver: _Saver) -> dict:
        """The hyperparameters group ``index`` gets: the saved ones (checked as the
        constructor checks its arguments) from a member, this optimizer's own otherwise."""
        current = {key: value for key, value in group.items() if key != "params"}
        if saver.family:
            values = {**current, **saved}  # a key the saver did not have keeps its value
            self._check_hyperparameters(values, f" in param group {index} of the loaded "
                                                "state dict")
            return values
        values = {**current, "params": saved["params"]}
        if "param_names" in saved:
            values["param_names"] = saved["param_names"]
        return values

    def _loaded_entry(self, entry: dict, saver: _Saver, saved_group: dict, values: dict,
                      param: Tensor, index: int) -> dict:
        """One parameter's saved state as this optimizer keeps it; refuse what is missing."""
        needed = _state_keys(self.variance_estimator)
        missing = sorted(({"step", "exp_avg"} | needed) - entry.keys())
        if missing:
            raise ValueError(
                f"{self._label()}.load_state_dict: the state dict was saved by "
                f"{saver.description}; this optimizer needs {', '.join(missing)} in the "
                "state of every parameter that has taken a step, and that cannot be computed "
                "from what was saved. Load it into a member built with the saver's estimator "
                "(MSGD and MSSD take over step and exp_avg alone), or start "
                f"{type(self).__name__} afresh."
            )
        if not saver.family:
            self._check_adam_averages(saved_group, values, needed, index)
        converted = {"step": _as_step(entry["step"]), "exp_avg": entry["exp_avg"],
                     **{key: entry[key] for key in needed}}
        for key, value in converted.items():
            if torch.is_tensor(value) and value.shape != param.shape:
                raise ValueError(
                    f"{self._label()}.load_state_dict: the saved {key!r} of a parameter in "
                    f"param group {index} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(param.shape)}: the state dict belongs to another model."
                )
        return converted

    def _check_adam_averages(self, saved_group: dict, values: dict,
                             needed: frozenset[str], index: int) -> None:
        """Adam's averages are this family's only where they used the same constant."""
        beta1, beta2 = saved_group["betas"]
        beta, here = values["beta"], f"param group {index} here has beta = {values['beta']}"
        start = f"{self._label()}.load_state_dict: the Adam state of param group {index}"
        if saved_group.get("maximize"):
            raise ValueError(f"{start} was saved with maximize=True: its exp_avg averages "
                             "the negative gradient. It cannot be converted.")
        if beta1 != beta:
            raise ValueError(
                f"{start} averages the gradient (exp_avg) with beta1 = {beta1}, {here}: build "
                f"{type(self).__name__} with beta={beta1} to take it over exactly.")
        shared = sorted(needed & set(ADAM_STATE))
        if shared and beta2 != beta:
            raise ValueError(
                f"{start} averages g^2 ({', '.join(shared)}) with beta2 = {beta2}; "
                f"{_estimator_label(self.variance_estimator)} needs it averaged with the "
                f"beta of exp_avg, and {here}: only an Adam with betas=(beta, beta) converts "
                "to it (MSGD and MSSD take over exp_avg alone).")

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
        for group, params, batch_variances in self._checked_groups():
            states = [self._init_state(p) for p in params]
            if fused_module.use_fused(group.get("fused"), group.get("foreach"),
                                      self.variance_estimator, params[0].device):
                self._step_fused(group, params, states, batch_variances)
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

    def _checked_groups(self) -> list[tuple[dict, list[Tensor], list[Tensor] | None]]:
        """``(group, parameters with a gradient, their within-batch variances)`` of every
        group, after checking all of them: raises before any state or parameter changes."""
        checked, finite_checks = [], []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for param in params:
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            batch_variances = (
                [read_grad_variance(p) for p in params] if self._needs_batch_variance() else None
            )
            if group.get("check_finite", True):
                finite_checks.append((index, [p.grad for p in params], batch_variances or []))
            checked.append((group, params, batch_variances))
        tensors = [t for _, grads, variances in finite_checks for t in (*grads, *variances)]
        if not all_finite(tensors):  # one host sync in the usual case; name the culprit
            for index, grads, variances in finite_checks:
                where = f" of param group {index}" if len(self.param_groups) > 1 else ""
                check_finite(grads, f"a gradient (p.grad){where}")
                check_finite(variances, f"a within-batch variance (p.grad_variance){where}")
        return checked

    def _step_single_tensor(self, group, params, states, batch_variances) -> None:
        """Reference path: one parameter at a time, with Python numbers."""
        lr, beta, weight_decay = group["lr"], group["beta"], group["weight_decay"]
        for i, (param, state) in enumerate(zip(params, states)):
            t = state["step"]
            coefficients = step_coefficients(lr, beta, weight_decay, t)
            moments = advance_momentum_(TENSOR, param, param.grad, state["exp_avg"],
                                        coefficients, weight_decay != 0)
            variance = None
            if self.variance_estimator is not None:
                variance = self.variance_estimator.update(
                    state, moments, None if batch_variances is None else batch_variances[i],
                    t, beta, self.variance_target,
                )
            descend_(TENSOR, param, self.direction(TENSOR, moments, variance), coefficients)
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
            coefficients = step_coefficients(lr, beta, weight_decay, t)
            moments = advance_momentum_(
                FOREACH, bucket_params, [p.grad for p in bucket_params],
                [state["exp_avg"] for state in bucket_states], coefficients, weight_decay != 0)
            variances = None
            if self.variance_estimator is not None:
                variances = self.variance_estimator.update_foreach(
                    bucket_states, moments,
                    None if batch_variances is None else [batch_variances[i] for i in indices],
                    t, beta, self.variance_target,
                )
            descend_(FOREACH, bucket_params, self.direction(FOREACH, moments, variances),
                     coefficients)
            for state in bucket_states:
                state["step"] = t + 1

    def _step_fused(self, group, params, states, batch_variances) -> None:
        """Compiled path: the same code, one ``torch.compile``-d kernel per parameter."""
        fused_module.fused_step(
            params, states, batch_variances, lr=group["lr"], beta=group["beta"],
            weight_decay=group["weight_decay"], direction=self.direction,
            estimator=self.variance_estimator, target=self.variance_target,
            estimator_keys=tuple(key for key in states[0] if key not in OWN_STATE),
        )


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
        fused: the compiled kernel (default: where torch.compile works; False: eager).
        check_finite: refuse NaN/Inf gradients before touching the state (default True).
    """

    direction = directions.MomentumDirection()

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool | None = None, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, None, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)


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
        fused: the compiled kernel (default: where torch.compile works; False: eager).
        check_finite: refuse NaN/Inf gradients before touching the state (default True).
    """

    direction = directions.SignDirection()

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool | None = None, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, None, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)


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
        beta: averaging constant in [0, 1) (default 0.9); in (0, 1) with
            ``variance="moving_average"``.
        variance: ``"moving_average"`` (default), ``"minibatch"`` or a
            :class:`~msvag_mb.VarianceEstimator` instance.
        weight_decay: L2 coefficient added to the gradient, not to the variance (default 0).
        foreach: use the multi-tensor path (default: on accelerators).
        fused: the compiled kernel (default: where torch.compile works; False: eager).
        check_finite: refuse NaN/Inf gradients or variances before touching the state.
    """

    direction = directions.AdaptedMomentumDirection()

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 variance: str | VarianceEstimator = "moving_average",
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool | None = None, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, variance, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)


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
        beta: averaging constant in [0, 1) of ``m_t`` (and ``v_t``) (default 0.9); in (0, 1)
            with ``variance="moving_average"``.
        variance: ``"moving_average"`` (default), ``"minibatch"`` or a
            :class:`~msvag_mb.VarianceEstimator` instance (asked for ``var[g_t]``).
        weight_decay: L2 coefficient added to the gradient, not to the variance (default 0).
        foreach: use the multi-tensor path (default: on accelerators).
        fused: the compiled kernel (default: where torch.compile works; False: eager).
        check_finite: refuse NaN/Inf gradients or variances before touching the state.
    """

    direction = directions.AdaptedGradientDirection()

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 variance: str | VarianceEstimator = "moving_average",
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool | None = None, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, variance, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)


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
        beta: averaging constant in [0, 1) of all moving averages (default 0.9); in (0, 1)
            with ``variance="moving_average"``.
        variance: ``"moving_average"`` (default), ``"minibatch"`` or a
            :class:`~msvag_mb.VarianceEstimator` instance (asked for ``var[m_t]``).
        weight_decay: L2 coefficient added to the gradient, not to the variance (default 0).
        foreach: use the multi-tensor path (default: on accelerators).
        fused: the compiled kernel (default: where torch.compile works; False: eager).
        check_finite: refuse NaN/Inf gradients or variances before touching the state.
    """

    direction = directions.AdamStarDirection()

    def __init__(self, params: ParamsT, lr: float, beta: float = 0.9,
                 variance: str | VarianceEstimator = "moving_average",
                 weight_decay: float = 0.0, *, foreach: bool | None = None,
                 fused: bool | None = None, check_finite: bool = True) -> None:
        super().__init__(params, lr, beta, variance, weight_decay, foreach=foreach,
                         fused=fused, check_finite=check_finite)
