"""The engine interface: how per-example gradient statistics are computed.

An engine runs one forward and backward pass of ``loss_fn(model(inputs), targets)`` and
returns, for every trainable parameter that received a gradient,

* ``grad``: the batch gradient, exactly what ``loss.backward()`` would leave in ``p.grad``;
* ``sum_grad_squared``: ``sum_n c_n**2``, where ``c_n`` is example n's *contribution* to
  ``grad`` (so ``grad = sum_n c_n``). With a mean-reduced loss ``c_n = g_n / B``; with a
  sum-reduced loss ``c_n = g_n``.

Working with contributions makes the within-batch variance estimate independent of the
loss's reduction: ``s_hat = (B * sum_grad_squared - grad**2) / (B - 1)`` is the unbiased
estimate of ``var[grad]`` in the scale of ``grad`` for both (ALGORITHMS.md).

Engines register themselves by name with :func:`register_engine`; ``GradientVariance``
looks them up in :data:`ENGINES`, and tests loop over that registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

LossFunction = Callable[[Tensor, Tensor], Tensor]


class UnsupportedModelError(ValueError):
    """A model (or one of its layers) cannot be handled by the requested engine.

    Raised before any backward pass; the message names the layer and the fix.
    """


@dataclass
class ParameterStatistics:
    """Per-parameter output of an engine for one batch."""

    grad: Tensor
    sum_grad_squared: Tensor


@dataclass
class EngineResult:
    """What an engine returns for one batch."""

    loss: Tensor
    batch_size: int
    statistics: dict[nn.Parameter, ParameterStatistics]


class Engine(ABC):
    """Computes a batch gradient and the sum of squared per-example contributions."""

    #: registry name, e.g. ``"backpack"``
    name: ClassVar[str]
    #: lower is preferred by ``engine="auto"`` among the engines that support a model
    auto_priority: ClassVar[int | None] = 100  # None: never chosen by "auto"

    @classmethod
    @abstractmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """``None`` if this engine computes correct statistics for ``model``, else why not.

        The reason names the offending layer (by its qualified name) and says what to do.
        Must not run the model.
        """

    @abstractmethod
    def compute(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        inputs: Tensor | Sequence[Tensor],
        targets: Tensor,
        parameters: Sequence[nn.Parameter],
        reduction: str | None = None,
    ) -> EngineResult:
        """Run forward + backward and return per-parameter statistics.

        ``inputs`` is a tensor, or a tuple of tensors passed as ``model(*inputs)``; examples
        lie along dim 0 of each. ``parameters`` are the trainable parameters to report on
        (their ``p.grad`` is ``None`` on entry: an engine may call ``loss.backward()`` and
        return ``p.grad``, or use ``torch.autograd.grad``; ``GradientVariance`` owns
        ``p.grad`` afterwards). ``reduction`` is the loss's reduction (``"mean"``, ``"sum"``)
        when known; most engines do not need it. ``EngineResult.batch_size`` is the number of
        independent units whose contributions were summed (examples, or groups for a
        ghost-batch engine). Implementations must not leave hooks or other state behind.
        """


ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make ``cls`` available as ``engine=cls.name``."""
    if cls.name in ENGINES and ENGINES[cls.name] is not cls:
        raise ValueError(f"an engine named {cls.name!r} is already registered")
    ENGINES[cls.name] = cls
    return cls


def model_inputs(inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Normalise ``inputs`` to the positional arguments of ``model``."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    return tuple(inputs)


def batch_size_of(inputs: Tensor | Sequence[Tensor]) -> int:
    """Number of examples: the size of dim 0 of the (first) input."""
    first = model_inputs(inputs)[0]
    if first.dim() == 0:
        raise ValueError("inputs must have a batch dimension (examples along dim 0)")
    return first.shape[0]


def qualified_names(model: nn.Module) -> dict[nn.Parameter, str]:
    """Map each parameter to its name in ``model``."""
    return {p: name for name, p in model.named_parameters()}


def find_tied_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of module paths that hold the *same* Parameter object (tied weights)."""
    owner: dict[int, str] = {}
    tied = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            path = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in owner and owner[id(param)] != path:
                tied.append((owner[id(param)], path))
            else:
                owner[id(param)] = path
    return tied


def inplace_modules(model: nn.Module) -> list[str]:
    """Qualified names of modules configured to work in place (``inplace=True``)."""
    return [name for name, m in model.named_modules() if getattr(m, "inplace", False) is True]


def train_mode_batchnorm(model: nn.Module) -> list[str]:
    """Qualified names of BatchNorm layers in train mode (examples not independent)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]


def train_mode_batchnorm_reason(model: nn.Module) -> str | None:
    """Why per-example engines refuse ``model`` because of train-mode BatchNorm, or None."""
    batchnorm = train_mode_batchnorm(model)
    if not batchnorm:
        return None
    return (f"BatchNorm layer '{batchnorm[0]}' is in train mode: examples are not "
            "independent, so per-example gradients are undefined. Call model.eval() "
            "for these layers, or use engine=msvag_mb.GhostBatchEngine(groups=K).")


def leaf_modules_with_parameters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that directly own trainable parameters."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def require_finite(tensor: Tensor, what: str) -> None:
    """Raise a clear error if ``tensor`` holds NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise FloatingPointError(
            f"{what} contains NaN or Inf. Check the data and the step size, or use a "
            "GradScaler (mixed precision) which skips such steps."
        )
