"""Fig. 5-style figures from run folders: train loss and test accuracy, mean ± std over seeds.

Runs are found by their ``config.json`` anywhere below a root folder and grouped by
problem, method (optimizer and variance estimator) and step size. Unless all step sizes
are asked for, each method shows the step size that the paper's tuning criterion prefers
(App. A.2): the highest test accuracy reached, averaged over seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .training import TrainConfig, load_run

#: fixed colours so a method looks the same in every panel (the paper's 2x2 pairs share hue)
_COLOURS = {"msgd": "tab:blue", "msvag-ma": "tab:cyan", "msvag-mb": "tab:purple",
            "mssd": "tab:red", "adam": "tab:orange", "adamstar-ma": "tab:brown",
            "adamstar-mb": "tab:pink", "svag-ma": "tab:olive", "svag-mb": "tab:green"}
_ORDER = ["msgd", "msvag-ma", "msvag-mb", "mssd", "adam", "adamstar-ma", "adamstar-mb",
          "svag-ma", "svag-mb"]


@dataclass
class RunGroup:
    """The seeds of one (problem, method, step size)."""

    problem: str
    label: str
    display_name: str
    lr: float
    runs: list[list[dict]]  # one record list per seed

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps, mean and std over seeds of ``key`` at the steps every seed recorded."""
        by_seed = [{r["step"]: r.get(key) for r in records if r.get(key) is not None}
                   for records in self.runs]
        common = sorted(set.intersection(*(set(d) for d in by_seed))) if by_seed else []
        values = np.array([[d[s] for s in common] for d in by_seed], dtype=float)
        if not common:
            return np.array([]), np.array([]), np.array([])
        std = values.std(0, ddof=1) if len(by_seed) > 1 else np.zeros(len(common))
        return np.array(common), values.mean(0), std

    def score(self) -> float:
        """Tuning criterion: best test accuracy reached, mean over seeds (NaN if diverged)."""
        best = []
        for records in self.runs:
            accuracies = [r["test_accuracy"] for r in records if r.get("test_accuracy") is not None]
            if not accuracies or any(r.get("diverged") for r in records):
                return float("nan")
            best.append(max(accuracies))
        return float(np.mean(best))

    def final(self, key: str) -> tuple[float, float]:
        """Mean and std over seeds of ``key`` at the last common step."""
        _, mean, std = self.curve(key)
        return (float(mean[-1]), float(std[-1])) if len(mean) else (math.nan, math.nan)


def collect_groups(root: str | Path, include_unfinished: bool = True) -> list[RunGroup]:
    """Every run below ``root``, grouped by problem, method and step size.

    With ``include_unfinished=False``, runs still in progress (neither at their last step
    nor diverged) are left out, so they do not cut the mean ± std curves short.
    """
    grouped: dict[tuple[str, str, float], list[list[dict]]] = defaultdict(list)
    names: dict[tuple[str, str, float], str] = {}
    for config_path in sorted(Path(root).rglob("config.json")):
        config, records = load_run(config_path.parent)
        if not records:
            continue
        finished = records[-1]["step"] == config.steps or records[-1].get("diverged")
        if not include_unfinished and not finished:
            continue
        key = (config.problem, config.label, config.lr)
        grouped[key].append(records)
        names[key] = config.display_name
    return [RunGroup(p, label, names[(p, label, lr)], lr, runs)
            for (p, label, lr), runs in grouped.items()]


def best_step_sizes(groups: list[RunGroup]) -> list[RunGroup]:
    """Per (problem, method), the group with the best :meth:`RunGroup.score`."""
    best: dict[tuple[str, str], RunGroup] = {}
    for group in groups:
        key = (group.problem, group.label)
        score = group.score()
        current = best.get(key)
        if current is None or (not math.isnan(score) and not (current.score() >= score)):
            best[key] = group
    return list(best.values())


def _sort_key(group: RunGroup) -> tuple:
    rank = _ORDER.index(group.label) if group.label in _ORDER else len(_ORDER)
    return (group.problem, rank, group.lr)


def _mean_std(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4f}" if seeds == 1 else f"{mean:.4f} ± {std:.4f}"


def results_table(groups: list[RunGroup]) -> str:
    """Final train loss and test accuracy (mean ± std over seeds) per group, as Markdown."""
    lines = ["| problem | method | step size | seeds | step | final train loss "
             "| final test accuracy | best test accuracy |", "|---|---|---|---|---|---|---|---|"]
    for group in sorted(groups, key=_sort_key):
        loss_mean, loss_std = group.final("train_loss")
        acc_mean, acc_std = group.final("test_accuracy")
        steps, _, _ = group.curve("test_accuracy")
        last = int(steps[-1]) if len(steps) else "-"
        lines.append(
            f"| {group.problem} | {group.display_name} | {group.lr:g} | {len(group.runs)} | "
            f"{last} | {_mean_std(loss_mean, loss_std, len(group.runs))} | "
            f"{_mean_std(acc_mean, acc_std, len(group.runs))} | "
            f"{group.score():.4f} |"
        )
    return "\n".join(lines)


def plot_groups(groups: list[RunGroup], output: str | Path, title: str | None = None) -> Path:
    """Fig. 5 layout: one column per problem, rows train loss and test accuracy."""
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    problems = sorted({g.problem for g in groups})
    if not problems:
        raise ValueError("no runs to plot (no config.json with records below the folder)")
    fig, axes = plt.subplots(2, len(problems), figsize=(4.5 * len(problems), 6.5),
                             squeeze=False, sharex="col")
    for column, problem in enumerate(problems):
        for row, (key, ylabel) in enumerate([("train_loss", "train loss"),
                                             ("test_accuracy", "test accuracy")]):
            ax = axes[row][column]
            lowest = math.inf
            for group in sorted((g for g in groups if g.problem == problem), key=_sort_key):
                steps, mean, std = group.curve(key)
                if not len(steps):
                    continue
                later = steps >= 0.1 * steps[-1]
                lowest = min(lowest, float((mean - std)[later].min()))
                colour = _COLOURS.get(group.label)
                label = f"{group.display_name}, lr {group.lr:g}"
                ax.plot(steps, mean, color=colour, label=label)
                ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.2)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(problem)
                ax.set_yscale("log")
            else:
                ax.set_xlabel("step")
                if math.isfinite(lowest):  # zoom past the first 10% of steps, as Fig. 5
                    ax.set_ylim(bottom=max(0.0, lowest - 0.01))
        axes[0][column].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def plot_runs(root: str | Path, output: str | Path | None = None,
              all_step_sizes: bool = False,
              include_unfinished: bool = False) -> tuple[Path, str]:
    """Plot every finished run below ``root`` (``include_unfinished``: also runs in
    progress); returns the figure's path and the results table."""
    groups = collect_groups(root, include_unfinished)
    if not all_step_sizes:
        groups = best_step_sizes(groups)
    output = Path(output) if output is not None else Path(root) / "figure.png"
    path = plot_groups(groups, output)
    return path, results_table(groups)


__all__ = ["RunGroup", "TrainConfig", "best_step_sizes", "collect_groups", "plot_groups",
           "plot_runs", "results_table"]
