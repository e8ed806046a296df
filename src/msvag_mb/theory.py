r"""The paper's side results as small, checkable functions.

Balles & Hennig, *Dissecting Adam* (ICML 2018). The copy of the paper this work started
from had lost its typeset equations; the formulas below are reconstructed from the
surrounding text and the appendix derivations (each docstring says what was reconstructed).
``docs/theory.md`` states them with the figures; the optimizers' own equations are in
``docs/maths.md``.

Three groups:

* **Fig. 3 / Eq. (10)** -- the optimal variance adaptation factor of the *sign* of a Gaussian
  gradient, ``2 rho - 1 = erf(1/(sqrt(2) eta))``, against Adam's factor
  ``1/sqrt(1 + eta^2)``, with ``eta = sigma/|mu|`` the relative noise:
  :func:`sign_success_probability`, :func:`sign_vs_variance_factor`.
* **Section 2 / App. B.2** -- stochastic quadratic problems (sQPs): the expected
  improvement (Eq. 12) of SGD and of stochastic sign descent (SSD), the diagonal share
  ``p_diag(Q)`` and its average ``~1.57/d`` under random rotations:
  :func:`p_diag`, :func:`p_diag_lower_bound`, :func:`haar_orthogonal`,
  :func:`rotation_path`, :func:`rotated_quadratic`, :func:`expected_improvement_sgd`,
  :func:`expected_improvement_ssd_bound`, :func:`expected_improvement_monte_carlo`,
  :func:`improvement_ratio_grid`.
* **Lemma 2 / App. B.6** -- Wilson et al.'s (2017) binary least-squares construction on
  which sign descent iterates stay proportional to ``sign(X^T y)``:
  :func:`wilson_construction`, :func:`lemma2_constant`, :func:`run_least_squares`,
  :func:`cosine_to_sign_direction`, :func:`wilson_test_accuracy`.

Everything is float64 torch, vectorised, and takes a ``torch.Generator`` (or a seed) where
randomness is involved, so results are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ImprovementEstimate",
    "LeastSquaresRun",
    "cosine_to_sign_direction",
    "expected_improvement_monte_carlo",
    "expected_improvement_sgd",
    "expected_improvement_ssd_bound",
    "expected_improvements_at_points",
    "haar_orthogonal",
    "improvement_ratio_grid",
    "lemma2_constant",
    "p_diag",
    "p_diag_lower_bound",
    "p_diag_random_rotation_mean",
    "rotated_quadratic",
    "rotation_path",
    "run_least_squares",
    "sign_success_probability",
    "sign_vs_variance_factor",
    "wilson_construction",
    "wilson_test_accuracy",
]

_DTYPE = torch.float64


def _generator(seed_or_generator: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(0 if seed_or_generator is None else seed_or_generator)


# ---------------------------------------------------------------------------------------
# Fig. 3 / Eq. (10): sign success probability and the two adaptation factors
# ---------------------------------------------------------------------------------------


def sign_success_probability(mu: Tensor | float, sigma: Tensor | float) -> Tensor:
    r"""Success probability of the sign of a Gaussian, Eq. (10) / Lemma in App. B.1.

    For :math:`g \sim \mathcal N(\mu, \sigma^2)`,

    .. math:: \rho := P[\operatorname{sign}(g) = \operatorname{sign}(\mu)]
              = \tfrac12 \bigl(1 + \operatorname{erf}\bigl(|\mu| / (\sqrt2 \sigma)\bigr)\bigr).

    (Reconstructed: App. B.1 gives the cdf :math:`\Phi(z) = \frac12(1 + \operatorname{erf}(z/\sqrt2))`
    and the main text states :math:`2\rho - 1 = \operatorname{erf}[(\sqrt2\eta)^{-1}]` with
    :math:`\eta = \sigma/|\mu|`.) ``sigma = 0`` gives 1 (a certain sign) for ``mu != 0``.
    """
    mu_t = torch.as_tensor(mu, dtype=_DTYPE)
    sigma_t = torch.as_tensor(sigma, dtype=_DTYPE)
    if torch.any(sigma_t < 0):
        raise ValueError("sigma must be >= 0 (it is a standard deviation)")
    # |mu|/(sqrt2 sigma) -> +inf for sigma = 0, and erf(inf) = 1: the sign is certain.
    return 0.5 * (1.0 + torch.special.erf(mu_t.abs() / (math.sqrt(2.0) * sigma_t)))


def sign_vs_variance_factor(eta: Tensor | float) -> tuple[Tensor, Tensor]:
    r"""The two variance adaptation factors of Fig. 3 as functions of the relative noise.

    ``eta`` is :math:`\eta = \sigma/|\mu|` (relative standard deviation of one gradient
    element). Returns

    * :math:`2\rho - 1 = \operatorname{erf}\bigl(1/(\sqrt2\,\eta)\bigr)`: the optimal factor
      for the sign of a Gaussian gradient (Lemma 1 with Eq. (10)), and
    * :math:`1/\sqrt{1 + \eta^2}`: Adam's factor, since
      :math:`\operatorname{sign}(m)/\sqrt{1+\eta^2} = m/\sqrt{m^2 + \sigma^2}` (Eq. (6)).

    Both are 1 at :math:`\eta = 0`, decrease in :math:`\eta`, and go to 0 like
    :math:`\sqrt{2/\pi}/\eta` and :math:`1/\eta` respectively as :math:`\eta \to \infty`.
    """
    eta_t = torch.as_tensor(eta, dtype=_DTYPE)
    if torch.any(eta_t < 0):
        raise ValueError("eta = sigma/|mu| must be >= 0")
    # 1/(sqrt2 * 0) = inf and erf(inf) = 1: the eta -> 0 limit without a special case.
    sign_factor = torch.special.erf(1.0 / (math.sqrt(2.0) * eta_t))
    adam_factor = torch.rsqrt(1.0 + eta_t**2)
    return sign_factor, adam_factor


# ---------------------------------------------------------------------------------------
# Section 2 / App. B.2: p_diag(Q) and random rotations
# ---------------------------------------------------------------------------------------


def p_diag(Q: Tensor) -> Tensor:
    r"""Share of the absolute "mass" of ``Q`` on its diagonal (Section 2, used in Eq. (13)).

    .. math:: p_{\text{diag}}(Q) = \frac{\sum_i |q_{ii}|}{\sum_{i,j} |q_{ij}|} \in [1/d, 1]

    (Reconstructed from App. B.2, which uses
    :math:`\sum_{i,j}|q_{ij}| = p_{\text{diag}}(Q)^{-1}\sum_i|q_{ii}|`.) 1 for diagonal ``Q``;
    ``1/d`` for a (near) rank-one ``Q`` along :math:`(1,\dots,1)/\sqrt d`. Works on batches
    ``(..., d, d)``.
    """
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"p_diag needs square matrices (..., d, d), got shape {tuple(Q.shape)}")
    diagonal = torch.diagonal(Q, dim1=-2, dim2=-1).abs().sum(-1)
    return diagonal / Q.abs().sum((-2, -1))


def p_diag_lower_bound(eigenvalues: Tensor, eigenvectors: Tensor) -> Tensor:
    r"""The bound of App. B.2, Eq. (35) (reconstructed), for ``Q = V diag(lambda) V^T``.

    .. math:: p_{\text{diag}}(Q) \;\ge\; \frac{\sum_i \lambda_i}{\sum_i \lambda_i \|v_i\|_1^2}

    from :math:`\sum_{jk}|q_{jk}| \le \sum_i \lambda_i \|v_i\|_1^2` and
    :math:`\sum_j q_{jj} = \sum_i \lambda_i` (positive definite ``Q``). With
    :math:`\|v\|_1 \le \sqrt d\,\|v\|_2` it is at least ``1/d``; for a random orientation
    :math:`\|v\|_1^2 \approx 2d/\pi`, which gives the paper's average
    :math:`\pi/(2d) \approx 1.57/d`. The bound is attained when ``Q`` has rank one.

    Args:
        eigenvalues: ``(..., d)``, positive.
        eigenvectors: ``(..., d, d)``, orthonormal columns ``v_i``.
    """
    if torch.any(eigenvalues <= 0):
        raise ValueError("the bound of App. B.2 is for positive definite Q: eigenvalues must be > 0")
    l1_squared = eigenvectors.abs().sum(-2) ** 2  # ||v_i||_1^2 for every column i
    return eigenvalues.sum(-1) / (eigenvalues * l1_squared).sum(-1)


def p_diag_random_rotation_mean(d: int) -> float:
    r"""Mean of ``p_diag`` of a rank-one ``Q`` with a Haar-random eigenvector, to O(1/d^3).

    The paper's value is the leading term :math:`\pi/(2d) \approx 1.57/d` (App. B.2, via
    :math:`\|w\|_1 \approx \sqrt{2d/\pi}\,\|w\|_2` for :math:`w\sim\mathcal N(0, I)`). We add
    the next term of the delta-method expansion of
    :math:`E[\|w\|_2^2/\|w\|_1^2]` (our own derivation, with :math:`a^2 = 2/\pi`,
    :math:`\operatorname{var}|w_i| = 1 - a^2`, :math:`\operatorname{cov}(|w_i|, w_i^2) = a`):

    .. math:: E[p_{\text{diag}}] \approx \frac{\pi}{2d}
              + \frac{3(1-a^2)/a^4 - 2/a^2}{d^2}
              \approx \frac{1.5708}{d} - \frac{0.4516}{d^2},

    so that Monte-Carlo tests with small standard errors compare against the right number.
    """
    a2 = 2.0 / math.pi
    return 1.0 / (d * a2) + (3.0 * (1.0 - a2) / a2**2 - 2.0 / a2) / d**2


def haar_orthogonal(
    d: int, num: int | None = None, generator: int | torch.Generator | None = None
) -> Tensor:
    """Haar-distributed (uniformly random) orthogonal matrices, ``(d, d)`` or ``(num, d, d)``.

    QR of a Gaussian matrix with the signs of ``diag(R)`` moved into ``Q`` (Mezzadri 2007):
    without that correction the distribution is not Haar.
    """
    gen = _generator(generator)
    shape = (d, d) if num is None else (num, d, d)
    q, r = torch.linalg.qr(torch.randn(shape, generator=gen, dtype=_DTYPE))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def rotation_path(
    d: int, omegas: Iterable[float] | Tensor, generator: int | torch.Generator | None = None
) -> Tensor:
    r"""Rotations ``R(omega)`` on the geodesic of SO(d) from ``I`` (omega=0) to a Haar ``U``.

    ``R(omega) = exp(omega log U)``, computed from the eigendecomposition
    :math:`U = W e^{i\Phi} W^H` as :math:`\operatorname{Re}(W e^{i\omega\Phi} W^H)`.
    ``omega = 0`` is axis-aligned, ``omega = 1`` a uniformly random orientation; in between
    the orientation of ``Q = R diag(lambda) R^T`` interpolates, which is how we vary the
    "rotation" of Section 2 continuously. (Our parametrisation, not the paper's.)

    Returns ``(len(omegas), d, d)``.
    """
    omega_t = torch.as_tensor(list(omegas) if not isinstance(omegas, Tensor) else omegas,
                              dtype=_DTYPE)
    U = haar_orthogonal(d, generator=generator)
    if torch.linalg.det(U) < 0:
        U[:, 0] = -U[:, 0]  # a real logarithm needs det U = +1 (no eigenvalue -1)
    eigenvalues, W = torch.linalg.eig(U)
    phases = torch.angle(eigenvalues)  # in (-pi, pi]: the principal logarithm
    rotations = []
    for omega in omega_t:
        R = (W * torch.exp(1j * omega * phases).unsqueeze(-2)) @ W.conj().transpose(-2, -1)
        # W is unitary up to round-off (U is normal); re-orthonormalise the real part so
        # that Q keeps exactly its eigenvalues.
        q, r = torch.linalg.qr(R.real)
        rotations.append(q * torch.sign(torch.diagonal(r)).unsqueeze(-2))
    return torch.stack(rotations)


def rotated_quadratic(eigenvalues: Tensor, rotation: Tensor) -> Tensor:
    """Hessian ``Q = R diag(lambda) R^T`` of a stochastic quadratic problem (Section 2)."""
    lam = torch.as_tensor(eigenvalues, dtype=_DTYPE)
    return (rotation * lam.unsqueeze(-2)) @ rotation.transpose(-2, -1)


# ---------------------------------------------------------------------------------------
# Section 2 / App. B.2: expected improvement of SGD and SSD on stochastic QPs
# ---------------------------------------------------------------------------------------
#
# Reconstructed setting (Section 2, Eq. (11)-(13)): L(theta) = 1/2 (theta - x*)^T Q (theta - x*),
# per-example loss 1/2 (theta - x)^T Q (theta - x) with x ~ N(x*, nu^2 I), so the stochastic
# gradient g = Q(theta - x) ~ N(grad L, nu^2 Q Q). For a stochastic direction z, the optimal
# step alpha* = -grad L^T E[z] / E[z^T Q z] gives the expected improvement (Eq. (12))
#
#     I(z) = (grad L^T E[z])^2 / (2 E[z^T Q z]).
#
# Eq. (13): I_SGD = ||grad L||^4 / (2 (grad L^T Q grad L + nu^2 sum_i lambda_i^3))     (z = -g)
#           I_SSD >= (sum_i (2 rho_i - 1) |grad_i L|)^2 p_diag(Q) / (2 sum_i lambda_i)  (z = -sign g)
# where the SSD line is a lower bound (App. B.2 bounds E[s^T Q s] <= sum_ij |q_ij|).


class ImprovementEstimate(NamedTuple):
    """A Monte-Carlo estimate of an expected improvement with its standard error."""

    value: float
    standard_error: float


def _check_quadratic(Q: Tensor, grad: Tensor) -> None:
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1] or grad.shape != Q.shape[:1]:
        raise ValueError(
            f"need Q of shape (d, d) and grad of shape (d,), got {tuple(Q.shape)} and "
            f"{tuple(grad.shape)}"
        )


def expected_improvement_sgd(Q: Tensor, grad: Tensor, nu: float) -> float:
    r"""Closed-form :math:`\mathcal I_{\text{SGD}}` of Eq. (13) (reconstructed).

    :math:`E[g^T Q g] = \nabla L^T Q \nabla L + \operatorname{tr}(Q\,\nu^2 QQ)` and
    :math:`\operatorname{tr}(Q^3) = \sum_i\lambda_i^3`, so

    .. math:: \mathcal I_{\text{SGD}} = \frac{\|\nabla L\|^4}
              {2(\nabla L^T Q \nabla L + \nu^2 \sum_i \lambda_i^3)}.
    """
    _check_quadratic(Q, grad)
    trace_q3 = torch.trace(Q @ Q @ Q)
    return float((grad @ grad) ** 2 / (2.0 * (grad @ Q @ grad + nu**2 * trace_q3)))


def _sign_mean(Q: Tensor, grad: Tensor, nu: float) -> Tensor:
    """E[sign(g)] = (2 rho - 1) sign(grad L) for g ~ N(grad L, nu^2 QQ) (App. B.2)."""
    sigma = nu * torch.sqrt(torch.diagonal(Q @ Q))
    return (2.0 * sign_success_probability(grad, sigma) - 1.0) * torch.sign(grad)


def expected_improvement_ssd_bound(Q: Tensor, grad: Tensor, nu: float) -> float:
    r"""The lower bound on :math:`\mathcal I_{\text{SSD}}` of Eq. (13) (reconstructed).

    .. math:: \mathcal I_{\text{SSD}} \ge \frac{\bigl(\sum_i (2\rho_i - 1)|\nabla_i L|\bigr)^2}
              {2 \sum_i \lambda_i}\, p_{\text{diag}}(Q),

    with :math:`\rho_i` the success probabilities (Eq. (10)) of :math:`g_i \sim
    \mathcal N(\nabla_i L, \nu^2 (QQ)_{ii})`. It uses
    :math:`E[s^TQs] = \sum_{ij} q_{ij} E[s_i s_j] \le \sum_{ij}|q_{ij}|`.
    """
    _check_quadratic(Q, grad)
    numerator = (grad @ _sign_mean(Q, grad, nu)) ** 2
    return float(numerator * p_diag(Q) / (2.0 * torch.trace(Q)))


def expected_improvement_monte_carlo(
    Q: Tensor,
    grad: Tensor,
    nu: float,
    direction: str,
    num_samples: int = 20_000,
    generator: int | torch.Generator | None = None,
) -> ImprovementEstimate:
    r"""Monte-Carlo :math:`\mathcal I(z) = (\nabla L^T E[z])^2 / (2 E[z^T Q z])` (Eq. (12)).

    ``direction="sgd"`` (z = -g) or ``"ssd"`` (z = -sign g) with
    :math:`g = \nabla L + \nu Q \xi`, :math:`\xi \sim \mathcal N(0, I)`. The numerator
    :math:`E[z]` is exact (``-grad`` and ``-(2 rho - 1) sign(grad)``); only the denominator
    :math:`E[z^TQz]` is sampled, and the standard error follows from it by the delta method
    (relative error of ``I`` = relative error of the denominator).
    """
    _check_quadratic(Q, grad)
    if direction not in ("sgd", "ssd"):
        raise ValueError(f"direction must be 'sgd' or 'ssd', got {direction!r}")
    gen = _generator(generator)
    xi = torch.randn(num_samples, Q.shape[0], generator=gen, dtype=_DTYPE)
    g = grad + nu * xi @ Q  # Q symmetric: rows are (Q xi)^T
    if direction == "sgd":
        z, mean_z = g, grad  # the sign of z does not change I
    else:
        z, mean_z = torch.where(g >= 0, 1.0, -1.0).to(_DTYPE), _sign_mean(Q, grad, nu)  # sign(0) = 1
    quadratic = ((z @ Q) * z).sum(-1)  # z^T Q z per sample
    denominator = quadratic.mean()
    numerator = (grad @ mean_z) ** 2
    value = numerator / (2.0 * denominator)
    relative_se = quadratic.std() / math.sqrt(num_samples) / denominator
    return ImprovementEstimate(float(value), float(value * relative_se))


def expected_improvements_at_points(
    Q: Tensor,
    displacements: Tensor,
    nu: float,
    num_samples: int = 1_000,
    generator: int | torch.Generator | None = None,
    return_bound: bool = False,
) -> tuple[Tensor, ...]:
    r"""``(I_SGD, I_SSD)`` at many points :math:`\theta = x^* + \delta` at once (Eq. (12), (13)).

    ``displacements`` is ``(M, d)``; the gradients are :math:`\nabla L = Q\delta`. ``I_SGD`` is
    the closed form of :func:`expected_improvement_sgd`; ``I_SSD`` has the exact numerator
    and a Monte-Carlo denominator :math:`E[s^TQs]` from ``num_samples`` gradients per point
    (vectorised over points and samples). Returns two ``(M,)`` tensors, and with
    ``return_bound`` a third: Eq. (13)'s lower bound on ``I_SSD``
    (:func:`expected_improvement_ssd_bound` at every point).
    """
    gen = _generator(generator)
    grads = displacements @ Q  # (M, d): rows (Q delta)^T, Q symmetric
    trace_q3 = torch.trace(Q @ Q @ Q)
    squared_norms = (grads * grads).sum(-1)
    i_sgd = squared_norms**2 / (2.0 * (((grads @ Q) * grads).sum(-1) + nu**2 * trace_q3))
    sigma = nu * torch.sqrt(torch.diagonal(Q @ Q))
    mean_sign = (2.0 * sign_success_probability(grads, sigma) - 1.0) * torch.sign(grads)
    numerator = (grads * mean_sign).sum(-1) ** 2
    xi = torch.randn(num_samples, *grads.shape, generator=gen, dtype=_DTYPE)
    signs = torch.where(grads + nu * xi @ Q >= 0, 1.0, -1.0).to(_DTYPE)  # (N, M, d); sign(0) = 1
    denominator = ((signs @ Q) * signs).sum(-1).mean(0)  # E[s^T Q s] per point
    i_ssd = numerator / (2.0 * denominator)
    if return_bound:
        return i_sgd, i_ssd, numerator * p_diag(Q) / (2.0 * torch.trace(Q))
    return i_sgd, i_ssd


def improvement_ratio_grid(
    eigenvalues: Tensor,
    omegas: Iterable[float],
    nus: Iterable[float],
    num_points: int = 64,
    num_samples: int = 256,
    seed: int = 0,
) -> dict[str, Tensor]:
    r""":math:`\mathcal I_{\text{SSD}}/\mathcal I_{\text{SGD}}` over rotation and noise (Section 2).

    One spectrum :math:`\lambda` and one Haar target rotation (from ``seed``); the
    orientation moves along :func:`rotation_path` (``omega = 0`` axis-aligned, ``1``
    random) and the noise level is :math:`\nu`. The improvement is local and depends on the
    point, so we average over ``num_points`` points :math:`\theta = x^* + \delta`,
    :math:`\delta \sim \mathcal N(0, I)` (the same points for every cell) and report the
    ratio of the averages, ``E_delta[I_SSD] / E_delta[I_SGD]`` (our choice; the paper
    discusses one point at a time).

    Returns a dict with ``omega`` (R,), ``nu`` (N,), ``p_diag`` (R,), ``ratio`` (R, N),
    its standard error ``ratio_se`` (R, N) (delta method over the points, which includes
    the inner Monte-Carlo error), and ``bound_ratio`` (R, N): the same ratio with Eq. (13)'s
    lower bound in place of ``I_SSD``.
    """
    lam = torch.as_tensor(eigenvalues, dtype=_DTYPE)
    d = lam.numel()
    gen = torch.Generator().manual_seed(seed)
    omega_t = torch.as_tensor(list(omegas), dtype=_DTYPE)
    nu_t = torch.as_tensor(list(nus), dtype=_DTYPE)
    rotations = rotation_path(d, omega_t, generator=gen)
    displacements = torch.randn(num_points, d, generator=gen, dtype=_DTYPE)
    shape = (len(omega_t), len(nu_t))
    ratio, ratio_se, bound_ratio = (torch.empty(shape, dtype=_DTYPE) for _ in range(3))
    pd = torch.empty(len(omega_t), dtype=_DTYPE)
    for i, rotation in enumerate(rotations):
        Q = rotated_quadratic(lam, rotation)
        pd[i] = p_diag(Q)
        for j, nu in enumerate(nu_t.tolist()):
            i_sgd, i_ssd, bounds = expected_improvements_at_points(
                Q, displacements, nu, num_samples, gen, return_bound=True)
            r = i_ssd.mean() / i_sgd.mean()
            # delta method for a ratio of means of paired samples
            residual = i_ssd - r * i_sgd
            ratio[i, j] = r
            ratio_se[i, j] = residual.std() / (math.sqrt(num_points) * i_sgd.mean())
            bound_ratio[i, j] = bounds.mean() / i_sgd.mean()
    return {"omega": omega_t, "nu": nu_t, "p_diag": pd, "ratio": ratio, "ratio_se": ratio_se,
            "bound_ratio": bound_ratio}


# ---------------------------------------------------------------------------------------
# Lemma 2 / App. B.6: Wilson et al.'s least-squares construction
# ---------------------------------------------------------------------------------------


def wilson_construction(
    n: int, p: float = 0.75, generator: int | torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    r"""Wilson et al. (2017, Sec. 3.3) binary least-squares data ``(X, y)``, ``d = 3 + 5n``.

    Labels :math:`y_i = +1` with probability ``p > 1/2``, else ``-1``. Features of example i:
    :math:`x_{i1} = y_i`; :math:`x_{i2} = x_{i3} = 1`; and in a block of 5 features of its
    own, starting at :math:`j = 4 + 5(i-1)` (1-based), the first one (``y_i = 1``) or all five
    (``y_i = -1``) are 1; everything else 0. (Transcribed from Wilson et al.; the paper only
    cites it.) If positives are the majority, :math:`X \operatorname{sign}(X^T y) = 4y`: the
    assumption of Lemma 2 with ``c = 4``. A draw with no positive majority is rejected with
    an error (that assumption would fail). The unused block columns of positive examples are
    all-zero; with ``sign(0) = 0`` they never move and do not break the proportionality.
    """
    if not 0.5 < p <= 1.0:
        raise ValueError(f"p must be in (1/2, 1] (positives must be the majority), got {p}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gen = _generator(generator)
    y = torch.where(torch.rand(n, generator=gen, dtype=_DTYPE) < p, 1.0, -1.0).to(_DTYPE)
    if y.sum() <= 0:
        raise ValueError(
            "this draw has no majority of positive labels, so Lemma 2's assumption fails; "
            "use another seed, a larger n or a larger p"
        )
    X = torch.zeros(n, 3 + 5 * n, dtype=_DTYPE)
    X[:, 0] = y
    X[:, 1:3] = 1.0
    for i in range(n):
        width = 1 if y[i] > 0 else 5
        X[i, 3 + 5 * i : 3 + 5 * i + width] = 1.0
    return X, y


def lemma2_constant(X: Tensor, y: Tensor, atol: float = 1e-12) -> float:
    r"""The ``c > 0`` with :math:`X \operatorname{sign}(X^T y) = c\,y` (Lemma 2's assumption).

    Raises ``ValueError`` if no such ``c`` exists.
    """
    u = torch.sign(X.T @ y)
    Xu = X @ u
    c = float((Xu @ y) / (y @ y))
    if c <= 0 or not torch.allclose(Xu, c * y, atol=atol, rtol=0.0):
        raise ValueError("X sign(X^T y) is not a positive multiple of y: Lemma 2 does not apply")
    return c


class LeastSquaresRun(NamedTuple):
    """Iterates ``(steps + 1, d)`` (theta_0 = 0 first) and losses ``(steps + 1,)``."""

    iterates: Tensor
    losses: Tensor


def run_least_squares(
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    X: Tensor,
    y: Tensor,
    steps: int,
) -> LeastSquaresRun:
    r"""Full-batch descent on :math:`R(\theta) = \frac12\|X\theta - y\|^2` from :math:`\theta_0 = 0`.

    The objective of Eq. (26) (Wilson et al.'s Eq. 3.2; the factor 1/2 only rescales the
    step size). ``make_optimizer`` receives the parameter list, e.g.
    ``lambda ps: msvag_mb.MSSD(ps, lr=1e-2)``. Gradients are exact (no mini-batches), as in
    Lemma 2.
    """
    theta = torch.zeros(X.shape[1], dtype=X.dtype, requires_grad=True)
    optimizer = make_optimizer([theta])
    iterates = [theta.detach().clone()]
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = 0.5 * (X @ theta - y).square().sum()
        loss.backward()
        losses.append(loss.detach())
        optimizer.step()
        iterates.append(theta.detach().clone())
    with torch.no_grad():
        losses.append(0.5 * (X @ theta - y).square().sum())
    return LeastSquaresRun(torch.stack(iterates), torch.stack(losses))


def cosine_to_sign_direction(iterates: Tensor, X: Tensor, y: Tensor) -> Tensor:
    r"""Cosine similarity of each iterate with :math:`\operatorname{sign}(X^T y)`.

    Lemma 2: 1 (up to round-off, and up to the sign of the scalar :math:`\lambda_t`) for
    every sign-descent iterate; ``nan`` for a zero iterate (theta_0).
    """
    u = torch.sign(X.T @ y).to(iterates.dtype)
    norms = iterates.norm(dim=-1) * u.norm()
    cos = (iterates @ u) / norms
    return torch.where(norms > 0, cos, torch.full_like(cos, float("nan")))


def wilson_test_accuracy(
    theta: Tensor, num_test: int, p: float = 0.75,
    generator: int | torch.Generator | None = None,
) -> float:
    r"""Accuracy of ``sign(x^T theta)`` on fresh examples of :func:`wilson_construction`.

    A fresh example's own 5-feature block is new (the weights there are 0), so only the
    shared features matter: the prediction is :math:`\operatorname{sign}(\theta_1 y +
    \theta_2 + \theta_3)`. A sign-descent solution :math:`\lambda\operatorname{sign}(X^Ty)
    = \lambda(1, 1, 1, \dots)` predicts +1 for everything (accuracy ~ ``p``), Wilson et
    al.'s point about adaptive methods. Ties (score 0) count as errors.
    """
    gen = _generator(generator)
    y = torch.where(torch.rand(num_test, generator=gen, dtype=_DTYPE) < p, 1.0, -1.0).to(_DTYPE)
    score = theta[0].to(_DTYPE) * y + theta[1].to(_DTYPE) + theta[2].to(_DTYPE)
    return float((torch.sign(score) == y).to(_DTYPE).mean())
