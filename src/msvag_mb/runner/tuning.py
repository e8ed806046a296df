"""Step-size tuning as the paper's App. A.2 (``msvag-tune``).

Seed 0 on the grid ``6·10^m, 3·10^m, 1·10^m`` downwards from ``lr_max`` (:func:`step_size_grid`;
by default about 10x the paper's step size, :func:`default_lr_max`); diverging sizes are
skipped; the winner is the size with the highest test accuracy reached (:func:`choose_winner`),
which then runs with the other seeds. Every run resumes when it exists already, so a rerun
reuses finished grid points (``overwrite=True`` trains them again); a winner at either end
of the grid is reported as such (:func:`edge_warning`). :func:`write_summary` writes
``tune_<label>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..distributed import DistributedContext
from ..problems import get_problem
from . import collectives
from .config import TrainConfig, paper_step_size
from .files import holds_run_of
from .loop import train
from .results import RunResult

_MANTISSAS = (6, 3, 1)


def step_size_grid(lr_max: float, points: int) -> list[float]:
    """App. A.2's grid ``6·10^m, 3·10^m, 1·10^m`` downwards from ``lr_max`` (on the grid)."""
    exponent = math.floor(math.log10(lr_max) + 1e-9)
    mantissa = lr_max / 10 ** exponent
    matches = [m for m in _MANTISSAS if math.isclose(mantissa, m, rel_tol=1e-6)]
    if not matches:
        raise ValueError(f"--lr-max {lr_max:g} is not on the grid 6·10^m, 3·10^m, 1·10^m "
                         "(e.g. 0.6, 0.3, 0.1)")
    grid, index = [], _MANTISSAS.index(matches[0])
    while len(grid) < points:
        grid.append(float(f"{_MANTISSAS[index] * 10.0 ** exponent:.6g}"))
        index += 1
        if index == 3:
            index, exponent = 0, exponent - 1
    return grid


def default_lr_max(problem: str, optimizer: str) -> float:
    """The grid value at or just above 10x the paper's step size (1.0 if none is known)."""
    reference = paper_step_size(get_problem(problem), optimizer)
    if reference is None:
        return 1.0
    target = 10 * reference
    exponent = math.floor(math.log10(target)) - 1
    while True:
        for m in reversed(_MANTISSAS):
            value = m * 10.0 ** exponent
            if value >= target * (1 - 1e-6):
                return float(f"{value:.6g}")
        exponent += 1


@dataclass
class Tuning:
    """What :func:`tune` returns."""

    grid: list[float]
    #: seed 0 at every grid point
    grid_results: list[RunResult]
    winner: RunResult
    #: the winner's step size with every seed (the winner itself first)
    seed_results: list[RunResult]
    #: how many seeds were asked for
    seeds: int

    def summary(self) -> dict:
        """The contents of ``tune_<label>.json``."""
        return {
            "problem": self.winner.config.problem, "method": self.winner.config.label,
            "grid": self.grid,
            "grid_best_test_accuracy": {f"{r.config.lr:g}": (None if r.diverged else
                                                             r.best_test_accuracy)
                                        for r in self.grid_results},
            "winner_lr": self.winner.config.lr, "seeds": self.seeds,
            "warning": edge_warning(self.grid, self.winner.config.lr),
        }


def edge_warning(grid: list[float], winner: float) -> str | None:
    """A warning when the winner is the grid's largest or smallest step size (a better
    one may lie beyond the grid), else ``None``."""
    if len(grid) < 2:
        return None
    if winner == grid[0]:
        return (f"the winner, lr {winner:g}, is the largest step size of the grid: a larger "
                "one may be better; raise --lr-max")
    if winner == grid[-1]:
        return (f"the winner, lr {winner:g}, is the smallest step size of the grid: a "
                "smaller one may be better; pass more --grid-points")
    return None


def choose_winner(grid_results: list[RunResult], ctx: DistributedContext) -> RunResult:
    """The grid point with the highest test accuracy reached, diverged points left out
    (rank 0's choice on every rank: the others have no scores)."""
    stable = [r for r in grid_results if not r.diverged]  # the same on every rank
    if not stable:
        grid = [r.config.lr for r in grid_results]
        raise ValueError(f"every step size of the grid {grid} diverged; lower --lr-max")
    winner = max(stable, key=lambda r: r.best_test_accuracy)
    return grid_results[collectives.from_main(grid_results.index(winner), ctx)]


def tune(config: TrainConfig, out: str | os.PathLike, *, lr_max: float | None = None,
         grid_points: int = 5, seeds: int = 10, data_dir: str | os.PathLike | None = None,
         download: bool = False, report: Callable[[str], None] = print,
         overwrite: bool = False, **train_kwargs) -> Tuning:
    """The grid with seed 0, then the winner with ``seeds`` seeds; ``config``'s ``lr`` and
    ``seed`` are replaced. Existing runs are continued (finished ones reused) unless
    ``overwrite``. ``report`` gets a line per grid point and a warning when the winner
    lies at an end of the grid (rank 0 only);
    ``report`` also gets the runs' lines; ``train_kwargs`` go to
    :func:`~msvag_mb.runner.train` (``device``, ``progress``, ``distributed``). Under
    torchrun every run is data-parallel."""
    ctx = train_kwargs.get("distributed") or DistributedContext()
    grid = step_size_grid(lr_max or default_lr_max(config.problem, config.optimizer),
                          grid_points)
    data = get_problem(config.problem).load_data(
        data_dir, download, synthetic=config.data == "synthetic", seed=0)

    def run(lr: float, seed: int) -> RunResult:
        point = dataclasses.replace(config, lr=lr, seed=seed)
        # a rerun of msvag-tune continues (or reuses) the runs it finds
        exists = holds_run_of(dataclasses.replace(point, world_size=ctx.world_size).resolved(),
                              out)
        return train(point, out, data=data, data_dir=data_dir, download=download,
                     resume=exists and not overwrite, overwrite=overwrite, report=report,
                     **train_kwargs)

    grid_results = []
    for lr in grid:
        grid_results.append(run(lr, 0))
        if ctx.is_main:  # only rank 0 evaluates: it alone knows the scores
            result = grid_results[-1]
            report(f"lr {lr:g}: " + ("diverged" if result.diverged else
                                     f"best test accuracy {result.best_test_accuracy:.4f}"))
    winner = choose_winner(grid_results, ctx)
    warning = edge_warning(grid, winner.config.lr)
    if warning and ctx.is_main:
        report(f"warning: {warning}")
    seed_results = [winner] + [run(winner.config.lr, seed) for seed in range(1, seeds)]
    return Tuning(grid, grid_results, winner, seed_results, seeds)


def write_summary(tuning: Tuning, out: str | os.PathLike) -> Path:
    """Write ``<out>/<problem>/tune_<label>.json``; returns its path."""
    winner = tuning.winner.config
    path = Path(out) / winner.problem / f"tune_{winner.label}.json"
    path.write_text(json.dumps(tuning.summary(), indent=2) + "\n")
    return path
