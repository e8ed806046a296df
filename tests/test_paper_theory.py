"""The paper's side results (ALGORITHMS.md, "What the tests must show", point 4).

Fig. 3 (erf vs Adam factor), Section 2 / App. B.2 (p_diag, sign descent vs SGD on stochastic
quadratic problems) and Lemma 2 / App. B.6 (Wilson et al.'s construction) with the real
optimizers. Monte-Carlo tolerances are multiples of standard errors; seeds are fixed.
"""

from __future__ import annotations

import math

import pytest
import torch

import msvag_mb
from msvag_mb import theory

# ---------------------------------------------------------------------------------------
# Fig. 3 / Eq. (10)
# ---------------------------------------------------------------------------------------


def test_factors_at_known_values_against_math_erf():
    etas = [0.1, 0.5, 1.0, 2.0, 10.0]
    sign_factor, adam_factor = theory.sign_vs_variance_factor(torch.tensor(etas))
    for k, eta in enumerate(etas):
        assert sign_factor[k].item() == pytest.approx(math.erf(1 / (math.sqrt(2) * eta)), abs=1e-14)
        assert adam_factor[k].item() == pytest.approx(1 / math.sqrt(1 + eta**2), abs=1e-14)
    # eta = 1: erf(1/sqrt2) = 0.682689..., the one-sigma mass; 1/sqrt2 = 0.707106...
    assert sign_factor[2].item() == pytest.approx(0.6826894921370859, abs=1e-12)


def test_factors_are_one_at_zero_noise_and_decrease():
    sign_factor, adam_factor = theory.sign_vs_variance_factor(torch.tensor([0.0, 1e-9]))
    assert sign_factor.tolist() == [1.0, 1.0] and adam_factor.tolist() == [1.0, 1.0]
    eta = torch.logspace(-3, 3, 1000, dtype=torch.float64)
    sign_factor, adam_factor = theory.sign_vs_variance_factor(eta)
    # strictly decreasing where the values are not rounded to 1 yet
    assert torch.all(sign_factor.diff() <= 0) and torch.all(adam_factor.diff() < 0)
    assert torch.all(sign_factor[eta > 0.2].diff() < 0)  # erf(1/(sqrt2 0.2)) < 1 - 1e-6
    # "closely approximated" (Fig. 3): never more than 0.07 apart
    assert (sign_factor - adam_factor).abs().max() < 0.07
    # tails: erf(x) ~ 2x/sqrt(pi), so sqrt(2/pi)/eta vs 1/eta for large eta
    assert sign_factor[-1].item() * 1e3 == pytest.approx(math.sqrt(2 / math.pi), rel=1e-5)
    assert adam_factor[-1].item() * 1e3 == pytest.approx(1.0, rel=1e-5)


def test_sign_success_probability_matches_sampling():
    """2 rho - 1 = E[sign(g)] sign(mu) for g ~ N(mu, sigma^2), Eq. (10)."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, -2.0, 0.5, 3.0])
    sigma = torch.tensor([0.5, 2.0, 2.0, 30.0])
    n = 200_000
    g = mu + sigma * torch.randn(n, 4, generator=gen)
    hits = (torch.sign(g) == torch.sign(mu)).double()
    se = hits.std(0) / math.sqrt(n)
    rho = theory.sign_success_probability(mu, sigma)
    assert torch.all((hits.mean(0) - rho).abs() < 4 * se)
    assert theory.sign_success_probability(2.0, 0.0).item() == 1.0


# ---------------------------------------------------------------------------------------
# Section 2 / App. B.2: p_diag
# ---------------------------------------------------------------------------------------


def test_p_diag_extremes_and_bound():
    d = 6
    assert theory.p_diag(torch.diag(torch.arange(1.0, d + 1))).item() == 1.0
    ones = torch.full((d,), 1 / math.sqrt(d))
    # worst case 1/d: rank one along (1, ..., 1)/sqrt(d)
    assert theory.p_diag(torch.outer(ones, ones)).item() == pytest.approx(1 / d, rel=1e-12)
    U = theory.haar_orthogonal(d, 50, generator=3)
    lam = torch.logspace(-1, 2, d)
    Q = theory.rotated_quadratic(lam, U)
    bound = theory.p_diag_lower_bound(lam.expand(50, d), U)
    pd = theory.p_diag(Q)
    assert torch.all(pd >= bound - 1e-12) and torch.all(bound >= 1 / d - 1e-12)
    assert torch.all(pd <= 1.0)


@pytest.mark.parametrize("d", [50, 100])
def test_p_diag_random_rotation_is_157_over_d(d):
    """Average p_diag over Haar orientations ~ pi/(2d) ~ 1.57/d (Section 2, App. B.2)."""
    num = 300
    U = theory.haar_orthogonal(d, num, generator=d)
    assert (U.transpose(-2, -1) @ U - torch.eye(d)).abs().max() < 1e-12
    v = U[..., :1]
    scaled = d * theory.p_diag(v @ v.transpose(-2, -1))  # rank one: the bound is attained
    se = scaled.std() / math.sqrt(num)
    assert abs(scaled.mean() - d * theory.p_diag_random_rotation_mean(d)) < 4 * se
    # the paper's 1.57, allowing for its O(1/d) approximation error (0.45/d)
    assert abs(scaled.mean() - 1.57) < 4 * se + 0.5 / d
    # the Eq. (35) bound for a full, ill-conditioned spectrum has the same average
    lam = torch.logspace(0, 3, d)
    bound = d * theory.p_diag_lower_bound(lam.expand(num, d), U)
    assert abs(bound.mean() - math.pi / 2) < 4 * bound.std() / math.sqrt(num) + 1.0 / d


def test_haar_is_not_plain_qr():
    """Without the sign correction QR output has a positive diagonal of R: not Haar."""
    U = theory.haar_orthogonal(3, 4000, generator=0)
    # Haar: every entry has mean 0; plain QR of a Gaussian biases U[0, 0] to be positive
    se = U[:, 0, 0].std() / math.sqrt(4000)
    assert abs(U[:, 0, 0].mean()) < 4 * se


def test_rotation_path_endpoints():
    R = theory.rotation_path(8, [0.0, 0.5, 1.0], generator=5)
    U = theory.haar_orthogonal(8, generator=5)
    if torch.linalg.det(U) < 0:
        U[:, 0] = -U[:, 0]
    assert (R[0] - torch.eye(8)).abs().max() < 1e-12
    assert (R[2] - U).abs().max() < 1e-10
    assert (R[1] @ R[1] - U).abs().max() < 1e-10  # a geodesic: R(1/2)^2 = R(1)


# ---------------------------------------------------------------------------------------
# Section 2 / App. B.2: expected improvement of SGD vs sign descent
# ---------------------------------------------------------------------------------------


def _quadratic(d: int, seed: int, rotated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lam = torch.logspace(-1, 1, d)
    R = theory.haar_orthogonal(d, generator=seed) if rotated else torch.eye(d)
    Q = theory.rotated_quadratic(lam, R)
    delta = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1))
    return Q, Q @ delta


@pytest.mark.parametrize("nu", [0.0, 0.5, 2.0])
def test_sgd_improvement_closed_form_matches_monte_carlo(nu):
    Q, grad = _quadratic(20, 0, rotated=True)
    closed = theory.expected_improvement_sgd(Q, grad, nu)
    mc = theory.expected_improvement_monte_carlo(Q, grad, nu, "sgd", 50_000, generator=1)
    assert abs(mc.value - closed) < 4 * mc.standard_error + 1e-12


@pytest.mark.parametrize("nu", [0.0, 0.5, 2.0])
def test_ssd_improvement_bound(nu):
    """Eq. (13)'s I_SSD expression is exact for diagonal Q and a lower bound otherwise."""
    Q, grad = _quadratic(20, 0, rotated=False)
    mc = theory.expected_improvement_monte_carlo(Q, grad, nu, "ssd", 2_000, generator=1)
    # diagonal Q: s^T Q s = sum_i q_ii for every sample, so the "Monte Carlo" is exact
    assert mc.standard_error == 0.0
    assert mc.value == pytest.approx(theory.expected_improvement_ssd_bound(Q, grad, nu), rel=1e-12)
    Q, grad = _quadratic(20, 0, rotated=True)
    mc = theory.expected_improvement_monte_carlo(Q, grad, nu, "ssd", 20_000, generator=1)
    assert mc.value > theory.expected_improvement_ssd_bound(Q, grad, nu) + 4 * mc.standard_error


def test_isotropic_quadratic_ratio_is_about_two_over_pi():
    """Q = I, no noise: I_SSD/I_SGD = ||delta||_1^2/(d ||delta||^2); its ratio of means over
    delta ~ N(0, I) is (1 + (d-1) 2/pi)/d exactly, whatever the rotation (p_diag(I) = 1)."""
    d = 50
    grid = theory.improvement_ratio_grid(torch.ones(d), [0.0, 1.0], [0.0], num_points=1000,
                                         num_samples=2, seed=0)
    expected = (1 + (d - 1) * 2 / math.pi) / d
    assert torch.all((grid["ratio"][:, 0] - expected).abs() < 4 * grid["ratio_se"][:, 0])
    assert torch.allclose(grid["p_diag"], torch.ones(2))


@pytest.fixture(scope="module")
def ill_conditioned_grid():
    d = 100
    lam = torch.cat([torch.full((2,), 10.0), torch.ones(d - 2)])
    return theory.improvement_ratio_grid(lam, [0.0, 1.0], [0.0, 1.0], num_points=64,
                                         num_samples=128, seed=0)


def test_sign_beats_sgd_on_axis_aligned_ill_conditioned(ill_conditioned_grid):
    """Section 2: sign descent profits from ill-conditioned, axis-aligned (p_diag = 1)
    problems, with or without noise."""
    g = ill_conditioned_grid
    assert g["p_diag"][0].item() == pytest.approx(1.0, abs=1e-12)
    assert torch.all(g["ratio"][0] - 1.0 > 3 * g["ratio_se"][0])


def test_rotation_removes_the_sign_advantage(ill_conditioned_grid):
    """Section 2: a random orientation hurts sign descent. Noise-free, SGD is better; at
    every noise level the ratio drops by a clear margin. (p_diag ~ 0.12 here, not 1.57/d:
    the flat bulk of 98 unit eigenvalues is rotation invariant.)"""
    g = ill_conditioned_grid
    assert g["p_diag"][1] < 0.2
    assert 1.0 - g["ratio"][1, 0] > 3 * g["ratio_se"][1, 0]
    drop = g["ratio"][0] - g["ratio"][1]
    assert torch.all(drop > 3 * torch.hypot(g["ratio_se"][0], g["ratio_se"][1]))
    # Eq. (13)'s bound predicts the direction but is pessimistic: it lies below the truth
    assert torch.all(g["bound_ratio"][1] < g["ratio"][1])


def test_sgd_beats_sign_on_well_conditioned_even_axis_aligned():
    d = 100
    grid = theory.improvement_ratio_grid(torch.linspace(1, 2, d), [0.0], [0.0, 1.0],
                                         num_points=64, num_samples=64, seed=0)
    assert torch.all(1.0 - grid["ratio"][0] > 3 * grid["ratio_se"][0])


# ---------------------------------------------------------------------------------------
# Lemma 2 / App. B.6
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wilson_data():
    X, y = theory.wilson_construction(20, generator=0)
    return X.double(), y.double()


def test_wilson_construction_satisfies_lemma2_assumption(wilson_data):
    X, y = wilson_data
    assert X.shape == (20, 3 + 5 * 20)
    assert theory.lemma2_constant(X, y) == 4.0
    # one flipped label breaks the assumption, and lemma2_constant says so
    flipped = y.clone()
    flipped[1] = -flipped[1]
    with pytest.raises(ValueError, match="Lemma 2"):
        theory.lemma2_constant(X, flipped)


def _cosines(make, X, y, steps=200):
    run = theory.run_least_squares(make, X, y, steps)
    assert torch.isfinite(run.losses).all()
    return theory.cosine_to_sign_direction(run.iterates, X, y)[1:], run


def test_mssd_iterates_stay_proportional_to_sign_xty(wilson_data):
    X, y = wilson_data
    cos, run = _cosines(lambda ps: msvag_mb.MSSD(ps, lr=0.01), X, y)
    assert (cos - 1.0).abs().max() < 1e-6
    assert run.losses[-1] < 0.2 * run.losses[0]  # it does make progress
    # the generalisation failure of Wilson et al.: everything is predicted +1
    accuracy = theory.wilson_test_accuracy(run.iterates[-1], 10_000, generator=1)
    assert accuracy < 0.8


def test_msvag_iterates_are_not_proportional_to_sign_xty(wilson_data):
    X, y = wilson_data
    cos, run = _cosines(lambda ps: msvag_mb.MSVAG(ps, lr=0.05, variance="moving_average"), X, y)
    assert cos.max() < 0.9
    # the first step is a gradient step (s_0 = 0), so theta_1 is proportional to X^T y
    xty = X.T @ y
    first = run.iterates[1]
    assert torch.nn.functional.cosine_similarity(first, xty, dim=0) == pytest.approx(1.0, abs=1e-12)
    assert run.losses[-1] < 1e-6 * run.losses[0]
    assert theory.wilson_test_accuracy(run.iterates[-1], 10_000, generator=1) == 1.0
