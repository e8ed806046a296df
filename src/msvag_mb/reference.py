"""A plain float64 transcription of ``docs/maths.md``: the oracle for the optimizers.

Written for reading, not speed: NumPy, one step at a time, the paper's symbols, no shared
code with :mod:`msvag_mb.optimizers`. Each function runs ``len(gradients)`` steps from
``theta0`` on a *prescribed* gradient sequence (the gradient before weight decay; the
decay term ``lambda * theta_t`` is added from the current iterate, as the optimizers do).
The comments cite the equations of ``docs/maths.md``: ``(22)`` is the paper's Eq. (22),
``(M15)`` one of the page's own.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Array = np.ndarray


def rho(beta: float, t: int) -> float:
    """rho(beta, t) = (1-beta)(1+beta^(t+1)) / ((1+beta)(1-beta^(t+1))), docs/maths.md (M3)."""
    return (1 - beta) * (1 + beta ** (t + 1)) / ((1 + beta) * (1 - beta ** (t + 1)))


def _sign(x: Array) -> Array:
    return np.sign(x)  # sign(0) = 0


def run_reference(
    algorithm: str,
    theta0: Array,
    gradients: Sequence[Array],
    lr: float,
    beta: float = 0.9,
    variance: str | None = None,
    batch_variances: Sequence[Array] | None = None,
    weight_decay: float = 0.0,
) -> list[Array]:
    """Iterates ``[theta_1, ..., theta_T]`` of one family member.

    Args:
        algorithm: ``"msgd"``, ``"mssd"``, ``"msvag"``, ``"svag"`` or ``"adamstar"``.
        theta0: initial parameters.
        gradients: ``g_0, ..., g_{T-1}`` (without weight decay).
        lr: step size alpha.
        beta: averaging constant.
        variance: ``"moving_average"`` or ``"minibatch"`` for the variance-adapted members.
        batch_variances: ``s_hat_0, ..., s_hat_{T-1}`` for ``variance="minibatch"``.
        weight_decay: lambda; ``g_t + lambda theta_t`` is used as the gradient.
    """
    theta = np.array(theta0, dtype=np.float64)
    m_tilde = np.zeros_like(theta)  # EMA of g
    v_tilde = np.zeros_like(theta)  # EMA of g^2 (Alg. 1)
    r_tilde = np.zeros_like(theta)  # EMA of s_hat with squared weights (Alg. 5)
    iterates = []
    for t, raw_gradient in enumerate(gradients):
        g = np.asarray(raw_gradient, dtype=np.float64) + weight_decay * theta
        m_tilde = beta * m_tilde + (1 - beta) * g
        m = m_tilde / (1 - beta ** (t + 1))  # (M1)

        if variance == "moving_average":
            v_tilde = beta * v_tilde + (1 - beta) * g**2  # (M10)
            v = v_tilde / (1 - beta ** (t + 1))
            if t == 0:
                s = np.zeros_like(theta)  # rho(beta, 0) = 1: Eq. (22) undefined
            else:
                s = np.maximum((v - m**2) / (1 - rho(beta, t)), 0.0)  # Eq. (22)
            variance_of_g = s
            variance_of_m = rho(beta, t) * s
        elif variance == "minibatch":
            s_hat = np.asarray(batch_variances[t], dtype=np.float64)
            r_tilde = beta**2 * r_tilde + (1 - beta) ** 2 * s_hat  # (M15)
            r = r_tilde / (1 - beta ** (t + 1)) ** 2
            variance_of_g = s_hat
            variance_of_m = r
        elif variance is not None:
            raise ValueError(f"unknown variance {variance!r}")

        with np.errstate(invalid="ignore", divide="ignore"):
            if algorithm == "msgd":
                update = m  # (M7)
            elif algorithm == "mssd":
                update = _sign(m)  # (M8)
            elif algorithm == "msvag":
                gamma = m**2 / (m**2 + variance_of_m)  # Eq. (25)
                update = np.where(m**2 + variance_of_m > 0, gamma, 0.0) * m
            elif algorithm == "svag":
                gamma = m**2 / (m**2 + variance_of_g)  # (23)
                update = np.where(m**2 + variance_of_g > 0, gamma, 0.0) * g
            elif algorithm == "adamstar":
                eta_squared = variance_of_m / m**2  # (M9)
                update = np.where(m != 0, _sign(m) / np.sqrt(1 + eta_squared), 0.0)
            else:
                raise ValueError(f"unknown algorithm {algorithm!r}")
        theta = theta - lr * update  # (M6)
        iterates.append(theta.copy())
    return iterates


def within_batch_variance(per_example_gradients: Array) -> Array:
    """s_hat = 1/(B(B-1)) sum_b (g_b - gbar)^2 (docs/maths.md (M12)), gradients along axis 0."""
    g = np.asarray(per_example_gradients, dtype=np.float64)
    batch_size = g.shape[0]
    gbar = g.mean(axis=0)
    return ((g - gbar) ** 2).sum(axis=0) / (batch_size * (batch_size - 1))
