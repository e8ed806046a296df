"""Engine ``"ghost_batch"``: variance from the spread of K independent group gradients.

For models whose examples are not independent inside a batch (BatchNorm in train mode),
per-example gradients are undefined. Ghost batches give a defined alternative: split the
batch into ``K`` equal groups, run each group forward and backward on its own (BatchNorm
statistics per group), and treat the groups as the independent units. With mean
reduction the batch gradient is the mean of the group gradients ``G_k`` and

    s_hat = ( (1/K) sum_k G_k^2 - Gbar^2 ) / (K - 1),

which is unbiased for ``var[Gbar]`` when the groups are independent, with only ``K - 1``
degrees of freedom. Side effects: BatchNorm normalises with group statistics (as in
ghost batch normalisation) and updates its running averages once per group.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..model_checks import batch_size_of, model_inputs, sparse_gradients_reason
from .base import Engine, EngineResult, LossFunction, ParameterStatistics, register_engine


@register_engine
class GhostBatchEngine(Engine):
    """Group-wise forward/backward; the groups are the independent units.

    Args:
        groups: number of groups ``K >= 2``; the batch size must be divisible by it.
    """

    name = "ghost_batch"
    auto_priority = None  # changes what BatchNorm computes: never chosen implicitly
    units_are_examples = False  # the groups are the units (the constructor checks K >= 2)
    handles_train_mode_batchnorm = True  # BatchNorm normalises within each group
    reruns_model = True  # one forward per group
    #: refused with a DistributedDataParallel model: GradientVariance bypasses DDP's
    #: forward and its buffer broadcast, so the groups' BatchNorm updates would let the
    #: ranks' running statistics drift apart, and every rank's share would have to split
    #: into K equal groups
    supports_distributed = False

    def __init__(self, groups: int = 8) -> None:
        if not isinstance(groups, int) or groups < 2:
            raise ValueError(f"Invalid number of groups: {groups} (must be an int >= 2)")
        self.groups = groups

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """``None`` unless a trainable layer has sparse gradients: only ordinary forward
        and backward passes are used."""
        return sparse_gradients_reason(model)

    def compute(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        inputs: Tensor | Sequence[Tensor],
        targets: Tensor,
        parameters: Sequence[nn.Parameter],
        reduction: str | None = None,
    ) -> EngineResult:
        """Forward and backward per group of ``batch_size / K`` examples; each group's gradient
        is one unit of the statistics (the batch size must be divisible by ``K``; mean or sum
        reduction).
        """
        batch_size = batch_size_of(inputs)
        if batch_size % self.groups != 0:
            raise ValueError(
                f"GhostBatchEngine(groups={self.groups}) needs a batch size divisible by "
                f"{self.groups}, got {batch_size}; change the batch size or the groups."
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(
                "GhostBatchEngine needs the loss reduction to weigh the groups: use an "
                "nn loss with reduction='mean' or 'sum', or pass reduction= to "
                "GradientVariance."
            )
        # with mean reduction, group k's contribution to the batch gradient is G_k / K
        weight = 1.0 / self.groups if reduction == "mean" else 1.0
        split_inputs = [x.chunk(self.groups) for x in model_inputs(inputs)]
        split_targets = targets.chunk(self.groups)
        params = list(parameters)
        grad: list[Tensor | None] = [None] * len(params)
        sum_grad_squared: list[Tensor | None] = [None] * len(params)
        total_loss = 0.0
        for k in range(self.groups):
            group_inputs = tuple(chunks[k] for chunks in split_inputs)
            group_loss = loss_fn(model(*group_inputs), split_targets[k]) * weight
            group_grads = torch.autograd.grad(group_loss, params, allow_unused=True)
            total_loss = total_loss + group_loss.detach()
            for i, contribution in enumerate(group_grads):
                if contribution is None:
                    continue
                if grad[i] is None:
                    grad[i] = contribution.clone()
                    sum_grad_squared[i] = contribution * contribution
                else:
                    grad[i].add_(contribution)
                    sum_grad_squared[i].addcmul_(contribution, contribution)
        statistics = {
            param: ParameterStatistics(g, s)
            for param, g, s in zip(params, grad, sum_grad_squared)
            if g is not None
        }
        return EngineResult(total_loss, self.groups, statistics)
