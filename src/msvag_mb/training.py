"""The training runner's former home, kept so that ``from msvag_mb.training import train``
goes on working: every name is that of :mod:`msvag_mb.runner`, where the code lives."""

from .runner import (
    OPTIMIZERS,
    VARIANCES,
    RunResult,
    TrainConfig,
    build_model,
    evaluate,
    load_run,
    make_gradient_variance,
    make_optimizer,
    run_dir_for,
    summarize,
    train,
)

__all__ = ["OPTIMIZERS", "VARIANCES", "RunResult", "TrainConfig", "build_model", "evaluate",
           "load_run", "make_gradient_variance", "make_optimizer", "run_dir_for", "summarize",
           "train"]
