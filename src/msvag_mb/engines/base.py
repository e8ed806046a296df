"""The engine interface: how per-example gradient statistics are computed.

An engine runs one forward and backward pass of ``loss_fn(model(inputs), targets)`` and
returns, for every trainable parameter that received a gradient,

* ``grad``: the batch gradient, exactly what ``loss.backward()`` would leave in ``p.grad``;
* ``sum_grad_squared``: ``sum_n c_n**2``, where ``c_n`` is unit n's *contribution* to
  ``grad`` (so ``grad = sum_n c_n``). For an engine whose units are examples, with a
  mean-reduced loss ``c_n = g_n / B``; with a sum-reduced loss ``c_n = g_n``.

Working with contributions makes the within-batch variance estimate independent of the
loss's reduction: ``s_hat = (B * sum_grad_squared - grad**2) / (B - 1)`` is the unbiased
estimate of ``var[grad]`` in the scale of ``grad`` for both (the paper's App. D;
docs/maths.md, "Per-example contributions", (M13)).

An engine *declares* what it is in class attributes (:class:`Engine`'s capabilities: what
its units are, whether it needs or supports several processes, autocast in the backward
pass, ...); ``GradientVariance`` and the runner read those, never an engine's name.
Engines register themselves by name with :func:`register_engine`; ``GradientVariance``
looks them up in :data:`ENGINES`, and tests loop over that registry.

An engine that ``serves_collect`` can also take its statistics from a forward and backward
that the user runs (``GradientVariance.collect``): :meth:`Engine.collect_session` returns a
:class:`CollectSession`, which hooks the model for that one pass and reads the statistics
afterwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

from torch import Tensor, nn

from ..model_checks import UnsupportedModelError

__all__ = [
    "ENGINES",
    "CollectSession",
    "Engine",
    "EngineResult",
    "LossFunction",
    "ParameterStatistics",
    "StatisticsListener",
    "UnsupportedModelError",
    "register_engine",
]

LossFunction = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ParameterStatistics:
    """Per-parameter output of an engine for one batch."""

    grad: Tensor
    sum_grad_squared: Tensor


#: ``on_ready(param, statistics)``: a streaming engine's announcement that ``param``'s
#: statistics are final (``Engine.streams_statistics``); called during the backward pass
StatisticsListener = Callable[[nn.Parameter, ParameterStatistics], None]


@dataclass
class EngineResult:
    """What an engine returns for one batch.

    ``units`` is the number of independent units whose contributions were summed: the
    examples, or the groups of a ghost-batch engine, or 1 for one rank's share.
    """

    loss: Tensor
    units: int
    statistics: dict[nn.Parameter, ParameterStatistics]


class Engine(ABC):
    """Computes a batch gradient and the sum of squared per-unit contributions.

    Capabilities (class attributes; a new engine overrides those that differ):
    """

    #: registry name, e.g. ``"backpack"``
    name: ClassVar[str]
    #: lower is preferred by ``engine="auto"`` among the engines that support a model
    auto_priority: ClassVar[int | None] = 100  # None: never chosen by "auto"

    #: each unit of the statistics is one example (False: groups of examples, or ranks)
    units_are_examples: ClassVar[bool] = True
    #: the units only exist across processes: needs a DistributedDataParallel model on
    #: ``>= 2`` ranks (its statistics are formed after the all-reduce)
    needs_distributed: ClassVar[bool] = False
    #: may run with a DistributedDataParallel model (under torchrun)
    supports_distributed: ClassVar[bool] = True
    #: its per-layer backward code needs the user's autocast around the backward pass too
    #: (the others run their own maths outside autocast, in the parameters' dtype)
    autocast_in_backward: ClassVar[bool] = False
    #: the fewest units that have a within-batch variance
    min_units: ClassVar[int] = 2
    #: exact (for its own estimator) on models with BatchNorm layers in train mode
    handles_train_mode_batchnorm: ClassVar[bool] = False
    #: runs the model itself (its own forward passes, e.g. per group or under torch.func),
    #: so it cannot take its statistics from a forward and backward that the user runs
    reruns_model: ClassVar[bool] = False
    #: can take its statistics from a forward and backward that the user runs inside
    #: ``GradientVariance.collect()`` (implements :meth:`collect_session`)
    serves_collect: ClassVar[bool] = False
    #: announces each parameter's statistics during the backward pass, as soon as they are
    #: final: :meth:`compute` and :meth:`collect_session` take ``on_ready`` (a
    #: :data:`StatisticsListener`), so that with DDP their all-reduce overlaps the rest of
    #: the backward pass. Its units are its examples, and what it announces is exactly what
    #: it returns (parameters it does not announce are taken from the result afterwards).
    streams_statistics: ClassVar[bool] = False

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
        when known; most engines do not need it. ``EngineResult.units`` is the number of
        independent units whose contributions were summed (examples, or groups for a
        ghost-batch engine). Implementations must not leave hooks or other state behind.
        """

    def collect_session(self, model: nn.Module,
                        parameters: Sequence[nn.Parameter]) -> "CollectSession":
        """A :class:`CollectSession` for one user-driven forward and backward of ``model``
        (only for an engine that declares ``serves_collect``)."""
        raise NotImplementedError(
            f"engine '{self.name}' does not serve GradientVariance.collect() "
            "(serves_collect is False)")


class CollectSession(ABC):
    """The engine's side of one ``GradientVariance.collect()`` block: the user runs one
    forward of the model and one backward of a loss built from its outputs.

    ``GradientVariance`` calls, in this order: :meth:`begin` when the model's forward starts
    (the batch size and the model's tensor arguments are known then), :meth:`check_output`
    when it returns (before any backward: refuse here what the forward revealed),
    :meth:`statistics` after the block (``p.grad`` then holds this batch's gradient only),
    and :meth:`close` in every case, also after an error. A session must leave no hooks or
    other state behind after :meth:`close`. Its units are the batch's examples.
    """

    #: the parameters whose statistics come from their own layers' calls: any use of one
    #: outside the model's forward (e.g. an L2 term written into the loss) is refused
    guarded_parameters: Sequence[nn.Parameter] = ()

    @abstractmethod
    def begin(self, batch_size: int, inputs: Sequence[Tensor]) -> None:
        """The model's forward starts: ``batch_size`` examples, along dim 0 of ``inputs``."""

    def check_output(self, output) -> None:
        """The model's forward returned ``output`` (a tensor or nested tuples, lists,
        dicts); raise :class:`UnsupportedModelError` here, before the backward pass."""

    @abstractmethod
    def statistics(self) -> dict[nn.Parameter, ParameterStatistics]:
        """After the user's backward: ``p.grad`` and ``sum_u c_u**2`` per parameter that
        received a gradient (``c_u`` as the gradient carries them: the loss's own scale)."""

    @abstractmethod
    def close(self) -> None:
        """Remove every hook and piece of state the session added (idempotent)."""


ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make ``cls`` available as ``engine=cls.name``."""
    if cls.name in ENGINES and ENGINES[cls.name] is not cls:
        raise ValueError(f"an engine named {cls.name!r} is already registered")
    ENGINES[cls.name] = cls
    return cls
