"""Which engine a ``GradientVariance`` call uses: a name, an instance, or ``"auto"``.

``"auto"`` tries the registered engines that declare an ``auto_priority``, lowest first,
and takes the first whose :meth:`~msvag_mb.engines.Engine.unsupported_reason` is ``None``;
engines that estimate something else (ghost batches, rank spreads) declare none. Some
refusals can only be made while the model runs (where the examples are in a layer's
input, a layer called twice, a parameter used outside its layer); an engine makes them
before any backward pass, and ``GradientVariance`` then moves on to the next of
:func:`engine_candidates`.
"""

from __future__ import annotations

from torch import nn

from ..model_checks import UnsupportedModelError
from .base import ENGINES, Engine


def engine_from(spec: str | Engine) -> Engine | None:
    """The engine that ``engine=spec`` asks for; ``None`` for ``"auto"`` (chosen per call)."""
    if isinstance(spec, str):
        if spec != "auto" and spec not in ENGINES:
            raise ValueError(
                f"Invalid engine: {spec!r}. Use 'auto' or one of {sorted(ENGINES)}."
            )
        return None if spec == "auto" else ENGINES[spec]()
    if isinstance(spec, Engine):
        return spec
    raise TypeError(f"engine must be a name or an Engine instance, got {spec!r}")


def auto_candidates() -> list[type[Engine]]:
    """The engines ``"auto"`` may choose, in the order it tries them."""
    return sorted(
        (cls for cls in ENGINES.values() if cls.auto_priority is not None),
        key=lambda cls: cls.auto_priority,
    )


def select_engine(model: nn.Module, requested: Engine | None) -> Engine:
    """``requested`` if it supports ``model``, or (for ``None``) the engine ``"auto"`` picks.

    Raises :class:`~msvag_mb.engines.UnsupportedModelError` with the reason(s) otherwise.
    """
    if requested is not None:
        reason = requested.unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(f"engine '{requested.name}': {reason}")
        return requested
    reasons = []
    for cls in auto_candidates():
        reason = cls.unsupported_reason(model)
        if reason is None:
            return cls()
        reasons.append(f"  {cls.name}: {reason}")
    raise UnsupportedModelError(
        "engine='auto' found no engine that computes correct per-example statistics "
        "for this model:\n" + "\n".join(reasons)
    )


def engine_candidates(model: nn.Module, requested: Engine | None) -> list[Engine]:
    """The engines a call may use, in order: ``[requested]`` if it supports ``model``, or
    (for ``"auto"``) every engine ``"auto"`` may choose that supports it. The first is what
    :func:`select_engine` returns; a call moves on to the next when an engine refuses the
    model while running it. Raises like :func:`select_engine` when there is none."""
    if requested is not None:
        return [select_engine(model, requested)]
    engines = [cls() for cls in auto_candidates() if cls.unsupported_reason(model) is None]
    return engines or [select_engine(model, None)]  # select_engine raises with the reasons
