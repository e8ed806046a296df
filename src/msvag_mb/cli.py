"""Command-line entry points: ``msvag-train``, ``msvag-tune``, ``msvag-reproduce``, ``msvag-plot``.

Argument parsing only: each command turns its options into a call of :mod:`msvag_mb.runner`
(or :mod:`msvag_mb.plotting`), prints what it returns and exits with a status.

``msvag-train`` with no arguments runs the built-in default: M-SVAG with both variance
estimators against M-SGD and Adam on the ``digits`` problem (about a minute on two CPU
cores), prints a table and writes ``runs/default/digits/comparison.png``.

Several processes: ``torchrun --nproc_per_node=2 -m msvag_mb.cli --problem ...`` (or
``torchrun --no-python --nproc_per_node=2 msvag-train ...``) trains data-parallel with the
same global batch; see ``docs/scaling_out.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import select
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import distributed
from .plotting import best_step_sizes, plot_path, results_table
from .problems import PROBLEMS, DataNotFoundError
from .runner import (
    OPTIMIZERS,
    STEP_PATHS,
    VARIANCES,
    RunFileError,
    RunInterrupted,
    TrainConfig,
    compare,
    default_lr_max,
    differing_records,
    engine_choices,
    load_run,
    plot_comparison,
    step_size_grid,
    summarize,
    train,
    tune,
    write_summary,
)
from .runner.collectives import process_group_for
from .runner.comparison import comparison_configs

#: the no-argument run: the comparison on the fast real problem
DEFAULT_PROBLEM = "digits"
DEFAULT_OUT = "runs/default"
_REFUSALS = (DataNotFoundError, FileExistsError, ValueError, RunFileError)
#: the defaults of the options that --compare refuses (None in the parser: "not given")
_METHOD_DEFAULTS = {"optimizer": "msvag", "variance": "moving_average"}


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of both msvag-train and msvag-tune."""
    parser.add_argument("--problem", default=DEFAULT_PROBLEM, choices=sorted(PROBLEMS),
                        help="test problem (default: %(default)s)")
    parser.add_argument("--optimizer", default=None, choices=sorted(OPTIMIZERS),
                        help=f"default: {_METHOD_DEFAULTS['optimizer']}")
    parser.add_argument("--variance", default=None, choices=VARIANCES,
                        help="variance estimate of msvag/svag/adamstar: moving averages "
                             "(Alg. 1) or within the mini-batch (Alg. 5) (default: "
                             f"{_METHOD_DEFAULTS['variance']})")
    parser.add_argument("--engine", default="auto", choices=engine_choices(),
                        help="per-example statistics engine for --variance minibatch; 'auto' "
                             "uses ghost batches for BatchNorm in train mode "
                             "(default: %(default)s)")
    parser.add_argument("--step-path", default=None, choices=tuple(STEP_PATHS),
                        help="pin the optimizer's step implementation (recorded in the "
                             "run's config; the paths agree to rounding, not bitwise) "
                             "(default: the library's choice)")
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
                        help="folder with the data files (default: search the folders of "
                             "$MSVAG_DATA_DIR, then ~/data, ./data, /usr/share/datasets)")
    parser.add_argument("--download", action="store_true",
                        help="download missing data files from their official sources")
    parser.add_argument("--data", default="real", choices=("real", "synthetic"),
                        help="'synthetic': random tensors of the problem's shapes (smoke runs)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (a line per evaluation is still printed)")


def _config(args: argparse.Namespace, **overrides) -> TrainConfig:
    values = dict(
        problem=args.problem, optimizer=args.optimizer or _METHOD_DEFAULTS["optimizer"],
        variance=args.variance or _METHOD_DEFAULTS["variance"],
        engine=args.engine, lr=getattr(args, "lr", None), beta=args.beta,
        batch_size=args.batch_size, steps=args.steps, eval_every=args.eval_every,
        weight_decay=args.weight_decay, ghost_groups=args.ghost_groups,
        seed=getattr(args, "seed", 0), data=args.data, step_path=args.step_path,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`msvag_mb.runner.train` the options set."""
    return dict(data_dir=args.data_dir, download=args.download, device=args.device,
                progress=not args.no_progress, distributed=args.distributed, report=_say)


def _say(line: str) -> None:
    """A line on stdout, flushed (a pipe or a CI log shows it at once)."""
    print(line, flush=True)


def _in_process_group(args: argparse.Namespace,
                      command: Callable[[argparse.Namespace], int]) -> int:
    """Run ``command(args)`` with ``args.threads`` applied and ``args.distributed`` set to
    torchrun's process group (a single-process context without torchrun), ended after;
    a refused run exits with status 2 and its message, a Ctrl-C with status 130, what was
    saved and the command that continues (``args.again``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.distributed = process_group_for(args.device)
    except (RuntimeError, ValueError) as error:
        return _fail(str(error))
    try:
        return command(args)
    except _REFUSALS as error:
        return _fail(str(error))
    except KeyboardInterrupt as interrupt:
        if args.distributed.is_main:
            saved = (f"{interrupt}, checkpoint {Path(interrupt.run_dir) / 'checkpoint.pt'}"
                     if isinstance(interrupt, RunInterrupted)
                     else "before training started or resumed")
            print(f"interrupted: {saved}\nto continue: {args.again}", file=sys.stderr,
                  flush=True)
        return 130
    finally:
        distributed.cleanup(args.distributed)


def _again(prog: str, argv: Sequence[str], add_resume: bool) -> str:
    """The command that continues ``prog argv`` after a Ctrl-C (``--overwrite`` dropped,
    ``--resume`` added where it is needed)."""
    kept = [arg for arg in argv if arg != "--overwrite"]
    if add_resume and "--resume" not in kept:
        kept.append("--resume")
    launcher = "python -m msvag_mb.cli" if Path(sys.argv[0]).name == "cli.py" else prog
    return " ".join([launcher, *map(shlex.quote, kept)])


#: the exit status of a Unix tool that a closed pipe ended (128 + SIGPIPE)
CLOSED_PIPE_STATUS = 141


def _reader_gone(stream) -> bool:
    """Whether ``stream`` is a pipe (or socket) whose reading end is closed: ``poll`` reports
    an error or hang-up on a writable file descriptor that nobody reads any more."""
    try:
        descriptor = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False  # no file descriptor (a test's captured output): no pipe to close
    if not hasattr(select, "poll"):
        return stream is sys.stdout  # Windows: stdout, the one a pipe usually closes
    poller = select.poll()
    poller.register(descriptor, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _quiet_on_closed_pipe(main: Callable[..., int]) -> Callable[..., int]:
    """``main`` ending as Unix tools do when the reader of its output goes away
    (``msvag-train ... | head -3``): status :data:`CLOSED_PIPE_STATUS`, no traceback.

    Python ignores SIGPIPE, so a write to the closed pipe raises ``BrokenPipeError``; it is
    caught here and the closed stream pointed at ``/dev/null``, where Python's flush at exit
    can write what is left. Restoring ``signal(SIGPIPE, SIG_DFL)`` instead would also kill
    the process silently when a socket of the process group closes (torchrun, gloo). A
    ``BrokenPipeError`` of another pipe (a data loader's worker) is raised as before."""

    @functools.wraps(main)
    def entry_point(argv: Sequence[str] | None = None) -> int:
        # the flushes: a pipe closed after the last print fails here, not at exit
        try:
            try:
                status = main(argv)
            except SystemExit:  # argparse's --help and usage errors
                sys.stdout.flush()
                raise
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            closed = [stream for stream in (sys.stdout, sys.stderr) if _reader_gone(stream)]
            if not closed:
                raise
            devnull = os.open(os.devnull, os.O_WRONLY)
            for stream in closed:
                os.dup2(devnull, stream.fileno())
            os.close(devnull)
            return CLOSED_PIPE_STATUS

    return entry_point


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


@_quiet_on_closed_pipe
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
    if args.resume and args.overwrite:
        parser.error("pass --resume (continue the run) or --overwrite (train it again), "
                     "not both")
    given = [f"--{name}" for name in _METHOD_DEFAULTS if getattr(args, name) is not None]
    if args.compare and given:
        parser.error(f"--compare trains its own methods (M-SGD, M-SVAG with both variance "
                     f"estimates, Adam): drop {' and '.join(given)}, or drop --compare for "
                     "one run")
    args.again = _again("msvag-train", argv, add_resume=not args.compare)
    return _in_process_group(args, _compare if args.compare else _train)


def _train(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.distributed.is_main:
        method = config.resolved()
        _say(f"msvag-train: one run, {method.display_name} on {method.problem}, lr "
             f"{method.lr:g} (without options, or with --compare: the four-method comparison)")
    result = train(config, args.out or "runs", resume=args.resume,
                   overwrite=args.overwrite, monitor=args.monitor, **_train_options(args))
    if not args.distributed.is_main:
        return 1 if result.diverged else 0
    print(summarize([result]))
    print(f"records: {result.run_dir / 'metrics.jsonl'}")
    if args.monitor is not None:
        print(f"monitoring: {result.run_dir / 'monitor.jsonl'} (msvag-plot {result.run_dir})")
    return 1 if result.diverged else 0


def _compare(args: argparse.Namespace) -> int:
    out = args.out or DEFAULT_OUT
    started = time.perf_counter()
    config = _config(args)
    if args.distributed.is_main:
        names = [method.resolved().display_name for method in comparison_configs(config)]
        _say(f"msvag-train: the comparison of {', '.join(names[:-1])} and {names[-1]} on "
             f"{config.problem} into {out} (finished runs are reused; --overwrite trains "
             "them again)")
    results = compare(config, out, monitor=args.monitor, overwrite=args.overwrite,
                      **_train_options(args))
    if not args.distributed.is_main:
        return 0
    print(summarize(results))
    figure = plot_comparison(results, out)
    print(f"figure: {figure}  ({time.perf_counter() - started:.0f} s)")
    return 0


@_quiet_on_closed_pipe
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
    parser.add_argument("--overwrite", action="store_true",
                        help="train every run again (default: continue or reuse the runs "
                             "found in --out)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.again = _again("msvag-tune", argv, add_resume=False)
    return _in_process_group(args, _tune)  # under torchrun every run is data-parallel


def _tune(args: argparse.Namespace) -> int:
    tuning = tune(_config(args), args.out, lr_max=args.lr_max, grid_points=args.grid_points,
                  seeds=args.seeds, overwrite=args.overwrite, **_train_options(args))
    if not args.distributed.is_main:
        return 0
    print(summarize(tuning.grid_results + tuning.seed_results[1:]))
    path = write_summary(tuning, args.out)
    print(f"winner: lr {tuning.winner.config.lr:g}; summary {path}")
    return 0


@_quiet_on_closed_pipe
def reproduce_main(argv: Sequence[str] | None = None) -> int:
    """``msvag-reproduce``: rerun a recorded run's first steps and compare its records."""
    parser = argparse.ArgumentParser(
        prog="msvag-reproduce",
        description="Train the run recorded in RUN_DIR (its config.json) again, from "
                    "scratch, up to --until steps, in a scratch folder, and check that the "
                    "records up to that step equal those in RUN_DIR/metrics.jsonl bit for "
                    "bit. Exit status 0: identical; 1: they differ (listed).",
    )
    parser.add_argument("run_dir", help="a run folder (config.json, metrics.jsonl)")
    parser.add_argument("--until", type=int, default=None,
                        help="steps to rerun (default: the run's first evaluation interval)")
    parser.add_argument("--out", default=None,
                        help="root folder of the rerun (default: a temporary folder, removed)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the data files (default: as msvag-train)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _reproduce(args)
    except (ValueError, RunFileError, DataNotFoundError) as error:
        return _fail(str(error))


def _reproduce(args: argparse.Namespace) -> int:
    config, recorded = load_run(args.run_dir)
    until = args.until if args.until is not None else config.resolved().eval_every
    with tempfile.TemporaryDirectory(prefix="msvag-reproduce-") as scratch:
        result = train(config, args.out or scratch, data_dir=args.data_dir,
                       device=args.device, progress=False, stop_after=until,
                       overwrite=True, report=_say)
    differences = differing_records(recorded, result.records, until)
    if differences:
        print("\n".join(["the rerun differs:", *differences]))
        return 1
    steps = ", ".join(str(r["step"]) for r in result.records if r["step"] <= until)
    print(f"identical: the records of steps {steps} of {args.run_dir}")
    return 0


@_quiet_on_closed_pipe
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
    try:
        plot_path(args.root, args.output, all_step_sizes=args.all_step_sizes,
                  include_unfinished=args.include_unfinished, monitor=not args.no_monitor)
    except (ValueError, RunFileError) as error:
        return _fail(str(error))
    return 0


__all__ = ["best_step_sizes", "default_lr_max", "plot_main", "results_table",
           "step_size_grid", "train_main", "tune_main"]


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m msvag_mb.cli [msvag-train options]
    sys.exit(train_main())
