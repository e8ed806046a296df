"""Fig. 5-style figures from run folders: train loss and test accuracy, mean ± std over seeds.

Runs are found by their ``config.json`` anywhere below a root folder and grouped by
configuration (all but the seed): problem, method (optimizer and variance estimator), step
size and any other setting in which runs of one method differ (beta, batch size, ..., named
in the legend). Unless all step sizes are asked for, each method shows the step size that
the paper's tuning criterion prefers (App. A.2): the highest test accuracy reached,
averaged over seeds.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .runner.config import TrainConfig
from .runner.files import load_run

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
    #: the settings that set this group apart from the method's other groups (``"beta 0.5"``)
    variant: str = ""

    @property
    def name(self) -> str:
        """Method name with the variant, if any: ``M-SVAG (moving avg.), beta 0.5``."""
        return f"{self.display_name}, {self.variant}" if self.variant else self.display_name

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


def _finished(config: TrainConfig, records: list[dict]) -> bool:
    return bool(records) and (records[-1]["step"] == config.steps
                              or bool(records[-1].get("diverged")))


def scan_runs(root: str | Path) -> list[tuple[TrainConfig, list[dict]]]:
    """Config and records of every run below ``root`` that has records."""
    runs = []
    for config_path in sorted(Path(root).rglob("config.json")):
        config, records = load_run(config_path.parent)
        if records:
            runs.append((config, records))
    return runs


def collect_groups(root: str | Path, include_unfinished: bool = True) -> list[RunGroup]:
    """Every run below ``root``, grouped by configuration (all but the seed).

    With ``include_unfinished=False``, runs still in progress (neither at their last step
    nor diverged) are left out, so they do not cut the mean ± std curves short.
    """
    return groups_of_runs([(config, records) for config, records in scan_runs(root)
                           if include_unfinished or _finished(config, records)])


def groups_of_runs(runs: Sequence[tuple[TrainConfig, list[dict]]]) -> list[RunGroup]:
    """Runs grouped by configuration (all but the seed); each group's :attr:`RunGroup.variant`
    names the settings in which the method's groups differ, other than the step size."""
    grouped: dict[tuple, list[list[dict]]] = defaultdict(list)
    configs: dict[tuple, TrainConfig] = {}
    for config, records in runs:
        settings = dataclasses.asdict(config)
        settings.pop("seed")
        key = tuple(sorted(settings.items(), key=lambda item: item[0]))
        grouped[key].append(records)
        configs.setdefault(key, config)
    by_method: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for config in configs.values():
        by_method[(config.problem, config.label)].append(dataclasses.asdict(config))
    groups = []
    for key, records in grouped.items():
        config = configs[key]
        siblings = by_method[(config.problem, config.label)]
        varying = [field for field in dataclasses.asdict(config)
                   if field not in ("lr", "seed") and len({repr(s[field]) for s in siblings}) > 1]
        variant = ", ".join(f"{field.replace('_', ' ')} {getattr(config, field)}"
                            for field in varying)
        groups.append(RunGroup(config.problem, config.label, config.display_name, config.lr,
                               records, variant))
    return groups


def best_step_sizes(groups: list[RunGroup]) -> list[RunGroup]:
    """Per (problem, method, variant), the group with the best :meth:`RunGroup.score`."""
    best: dict[tuple[str, str, str], RunGroup] = {}
    for group in groups:
        key = (group.problem, group.label, group.variant)
        score = group.score()
        current = best.get(key)
        if current is None or (not math.isnan(score) and not (current.score() >= score)):
            best[key] = group
    return list(best.values())


def _sort_key(group: RunGroup) -> tuple:
    rank = _ORDER.index(group.label) if group.label in _ORDER else len(_ORDER)
    return (group.problem, rank, group.variant, group.lr)


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
            f"| {group.problem} | {group.name} | {group.lr:g} | {len(group.runs)} | "
            f"{last} | {_mean_std(loss_mean, loss_std, len(group.runs))} | "
            f"{_mean_std(acc_mean, acc_std, len(group.runs))} | "
            f"{group.score():.4f} |"
        )
    return "\n".join(lines)


def plot_groups(groups: list[RunGroup], output: str | Path, title: str | None = None) -> Path:
    """Fig. 5 layout: one column per problem, rows train loss and test accuracy; each
    column's legend below its panels (never over a curve)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    problems = sorted({g.problem for g in groups})
    if not problems:
        raise ValueError("no runs to plot (no config.json with records below the folder)")
    fig, axes = plt.subplots(2, len(problems), figsize=(4.5 * len(problems), 6.5),
                             squeeze=False, sharex="col")
    for column, problem in enumerate(problems):
        members = sorted((g for g in groups if g.problem == problem), key=_sort_key)
        for row, key in enumerate(("train_loss", "test_accuracy")):
            _draw_panel(axes[row][column], members, key)
        axes[0][column].set_title(problem)
        handles, labels = axes[0][column].get_legend_handles_labels()
        axes[1][column].legend(handles, labels, fontsize=7, loc="upper center",
                               bbox_to_anchor=(0.5, -0.2), ncol=1 if len(labels) < 4 else 2,
                               frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120, bbox_inches="tight")  # "tight": the legends below included
    plt.close(fig)
    return output


def _draw_panel(ax, groups: list[RunGroup], key: str) -> None:
    """One panel: mean ± std of ``key`` per group. Test accuracy is zoomed past the first
    10% of steps, as Fig. 5; a curve that the zoom cuts is marked so at the axis."""
    lowest, smallest = math.inf, math.inf
    for group in groups:
        steps, mean, std = group.curve(key)
        if not len(steps):
            continue
        later = steps >= 0.1 * steps[-1]
        lowest = min(lowest, float((mean - std)[later].min()))
        smallest = min(smallest, float(mean.min()))
        colour = _COLOURS.get(group.label)
        ax.plot(steps, mean, color=colour, label=f"{group.name}, lr {group.lr:g}")
        ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.2)
    ax.grid(alpha=0.3)
    if key == "train_loss":
        ax.set_ylabel("train loss")
        ax.set_yscale("log")
        return
    ax.set_ylabel("test accuracy")
    ax.set_xlabel("step")
    if not math.isfinite(lowest):
        return
    bottom = max(0.0, lowest - 0.01)
    ax.set_ylim(bottom=bottom)
    if smallest < bottom:
        ax.annotate(f"axis cut at {bottom:.2f}: early values below (lowest {smallest:.2f})",
                    xy=(0.98, 0.02), xycoords="axes fraction", ha="right", fontsize=7,
                    color="0.3")


def plot_runs(root: str | Path, output: str | Path | None = None,
              all_step_sizes: bool = False,
              include_unfinished: bool = False) -> tuple[Path, str]:
    """Plot every finished run below ``root`` (``include_unfinished``: also runs in
    progress); returns the figure's path and the results table."""
    runs = scan_runs(root)
    groups = groups_of_runs([(config, records) for config, records in runs
                             if include_unfinished or _finished(config, records)])
    if not groups and runs:
        raise ValueError(f"no finished runs below {root} ({len(runs)} still in progress); "
                         "pass --include-unfinished to plot them")
    if not all_step_sizes:
        groups = best_step_sizes(groups)
    output = Path(output) if output is not None else Path(root) / "figure.png"
    path = plot_groups(groups, output)
    return path, results_table(groups)


def plot_path(root: str | Path, output: str | Path | None = None, *,
              all_step_sizes: bool = False, include_unfinished: bool = False,
              monitor: bool = True, report: Callable[[str], None] = print) -> None:
    """What ``msvag-plot ROOT`` draws: for a folder of runs, :func:`plot_runs` and (with
    ``monitor``) every run's monitoring log beside it; for one run's folder or one
    ``monitor.jsonl``, its monitoring figure (into ``output`` if given). ``report`` gets
    the table and the figures' paths; a ValueError says why nothing could be drawn."""
    given, root = root, Path(root)
    if root.is_file():  # one monitoring log
        plot_monitor_logs([root], output, report)
        return
    if not root.is_dir():
        raise ValueError(f"{given} is not a folder of runs nor a monitor.jsonl")
    logs = sorted(root.rglob("monitor.jsonl")) if monitor else []
    if (root / "metrics.jsonl").is_file():  # one run's folder: its monitoring log only
        if not logs:
            raise ValueError(f"{root} is one run without a monitor.jsonl; pass the folder "
                             "above it to plot the runs, or train with --monitor")
        plot_monitor_logs(logs, output, report)
        return
    path, table = plot_runs(root, output, all_step_sizes, include_unfinished)
    report(table)
    report(f"figure: {path}")
    plot_monitor_logs(logs, None, report)


def plot_monitor_logs(logs: Sequence[Path], output: str | Path | None = None,
                      report: Callable[[str], None] = print) -> None:
    """Draw each monitoring log beside it (``monitor.png``), or one log into ``output``."""
    from .monitoring import plot_monitoring

    for log in logs:
        target = output if output and len(logs) == 1 else log.with_suffix(".png")
        report(f"monitoring figure: {plot_monitoring(log, target)}")


__all__ = ["RunGroup", "TrainConfig", "best_step_sizes", "collect_groups", "groups_of_runs",
           "plot_groups", "plot_monitor_logs", "plot_path", "plot_runs", "results_table",
           "scan_runs"]
