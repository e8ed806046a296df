"""Engine ``"rank_spread"``: the variance from the spread of the ranks' mean gradients.

A cheap estimator for data-parallel training that needs no per-example gradients: every
rank runs one ordinary forward and backward pass on its local batch (``B_r`` examples,
local mean gradient ``G_r``), and the ``W`` ranks are the independent units. With the
global mean ``gbar = sum_r B_r G_r / N`` (``N = sum_r B_r``, exactly the gradient of the
global batch) the estimate is

    s_hat = sum_r B_r (G_r - gbar)^2 / ((W - 1) N)

for a mean-reduced loss (``N^2`` times that for a sum-reduced one). If the ``N`` examples
are independent draws with a common per-example covariance, ``E[s_hat] = var[gbar]``
exactly, for equal and for unequal local batch sizes; with equal sizes it is
``var_r(G_r) / W``, the ghost-batch formula with the ranks as groups.

The engine itself only reports one unit per rank (contribution ``c = grad``, so
``sum c^2 = grad^2``); :class:`~msvag_mb.GradientVariance` turns the all-reduced sums into
the estimate above (its module docstring: ``S2 = sum_r B_r G_r^2``, ``U = W``).

Limits:

* Only ``W - 1`` degrees of freedom: for Gaussian gradients the relative standard
  deviation of ``s_hat`` is about ``sqrt(2 / (W - 1))`` (141% with 2 ranks, 38% with 16),
  against ``sqrt(2 / (N - 1))`` for the per-example engines. M-SVAG's factor
  ``m^2 / (m^2 + r)`` is non-linear in the estimate, so a noisy estimate biases the step.
* Needs ``>= 2`` ranks holding examples, and local batches that are independent of each
  other (no shared examples; sample with replacement or shard one shuffled stream).
* Everything that makes ranks differ other than their examples adds to the spread
  (e.g. BatchNorm in train mode normalises per rank, as DDP without SyncBatchNorm does):
  that is the variance of the gradient actually computed, but not a per-example one.
* Cost: no more computation than plain DDP; the all-reduce carries ``2P`` numbers per
  call instead of DDP's ``P``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..model_checks import model_inputs
from .base import Engine, EngineResult, LossFunction, ParameterStatistics, register_engine


@register_engine
class RankSpreadEngine(Engine):
    """One ordinary backward pass per rank; the ranks are the independent units."""

    name = "rank_spread"
    auto_priority = None  # a different (much noisier) estimator: never chosen implicitly
    units_are_examples = False  # the ranks are the units
    #: the units only exist after the all-reduce over the ranks
    needs_distributed = True

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Any model, but only under ``torch.distributed`` with at least two processes."""
        # Any model works (only an ordinary forward/backward pass is used), but not on a
        # single process: there is only one unit there.
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() >= 2):
            return ("its units are the ranks, so it needs torch.distributed initialised with "
                    ">= 2 processes and a DistributedDataParallel model (torchrun "
                    "--nproc_per_node=2 ...); on one process use engine='auto' (per-example "
                    "statistics) or engine=msvag_mb.GhostBatchEngine(groups=K).")
        return None

    def compute(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        inputs: Tensor | Sequence[Tensor],
        targets: Tensor,
        parameters: Sequence[nn.Parameter],
        reduction: str | None = None,
    ) -> EngineResult:
        """One ordinary forward and backward pass on the local batch, reported as a single unit
        (contribution = gradient); the spread across ranks is formed after the all-reduce.
        """
        params = list(parameters)
        loss = loss_fn(model(*model_inputs(inputs)), targets)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        statistics = {
            param: ParameterStatistics(grad, grad * grad)
            for param, grad in zip(params, grads)
            if grad is not None
        }
        return EngineResult(loss.detach(), 1, statistics)
