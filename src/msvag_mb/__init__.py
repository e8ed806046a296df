"""msvag_mb: variance-adapted stochastic optimization (Balles & Hennig, ICML 2018).

M-SVAG and its relatives as ``torch.optim`` optimizers, with the gradient variance
estimated either by moving averages (paper Alg. 1) or from the per-example gradients of
the current mini-batch (paper App. D, Alg. 5), chosen by one flag: ``variance=``.
"""

from .engines import ENGINES, Engine, GhostBatchEngine, UnsupportedModelError, register_engine
from .estimators import (
    MiniBatchVariance,
    MovingAverageVariance,
    VarianceEstimator,
    rho,
)
from .gradient_variance import GradientVariance
from .optimizers import MSGD, MSSD, MSVAG, SVAG, AdamStar, MomentumFamilyOptimizer

__version__ = "0.1.0"

__all__ = [
    "ENGINES",
    "AdamStar",
    "Engine",
    "GhostBatchEngine",
    "GradientVariance",
    "MSGD",
    "MSSD",
    "MSVAG",
    "MiniBatchVariance",
    "MomentumFamilyOptimizer",
    "MovingAverageVariance",
    "SVAG",
    "UnsupportedModelError",
    "VarianceEstimator",
    "register_engine",
    "rho",
]
