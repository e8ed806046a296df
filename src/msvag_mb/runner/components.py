"""The parts a config makes: the model, the optimizer and the mini-batch estimator.

Mini-batch variance (``variance="minibatch"``): :class:`msvag_mb.GradientVariance` computes
``p.grad_variance`` with the chosen engine. For models with BatchNorm in train mode (P3)
per-example gradients are undefined; ``engine="auto"`` then uses the registered engine that
declares ``handles_train_mode_batchnorm`` (ghost batches, ``groups=config.ghost_groups``;
see ``docs/problems.md``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..engines import ENGINES, Engine
from ..model_checks import train_mode_batchnorm
from ..gradient_variance import GradientVariance
from ..optimizers import MomentumFamilyOptimizer
from ..problems import Problem, parameter_groups
from .config import (
    DEFAULT_GHOST_GROUPS,
    OPTIMIZERS,
    STEP_PATHS,
    TrainConfig,
    adapts_to_variance,
    batchnorm_engine,
)


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
    cls = OPTIMIZERS[config.optimizer]
    groups = parameter_groups(model, config.weight_decay)
    path = STEP_PATHS[config.step_path] if config.step_path is not None else {}
    if issubclass(cls, MomentumFamilyOptimizer):
        kwargs = {"variance": config.variance} if adapts_to_variance(config.optimizer) else {}
        return cls(groups, lr=config.lr, beta=config.beta, **kwargs, **path)
    # torch's Adam: its weight_decay adds λθ to the gradient, the paper's L2 loss term
    return cls(groups, lr=config.lr, betas=(config.beta, 0.999), eps=1e-8, **path)


def make_gradient_variance(config: TrainConfig, model: nn.Module,
                           loss_fn: nn.Module) -> GradientVariance:
    """``GradientVariance`` for the mini-batch estimator (``config`` resolved), ghost
    batches for train-mode BN."""
    model.train()
    name = config.engine or "auto"
    for_batchnorm = name == "auto" and bool(train_mode_batchnorm(model))
    cls = batchnorm_engine() if for_batchnorm else ENGINES.get(name)  # None: plain "auto"
    engine: str | Engine = name
    if cls is not None:
        _check_processes(cls, config, for_batchnorm)
        if getattr(cls, "handles_train_mode_batchnorm", False):
            engine = cls(groups=_ghost_groups(config))
    return GradientVariance(model, loss_fn, engine=engine)


def _check_processes(cls: type[Engine], config: TrainConfig, for_batchnorm: bool) -> None:
    """Refuse an engine that runs on one process only under torchrun."""
    if config.world_size > 1 and not getattr(cls, "supports_distributed", True):
        why = " (BatchNorm in train mode)" if for_batchnorm else ""
        raise ValueError(f"the {cls.name} engine{why} runs on one process only; use "
                         "--variance moving_average with torchrun.")


def _ghost_groups(config: TrainConfig) -> int:
    """The groups of the ghost-batch engine; the batch must split into them evenly."""
    groups = config.ghost_groups or DEFAULT_GHOST_GROUPS
    if config.batch_size % groups != 0:
        raise ValueError(f"the ghost-batch estimator splits each batch into {groups} groups: "
                         f"batch size {config.batch_size} is not divisible; change "
                         "--batch-size or --ghost-groups.")
    return groups
