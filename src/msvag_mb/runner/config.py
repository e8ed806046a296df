"""What a run is: :class:`TrainConfig`, its resolution against the problem's paper settings,
and the tables the options are checked against (each derived from its registry).

* the optimizers by name (:data:`OPTIMIZERS`); whether one adapts to the variance is the
  class's own declaration (:func:`adapts_to_variance`);
* the variance estimators (:data:`VARIANCES`);
* the engines ``--engine`` offers (:func:`engine_choices`, from :data:`msvag_mb.ENGINES`);
* the step size of a method without a tuned value in the paper (:func:`paper_step_size`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .. import optimizers as optimizers_module
from ..engines import ENGINES, Engine
from ..problems import Problem, get_problem

#: the runner's optimizers by name (the CLI's ``--optimizer`` choices)
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "msgd": optimizers_module.MSGD,
    "mssd": optimizers_module.MSSD,
    "msvag": optimizers_module.MSVAG,
    "svag": optimizers_module.SVAG,
    "adamstar": optimizers_module.AdamStar,
    "adam": torch.optim.Adam,
}
VARIANCES = ("moving_average", "minibatch")
#: the implementations of the optimizer's step a run can pin (``--step-path``), as the
#: keyword arguments both our optimizers and torch's Adam take; a run without one gets the
#: library's default (ours: the compiled kernel where torch.compile works; Adam's: torch's).
#: The paths agree to rounding, not bitwise: a record reproduces exactly under its own path.
STEP_PATHS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True},
    "foreach": {"foreach": True, "fused": False},
    "for-loop": {"foreach": False, "fused": False},
}
#: groups of the ghost-batch engine when neither the option nor the problem names them
DEFAULT_GHOST_GROUPS = 8
_DISPLAY = {"msgd": "M-SGD", "mssd": "M-SSD", "msvag": "M-SVAG", "svag": "SVAG",
            "adamstar": "ADAM*", "adam": "ADAM"}
#: SVAG and ADAM* have no tuned step size in the paper: they take their relative's
_STEP_SIZE_RELATIVE = {"svag": "msvag", "adamstar": "adam"}


def adapts_to_variance(optimizer: str) -> bool:
    """Whether the optimizer called ``optimizer`` adapts its step to a variance estimate
    (its class declares a ``variance_target``; torch's Adam has none)."""
    return getattr(OPTIMIZERS[optimizer], "variance_target", None) is not None


def engine_choices() -> tuple[str, ...]:
    """``"auto"`` and the registered engines a run can use: those that also run on one
    process (an engine whose units are the ranks needs torchrun for every run)."""
    return ("auto",) + tuple(sorted(
        name for name, cls in ENGINES.items() if not getattr(cls, "needs_distributed", False)))


def batchnorm_engine() -> type[Engine]:
    """The registered engine for models with BatchNorm in train mode (ghost batches,
    which take ``ghost_groups``)."""
    for cls in ENGINES.values():
        if getattr(cls, "handles_train_mode_batchnorm", False):
            return cls
    raise ValueError("no registered engine handles BatchNorm in train mode")


def takes_ghost_groups(engine: str | None) -> bool:
    """Whether the engine called ``engine`` is :func:`batchnorm_engine` (``ghost_groups``)."""
    cls = ENGINES.get(engine) if engine is not None else None
    return bool(getattr(cls, "handles_train_mode_batchnorm", False))


def paper_step_size(problem: Problem, optimizer: str) -> float | None:
    """The paper's tuned step size of ``optimizer`` on ``problem`` (App. A.2), or that of
    its relative for SVAG and ADAM*; ``None`` when neither has one."""
    relative = _STEP_SIZE_RELATIVE.get(optimizer, optimizer)
    return problem.lrs.get(optimizer, problem.lrs.get(relative))


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {what}: {value!r}. Use one of {list(choices)}.")


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
    #: a key of :data:`STEP_PATHS`, or ``None``: the library's default step implementation
    step_path: str | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with every problem default filled in and checked."""
        problem = get_problem(self.problem)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {self.optimizer!r}. Use one of "
                             f"{sorted(OPTIMIZERS)}.")
        adapts = adapts_to_variance(self.optimizer)
        variance = self.variance if adapts else None
        if adapts:
            _check_choice("variance", variance, VARIANCES)
        engine = self.engine if variance == "minibatch" else None
        if engine is not None:
            _check_choice("engine", engine, engine_choices())
        lr = self.lr if self.lr is not None else paper_step_size(problem, self.optimizer)
        if lr is None:
            raise ValueError(f"no default step size for {self.optimizer} on {self.problem}; "
                             "pass --lr (msvag-tune finds one).")
        if self.step_path is not None:
            _check_choice("step path", self.step_path, STEP_PATHS)
        if self.data not in ("real", "synthetic"):
            raise ValueError(f"Invalid data: {self.data!r} (use 'real' or 'synthetic')")
        steps = self.steps if self.steps is not None else problem.steps
        eval_every = (self.eval_every if self.eval_every is not None
                      else max(1, min(problem.eval_every, steps)))
        resolved = dataclasses.replace(
            self, variance=variance, engine=engine, lr=float(lr),
            batch_size=self.batch_size if self.batch_size is not None else problem.batch_size,
            steps=steps, eval_every=eval_every,
            weight_decay=(self.weight_decay if self.weight_decay is not None
                          else problem.weight_decay),
            ghost_groups=self._ghost_groups(problem, engine),
        )
        resolved._check_sizes()
        return resolved

    def _ghost_groups(self, problem: Problem, engine: str | None) -> int | None:
        """The groups of the ghost-batch engine: for that engine, and for ``"auto"`` (which
        uses it for BatchNorm in train mode); ``None`` for every other engine."""
        if self.ghost_groups is not None and self.ghost_groups < 1:
            raise ValueError(f"Invalid --ghost-groups {self.ghost_groups}: must be >= 1")
        if engine == "auto":
            return self.ghost_groups or problem.ghost_groups or None
        if takes_ghost_groups(engine):
            return self.ghost_groups or problem.ghost_groups or DEFAULT_GHOST_GROUPS
        return None

    def _check_sizes(self) -> None:
        """Refuse sizes no run can have, naming the option."""
        for option, value, least in (("--steps", self.steps, 1),
                                     ("--eval-every", self.eval_every, 1),
                                     ("--batch-size", self.batch_size, 2)):
            if value < least:
                raise ValueError(f"Invalid {option} {value}: must be >= {least}")
        if self.world_size < 1 or self.batch_size < self.world_size:
            raise ValueError(f"batch size {self.batch_size} (the global batch) must be at "
                             f"least the number of processes, {self.world_size}")

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
        """The run folder's name: ``<label>__lr<lr>__seed<seed>`` (with
        :meth:`detailed_run_name`, the one place that names runs;
        :func:`msvag_mb.runner.files.run_dir_for` chooses between them)."""
        return f"{self.label}__lr{_name_value(self.lr)}__seed{self.seed}"

    def detailed_run_name(self) -> str:
        """:meth:`run_name` followed by every setting that differs from the problem's
        defaults (``msvag-ma__lr0.3__seed0__beta0.5__bs16``; ``__defaults`` if none does):
        the folder of a run whose plain name another configuration has taken. Different
        configurations of a resolved config never get the same detailed name."""
        differing = self.differing_settings()
        suffix = "__".join(f"{_NAME_KEYS.get(field, field)}{_name_value(value)}"
                           for field, value in differing.items())
        return f"{self.run_name()}__{suffix or 'defaults'}"

    def differing_settings(self) -> dict[str, Any]:
        """The settings of this resolved config, other than the problem, method, step size
        and seed, that differ from those of the problem's defaults."""
        defaults = dataclasses.asdict(TrainConfig(
            problem=self.problem, optimizer=self.optimizer, variance=self.variance,
            lr=self.lr, seed=self.seed).resolved())
        return {field: value for field, value in dataclasses.asdict(self).items()
                if field not in _NAMED_BY_LABEL and value != defaults.get(field)}


#: fields already in ``<problem>/<label>__lr<lr>__seed<seed>``
_NAMED_BY_LABEL = ("problem", "optimizer", "variance", "lr", "seed")
#: short names of the other settings in :meth:`TrainConfig.detailed_run_name`
_NAME_KEYS = {"batch_size": "bs", "eval_every": "eval", "weight_decay": "wd",
              "ghost_groups": "ghost", "world_size": "ranks"}


def _name_value(value: Any) -> str:
    """A value as a folder name writes it: ``0.3``, ``1e-05``, ``none``; a float that
    ``:g`` would round is written in full, so different values never share a name."""
    if value is None:
        return "none"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)
