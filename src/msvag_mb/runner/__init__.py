"""The training runner behind ``msvag-train``, ``msvag-tune`` and the default comparison.

One module per idea:

=======================  ===================================================================
``config``               :class:`TrainConfig`, its resolution against the problem's paper
                         settings, and the option tables (optimizers, estimators, engines)
``files``                the run folder: ``config.json``, the records, the checkpoint, the
                         resume check, :func:`load_run`
``components``           the model, optimizer and mini-batch estimator a config makes
``evaluation``           loss and accuracy on a split (:func:`evaluate`)
``loop``                 :func:`train`: one run, step by step
``collectives``          what the ranks of a ``torchrun`` launch do together
``results``              :class:`RunResult`, :func:`summarize`, :func:`differing_records`
``tuning``               ``msvag-tune``: the step-size grid of App. A.2 and the winner
``comparison``           the no-argument comparison of ``msvag-train``
=======================  ===================================================================
"""

from .comparison import COMPARISON, compare, plot_comparison
from .components import build_model, make_gradient_variance, make_optimizer
from .config import (
    OPTIMIZERS,
    STEP_PATHS,
    VARIANCES,
    TrainConfig,
    adapts_to_variance,
    engine_choices,
    paper_step_size,
)
from .evaluation import evaluate
from .files import RunFileError, holds_run_of, load_run, run_dir_for
from .loop import RunInterrupted, train
from .results import RunResult, differing_records, summarize
from .tuning import Tuning, default_lr_max, step_size_grid, tune, write_summary

__all__ = [
    "COMPARISON",
    "OPTIMIZERS",
    "STEP_PATHS",
    "VARIANCES",
    "RunFileError",
    "RunInterrupted",
    "RunResult",
    "TrainConfig",
    "Tuning",
    "adapts_to_variance",
    "build_model",
    "compare",
    "default_lr_max",
    "differing_records",
    "engine_choices",
    "evaluate",
    "holds_run_of",
    "load_run",
    "make_gradient_variance",
    "make_optimizer",
    "paper_step_size",
    "plot_comparison",
    "run_dir_for",
    "step_size_grid",
    "summarize",
    "train",
    "tune",
    "write_summary",
]
