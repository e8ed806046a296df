"""The training loop: one problem, one optimizer, one seed, either variance estimator.

:func:`train` resolves the config, checks the run folder (:mod:`~msvag_mb.runner.files`),
builds the run's parts (:mod:`~msvag_mb.runner.components`) and steps. ``_Run`` holds one
run while it trains; each of its methods is one thing the loop does: a step, a record, a
checkpoint, what happens on Ctrl-C.

Determinism: the model is initialised after ``torch.manual_seed(seed)``; the batch of step
``k`` and its augmentation are pure functions of ``(seed, k)`` and the global RNG (dropout)
is reseeded from ``(seed, k)`` before every step, so nothing but the checkpoint is needed
to resume, and a run on CPU is bitwise reproducible.

Several processes (``torchrun``, see ``docs/scaling_out.md``): pass the
:class:`~msvag_mb.distributed.DistributedContext` of
:func:`msvag_mb.distributed.init_from_environment`. ``batch_size`` stays the *global* batch:
every rank draws the same global batch of step ``k`` and trains on its contiguous share, the
model is wrapped in ``DistributedDataParallel``, and ``p.grad`` and ``p.grad_variance`` are
those of the global batch, so the run equals the single-process run up to float rounding
(and dropout masks, which are drawn per rank). Rank 0 alone evaluates and writes the files
(:mod:`~msvag_mb.runner.collectives` holds what the ranks do together).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import torch

from ..distributed import DistributedContext, rank_seed, shard_batch, wrap_model
from ..problems import get_problem
from ..problems.data import step_seed
from ..problems.models import CarriesState
from . import collectives
from .components import build_model, make_gradient_variance, make_optimizer
from .config import TrainConfig, adapts_to_variance
from .evaluation import evaluation_fields
from .files import (
    RunFileError,
    RunFiles,
    append_record,
    existing_checkpoint,
    files_for,
    read_records,
    save_checkpoint,
    write_config,
    write_records,
)
from .results import RunResult


class _Diverged(Exception):
    pass


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; ``step`` is the step its checkpoint holds (``resume=True``
    continues from there)."""

    def __init__(self, run_dir: os.PathLike, step: int, steps: int, at_step: bool) -> None:
        self.run_dir, self.step, self.steps = run_dir, step, steps
        where = ("at step" if at_step else "during a step; the checkpoint stays at step")
        super().__init__(f"{run_dir}: stopped {where} {step} of {steps}")


def train(
    config: TrainConfig,
    out: str | os.PathLike = "runs",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    data=None,
    monitor: int | None = None,
    distributed: DistributedContext | None = None,
    report: Callable[[str], None] | None = None,
) -> RunResult:
    """Train one run; returns its records. See :mod:`msvag_mb.runner.files` for the files.

    Args:
        config: what to run (problem defaults are filled in by :meth:`TrainConfig.resolved`).
        out: root folder of the runs.
        data_dir: folder with the data files (``None``: the standard places, see
            :func:`msvag_mb.problems.data.search_dirs`).
        download: fetch missing files from their official sources.
        device: ``"cpu"``, ``"cuda"``, ... (with ``distributed``: the context's device).
        resume: continue from the run folder's checkpoint (an error if its config differs).
        overwrite: discard an existing run of this config (never one of another config).
        progress: show a tqdm progress bar with the running loss on a terminal (elsewhere
            a plain line every minute), and the lines below on stdout if ``report`` is None.
        stop_after: stop (with a checkpoint) after this many steps in total, as if
            interrupted; a later ``resume=True`` call finishes the run.
        data: already loaded data for ``config.problem`` (skips loading; for sweeps).
        monitor: record what the variance adaptation sees every ``monitor`` steps in
            ``monitor.jsonl`` (and TensorBoard if installed); only for the optimizers that
            adapt to the variance (``msvag``, ``svag``, ``adamstar``).
        distributed: the context of a ``torchrun`` launch
            (:func:`msvag_mb.distributed.init_from_environment`); ``None``: one process.
            Every rank must call ``train`` with the same arguments.
        report: gets a line per evaluation and a note on resuming (rank 0 only).

    Returns:
        The run's :class:`RunResult`; on ranks other than 0 its ``records`` are empty.

    Raises:
        RunInterrupted: Ctrl-C (SIGINT) on one process: the current step was finished
            and checkpointed (a second Ctrl-C abandons it); ``resume=True`` continues.
    """
    ctx = distributed or DistributedContext(device=torch.device(device))
    config = dataclasses.replace(config, world_size=ctx.world_size).resolved()
    _check_monitor(config, monitor)
    files = files_for(config, out, resume=resume)
    torch_device = ctx.device if ctx.is_distributed else torch.device(device)
    checkpoint = existing_checkpoint(files, config, resume=resume, overwrite=overwrite,
                                     device=torch_device)
    if data is None:
        data = get_problem(config.problem).load_data(
            data_dir, download, synthetic=config.data == "synthetic", seed=config.seed)
    say = report if report is not None else (_print if progress else None)
    run = _Run(config, ctx, torch_device, files, data, say if ctx.is_main else None)
    # every rank reads, checks and builds before rank 0 writes anything: a refused run
    # leaves no folder, and all ranks reach one verdict
    collectives.barrier(ctx)
    if ctx.is_main:
        write_config(files, config)
    with _CtrlC(enabled=not ctx.is_distributed) as ctrl_c:
        run.start(checkpoint, monitor)
        diverged = run.steps(stop_after, progress, ctrl_c)
    return RunResult(files.root, config, run.records, diverged,
                     completed=run.step == config.steps, model=run.module)


def _print(line: str) -> None:
    print(line, flush=True)


class _CtrlC:
    """SIGINT while a run trains (main thread, one process, Python's own handler in place):
    the first sets :attr:`requested`, which the loop reads between steps; a second raises
    ``KeyboardInterrupt`` at once (the step under way is abandoned)."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._enabled = enabled
        self._previous = None

    def __enter__(self) -> "_CtrlC":
        if (self._enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        try:  # os.write: print could re-enter a stream the interrupted code is writing
            os.write(sys.stderr.fileno(), b"\nCtrl-C: stopping after this step, with a "
                     b"checkpoint (Ctrl-C again: stop at once)\n")
        except (OSError, ValueError, AttributeError):
            pass

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_monitor(config: TrainConfig, monitor: int | None) -> None:
    if monitor is None:
        return
    if not adapts_to_variance(config.optimizer):
        raise ValueError(f"--monitor records the variance adaptation of msvag, svag and "
                         f"adamstar; {config.optimizer} has none.")
    if monitor < 1:
        raise ValueError(f"Invalid monitor interval: {monitor} (must be >= 1)")


class _Progress:
    """The tqdm bar with the running loss on a terminal; elsewhere (a pipe, a CI log),
    where no bar shows, a plain line every minute (rank 0 only)."""

    #: seconds between the plain progress lines
    PLAIN_EVERY = 60.0

    def __init__(self, config: TrainConfig, start: int, say: Callable[[str], None] | None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=config.steps, initial=start,
                        desc=f"{config.problem} {config.label}", dynamic_ncols=True,
                        leave=False, mininterval=0.5,
                        disable=None)  # None: no bar when stderr is not a terminal (CI logs)
        self.say, self.step, self.steps = say, start, config.steps
        self.running: float | None = None
        self.shown = time.monotonic()

    def update(self, loss: float) -> None:
        """One step done with mini-batch loss ``loss``."""
        self.running = loss if self.running is None else 0.95 * self.running + 0.05 * loss
        self.step += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.running:.4f}", refresh=False)
        if self.bar.disable and self.say is not None and \
                time.monotonic() - self.shown >= self.PLAIN_EVERY:
            self.say(f"step {self.step:>7} of {self.steps}  running loss {self.running:.4f}")
            self.shown = time.monotonic()

    def write(self, say: Callable[[str], None], line: str) -> None:
        """``say(line)`` without garbling the bar."""
        with self.bar.external_write_mode():
            say(line)

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


class _Run:
    """One run while it trains: its parts, its files and where it stands."""

    def __init__(self, config: TrainConfig, ctx: DistributedContext, device: torch.device,
                 files: RunFiles, data, say: Callable[[str], None] | None = None) -> None:
        problem = get_problem(config.problem)
        self.config, self.ctx, self.device, self.files = config, ctx, device, files
        self.module = build_model(problem, data, config.seed).to(device)
        # DDP for several processes; state_dict, evaluation and carried states use ``module``
        self.model = wrap_model(self.module, ctx)
        self.loss_fn = problem.loss_fn()
        self.batches = problem.batches(data, config.batch_size, config.seed)
        self.optimizer = make_optimizer(config, self.module)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, problem.milestone_steps(config.steps), gamma=problem.lr_factor)
        self.gradient_variance = (
            make_gradient_variance(config, self.model, self.loss_fn)
            if config.variance == "minibatch" else None)
        self.carries_state = isinstance(self.module, CarriesState)
        self.step = 0
        #: the step the checkpoint on disk holds (None: none of this run yet)
        self.saved_step: int | None = None
        #: sum and count of the mini-batch losses since the last record
        self.interval: tuple[float, int] = (0.0, 0)
        self.records: list[dict[str, Any]] = []
        self.monitor = None
        self.between_steps = True
        #: where the lines go (rank 0; None: nowhere), through the bar while one shows
        self.say = say
        self.bar: _Progress | None = None

    def note(self, line: str) -> None:
        """A line for the user (rank 0, if lines are wanted)."""
        if self.say is None:
            return
        if self.bar is not None:
            self.bar.write(self.say, line)
        else:
            self.say(line)

    def start(self, checkpoint: dict[str, Any] | None, monitor: int | None) -> None:
        """Continue from ``checkpoint`` (or from scratch, with the step-0 record), with a
        variance monitor every ``monitor`` steps."""
        if checkpoint is not None:
            self._restore(checkpoint)
            self.note(f"{self.files.root}: " + (
                f"finished already (step {self.step}); --overwrite trains it again"
                if self.step == self.config.steps else
                f"resuming at step {self.step} of {self.config.steps}"))
        if self.ctx.is_main:
            write_records(self.files.metrics, self.records)
            if monitor is not None:
                self._open_monitor(monitor, resumed=checkpoint is not None)
        if checkpoint is None:  # a fresh run (a step-0 checkpoint holds its record already)
            self.record()
            self.save()

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.module.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.carries_state:
            self.module.set_state(
                collectives.local_carried_state(checkpoint["carried_state"], self.ctx))
        self.step = self.saved_step = checkpoint["step"]
        self.interval = tuple(checkpoint["interval"])
        self.records = self._records_until_checkpoint()

    def _records_until_checkpoint(self) -> list[dict[str, Any]]:
        """The records up to the checkpoint's step, one per step (an interrupted run may
        have more, a line cut short is dropped, and an older version wrote step 0 twice);
        refuses when one that the checkpoint follows is missing."""
        path, config = self.files.metrics, self.config
        by_step: dict[int, dict[str, Any]] = {}
        for record in read_records(path):
            if not isinstance(record.get("step"), int):
                raise RunFileError(f"{path} holds a record without a step ({record}); "
                                   "restore the file, or pass --overwrite to train again")
            if record["step"] <= self.step:
                by_step.setdefault(record["step"], record)
        due = [0, *range(config.eval_every, self.step + 1, config.eval_every)]
        if self.step == config.steps and config.steps not in due:
            due.append(config.steps)
        missing = [step for step in due if step not in by_step]
        if missing:
            raise RunFileError(f"{path} lacks the records of steps {missing} that the "
                               f"checkpoint (step {self.step}) follows; restore the file, or "
                               "pass --overwrite to train the run again")
        return [by_step[step] for step in sorted(by_step)]

    def _open_monitor(self, every: int, resumed: bool) -> None:
        from ..monitoring import VarianceMonitor, tensorboard_available

        if resumed:  # keep the records of the steps before the checkpoint
            write_records(self.files.monitor, [r for r in read_records(self.files.monitor)
                                               if r["step"] < self.step])
        self.monitor = VarianceMonitor(
            self.optimizer, self.module, every=every, jsonl=self.files.monitor, append=resumed,
            tensorboard=self.files.tensorboard if tensorboard_available() else None)
        self.monitor.steps_seen = self.step  # records are due at steps 0, N, 2N, ...

    def record(self, diverged: bool = False) -> dict[str, Any]:
        """The record of the current step (evaluated on rank 0), appended to the file."""
        entry: dict[str, Any] = {"step": self.step,
                                 "epoch": self.step / self.batches.batches_per_epoch,
                                 "lr": self.optimizer.param_groups[0]["lr"]}
        if diverged:
            entry.update(diverged=True, train_loss=None, train_accuracy=None,
                         test_loss=None, test_accuracy=None)
        elif self.ctx.is_main:  # the other ranks go on; they wait at the next all-reduce
            entry.update(evaluation_fields(self.module, self.batches, self.loss_fn,
                                           self.device, self.config.weight_decay))
        total, count = self.interval
        entry["minibatch_loss"] = total / count if count else None
        if self.gradient_variance is not None:  # which engine "auto" resolved to
            entry["engine"] = self.gradient_variance.engine_name
        self.interval = (0.0, 0)
        if self.ctx.is_main:
            self.records.append(entry)
            append_record(self.files.metrics, entry)
        return entry

    def save(self) -> None:
        """Checkpoint the current step (a collective when distributed: every rank calls it
        at the same step)."""
        carried = (collectives.global_carried_state(self.module.get_state(), self.ctx)
                   if self.carries_state else None)
        if self.ctx.is_main:
            save_checkpoint({
                "step": self.step,
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "carried_state": carried,
                "interval": self.interval,
            }, self.files.checkpoint)
        self.saved_step = self.step

    def steps(self, stop_after: int | None, progress: bool, ctrl_c: "_CtrlC") -> bool:
        """Step to the end (or to ``stop_after``, or to a Ctrl-C); whether it diverged."""
        self.bar = _Progress(self.config, self.step, self.say) \
            if progress and self.ctx.is_main else None
        diverged = False
        self.model.train()
        try:
            while self.step < self.config.steps:
                if stop_after is not None and self.step >= stop_after:
                    break
                if ctrl_c.requested:
                    raise KeyboardInterrupt
                self.between_steps = False
                try:
                    loss = self._train_step()
                except (FloatingPointError, _Diverged):
                    diverged = True
                    break
                self._after_step(loss)
                self.between_steps = True  # step (and its evaluation) complete
        except KeyboardInterrupt as interrupt:
            raise self._interrupted() from interrupt
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.monitor is not None:
                self.monitor.close()
        if diverged:
            self.record(diverged=True)
        elif self.step < self.config.steps:
            self.save()  # stopped early on request
        return diverged

    def _train_step(self) -> torch.Tensor:
        """One optimizer step on the batch of ``self.step``; its global mean loss."""
        config, ctx = self.config, self.ctx
        if self.carries_state and self.batches.is_epoch_start(self.step):
            self.module.reset_state()  # each training epoch starts from a zero state
        # dropout masks of this step (rank 0 draws those of the single-process run)
        torch.manual_seed(step_seed(rank_seed(config.seed, ctx), self.step))
        x, y = shard_batch(*self.batches.train_batch(self.step), ctx)
        x, y = x.to(self.device), y.to(self.device)
        self.optimizer.zero_grad()
        if self.gradient_variance is not None:
            loss = self.gradient_variance.backward(x, y)  # the global batch's loss
        else:
            local_loss = self.loss_fn(self.model(x), y)
            loss = collectives.global_mean_loss(local_loss, y.shape[0], config.batch_size, ctx)
            if torch.isfinite(loss):  # the same verdict on every rank
                collectives.backward_share(local_loss, y.shape[0], config.batch_size, ctx)
        if not torch.isfinite(loss):
            raise _Diverged
        self.optimizer.step()
        return loss

    def _after_step(self, loss: torch.Tensor) -> None:
        """Count the step; record and checkpoint when an evaluation is due."""
        self.scheduler.step()
        self.step += 1
        value = float(loss.detach())
        total, count = self.interval
        self.interval = (total + value, count + 1)
        if self.bar is not None:
            self.bar.update(value)
        if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
            entry = self.record()
            self.save()
            if self.ctx.is_main:
                self.note(f"step {entry['step']:>7}  train loss {entry['train_loss']:.4f}  "
                          f"test loss {entry['test_loss']:.4f}  "
                          f"test acc {entry['test_accuracy']:.4f}")

    def _interrupted(self) -> RunInterrupted:
        """Ctrl-C: keep what was done. Between steps (the first Ctrl-C waits for one), the
        current step is checkpointed, so the next ``--resume`` starts from it exactly; a
        step under way (a second Ctrl-C) is abandoned and the last checkpoint stays the
        one to resume from. Returns the exception to raise (the one place for Ctrl-C)."""
        at_step = self.between_steps and not self.ctx.is_distributed
        if at_step and self.saved_step != self.step:
            self.save()
        step = self.step if at_step else (self.saved_step or 0)
        return RunInterrupted(self.files.root, step, self.config.steps, at_step)
