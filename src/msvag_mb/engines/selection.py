"""Which engine a ``GradientVariance`` call uses: a name, an instance, or ``"auto"``.

``"auto"`` tries the registered engines that declare an ``auto_priority``, lowest first,
and takes the first whose :meth:`~msvag_mb.engines.Engine.unsupported_reason` is ``None``;
engines that estimate something else (ghost batches, rank spreads) declare none. Some
refusals can only be made while the model runs (where the examples are in a layer's
input, a layer called twice, a parameter used outside its layer); an engine makes them
before any backward pass, and ``GradientVariance`` then moves on to the next of
:func:`engine_candidates`, whose own check runs only then (:func:`next_supported_engine`).

A caller that has just checked a model for an engine says so around the engine's call
(:func:`checked_for`), and the engine's own check at the start of ``compute``
(:func:`refuse_unsupported`) is not made a second time.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

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


def engine_candidates(model: nn.Module, requested: Engine | None
                      ) -> tuple[Engine, list[type[Engine]]]:
    """``(the engine a call uses first, the engines to try after it)``: ``requested`` and
    none if it supports ``model``; for ``"auto"`` the first engine ``"auto"`` may choose that
    supports it (what :func:`select_engine` returns) and every one after it, not yet checked
    (a call moves on to them, through :func:`next_supported_engine`, only when an engine
    refuses the model while running it). Raises like :func:`select_engine` when none does."""
    first = select_engine(model, requested)
    if requested is not None:
        return first, []
    later = auto_candidates()
    return first, later[later.index(type(first)) + 1:]


def next_supported_engine(model: nn.Module, candidates: list[type[Engine]],
                          refusals: list[str]) -> Engine | None:
    """Take engines off the front of ``candidates`` until one supports ``model`` and return
    it (``None`` when none is left); the reasons of those that do not go to ``refusals``."""
    while candidates:
        cls = candidates.pop(0)
        reason = cls.unsupported_reason(model)
        if reason is None:
            return cls()
        refusals.append(f"  {cls.name}: {reason}")
    return None


#: ``(id(engine), id(model))`` for each engine call whose caller has just checked the model
_CHECKED: set[tuple[int, int]] = set()


@contextlib.contextmanager
def checked_for(engine: Engine, model: nn.Module) -> Iterator[None]:
    """Within the block, ``engine`` may take ``engine.unsupported_reason(model)`` as
    ``None``: the caller has just checked it (the model stays the same till the call)."""
    key = (id(engine), id(model))
    if key in _CHECKED:
        yield
        return
    _CHECKED.add(key)
    try:
        yield
    finally:
        _CHECKED.discard(key)


def refuse_unsupported(engine: Engine, model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` if ``engine`` does not support ``model`` (checked
    here unless the caller did just now, :func:`checked_for`); an engine's first step."""
    if (id(engine), id(model)) in _CHECKED:
        return
    reason = engine.unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModelError(f"engine '{engine.name}': {reason}")
