"""The training runner: one problem, one optimizer, one seed, either variance estimator.

A run lives in its own folder ``<out>/<problem>/<label>__lr<lr>__seed<seed>/`` holding

* ``config.json``: the :class:`TrainConfig` (everything that determines the result);
* ``metrics.jsonl``: one JSON record per evaluation (step 0, every ``eval_every`` steps,
  and the last step): step size, loss and accuracy on the full test set and on an equally
  sized slice of the training set, the mean mini-batch loss since the previous record;
* ``checkpoint.pt``: model, optimizer, scheduler and carried LSTM state at the last record
  (``resume=True`` continues from it with the same result as an uninterrupted run);
* ``monitor.jsonl`` (with ``monitor=N``): what the variance adaptation saw every ``N`` steps,
  per layer (:class:`msvag_mb.monitoring.VarianceMonitor`; ``msvag-plot`` draws it), and
  ``tensorboard/`` with the same scalars when TensorBoard is installed.

Determinism: the model is initialised after ``torch.manual_seed(seed)``; the batch of step
``k`` and its augmentation are pure functions of ``(seed, k)`` and the global RNG (dropout)
is reseeded from ``(seed, k)`` before every step, so nothing but the checkpoint is needed
to resume, and a run on CPU is bitwise reproducible.

Mini-batch variance (``variance="minibatch"``): ``msvag_mb.GradientVariance`` computes
``p.grad_variance`` with the chosen engine. For models with BatchNorm in train mode (P3)
per-example gradients are undefined; ``engine="auto"`` then uses
``GhostBatchEngine(groups=problem.ghost_groups)`` (see ``docs/problems.md``).

Several processes (``torchrun``, see ``docs/scaling_out.md``): pass the
:class:`~msvag_mb.distributed.DistributedContext` of
:func:`msvag_mb.distributed.init_from_environment`. ``batch_size`` stays the *global* batch:
every rank draws the same global batch of step ``k`` and trains on its contiguous share, the
model is wrapped in ``DistributedDataParallel``, and ``p.grad`` and ``p.grad_variance`` are
those of the global batch, so the run equals the single-process run up to float rounding
(and dropout masks, which are drawn per rank). Rank 0 alone evaluates and writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as distributed_module
from . import optimizers as optimizers_module
from .distributed import DistributedContext
from .engines import GhostBatchEngine
from .engines.base import train_mode_batchnorm
from .gradient_variance import GradientVariance
from .problems import Problem, get_problem, l2_penalty, parameter_groups
from .problems.data import step_seed
from .problems.models import CharRNN

#: name -> (class, adapts to the variance)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], bool]] = {
    "msgd": (optimizers_module.MSGD, False),
    "mssd": (optimizers_module.MSSD, False),
    "msvag": (optimizers_module.MSVAG, True),
    "svag": (optimizers_module.SVAG, True),
    "adamstar": (optimizers_module.AdamStar, True),
    "adam": (torch.optim.Adam, False),
}
VARIANCES = ("moving_average", "minibatch")
ENGINE_CHOICES = ("auto", "backpack", "vmap", "extensions", "ghost_batch")
_DISPLAY = {"msgd": "M-SGD", "mssd": "M-SSD", "msvag": "M-SVAG", "svag": "SVAG",
            "adamstar": "ADAM*", "adam": "ADAM"}


@dataclass
class TrainConfig:
    """Everything that determines a run's result (saved as ``config.json``).

    ``None`` for ``batch_size``, ``steps``, ``eval_every`` and ``weight_decay`` means the
    problem's paper setting. ``variance`` and ``engine`` matter only for optimizers that
    adapt to the variance (``msvag``, ``svag``, ``adamstar``); for the others they are
    stored as ``None``.
    """

    problem: str = "digits"
    optimizer: str = "msvag"
    variance: str | None = "moving_average"
    engine: str | None = "auto"
    lr: float | None = None
    beta: float = 0.9
    batch_size: int | None = None
    steps: int | None = None
    eval_every: int | None = None
    weight_decay: float | None = None
    ghost_groups: int | None = None
    seed: int = 0
    data: str = "real"
    #: processes of a torchrun launch (dropout masks are drawn per rank)
    world_size: int = 1

    def resolved(self) -> "TrainConfig":
        """A copy with every problem default filled in and checked."""
        problem = get_problem(self.problem)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {self.optimizer!r}. Use one of "
                             f"{sorted(OPTIMIZERS)}.")
        adapts = OPTIMIZERS[self.optimizer][1]
        variance = self.variance if adapts else None
        if adapts and variance not in VARIANCES:
            raise ValueError(f"Invalid variance: {variance!r}. Use one of {list(VARIANCES)}.")
        engine = self.engine if variance == "minibatch" else None
        if engine is not None and engine not in ENGINE_CHOICES:
            raise ValueError(f"Invalid engine: {engine!r}. Use one of {list(ENGINE_CHOICES)}.")
        # SVAG and ADAM* have no tuned value in the paper: default to their relatives'
        fallback = {"svag": "msvag", "adamstar": "adam"}.get(self.optimizer, self.optimizer)
        lr = self.lr if self.lr is not None else problem.lrs.get(
            self.optimizer, problem.lrs.get(fallback))
        if lr is None:
            raise ValueError(f"no default step size for {self.optimizer} on {self.problem}; "
                             "pass --lr (msvag-tune finds one).")
        if self.data not in ("real", "synthetic"):
            raise ValueError(f"Invalid data: {self.data!r} (use 'real' or 'synthetic')")
        steps = self.steps if self.steps is not None else problem.steps
        resolved = dataclasses.replace(
            self, variance=variance, engine=engine, lr=float(lr),
            batch_size=self.batch_size or problem.batch_size,
            steps=steps,
            eval_every=self.eval_every or min(problem.eval_every, steps) or 1,
            weight_decay=(self.weight_decay if self.weight_decay is not None
                          else problem.weight_decay),
            ghost_groups=(
                (self.ghost_groups or problem.ghost_groups
                 or (8 if engine == "ghost_batch" else None))
                if engine in ("auto", "ghost_batch") else None
            ),
        )
        if resolved.steps < 1 or resolved.eval_every < 1 or resolved.batch_size < 2:
            raise ValueError("steps and eval_every must be >= 1 and batch_size >= 2")
        if resolved.world_size < 1 or resolved.batch_size < resolved.world_size:
            raise ValueError(f"batch size {resolved.batch_size} (the global batch) must be at "
                             f"least the number of processes, {resolved.world_size}")
        return resolved

    @property
    def label(self) -> str:
        """Short method name used in folder names: ``msvag-mb``, ``msvag-ma``, ``adam``."""
        if self.variance is None:
            return self.optimizer
        return f"{self.optimizer}-{'mb' if self.variance == 'minibatch' else 'ma'}"

    @property
    def display_name(self) -> str:
        """Method name for tables and plots: ``M-SVAG (mini-batch)``."""
        name = _DISPLAY[self.optimizer]
        if self.variance is None:
            return name
        return f"{name} ({'mini-batch' if self.variance == 'minibatch' else 'moving avg.'})"

    def run_name(self) -> str:
        """The run folder's name: ``<label>__lr<lr>__seed<seed>``."""
        return f"{self.label}__lr{self.lr:g}__seed{self.seed}"


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path
    config: TrainConfig
    records: list[dict[str, Any]]
    diverged: bool
    completed: bool
    #: the trained model (not saved by this object; the checkpoint holds it)
    model: nn.Module | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last record (the final evaluation, or the divergence)."""
        return self.records[-1]

    @property
    def best_test_accuracy(self) -> float:
        """Highest test accuracy over the records (NaN if none was evaluated)."""
        values = [r["test_accuracy"] for r in self.records if r.get("test_accuracy") is not None]
        return max(values) if values else float("nan")


class _Diverged(Exception):
    pass


def build_model(problem: Problem, data, seed: int) -> nn.Module:
    """The problem's model initialised after ``torch.manual_seed(seed)``, in float32
    whatever the global default dtype (so a seed gives the same network everywhere)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(seed)
        return problem.build_model(data)
    finally:
        torch.set_default_dtype(previous)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over two groups (weights with L2, the rest without)."""
    cls, adapts = OPTIMIZERS[config.optimizer]
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "adam":
        # torch's Adam adds weight_decay * theta to the gradient: the paper's L2 loss term
        return cls(groups, lr=config.lr, betas=(config.beta, 0.999), eps=1e-8)
    kwargs = {"variance": config.variance} if adapts else {}
    return cls(groups, lr=config.lr, beta=config.beta, **kwargs)


def make_gradient_variance(config: TrainConfig, problem: Problem, model: nn.Module,
                           loss_fn: nn.Module) -> GradientVariance:
    """``GradientVariance`` for the mini-batch estimator, ghost batches for train-mode BN."""
    engine: str | GhostBatchEngine = config.engine or "auto"
    model.train()
    if engine == "ghost_batch" or (engine == "auto" and train_mode_batchnorm(model)):
        if config.world_size > 1:
            raise ValueError("the ghost-batch estimator (BatchNorm in train mode) runs on one "
                             "process only; use --variance moving_average with torchrun.")
        groups = config.ghost_groups or 8
        if config.batch_size % groups != 0:
            raise ValueError(f"the ghost-batch estimator splits each batch into {groups} groups: "
                             f"batch size {config.batch_size} is not divisible; change "
                             "--batch-size or --ghost-groups.")
        engine = GhostBatchEngine(groups=groups)
    return GradientVariance(model, loss_fn, engine=engine)


@torch.no_grad()
def evaluate(model: nn.Module, batches, loss_fn: nn.Module, split: str,
             device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy over a split (``"test"`` or ``"train"``), eval mode.

    For the character model, the pass starts from a zero state and carries it through the
    windows in order; the training state is restored afterwards.
    """
    was_training = model.training
    model.eval()
    saved_state = model.get_state() if isinstance(model, CharRNN) else None
    if saved_state is not None:
        model.reset_state()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for x, y in batches.eval_batches(split):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            n = y.numel()
            total_loss += float(loss_fn(logits, y)) * n
            correct += int((logits.argmax(-1) == y).sum())
            count += n
    finally:
        if saved_state is not None:
            model.set_state(saved_state)
        model.train(was_training)
    return total_loss / count, correct / count


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def run_dir_for(config: TrainConfig, out: str | os.PathLike) -> Path:
    """``<out>/<problem>/<label>__lr<lr>__seed<seed>`` for a resolved config."""
    return Path(out) / config.problem / config.run_name()


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
) -> RunResult:
    """Train one run; returns its records. See the module docstring for the files.

    Args:
        config: what to run (problem defaults are filled in by :meth:`TrainConfig.resolved`).
        out: root folder of the runs.
        data_dir: folder with the data files (``None``: the standard places, see
            :func:`msvag_mb.problems.data.search_dirs`).
        download: fetch missing files from their official sources.
        device: ``"cpu"``, ``"cuda"``, ... (with ``distributed``: the context's device).
        resume: continue from the run folder's checkpoint (an error if its config differs).
        overwrite: discard an existing run in the folder.
        progress: show a tqdm progress bar with the running loss.
        stop_after: stop (with a checkpoint) after this many steps in total, as if
            interrupted; a later ``resume=True`` call finishes the run.
        data: already loaded data for ``config.problem`` (skips loading; for sweeps).
        monitor: record what the variance adaptation sees every ``monitor`` steps in
            ``monitor.jsonl`` (and TensorBoard if installed); only for the optimizers that
            adapt to the variance (``msvag``, ``svag``, ``adamstar``).
        distributed: the context of a ``torchrun`` launch
            (:func:`msvag_mb.distributed.init_from_environment`); ``None``: one process.
            Every rank must call ``train`` with the same arguments.

    Returns:
        The run's :class:`RunResult`; on ranks other than 0 its ``records`` are empty.
    """
    ctx = distributed or DistributedContext(device=torch.device(device))
    config = dataclasses.replace(config, world_size=ctx.world_size).resolved()
    if monitor is not None:
        if not OPTIMIZERS[config.optimizer][1]:
            raise ValueError(f"--monitor records the variance adaptation of msvag, svag and "
                             f"adamstar; {config.optimizer} has none.")
        if monitor < 1:
            raise ValueError(f"Invalid monitor interval: {monitor} (must be >= 1)")
    problem = get_problem(config.problem)
    run_dir = run_dir_for(config, out)
    config_path = run_dir / "config.json"
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint_path = run_dir / "checkpoint.pt"
    monitor_path = run_dir / "monitor.jsonl"
    torch_device = ctx.device if ctx.is_distributed else torch.device(device)
    is_main = ctx.is_main
    checkpoint = None
    # every rank reads and checks before rank 0 writes anything, so all reach one verdict
    if run_dir.exists() and (metrics_path.exists() or checkpoint_path.exists()):
        if resume and checkpoint_path.exists():
            saved = json.loads(config_path.read_text())
            try:  # through TrainConfig: a field added since the run was saved is defaulted
                saved = dataclasses.asdict(TrainConfig(**saved))
            except TypeError:  # a field this version does not know: a different config
                pass
            if saved != dataclasses.asdict(config):
                raise ValueError(
                    f"cannot resume {run_dir}: its config.json differs from this run's "
                    f"configuration ({saved} vs {dataclasses.asdict(config)}); use the same "
                    "arguments, or --overwrite to start afresh."
                )
            checkpoint = torch.load(checkpoint_path, map_location=torch_device,
                                    weights_only=False)
        elif not overwrite and not resume:
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite "
                "to start it again."
            )
    _barrier(ctx)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    if data is None:
        data = problem.load_data(data_dir, download, synthetic=config.data == "synthetic",
                                 seed=config.seed)
    module = build_model(problem, data, config.seed).to(torch_device)
    # DDP for several processes; state_dict, evaluation and carried states use ``module``
    model = distributed_module.wrap_model(module, ctx)
    loss_fn = problem.loss_fn()
    batches = problem.batches(data, config.batch_size, config.seed)
    optimizer = make_optimizer(config, module)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, problem.milestone_steps(config.steps), gamma=problem.lr_factor
    )
    gradient_variance = (make_gradient_variance(config, problem, model, loss_fn)
                         if config.variance == "minibatch" else None)
    carries_state = isinstance(module, CharRNN)

    start, interval_loss, interval_steps = 0, 0.0, 0
    records: list[dict[str, Any]] = []
    if checkpoint is not None:
        module.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if carries_state:
            module.set_state(_local_carried_state(checkpoint["carried_state"], ctx))
        start = checkpoint["step"]
        interval_loss, interval_steps = checkpoint["interval"]
        # drop records written after the checkpoint (an interrupted run may have more)
        records = [r for r in _read_records(metrics_path) if r["step"] <= start]
    if is_main:
        _write_records(metrics_path, records)

    variance_monitor = None
    if monitor is not None and is_main:
        from .monitoring import VarianceMonitor, tensorboard_available

        if checkpoint is not None:  # keep the records of the steps before the checkpoint
            _write_records(monitor_path, [r for r in _read_records(monitor_path)
                                          if r["step"] < start])
        variance_monitor = VarianceMonitor(
            optimizer, module, every=monitor, jsonl=monitor_path, append=checkpoint is not None,
            tensorboard=run_dir / "tensorboard" if tensorboard_available() else None)
        variance_monitor.steps_seen = start  # records are due at steps 0, N, 2N, ...

    def record(step: int, diverged: bool = False) -> dict[str, Any]:
        nonlocal interval_loss, interval_steps
        entry: dict[str, Any] = {"step": step, "epoch": step / batches.batches_per_epoch,
                                 "lr": optimizer.param_groups[0]["lr"]}
        if diverged:
            entry.update(diverged=True, train_loss=None, train_accuracy=None,
                         test_loss=None, test_accuracy=None)
        elif is_main:  # the other ranks go on; they wait at the next step's all-reduce
            for split in ("train", "test"):
                loss, accuracy = evaluate(module, batches, loss_fn, split, torch_device)
                entry[f"{split}_loss"] = loss
                entry[f"{split}_accuracy"] = accuracy
            if config.weight_decay:
                entry["l2_penalty"] = l2_penalty(module, config.weight_decay)
        entry["minibatch_loss"] = interval_loss / interval_steps if interval_steps else None
        if gradient_variance is not None:  # which engine "auto" resolved to
            entry["engine"] = gradient_variance.engine_name
        interval_loss, interval_steps = 0.0, 0
        if is_main:
            records.append(entry)
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        return entry

    def save_checkpoint(step: int) -> None:
        # a collective when distributed: every rank calls it at the same step
        carried = _global_carried_state(module.get_state(), ctx) if carries_state else None
        if is_main:
            _atomic_save({
                "step": step,
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "carried_state": carried,
                "interval": (interval_loss, interval_steps),
            }, checkpoint_path)

    if start == 0:
        record(0)
        save_checkpoint(0)

    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"{config.problem} {config.label}",
                   dynamic_ncols=True, leave=False, mininterval=0.5,
                   disable=None)  # None: no bar when stderr is not a terminal (CI logs)
    running = None
    diverged = False
    step = start
    between_steps = True
    model.train()
    try:
        while step < config.steps:
            if stop_after is not None and step >= stop_after:
                break
            between_steps = False
            if carries_state and batches.is_epoch_start(step):
                module.reset_state()  # each training epoch starts from a zero state
            # dropout masks of this step (rank 0 draws those of the single-process run)
            torch.manual_seed(step_seed(distributed_module.rank_seed(config.seed, ctx), step))
            x, y = distributed_module.shard_batch(*batches.train_batch(step), ctx)
            x, y = x.to(torch_device), y.to(torch_device)
            optimizer.zero_grad()
            try:
                if gradient_variance is not None:
                    loss = gradient_variance.backward(x, y)  # the global batch's loss
                else:
                    local_loss = loss_fn(model(x), y)
                    loss = _global_mean_loss(local_loss, y.shape[0], config.batch_size, ctx)
                    if torch.isfinite(loss):  # the same verdict on every rank
                        # DDP averages the ranks' gradients; weighting each by its share
                        # of the global batch makes that the global batch's mean gradient
                        (local_loss * (y.shape[0] * ctx.world_size / config.batch_size)
                         ).backward()
                if not torch.isfinite(loss):
                    raise _Diverged
                optimizer.step()
            except (FloatingPointError, _Diverged):
                diverged = True
                break
            scheduler.step()
            step += 1
            value = float(loss.detach())
            interval_loss += value
            interval_steps += 1
            running = value if running is None else 0.95 * running + 0.05 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            if step % config.eval_every == 0 or step == config.steps:
                entry = record(step)
                save_checkpoint(step)
                if bar is not None:
                    tqdm.write(f"step {step:>7}  train loss {entry['train_loss']:.4f}  "
                               f"test loss {entry['test_loss']:.4f}  "
                               f"test acc {entry['test_accuracy']:.4f}")
            between_steps = True  # step (and its evaluation) complete
    except KeyboardInterrupt:
        # keep what was done: the next --resume starts from this step exactly (only between
        # steps; mid-step the last evaluation's checkpoint stays the one to resume from)
        if between_steps and not ctx.is_distributed:
            save_checkpoint(step)
        raise
    finally:
        if bar is not None:
            bar.close()
        if variance_monitor is not None:
            variance_monitor.close()
    if diverged:
        record(step, diverged=True)
    elif step < config.steps:
        save_checkpoint(step)  # stopped early on request
    return RunResult(run_dir, config, records, diverged, completed=step == config.steps,
                     model=module)


def _barrier(ctx: DistributedContext) -> None:
    if ctx.is_distributed:
        torch.distributed.barrier()


def _global_mean_loss(local_loss: torch.Tensor, local_size: int, global_size: int,
                      ctx: DistributedContext) -> torch.Tensor:
    """The global batch's mean loss from each rank's mean over its share."""
    if not ctx.is_distributed:
        return local_loss.detach()
    total = local_loss.detach() * (local_size / global_size)
    torch.distributed.all_reduce(total)
    return total


def _global_carried_state(state, ctx: DistributedContext):
    """The char-RNN's carried state of the global batch (rank 0's result; a collective).

    Each rank carries the ``(h, c)`` of its share of the examples along dim 1; the
    checkpoint keeps the global batch's, so it does not depend on the number of processes.
    """
    if not ctx.is_distributed:
        return state
    gathered: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, [None if s is None else
                                                   tuple(t.cpu() for t in s) for s in state])
    if not ctx.is_main:
        return None
    return [None if layer[0] is None else
            tuple(torch.cat([rank_state[i] for rank_state in layer], dim=1) for i in range(2))
            for layer in zip(*gathered)]


def _local_carried_state(state, ctx: DistributedContext):
    """This rank's share (dim 1) of a carried state saved by :func:`_global_carried_state`."""
    if not ctx.is_distributed:
        return state
    def share(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, distributed_module.shard_slice(tensor.shape[1], ctx)].to(ctx.device)
    return [None if s is None else tuple(share(t) for t in s) for s in state]


def load_run(run_dir: str | os.PathLike) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """Config and records of a run folder."""
    run_dir = Path(run_dir)
    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    return config, _read_records(run_dir / "metrics.jsonl")


def summarize(results: list[RunResult]) -> str:
    """A plain-text table of final train loss and test accuracy per run."""
    lines = [f"{'method':<28} {'lr':>8} {'seed':>4} {'train loss':>10} {'test loss':>9} "
             f"{'test acc':>8} {'best acc':>8}"]
    for result in results:
        final = result.final
        if result.diverged:
            lines.append(f"{result.config.display_name:<28} {result.config.lr:>8g} "
                         f"{result.config.seed:>4} {'diverged at step ' + str(final['step']):>30}")
            continue
        lines.append(
            f"{result.config.display_name:<28} {result.config.lr:>8g} {result.config.seed:>4} "
            f"{final['train_loss']:>10.4f} {final['test_loss']:>9.4f} "
            f"{final['test_accuracy']:>8.4f} {result.best_test_accuracy:>8.4f}"
        )
    return "\n".join(lines)

