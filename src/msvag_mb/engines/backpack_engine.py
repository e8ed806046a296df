"""Engine ``"backpack"``: BackPACK's ``SumGradSquared`` first-order extension.

BackPACK (Dangel et al., 2020) computes ``sum_n c_n^2`` from each layer's input and output
gradient during one ordinary backward pass. We register BackPACK's hooks only for the
duration of one call and remove them afterwards, because hooks left on a model break
``torch.func`` transforms (engine switching). Every known trap is refused *before* the
backward pass, with the layer's name and the fix.
"""

from __future__ import annotations

import warnings
from typing import Sequence

from torch import Tensor, nn

from .base import (
    Engine,
    EngineResult,
    LossFunction,
    ParameterStatistics,
    UnsupportedModelError,
    batch_size_of,
    find_tied_parameters,
    inplace_modules,
    leaf_modules_with_parameters,
    model_inputs,
    register_engine,
    train_mode_batchnorm_reason,
)


def _lstm_problem(module: nn.RNNBase) -> str | None:
    """BackPACK 1.7's RNN/LSTM derivatives only cover this configuration."""
    if not module.batch_first:
        return "batch_first=False"
    if module.num_layers != 1:
        return (f"num_layers={module.num_layers} (BackPACK's converter, extend(..., "
                "use_converter=True), splits layers but refuses initial states)")
    if module.bias is not True:
        return "bias=False"
    if module.dropout != 0:
        return "dropout != 0"
    if module.bidirectional:
        return "bidirectional=True"
    if getattr(module, "proj_size", 0) != 0:
        return "proj_size != 0"
    return None


def _refuse_initial_state(module: nn.Module, args: tuple) -> None:
    # BackPACK's LSTM/RNN derivatives assume a zero initial state: with (h0, c0) given they
    # would silently return wrong statistics.
    if len(args) > 1 and args[1] is not None:
        raise UnsupportedModelError(
            f"BackPACK cannot handle an initial state passed to {type(module).__name__} (it "
            "assumes zeros and would give wrong statistics). Use engine='extensions' or "
            "engine='auto'."
        )


@register_engine
class BackpackEngine(Engine):
    """Per-example second moments from BackPACK's ``SumGradSquared``."""

    name = "backpack"
    auto_priority = 20

    @classmethod
    def supported_layers(cls) -> dict[type, object]:
        """The layer types BackPACK's ``SumGradSquared`` handles (its layer-to-extension map)."""
        from backpack.extensions import SumGradSquared

        # BackPACK keeps its layer map in a name-mangled private attribute
        return SumGradSquared()._BackpropExtension__module_extensions

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Refuses tied weights, in-place layers, BatchNorm in train mode, layers BackPACK lacks
        and LSTMs it cannot handle; ``None`` otherwise.
        """
        tied = find_tied_parameters(model)
        if tied:
            first, second = tied[0]
            return (f"tied weights: '{first}' and '{second}' are one Parameter; BackPACK "
                    "squares each module's share separately and returns wrong variances. "
                    "Use engine='vmap' (or 'auto').")
        inplace = inplace_modules(model)
        if inplace:
            return (f"layer '{inplace[0]}' works in place (inplace=True), which breaks "
                    "BackPACK's backward hooks; construct it with inplace=False.")
        batchnorm = train_mode_batchnorm_reason(model)
        if batchnorm:
            return batchnorm
        supported = cls.supported_layers()
        for name, module in leaf_modules_with_parameters(model):
            if type(module) not in supported:
                return (f"layer '{name}' ({type(module).__name__}) is not supported by "
                        "BackPACK's SumGradSquared (BackPACK would only warn and leave it "
                        "without statistics). Use engine='vmap' or engine='auto'.")
            if isinstance(module, nn.RNNBase):
                problem = _lstm_problem(module)
                if problem is not None:
                    return (f"layer '{name}' ({type(module).__name__}) has {problem}, which "
                            "BackPACK does not support. Use engine='extensions' or 'auto'.")
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
        """One forward and one backward pass with BackPACK's ``SumGradSquared`` hooked onto the
        leaf modules: the batch gradient and the sum of squared per-example contributions.
        """
        from backpack import backpack, hook_run_extensions, hook_store_io, memory_cleanup
        from backpack.extensions import SumGradSquared

        handles = []
        hooked = []
        try:
            for _, module in leaf_modules_with_parameters(model):
                if getattr(module, "_backpack_extend", False):
                    continue  # the user extended it already: its hooks are in place
                handles.append(module.register_forward_hook(hook_store_io))
                handles.append(module.register_full_backward_hook(hook_run_extensions))
                if isinstance(module, nn.RNNBase):
                    handles.append(module.register_forward_pre_hook(_refuse_initial_state))
                hooked.append(module)
            outputs = model(*model_inputs(inputs))
            loss = loss_fn(outputs, targets)
            with backpack(SumGradSquared()), warnings.catch_warnings():
                # expected for a first layer whose input needs no gradient: harmless here
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        finally:
            for handle in handles:
                handle.remove()
            for module in hooked:
                memory_cleanup(module)
        statistics = {}
        for param in parameters:
            if param.grad is None:
                continue
            sum_grad_squared = getattr(param, "sum_grad_squared", None)
            if sum_grad_squared is None:
                raise UnsupportedModelError(
                    f"BackPACK produced no statistics for a parameter of shape "
                    f"{tuple(param.shape)}: it is used outside a supported layer (e.g. in a "
                    "functional call). Use engine='vmap'."
                )
            del param.sum_grad_squared
            statistics[param] = ParameterStatistics(param.grad, sum_grad_squared)
        return EngineResult(loss.detach(), batch_size_of(inputs), statistics)
