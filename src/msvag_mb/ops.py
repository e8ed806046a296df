"""The element-wise operations that every formula of the update rules is written in.

The maths of the step (:mod:`msvag_mb.directions`) and of the variance estimators
(:mod:`msvag_mb.estimators`) is written once, as calls on an *ops* namespace, and runs on
every execution path of the optimizers:

* :data:`TENSOR`, one tensor at a time, the step's numbers as Python floats: the
  per-tensor path (the readable one, the oracle of the tests).
* :data:`KERNEL`, the same ops with the step's numbers as :class:`StepNumber` s (0-dim
  tensors): the body of the compiled kernel of :mod:`msvag_mb.fused`
  (``torch.compile(fullgraph=True, dynamic=True)``), so one kernel serves every step.
* :data:`FOREACH`, lists of tensors of one device and dtype: the ``torch._foreach`` path.

An op whose name ends in ``_`` writes into its first argument and returns it; the others
return a new tensor (list). ``other`` is a tensor (list) of the first argument's shape or a
scalar; ``alpha``, ``value`` and ``weight`` are scalars. A new formula needs nothing but
these ops (add one here, with both implementations, if it does).

This module imports nothing else from the package (a ground-floor module).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import Tensor


#: elementwise work on CPU tensors below this many elements runs on one thread: each
#: parallel kernel wakes the worker threads, which costs more than such a kernel itself
#: (docs/benchmarks.md, "Measured choices in the extensions")
SMALL_ELEMENTS = 1 << 20


@contextlib.contextmanager
def at_most_threads(count: int | None):
    """Run the block with at most ``count`` intra-op threads, restoring the setting after.
    ``None``: no change."""
    previous = torch.get_num_threads()
    if count is None or count >= previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


class TensorOps:
    """The ops on one tensor; scalars are Python numbers (eager) or 0-dim tensors (compiled).

    A Python number goes to the dedicated kernel (``addcmul_``, ``lerp_``, ``alpha=``); a
    0-dim tensor is applied by plain arithmetic, which every ``torch.compile`` fuses into
    the one loop and which needs no dtype match with the tensor.
    """

    foreach = False

    @staticmethod
    def add(x: Tensor, other, alpha=None) -> Tensor:
        """``x + alpha * other`` (``x + other`` without ``alpha``)."""
        if alpha is None:
            return x + other
        return x + alpha * other if isinstance(alpha, Tensor) else x.add(other, alpha=alpha)

    @staticmethod
    def add_(x: Tensor, other, alpha=None) -> Tensor:
        """``x += alpha * other`` (``x += other`` without ``alpha``)."""
        if alpha is None:
            return x.add_(other)
        return x.add_(alpha * other) if isinstance(alpha, Tensor) else x.add_(other, alpha=alpha)

    @staticmethod
    def sub_(x: Tensor, other) -> Tensor:
        """``x -= other``."""
        return x.sub_(other)

    @staticmethod
    def mul(x: Tensor, other) -> Tensor:
        """``x * other``."""
        return x * other

    @staticmethod
    def mul_(x: Tensor, other) -> Tensor:
        """``x *= other``."""
        return x.mul_(other)

    @staticmethod
    def div(x: Tensor, other) -> Tensor:
        """``x / other``."""
        return x / other

    @staticmethod
    def addcmul_(x: Tensor, a: Tensor, b: Tensor, value) -> Tensor:
        """``x += value * a * b``."""
        if isinstance(value, Tensor):
            return x.add_(value * a * b)
        return x.addcmul_(a, b, value=value)

    @staticmethod
    def lerp_(x: Tensor, other: Tensor, weight) -> Tensor:
        """``x += weight * (other - x)``."""
        if isinstance(weight, Tensor):
            return x.add_(weight * (other - x))
        return x.lerp_(other, weight)

    @staticmethod
    def clamp_min_(x: Tensor, value: float) -> Tensor:
        """``x = max(x, value)``."""
        return x.clamp_(min=value)

    @staticmethod
    def clamp_tiny_(x: Tensor) -> Tensor:
        """``x = max(x, tiny)``, ``tiny`` the smallest normal number of ``x``'s dtype."""
        return x.clamp_(min=_tiny(x.dtype))

    @staticmethod
    def sqrt_(x: Tensor) -> Tensor:
        """``x = sqrt(x)``."""
        return x.sqrt_()

    @staticmethod
    def sign(x: Tensor) -> Tensor:
        """``sign(x)`` (0 at 0)."""
        return torch.sign(x)


class ForeachOps:
    """The ops on lists of tensors, with ``torch._foreach`` kernels; scalars are numbers."""

    foreach = True

    @staticmethod
    def add(x: list[Tensor], other, alpha=None) -> list[Tensor]:
        """``x + alpha * other`` (``x + other`` without ``alpha``)."""
        if alpha is None:
            return torch._foreach_add(x, other)
        return torch._foreach_add(x, other, alpha=alpha)

    @staticmethod
    def add_(x: list[Tensor], other, alpha=None) -> list[Tensor]:
        """``x += alpha * other`` (``x += other`` without ``alpha``)."""
        if alpha is None:
            torch._foreach_add_(x, other)
        else:
            torch._foreach_add_(x, other, alpha=alpha)
        return x

    @staticmethod
    def sub_(x: list[Tensor], other) -> list[Tensor]:
        """``x -= other``."""
        torch._foreach_sub_(x, other)
        return x

    @staticmethod
    def mul(x: list[Tensor], other) -> list[Tensor]:
        """``x * other``."""
        return torch._foreach_mul(x, other)

    @staticmethod
    def mul_(x: list[Tensor], other) -> list[Tensor]:
        """``x *= other``."""
        torch._foreach_mul_(x, other)
        return x

    @staticmethod
    def div(x: list[Tensor], other) -> list[Tensor]:
        """``x / other``."""
        return torch._foreach_div(x, other)

    @staticmethod
    def addcmul_(x: list[Tensor], a: list[Tensor], b: list[Tensor], value) -> list[Tensor]:
        """``x += value * a * b``."""
        torch._foreach_addcmul_(x, a, b, value=value)
        return x

    @staticmethod
    def lerp_(x: list[Tensor], other: list[Tensor], weight) -> list[Tensor]:
        """``x += weight * (other - x)``."""
        torch._foreach_lerp_(x, other, weight)
        return x

    @staticmethod
    def clamp_min_(x: list[Tensor], value: float) -> list[Tensor]:
        """``x = max(x, value)``."""
        torch._foreach_clamp_min_(x, value)
        return x

    @staticmethod
    def clamp_tiny_(x: list[Tensor]) -> list[Tensor]:
        """``x = max(x, tiny)``, ``tiny`` the smallest normal number of each dtype."""
        # one list may mix dtypes: a float32 p.grad_variance promotes m^2 + V of a bf16 m
        by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
        for tensor in x:
            by_dtype[tensor.dtype].append(tensor)
        for dtype, tensors in by_dtype.items():
            torch._foreach_clamp_min_(tensors, _tiny(dtype))
        return x

    @staticmethod
    def sqrt_(x: list[Tensor]) -> list[Tensor]:
        """``x = sqrt(x)``."""
        torch._foreach_sqrt_(x)
        return x

    @staticmethod
    def sign(x: list[Tensor]) -> list[Tensor]:
        """``sign(x)`` (0 at 0)."""
        return torch._foreach_sign(x)


class StepNumber:
    """One of the step's numbers inside the compiled kernel: its value and its reciprocal,
    0-dim tensors computed on the host, so that dividing by it is a multiplication.

    Formulas pass step numbers to the ops (:class:`KernelOps` unwraps them); arithmetic
    on one directly works too, on its value.
    """

    __slots__ = ("value", "reciprocal")

    def __init__(self, value: Tensor, reciprocal: Tensor) -> None:
        self.value, self.reciprocal = value, reciprocal

    def __neg__(self):
        return -self.value

    def __add__(self, other):
        return self.value + _value(other)

    __radd__ = __add__

    def __sub__(self, other):
        return self.value - _value(other)

    def __rsub__(self, other):
        return _value(other) - self.value

    def __mul__(self, other):
        return self.value * _value(other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self.value / _value(other)

    def __rtruediv__(self, other):
        return _value(other) * self.reciprocal


def _value(x):
    return x.value if isinstance(x, StepNumber) else x


class KernelOps(TensorOps):
    """:class:`TensorOps` inside the compiled kernel, where the step's numbers are
    :class:`StepNumber` s: dividing by one multiplies by its reciprocal (a division per
    element made the kernel compute-bound; ``docs/benchmarks.md``)."""

    @staticmethod
    def add(x, other, alpha=None):
        """``x + alpha * other`` (``x + other`` without ``alpha``)."""
        return TensorOps.add(x, _value(other), _value(alpha))

    @staticmethod
    def add_(x, other, alpha=None):
        """``x += alpha * other`` (``x += other`` without ``alpha``)."""
        return TensorOps.add_(x, _value(other), _value(alpha))

    @staticmethod
    def sub_(x, other):
        """``x -= other``."""
        return x.sub_(_value(other))

    @staticmethod
    def mul(x, other):
        """``x * other``."""
        return x * _value(other)

    @staticmethod
    def mul_(x, other):
        """``x *= other``."""
        return x.mul_(_value(other))

    @staticmethod
    def div(x, other):
        """``x / other``; ``x * (1 / other)`` for a step number."""
        if isinstance(other, StepNumber):
            return x * other.reciprocal
        return x / other

    @staticmethod
    def addcmul_(x, a, b, value):
        """``x += value * a * b``."""
        return TensorOps.addcmul_(x, a, b, _value(value))

    @staticmethod
    def lerp_(x, other, weight):
        """``x += weight * (other - x)``."""
        return TensorOps.lerp_(x, other, _value(weight))

    @staticmethod
    def clamp_min_(x, value):
        """``x = max(x, value)``."""
        return x.clamp_(min=_value(value))


#: one tensor (the per-tensor path)
TENSOR = TensorOps()
#: one flattened tensor, the step's numbers as StepNumbers (the compiled kernel)
KERNEL = KernelOps()
#: lists of tensors (the ``foreach`` path)
FOREACH = ForeachOps()

Ops = TensorOps | ForeachOps
