"""Command-line entry points: ``msvag-train``, ``msvag-tune``, ``msvag-plot``.

``msvag-train`` with no arguments runs the built-in default: M-SVAG with both variance
estimators against M-SGD and Adam on the ``digits`` problem (about a minute on two CPU
cores), prints a table and writes ``runs/default/digits/comparison.png``.

Several processes: ``torchrun --nproc_per_node=2 -m msvag_mb.cli --problem ...`` (or
``torchrun --no-python --nproc_per_node=2 msvag-train ...``) trains data-parallel with the
same global batch; see ``docs/scaling_out.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import distributed
from .plotting import best_step_sizes, collect_groups, plot_groups, plot_runs, results_table
from .problems import PROBLEMS, DataNotFoundError, get_problem
from .training import (
    ENGINE_CHOICES,
    OPTIMIZERS,
    VARIANCES,
    RunResult,
    TrainConfig,
    summarize,
    train,
)

#: the no-argument run: the four methods of Fig. 5's comparison on the fast real problem
DEFAULT_PROBLEM = "digits"
DEFAULT_OUT = "runs/default"
COMPARISON = [("msgd", None), ("msvag", "moving_average"), ("msvag", "minibatch"),
              ("adam", None)]


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by msvag-train and msvag-tune."""
    parser.add_argument("--problem", default=DEFAULT_PROBLEM, choices=sorted(PROBLEMS),
                        help="test problem (default: %(default)s)")
    parser.add_argument("--optimizer", default="msvag", choices=sorted(OPTIMIZERS),
                        help="default: %(default)s")
    parser.add_argument("--variance", default="moving_average", choices=VARIANCES,
                        help="variance estimate of msvag/svag/adamstar: moving averages "
                             "(Alg. 1) or within the mini-batch (Alg. 5) (default: %(default)s)")
    parser.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                        help="per-example statistics engine for --variance minibatch; 'auto' "
                             "uses ghost batches for BatchNorm in train mode "
                             "(default: %(default)s)")
    parser.add_argument("--ghost-groups", type=int, default=None,
                        help="groups of the ghost-batch engine (default: the problem's, 8)")
    parser.add_argument("--beta", type=float, default=0.9, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the problem's (paper) batch size")
    parser.add_argument("--steps", type=int, default=None,
                        help="default: the problem's (paper) budget; step-size milestones scale")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="evaluate every N steps (default: the problem's)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="L2 factor on weights (default: the problem's)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the data files (default: search ~/data, ./data, "
                             "/usr/share/datasets, ../shared/data)")
    parser.add_argument("--download", action="store_true",
                        help="download missing data files from their official sources")
    parser.add_argument("--data", default="real", choices=("real", "synthetic"),
                        help="'synthetic': random tensors of the problem's shapes (smoke runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace, **overrides) -> TrainConfig:
    values = dict(
        problem=args.problem, optimizer=args.optimizer, variance=args.variance,
        engine=args.engine, lr=getattr(args, "lr", None), beta=args.beta,
        batch_size=args.batch_size, steps=args.steps, eval_every=args.eval_every,
        weight_decay=args.weight_decay, ghost_groups=args.ghost_groups,
        seed=getattr(args, "seed", 0), data=args.data,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _run(config: TrainConfig, args: argparse.Namespace, out: str, **kwargs) -> RunResult:
    return train(config, out, data_dir=args.data_dir, download=args.download,
                 device=args.device, progress=not args.no_progress,
                 distributed=args.distributed, **kwargs)


def _in_process_group(args: argparse.Namespace,
                      command: Callable[[argparse.Namespace], int]) -> int:
    """Run ``command(args)`` with ``args.threads`` applied and ``args.distributed`` set to
    torchrun's process group (a single-process context without torchrun), ended after."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.distributed = _init_distributed(args.device)
    except (RuntimeError, ValueError) as error:
        return _fail(str(error))
    try:
        return command(args)
    finally:
        distributed.cleanup(args.distributed)


def _init_distributed(device: str) -> distributed.DistributedContext:
    """torchrun's process group (a single-process context without torchrun)."""
    if device.startswith("cuda"):  # one GPU per process: cuda:LOCAL_RANK, NCCL
        return distributed.init_from_environment(backend="nccl" if device == "cuda" else None,
                                                 device=None if device == "cuda" else device)
    return distributed.init_from_environment(backend="gloo", device=device)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def train_main(argv: Sequence[str] | None = None) -> int:
    """``msvag-train``: train one run, or (no arguments / ``--compare``) the comparison."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="msvag-train",
        description="Train a test problem of Balles & Hennig (2018) with one optimizer. "
                    "Without arguments: M-SVAG (both variance estimators) vs M-SGD and Adam "
                    f"on '{DEFAULT_PROBLEM}', a table and a plot (about a minute).",
    )
    _add_run_arguments(parser)
    parser.add_argument("--lr", type=float, default=None,
                        help="step size (default: the paper's tuned value for the problem)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--out", default=None,
                        help="root folder of the runs (default: runs, or runs/default "
                             "for the comparison)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard an existing run with the same settings")
    parser.add_argument("--compare", action="store_true",
                        help="run M-SGD, M-SVAG (both estimators) and Adam with the problem's "
                             "step sizes, print a table and write a plot (the no-argument default)")
    # "--monitor-every": torchrun's own parser takes "--monitor" for its --monitor-interval
    parser.add_argument("--monitor", "--monitor-every", type=int, nargs="?", const=10,
                        default=None, metavar="N",
                        help="record what the variance adaptation sees every N steps (default "
                             "10) in the run's monitor.jsonl (and TensorBoard if installed); "
                             "msvag-plot draws it. For msvag, svag, adamstar. Under torchrun "
                             "write --monitor-every N")
    args = parser.parse_args(argv)
    args.compare = args.compare or not argv
    return _in_process_group(args, _train)


def _train(args: argparse.Namespace) -> int:
    try:
        if args.compare:
            return _compare(args)
        config = _config(args)
        result = _run(config, args, args.out or "runs", resume=args.resume,
                      overwrite=args.overwrite, monitor=args.monitor)
    except (DataNotFoundError, FileExistsError, ValueError) as error:
        return _fail(str(error))
    if not args.distributed.is_main:
        return 1 if result.diverged else 0
    print(summarize([result]))
    print(f"records: {result.run_dir / 'metrics.jsonl'}")
    if args.monitor is not None:
        print(f"monitoring: {result.run_dir / 'monitor.jsonl'} (msvag-plot {result.run_dir})")
    return 1 if result.diverged else 0


def _compare(args: argparse.Namespace) -> int:
    out = args.out or DEFAULT_OUT
    problem = get_problem(args.problem)
    data = problem.load_data(args.data_dir, args.download, synthetic=args.data == "synthetic",
                             seed=args.seed)
    results = []
    started = time.perf_counter()
    for optimizer, variance in COMPARISON:
        config = _config(args, optimizer=optimizer, variance=variance,
                         lr=problem.lrs.get(optimizer))
        monitor = args.monitor if variance is not None else None
        results.append(_run(config, args, out, data=data, overwrite=True, monitor=monitor))
    if not args.distributed.is_main:
        return 0
    print(summarize(results))
    groups = [g for g in collect_groups(Path(out) / args.problem)
              if (g.label, g.lr) in {(r.config.label, r.config.lr) for r in results}]
    figure = plot_groups(groups, Path(out) / args.problem / "comparison.png",
                         title=f"{args.problem}: seed {args.seed}")
    print(f"figure: {figure}  ({time.perf_counter() - started:.0f} s)")
    return 0


def step_size_grid(lr_max: float, points: int) -> list[float]:
    """App. A.2's grid ``6·10^m, 3·10^m, 1·10^m`` downwards from ``lr_max`` (on the grid)."""
    exponent = math.floor(math.log10(lr_max) + 1e-9)
    mantissa = lr_max / 10 ** exponent
    matches = [m for m in (6, 3, 1) if math.isclose(mantissa, m, rel_tol=1e-6)]
    if not matches:
        raise ValueError(f"--lr-max {lr_max:g} is not on the grid 6·10^m, 3·10^m, 1·10^m "
                         "(e.g. 0.6, 0.3, 0.1)")
    grid, index = [], (6, 3, 1).index(matches[0])
    while len(grid) < points:
        grid.append(float(f"{(6, 3, 1)[index] * 10.0 ** exponent:.6g}"))
        index += 1
        if index == 3:
            index, exponent = 0, exponent - 1
    return grid


def default_lr_max(problem: str, optimizer: str) -> float:
    """The grid value at or just above 10x the paper's step size (1.0 if none is known)."""
    reference = get_problem(problem).lrs.get(
        {"svag": "msvag", "adamstar": "adam"}.get(optimizer, optimizer))
    if reference is None:
        return 1.0
    target = 10 * reference
    exponent = math.floor(math.log10(target)) - 1
    while True:
        for m in (1, 3, 6):
            value = m * 10.0 ** exponent
            if value >= target * (1 - 1e-6):
                return float(f"{value:.6g}")
        exponent += 1


def tune_main(argv: Sequence[str] | None = None) -> int:
    """``msvag-tune``: the step-size grid of App. A.2, then the winner over 10 seeds."""
    parser = argparse.ArgumentParser(
        prog="msvag-tune",
        description="Step-size tuning as the paper's App. A.2: seed 0 on the grid "
                    "6·10^m, 3·10^m, 1·10^m downwards from --lr-max (diverging sizes are "
                    "skipped), pick the size with the highest test accuracy reached, then "
                    "run it with --seeds seeds.",
    )
    _add_run_arguments(parser)
    parser.add_argument("--lr-max", type=float, default=None,
                        help="largest grid value (default: about 10x the paper's step size)")
    parser.add_argument("--grid-points", type=int, default=5, help="default: %(default)s")
    parser.add_argument("--seeds", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--out", default="runs/tune", help="default: %(default)s")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return _in_process_group(args, _tune)  # under torchrun every run is data-parallel


def _tune(args: argparse.Namespace) -> int:
    is_main = args.distributed.is_main
    try:
        grid = step_size_grid(args.lr_max or default_lr_max(args.problem, args.optimizer),
                              args.grid_points)
        problem = get_problem(args.problem)
        data = problem.load_data(args.data_dir, args.download,
                                 synthetic=args.data == "synthetic", seed=0)
        grid_results = []
        for lr in grid:
            # resume=True: a rerun of msvag-tune reuses finished grid points
            result = _run(_config(args, lr=lr, seed=0), args, args.out, data=data, resume=True)
            grid_results.append(result)
            if not is_main:  # only rank 0 evaluates: it alone knows the scores
                continue
            print(f"lr {lr:g}: " + ("diverged" if result.diverged else
                                    f"best test accuracy {result.best_test_accuracy:.4f}"))
        stable = [r for r in grid_results if not r.diverged]  # the same on every rank
        if not stable:
            return _fail(f"every step size of the grid {grid} diverged; lower --lr-max")
        winner = max(stable, key=lambda r: r.best_test_accuracy)
        if args.distributed.is_distributed:  # rank 0's choice: the others have no scores
            choice = [grid_results.index(winner)]
            torch.distributed.broadcast_object_list(choice, src=0)
            winner = grid_results[choice[0]]
        seeds = [winner] + [
            _run(_config(args, lr=winner.config.lr, seed=seed), args, args.out, data=data,
                 resume=True)
            for seed in range(1, args.seeds)
        ]
    except (DataNotFoundError, FileExistsError, ValueError) as error:
        return _fail(str(error))
    if not is_main:
        return 0
    print(summarize(grid_results + seeds[1:]))
    summary = {
        "problem": args.problem, "method": winner.config.label, "grid": grid,
        "grid_best_test_accuracy": {f"{r.config.lr:g}": (None if r.diverged else
                                                         r.best_test_accuracy)
                                    for r in grid_results},
        "winner_lr": winner.config.lr, "seeds": args.seeds,
    }
    path = Path(args.out) / args.problem / f"tune_{winner.config.label}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"winner: lr {winner.config.lr:g}; summary {path}")
    return 0


def plot_main(argv: Sequence[str] | None = None) -> int:
    """``msvag-plot``: Fig. 5-style figure and table of every run below a folder."""
    parser = argparse.ArgumentParser(
        prog="msvag-plot",
        description="Train loss and test accuracy (mean ± std over seeds) of every finished "
                    "run below ROOT; per method the step size with the best mean test "
                    "accuracy reached.",
    )
    parser.add_argument("root", nargs="?", default="runs", help="default: %(default)s")
    parser.add_argument("--output", default=None, help="figure file (default: ROOT/figure.png)")
    parser.add_argument("--all-step-sizes", action="store_true",
                        help="plot every step size, not only each method's best")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="also plot runs still in progress (cut curves at their last step)")
    parser.add_argument("--no-monitor", action="store_true",
                        help="do not draw the monitoring logs (monitor.jsonl) of the runs")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.root)
    if root.is_file():  # one monitoring log
        return _plot_monitor_logs([root], args.output)
    if not root.is_dir():
        return _fail(f"{args.root} is not a folder of runs nor a monitor.jsonl")
    logs = [] if args.no_monitor else sorted(root.rglob("monitor.jsonl"))
    if (root / "metrics.jsonl").is_file():  # one run's folder: its monitoring log only
        if not logs:
            return _fail(f"{root} is one run without a monitor.jsonl; pass the folder above "
                         "it to plot the runs, or train with --monitor")
        return _plot_monitor_logs(logs, args.output)
    try:
        path, table = plot_runs(args.root, args.output, args.all_step_sizes,
                                args.include_unfinished)
    except ValueError as error:
        return _fail(str(error))
    print(table)
    print(f"figure: {path}")
    return _plot_monitor_logs(logs, None)


def _plot_monitor_logs(logs: Sequence[Path], output: str | None) -> int:
    """Draw each monitoring log beside it (``monitor.png``), or one log into ``output``."""
    from .monitoring import plot_monitoring

    for log in logs:
        target = output if output and len(logs) == 1 else log.with_suffix(".png")
        try:
            print(f"monitoring figure: {plot_monitoring(log, target)}")
        except ValueError as error:
            return _fail(str(error))
    return 0


__all__ = ["best_step_sizes", "default_lr_max", "plot_main", "results_table",
           "step_size_grid", "train_main", "tune_main"]


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m msvag_mb.cli [msvag-train options]
    sys.exit(train_main())
