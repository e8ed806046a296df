"""The paper's side results, computed and plotted (Balles & Hennig, Dissecting Adam, 2018).

    python examples/paper_theory.py [--out paper_theory_figures/]
    python examples/paper_theory.py --quick    # fewer Monte-Carlo samples (seconds)

Writes four figures and prints a summary (under a minute on two CPU cores):

* ``fig3_sign_vs_variance_factor.png`` -- erf(1/(sqrt2 eta)) vs 1/sqrt(1+eta^2) (Fig. 3), with
  Monte-Carlo values of 2 rho - 1 on top.
* ``pdiag_random_rotations.png`` -- d * p_diag(Q) of randomly rotated Hessians vs d, against
  the paper's pi/2 ~ 1.57 (Section 2, App. B.2).
* ``sqp_ssd_vs_sgd.png`` -- expected improvement of sign descent over SGD on stochastic
  quadratic problems as the Hessian rotates away from the axes, for several noise levels.
* ``lemma2_wilson.png`` -- cosine of the iterates with sign(X^T y) on Wilson et al.'s
  construction (Lemma 2): M-SSD and Adam stay at 1, M-SVAG and M-SGD do not.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import msvag_mb  # noqa: E402
from msvag_mb import theory  # noqa: E402


def figure3(out: Path, quick: bool = False) -> str:
    eta = torch.logspace(-2, 2, 400, dtype=torch.float64)
    sign_factor, adam_factor = theory.sign_vs_variance_factor(eta)
    # Monte-Carlo 2 rho - 1 = E[sign(g)] sign(mu) for g ~ N(1, eta^2): checks Eq. (10).
    gen = torch.Generator().manual_seed(0)
    eta_mc = torch.logspace(-1, 1, 9, dtype=torch.float64)
    samples = 5_000 if quick else 20_000
    g = 1.0 + eta_mc * torch.randn(samples, len(eta_mc), generator=gen, dtype=torch.float64)
    mc = torch.sign(g).mean(0)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogx(eta, sign_factor, label=r"$\mathrm{erf}(1/(\sqrt{2}\eta))$ (optimal, sign)")
    ax.semilogx(eta, adam_factor, "--", label=r"$1/\sqrt{1+\eta^2}$ (Adam)")
    ax.semilogx(eta_mc, mc, "k.", label=r"Monte Carlo $2\rho-1$")
    ax.set_xlabel(r"relative noise $\eta = \sigma/|\mu|$")
    ax.set_ylabel("variance adaptation factor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig3_sign_vs_variance_factor.png", dpi=120)
    plt.close(fig)
    gap = (sign_factor - adam_factor).abs().max()
    return f"Fig. 3: max |erf(1/(sqrt2 eta)) - 1/sqrt(1+eta^2)| = {gap:.3f} over eta in [1e-2, 1e2]"


def pdiag_figure(out: Path, quick: bool = False) -> str:
    dims = [5, 10, 20, 50, 100]
    num = 20 if quick else 200
    rank_one, bound, spread = [], [], []
    for d in dims:
        U = theory.haar_orthogonal(d, num, generator=d)
        # rank-one Q = v v^T: p_diag = 1/||v||_1^2, exactly the bound of Eq. (35)
        rank_one.append(d * theory.p_diag(U[..., :1] @ U[..., :1].transpose(-2, -1)))
        lam = torch.logspace(0, 2, d, dtype=torch.float64)
        bound.append(d * theory.p_diag_lower_bound(lam.expand(num, d), U))
        spread.append(d * theory.p_diag(theory.rotated_quadratic(lam, U)))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for values, label in [(rank_one, "rank one"), (bound, "Eq. (35) bound, spectrum 1..100"),
                          (spread, "spectrum 1..100")]:
        means = torch.stack([v.mean() for v in values])
        ses = torch.stack([v.std() / math.sqrt(num) for v in values])
        ax.errorbar(dims, means, yerr=2 * ses, marker="o", capsize=2, label=label)
    ax.plot(dims, [d * theory.p_diag_random_rotation_mean(d) for d in dims], "k:",
            label=r"$\pi/2 - 0.45/d$")
    ax.axhline(math.pi / 2, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dimension d")
    ax.set_ylabel(r"$d \cdot p_{\mathrm{diag}}(Q)$, Haar-random rotation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pdiag_random_rotations.png", dpi=120)
    plt.close(fig)
    i = dims.index(100)
    return (f"p_diag, d=100, Haar rotation: d*p_diag = {rank_one[i].mean():.3f} (rank one), "
            f"{bound[i].mean():.3f} (Eq. 35 bound), {spread[i].mean():.2f} (actual, spectrum 1..100); "
            f"paper: ~1.57")


def sqp_figure(out: Path, quick: bool = False) -> str:
    d = 100
    spectra = {
        "ill-conditioned: two eigenvalues 10, rest 1": torch.cat(
            [torch.full((2,), 10.0), torch.ones(d - 2)]).double(),
        "well-conditioned: eigenvalues in [1, 2]": torch.linspace(1, 2, d, dtype=torch.float64),
    }
    omegas = [0.0, 0.05, 0.1, 0.2, 0.4, 1.0]
    nus = [0.0, 1.0, 3.0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    lines = []
    for ax, (title, lam) in zip(axes, spectra.items()):
        grid = theory.improvement_ratio_grid(lam, omegas, nus, num_points=16 if quick else 64,
                                             num_samples=32 if quick else 128)
        for j, nu in enumerate(nus):
            ax.errorbar(grid["p_diag"], grid["ratio"][:, j], yerr=2 * grid["ratio_se"][:, j],
                        marker="o", capsize=2, label=rf"$\nu={nu:g}$ (Monte Carlo)")
        ax.plot(grid["p_diag"], grid["bound_ratio"][:, 0], "k:", label=r"Eq. (13) bound, $\nu=0$")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(r"$p_{\mathrm{diag}}(Q)$ (1 = axis-aligned)")
        ax.set_title(title, fontsize=9)
        lines.append(f"  {title}: ratio axis-aligned {grid['ratio'][0].numpy().round(2)}, "
                     f"random rotation {grid['ratio'][-1].numpy().round(2)} (nu = {nus})")
    axes[0].set_ylabel(r"$E[\mathcal{I}_{SSD}] / E[\mathcal{I}_{SGD}]$")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sqp_ssd_vs_sgd.png", dpi=120)
    plt.close(fig)
    return "sQP, expected improvement of sign descent / SGD (d = 100):\n" + "\n".join(lines)


def lemma2_figure(out: Path, quick: bool = False) -> str:
    X, y = theory.wilson_construction(20, generator=0)
    c = theory.lemma2_constant(X, y)
    optimizers = {
        "M-SSD": lambda ps: msvag_mb.MSSD(ps, lr=0.01),
        "Adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
        "M-SVAG": lambda ps: msvag_mb.MSVAG(ps, lr=0.05),
        "M-SGD": lambda ps: msvag_mb.MSGD(ps, lr=0.05),
    }
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    lines = [f"Lemma 2 (Wilson et al. data, n=20, d={X.shape[1]}, X sign(X^T y) = {c:g} y):"]
    for name, make in optimizers.items():
        run = theory.run_least_squares(make, X, y, steps=100 if quick else 300)
        cos = theory.cosine_to_sign_direction(run.iterates, X, y)[1:]
        accuracy = theory.wilson_test_accuracy(run.iterates[-1], 10_000, generator=1)
        axes[0].plot(range(1, len(cos) + 1), cos, label=name)
        axes[1].semilogy(run.losses.clamp_min(1e-16), label=name)
        lines.append(f"  {name:7s} cos(theta_t, sign(X^T y)) in [{cos.min():.6f}, {cos.max():.6f}], "
                     f"final loss {run.losses[-1]:.2e}, test accuracy {accuracy:.3f}")
    axes[0].set_xlabel("step t")
    axes[0].set_ylabel(r"cos$(\theta_t, \mathrm{sign}(X^T y))$")
    axes[1].set_xlabel("step t")
    axes[1].set_ylabel("training loss")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lemma2_wilson.png", dpi=120)
    plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("paper_theory_figures"))
    parser.add_argument("--quick", action="store_true",
                        help="fewer Monte-Carlo samples and steps (seconds; rougher numbers)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for part in (figure3, pdiag_figure, sqp_figure, lemma2_figure):
        part_start = time.perf_counter()
        print(part(args.out, args.quick), f"[{time.perf_counter() - part_start:.1f} s]")
    print(f"figures in {args.out}/ ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
