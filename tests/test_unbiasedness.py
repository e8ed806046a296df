"""Statistical checks (docs/maths.md, "What the tests check", unbiasedness):

(a) E[s_hat] = var[gbar] over batches drawn with replacement at fixed theta;
(b) E[(v - m^2) / (1 - rho(beta, t))] = sigma^2 for iid g_t, every t >= 1;
(c) E[r_t] = var[m_t] at fixed theta.

Each check compares a Monte-Carlo mean with the exact value, with a tolerance of Z
standard errors estimated from the same samples (fixed seeds), and a deliberately biased
variant must fail the very same check.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import msvag_mb
from msvag_mb.engines import ENGINES
from msvag_mb.estimators import Moments, MiniBatchVariance, MovingAverageVariance

Z = 4.0  # two-sided; with a handful of checks the chance of a false alarm is ~1e-4


def agrees(samples: torch.Tensor, exact: float) -> bool:
    """Is the sample mean within Z standard errors of ``exact``?"""
    standard_error = samples.std() / math.sqrt(samples.numel())
    return abs(float(samples.mean()) - exact) <= Z * float(standard_error)


@pytest.mark.parametrize("engine", sorted(
    n for n in ENGINES if ENGINES[n].units_are_examples and not ENGINES[n].needs_distributed))
def test_within_batch_estimate_is_unbiased(engine):
    """(a) with a real engine on a fixed population of 40 examples, batches of 4."""
    torch.manual_seed(0)
    population_x, population_y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    loss_fn = nn.CrossEntropyLoss()
    # exact per-example gradients of the population -> exact var[gbar] for draws with
    # replacement: population variance (1/N normalisation) / B
    per_example = []
    for n in range(40):
        model.zero_grad()
        loss_fn(model(population_x[n:n + 1]), population_y[n:n + 1]).backward()
        per_example.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    per_example = torch.stack(per_example)
    batch = 4
    exact_total = float(per_example.var(0, unbiased=False).sum()) / batch

    gv = msvag_mb.GradientVariance(model, loss_fn, engine=engine)
    generator = torch.Generator().manual_seed(1)
    totals = []
    for _ in range(1500):
        index = torch.randint(0, 40, (batch,), generator=generator)  # with replacement
        gv.zero_grad()
        gv.backward(population_x[index], population_y[index])
        totals.append(sum(float(p.grad_variance.sum()) for p in model.parameters()))
    totals = torch.tensor(totals)
    assert agrees(totals, exact_total)
    biased = totals * (batch - 1) / batch  # 1/B instead of 1/(B-1)
    assert not agrees(biased, exact_total)


def test_moving_average_estimate_is_unbiased_for_every_step():
    """(b) iid g_t ~ N(mu, sigma^2) in 200k independent coordinates (the replicates)."""
    torch.manual_seed(0)
    beta, mu, sigma = 0.9, 0.7, 1.3
    replicates = 200_000
    estimator = MovingAverageVariance()
    state = estimator.init_state(torch.zeros(replicates))
    exp_avg = torch.zeros(replicates)
    for t in range(25):
        g = mu + sigma * torch.randn(replicates)
        exp_avg.lerp_(g, 1 - beta)
        m = exp_avg / (1 - beta ** (t + 1))
        variance_of_g = estimator.update(state, Moments(g, m, m * m), None, t, beta, "gradient")
        if t == 0:
            continue  # s_0 = 0 by definition
        assert agrees(variance_of_g, sigma**2), f"t={t}"
        # without the Bessel-like correction 1/(1 - rho) the estimate is biased low
        uncorrected = variance_of_g * (1 - msvag_mb.rho(beta, t))
        assert not agrees(uncorrected, sigma**2), f"t={t}"


def test_minibatch_recursion_is_unbiased_for_the_variance_of_m():
    """(c) r_t against var[m_t] = rho(beta, t) sigma^2 / B, and against m_t's spread."""
    torch.manual_seed(0)
    beta, batch = 0.9, 5
    replicates = 100_000
    means = torch.linspace(-1.0, 1.0, replicates)
    sigma = 2.0
    estimator = MiniBatchVariance()
    state = estimator.init_state(means)
    exp_avg = torch.zeros(replicates)
    for t in range(20):
        # a batch of B iid per-example gradients per replicate (Gaussian noise, heavy mean)
        examples = means + sigma * torch.randn(batch, replicates)
        g = examples.mean(0)
        s_hat = examples.var(0) / batch
        exp_avg.lerp_(g, 1 - beta)
        m = exp_avg / (1 - beta ** (t + 1))
        r = estimator.update(state, Moments(g, m, m * m), s_hat, t, beta, "mean")
        exact = msvag_mb.rho(beta, t) * sigma**2 / batch
        assert agrees(r, exact), f"t={t}"
        # the empirical variance of m_t around its mean agrees too (sanity of 'exact')
        spread = (m - means) ** 2
        assert agrees(spread, exact), f"t={t}"
    # a deliberately biased recursion: r~ = beta r~ + (1 - beta) s_hat (linear weights)
    torch.manual_seed(0)
    wrong = torch.zeros(replicates)
    for t in range(20):
        examples = means + sigma * torch.randn(batch, replicates)
        s_hat = examples.var(0) / batch
        wrong.mul_(beta).add_(s_hat, alpha=1 - beta)
        r_wrong = wrong / (1 - beta ** (t + 1))
        if t >= 1:
            assert not agrees(r_wrong, msvag_mb.rho(beta, t) * sigma**2 / batch), f"t={t}"
