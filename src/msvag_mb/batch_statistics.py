"""The algebra of combining batches: ``(S1, S2, N, U)`` in and out of ``p.grad``/``s_hat``.

One batch's engine result holds ``p.grad = sum_u c_u`` and ``sum_u c_u^2`` over its ``U``
units (:mod:`msvag_mb.engines.base`), from which the within-batch estimate is

    s_hat = (U * sum_u c_u^2 - p.grad^2) / (U - 1)

(the paper's App. D; docs/maths.md, (M13)). Combining batches (accumulation, several
ranks) works with the sums over the per-example gradients ``g_n`` (the gradient of example
n's own loss term), docs/maths.md, "Combining batches", (M16):

    S1 = sum_n g_n,   S2 = sum_n g_n^2,   N examples,   U independent units

(``U = N`` for per-example engines; groups or ranks for the engines whose units are
bigger than one example, each unit then standing for its ``m_u`` examples with its mean
gradient ``G_u``: ``S2 = sum_u m_u G_u^2``). Then, for a mean-reduced loss, (M17):

    p.grad = S1 / N,   s_hat = (S2 - S1^2 / N) / ((U - 1) N)

and ``N`` times / ``N^2`` times those for a sum-reduced one; (M18) gives the sums from an
engine's output. Sums add across batches and ranks, so both are exact: several calls
before one optimizer step give the statistics of the concatenated batch, and one
all-reduce of ``(S1, S2, N, U)`` gives those of the global batch
(:mod:`msvag_mb.statistics_allreduce`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .engines.base import ParameterStatistics


@dataclass
class BatchStatistics:
    """One call's statistics (after the all-reduce when distributed), in contributions."""

    loss: Tensor
    examples: int  # N: examples in the batch the statistics describe
    units: int  # U: independent units (examples, ghost groups or ranks)
    statistics: dict[nn.Parameter, ParameterStatistics]


def single_batch_variance(grad: Tensor, sum_grad_squared: Tensor, units: int, *,
                          overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """``s_hat = (U sum_u c_u^2 - grad^2) / (U - 1)``, clamped at 0 (float cancellation),
    and the float32 sum of ``s_hat`` before the clamp: its finiteness witness.

    A NaN or Inf in ``grad``, in ``sum_u c_u^2`` or in the formula (``grad^2`` overflowing)
    makes that element NaN or +-Inf before the clamp (which would turn -Inf into 0), hence
    the sum: a finite sum proves ``grad`` and ``s_hat`` finite (a non-finite one may also
    be an overflow of finite values; :func:`msvag_mb.param_variance.all_finite` decides).

    ``overwrite``: ``sum_grad_squared`` is the caller's to consume (an engine's fresh
    result, not read afterwards); ``s_hat`` is then written into it where it owns its whole
    memory and shares none with ``grad``, saving a gradient-sized tensor.
    """
    # scale by the integer U before cancelling (folding 1/(U-1) in first rounds the two
    # large terms apart: tests/test_amp.py's high signal-to-noise case loses digits)
    if overwrite and _owns_its_memory(sum_grad_squared, grad):
        variance = sum_grad_squared.mul_(units)
    else:
        variance = sum_grad_squared.mul(units)
    variance.addcmul_(grad, grad, value=-1.0).div_(units - 1)
    witness = variance.sum(dtype=torch.float32)
    return variance.clamp_(min=0.0), witness


def _owns_its_memory(tensor: Tensor, other: Tensor) -> bool:
    """True if ``tensor`` is all of its storage, dense, and not ``other``'s storage: writing
    it in place changes nothing else (no view of a larger buffer, no expanded tensor)."""
    storage = tensor.untyped_storage()
    return (not tensor.requires_grad and tensor.is_contiguous()
            and storage.nbytes() == tensor.numel() * tensor.element_size()
            and storage.data_ptr() != other.untyped_storage().data_ptr())


def sums_from_contributions(grad: Tensor, sum_grad_squared: Tensor, examples: int,
                            units: int, reduction: str) -> tuple[Tensor, Tensor]:
    """``(S1, S2)`` from an engine's ``grad = sum_u c_u`` and ``sum_u c_u^2``.

    A unit of ``m = N/U`` examples with mean gradient ``G_u`` contributes ``c_u = G_u/U``
    (mean loss) or ``m G_u`` (sum loss) and stands for ``m`` examples of gradient ``G_u``
    in ``S2 = sum_u m G_u^2``.
    """
    if examples == 0:
        return torch.zeros_like(grad), torch.zeros_like(grad)
    if reduction == "mean":
        return grad * examples, sum_grad_squared * (examples * units)
    return grad.clone(), sum_grad_squared * (units / examples)


def contributions_from_sums(first: Tensor, second: Tensor, examples: int, units: int,
                            reduction: str) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`sums_from_contributions` for the combined batch."""
    if reduction == "mean":
        return first / examples, second / (examples * units)
    return first.clone(), second * (examples / units)


def sums_from_grad_variance(grad: Tensor, variance: Tensor, examples: int, units: int,
                            reduction: str) -> tuple[Tensor, Tensor]:
    """``(S1, S2)`` recovered from ``p.grad`` and ``p.grad_variance`` of ``N`` examples."""
    if reduction == "mean":
        first = grad * examples
        return first, variance * ((units - 1) * examples) + grad * grad * examples
    second = variance * ((units - 1) / examples) + grad * grad / examples
    return grad, second


def grad_variance_from_sums(first: Tensor, second: Tensor, examples: int, units: int,
                            reduction: str) -> tuple[Tensor, Tensor]:
    """``p.grad`` and ``s_hat`` (clamped at 0) from ``(S1, S2, N, U)``."""
    spread = second - first * first / examples  # sum_u m_u (G_u - gbar)^2
    if reduction == "mean":
        return first / examples, (spread / ((units - 1) * examples)).clamp_(min=0.0)
    return first, (spread * (examples / (units - 1))).clamp_(min=0.0)


@dataclass
class CycleSoFar:
    """What the accumulation cycle holds before a call: ``N``, ``U`` and, per parameter,
    its ``(p.grad, p.grad_variance)`` (absent or ``(None, None)``: no gradient yet)."""

    examples: int
    units: int
    results: dict[nn.Parameter, tuple[Tensor | None, Tensor | None]]


@dataclass
class CombinedStatistics:
    """The cycle's statistics including this call: ``(p.grad, p.grad_variance)`` per
    parameter (None: no gradient), and float32 sums whose finiteness proves those tensors
    finite (one per parameter of a single batch, see :func:`single_batch_variance`)."""

    updates: dict[nn.Parameter, tuple[Tensor, Tensor] | None]
    finiteness_sums: list[Tensor]


def combined_statistics(
    params: list[nn.Parameter], so_far: CycleSoFar, call: BatchStatistics, reduction: str | None
) -> CombinedStatistics:
    """``(p.grad, p.grad_variance)`` of the cycle including this call.

    Consumes ``call``: a single batch's variance is written into the engine's
    ``sum_u c_u^2`` where possible (the cycle so far is only read).
    """
    updates: dict[nn.Parameter, tuple[Tensor, Tensor] | None] = {}
    sums: list[Tensor] = []
    for param in params:
        stats = call.statistics.get(param)
        old_grad, old_variance = so_far.results.get(param, (None, None))
        if stats is None and old_grad is None:
            updates[param] = None
        elif so_far.examples == 0:
            variance, witness = single_batch_variance(
                stats.grad, stats.sum_grad_squared, call.units, overwrite=True)
            updates[param] = (stats.grad, variance)
            sums.append(witness)
        else:
            pair = _concatenated(param, old_grad, old_variance, so_far, stats, call, reduction)
            updates[param] = pair
            sums += [t.sum(dtype=torch.float32) for t in pair]
    return CombinedStatistics(updates, sums)


def _concatenated(param: nn.Parameter, old_grad: Tensor | None, old_variance: Tensor | None,
                  so_far: CycleSoFar, stats: ParameterStatistics | None, call: BatchStatistics,
                  reduction: str) -> tuple[Tensor, Tensor]:
    """Statistics of the concatenation of the cycle so far and this call's batch."""
    zeros = torch.zeros_like(param)
    old_grad = zeros if old_grad is None else old_grad
    old_variance = zeros if old_variance is None else old_variance
    new_grad = zeros if stats is None else stats.grad
    new_sgs = zeros if stats is None else stats.sum_grad_squared
    first_old, second_old = sums_from_grad_variance(
        old_grad, old_variance, so_far.examples, so_far.units, reduction)
    first_new, second_new = sums_from_contributions(
        new_grad, new_sgs, call.examples, call.units, reduction)
    return grad_variance_from_sums(
        first_old + first_new, second_old + second_new,
        so_far.examples + call.examples, so_far.units + call.units, reduction)
