"""The default comparison (``msvag-train`` without arguments, or ``--compare``): the four
methods of Fig. 5's comparison with the problem's step sizes, then one figure."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from ..distributed import DistributedContext
from ..problems import get_problem
from .config import TrainConfig, paper_step_size
from .files import holds_run_of
from .loop import train
from .results import RunResult

#: (optimizer, variance) of the comparison: M-SGD, M-SVAG with both estimators, Adam
COMPARISON = [("msgd", None), ("msvag", "moving_average"), ("msvag", "minibatch"),
              ("adam", None)]


def comparison_configs(config: TrainConfig) -> list[TrainConfig]:
    """The methods of :data:`COMPARISON` with every other setting of ``config``: its step
    size if it has one (for every method), otherwise each method's paper step size."""
    problem = get_problem(config.problem)
    return [dataclasses.replace(config, optimizer=optimizer, variance=variance,
                                lr=config.lr if config.lr is not None
                                else paper_step_size(problem, optimizer))
            for optimizer, variance in COMPARISON]


def compare(config: TrainConfig, out: str | os.PathLike, *,
            data_dir: str | os.PathLike | None = None, download: bool = False,
            monitor: int | None = None, overwrite: bool = False,
            report: Callable[[str], None] | None = print, **train_kwargs) -> list[RunResult]:
    """Train every method of :data:`COMPARISON` on ``config``'s problem and seed (its
    optimizer and variance are replaced, every other setting is kept: see
    :func:`comparison_configs`). A run that exists already is continued (a finished one
    is reused); ``overwrite`` trains them again. ``monitor`` applies to the methods that
    adapt to the variance; ``report`` gets a heading line per method (rank 0);
    ``train_kwargs`` go to :func:`~msvag_mb.runner.train`."""
    ctx = train_kwargs.get("distributed") or DistributedContext()
    problem = get_problem(config.problem)
    data = problem.load_data(data_dir, download, synthetic=config.data == "synthetic",
                             seed=config.seed)
    methods = comparison_configs(config)
    results = []
    for number, method in enumerate(methods, 1):
        resolved = dataclasses.replace(method, world_size=ctx.world_size).resolved()
        if report is not None and ctx.is_main:
            report(f"== {number}/{len(methods)}: {resolved.display_name}, lr {resolved.lr:g}")
        results.append(train(method, out, data=data, data_dir=data_dir, download=download,
                             resume=not overwrite and holds_run_of(resolved, out),
                             overwrite=overwrite,
                             monitor=monitor if method.variance is not None else None,
                             report=report, **train_kwargs))
    return results


def plot_comparison(results: list[RunResult], out: str | os.PathLike) -> Path:
    """``<out>/<problem>/comparison.png`` of the comparison's runs (those runs only);
    returns its path."""
    from ..plotting import groups_of_runs, plot_groups

    problem, seed = results[0].config.problem, results[0].config.seed
    groups = groups_of_runs([(r.config, r.records) for r in results if r.records])
    return plot_groups(groups, Path(out) / problem / "comparison.png",
                       title=f"{problem}: seed {seed}")
