"""Engines that compute per-example gradient statistics, registered by name.

Importing this package registers every built-in engine in :data:`ENGINES`.
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
from .ghost_batch import GhostBatchEngine
from .rank_spread import RankSpreadEngine
from .vmap_engine import VmapEngine

try:  # our own per-layer hooks (extensions/); preferred by engine="auto"
    from .extensions_engine import ExtensionsEngine
except ImportError:  # pragma: no cover - only while extensions/ is being written
    ExtensionsEngine = None

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
]
