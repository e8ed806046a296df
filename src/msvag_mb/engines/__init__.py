"""Engines that compute per-example gradient statistics, registered by name.

Importing this package registers every built-in engine in :data:`ENGINES`; each declares
its capabilities as class attributes (:class:`~msvag_mb.engines.base.Engine`), and
:mod:`~msvag_mb.engines.selection` picks one for a model.
"""

from .base import (
    ENGINES,
    Engine,
    EngineResult,
    ParameterStatistics,
    UnsupportedModelError,
    register_engine,
)
from .backpack_engine import BackpackEngine
from .extensions_engine import ExtensionsEngine  # our per-layer hooks; preferred by "auto"
from .ghost_batch import GhostBatchEngine
from .rank_spread import RankSpreadEngine
from .selection import auto_candidates, engine_candidates, engine_from, select_engine
from .vmap_engine import VmapEngine

__all__ = [
    "ENGINES",
    "Engine",
    "EngineResult",
    "ParameterStatistics",
    "UnsupportedModelError",
    "register_engine",
    "BackpackEngine",
    "ExtensionsEngine",
    "GhostBatchEngine",
    "RankSpreadEngine",
    "VmapEngine",
    "auto_candidates",
    "engine_candidates",
    "engine_from",
    "select_engine",
]
