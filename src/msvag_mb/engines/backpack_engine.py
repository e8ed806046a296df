"""Engine ``"backpack"``: BackPACK's ``SumGradSquared`` first-order extension.

BackPACK (Dangel et al., 2020) computes ``sum_n c_n^2`` from each layer's input and output
gradient during one ordinary backward pass. We register BackPACK's hooks only for the
duration of one call and remove them afterwards, because hooks left on a model break
``torch.func`` transforms (engine switching). Every known trap is refused *before* the
backward pass, with the layer's name and the fix:

* before running the model (:meth:`BackpackEngine.unsupported_reason`): tied weights,
  in-place layers, BatchNorm in train mode, layers BackPACK lacks, and configurations its
  derivatives ignore or crash on (``padding_mode`` other than zeros, ``padding='same'``,
  ``ConvTranspose`` with ``output_padding``, Embedding with ``padding_idx``, ``max_norm``,
  ``scale_grad_by_freq``, ``sparse`` or a dtype other than the default one, ``nn.RNN`` with
  ``nonlinearity='relu'``, RNNs other than single-layer batch-first ones);
* during the forward pass: a layer whose input does not hold the examples along dim 0
  (BackPACK assumes so; located by :class:`~msvag_mb.extensions.layout.ExampleLayouts`,
  e.g. ``x.flatten(0, 1)`` or a sequence-first layout), a layer called twice, an initial
  state passed to an RNN, a ``ConvTranspose`` called with ``output_size``;
* after the forward pass, from its autograd graph: a parameter used outside its layer
  (:class:`~msvag_mb.extensions.uses.ParameterUses`, e.g. ``F.linear(h, emb.weight)``).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from msvag_mb.extensions.layout import ExampleLayouts
from msvag_mb.extensions.uses import ParameterUses, tensors_in

from ..model_checks import (
    FREQUENCY_SCALING_REASON,
    UnsupportedModelError,
    batch_size_of,
    inplace_modules,
    leaf_modules_with_parameters,
    model_inputs,
    qualified_names,
    tied_weights_reason,
    train_mode_batchnorm_reason,
    used_outside_its_layer_error,
)
from .base import (
    CollectSession,
    Engine,
    EngineResult,
    LossFunction,
    ParameterStatistics,
    register_engine,
)
from .independence import check_examples_independent


def _rnn_problem(module: nn.RNNBase) -> str | None:
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
    if getattr(module, "nonlinearity", "tanh") != "tanh":
        return f"nonlinearity='{module.nonlinearity}' (only 'tanh')"
    return None


def _conv_problem(module: nn.Module) -> str | None:
    """Convolution settings that BackPACK's unfolding ignores (wrong numbers) or crashes on."""
    if module.padding_mode != "zeros":
        return (f"padding_mode='{module.padding_mode}' (BackPACK unfolds with zero padding "
                "and would give wrong statistics)")
    if module.padding == "same":
        return "padding='same' (BackPACK ignores it or crashes)"
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and any(module.output_padding):
        return f"output_padding={tuple(module.output_padding)} (BackPACK crashes)"
    return None


def _embedding_problem(module: nn.Embedding) -> str | None:
    """Embedding settings that BackPACK's derivatives refuse mid-backward."""
    if module.scale_grad_by_freq:
        return FREQUENCY_SCALING_REASON
    for option in ("padding_idx", "max_norm"):
        if getattr(module, option) is not None:
            return f"{option}={getattr(module, option)}, which BackPACK does not support"
    if module.sparse:
        return "sparse=True, which BackPACK does not support"
    if module.weight.dtype != torch.get_default_dtype():
        return (f"dtype {module.weight.dtype} while the default dtype is "
                f"{torch.get_default_dtype()} (BackPACK builds its one-hot indices in the "
                "default dtype and crashes)")
    return None


def _elsewhere(module: nn.Module) -> str:
    """Where a layer that BackPACK refuses is served."""
    if isinstance(module, nn.LSTM):
        return "Use engine='extensions' (or 'auto')."
    if isinstance(module, nn.RNNBase):
        return ("No per-example engine here handles it; use "
                "engine=msvag_mb.GhostBatchEngine(groups=K) or variance='moving_average'.")
    return "Use engine='auto' (or engine='extensions' / 'vmap')."


def _unknown_parameters(module: nn.Module, supported: dict) -> str | None:
    """Trainable parameters that BackPACK's extension for the layer does not compute."""
    # BackPACK keeps the parameter names of a layer's extension in a name-mangled attribute
    known = set(getattr(supported[type(module)], "_ModuleExtension__params", None) or ())
    unknown = sorted(n for n, p in module.named_parameters(recurse=False)
                     if p.requires_grad and n not in known)
    if not known or not unknown:
        return None
    return (f"parameters that BackPACK's extension does not know ({', '.join(unknown)}; "
            "e.g. from torch.nn.utils.weight_norm)")


def _layer_problem(module: nn.Module) -> str | None:
    if isinstance(module, nn.RNNBase):
        return _rnn_problem(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv_problem(module)
    if isinstance(module, nn.Embedding):
        return _embedding_problem(module)
    return None


class _CallChecks:
    """Forward hooks that refuse, while the model runs, what BackPACK would get wrong: an
    input without the examples along dim 0, a second call of a layer, an RNN initial state;
    and that record each call's graph for :meth:`ParameterUses.check`."""

    def __init__(self, model: nn.Module, inputs: Sequence[Tensor], batch_size: int,
                 parameters: Sequence[nn.Parameter]) -> None:
        self.layouts = ExampleLayouts(batch_size, inputs)
        names = qualified_names(model)
        modules = leaf_modules_with_parameters(model)
        wanted = {id(p) for p in parameters}
        self.uses = ParameterUses({
            p: (names[p], name) for name, module in modules
            for p in module.parameters(recurse=False) if id(p) in wanted})
        self.names = {module: name for name, module in modules}
        self.calls: dict[nn.Module, int] = {}

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with keyword arguments): the refusals."""
        name = self.names[module]
        self.calls[module] = self.calls.get(module, 0) + 1
        if self.calls[module] > 1:
            raise UnsupportedModelError(
                f"layer '{name}' is called more than once in one forward pass; BackPACK "
                "keeps one input per layer and would crash or give wrong statistics. Use "
                "engine='vmap' (engine='auto' falls back to it).")
        if args and isinstance(args[0], nn.utils.rnn.PackedSequence):
            raise UnsupportedModelError(
                f"layer '{name}' ({type(module).__name__}) got a PackedSequence, which "
                "BackPACK's RNN derivatives do not handle. Use padded input of equal lengths, "
                "or engine='extensions' / 'auto' where they apply.")
        if isinstance(module, nn.RNNBase) and len(args) > 1 and args[1] is not None:
            # BackPACK's LSTM/RNN derivatives assume a zero initial state
            raise UnsupportedModelError(
                f"BackPACK cannot handle an initial state passed to {type(module).__name__} "
                f"'{name}' (it assumes zeros and would give wrong statistics). Use "
                "engine='extensions' or engine='auto'.")
        if isinstance(module, nn.modules.conv._ConvTransposeNd) and (
                len(args) > 1 or kwargs.get("output_size") is not None):
            # an output_size adds output padding that BackPACK's unfolding does not see
            raise UnsupportedModelError(
                f"layer '{name}' ({type(module).__name__}) is called with output_size, "
                "which BackPACK's derivatives do not handle (they crash). Use "
                "engine='auto' (or engine='extensions' / 'vmap').")
        if args and isinstance(args[0], Tensor):
            self.layouts.batch_axis(args[0], name, type(module).__name__, (0,))

    def after(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook: where the examples are in the output, and the call's graph."""
        outputs = [output] if isinstance(output, Tensor) else list(output[:1])
        for tensor in outputs:
            if isinstance(tensor, Tensor):
                self.layouts.register(tensor, 0)
        self.uses.record_call(self.names[module], args, output)


@register_engine
class BackpackEngine(Engine):
    """Per-example second moments from BackPACK's ``SumGradSquared``."""

    name = "backpack"
    auto_priority = 20
    #: BackPACK's einsums of a layer's stored (autocast-dtype) input with its output
    #: gradient fail on mixed dtypes outside autocast; its sums of squares are then in the
    #: autocast dtype (about 3 significant digits in bfloat16)
    autocast_in_backward = True
    #: its hooks and its ``backpack(...)`` context serve the user's own backward pass
    serves_collect = True

    @classmethod
    def supported_layers(cls) -> dict[type, object]:
        """The layer types BackPACK's ``SumGradSquared`` handles (its layer-to-extension map)."""
        from backpack.extensions import SumGradSquared

        # BackPACK keeps its layer map in a name-mangled private attribute
        return SumGradSquared()._BackpropExtension__module_extensions

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Refuses tied weights, in-place layers, BatchNorm in train mode, layers BackPACK lacks
        and layer configurations its derivatives get wrong or crash on (see the module
        docstring); ``None`` otherwise.
        """
        tied = tied_weights_reason(model)
        if tied:
            return tied
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
            problem = _layer_problem(module) or _unknown_parameters(module, supported)
            if problem is not None:
                return (f"layer '{name}' ({type(module).__name__}) has {problem}. "
                        f"{_elsewhere(module)}")
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
        args = model_inputs(inputs)
        check_examples_independent(model, args, engine=self.name)
        with _BackpackSession(model, parameters) as session:
            session.begin(batch_size_of(inputs), args)
            loss = loss_fn(model(*args), targets)
            session.check_output(loss)  # before backward: parameters used outside their layer
            loss.backward()
            return EngineResult(loss.detach(), batch_size_of(inputs), session.statistics())

    def collect_session(self, model: nn.Module,
                        parameters: Sequence[nn.Parameter]) -> CollectSession:
        """BackPACK's hooks and its ``backpack(SumGradSquared())`` context around a forward
        and backward that the user runs."""
        reason = self.unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(f"engine 'backpack': {reason}")
        return _BackpackSession(model, parameters)


class _BackpackSession(CollectSession):
    """BackPACK's hooks on the leaf modules, our :class:`_CallChecks`, and BackPACK's
    ``SumGradSquared`` active for every backward pass until :meth:`close`."""

    def __init__(self, model: nn.Module, parameters: Sequence[nn.Parameter]) -> None:
        self.model = model
        self.guarded_parameters = [p for p in parameters if p.requires_grad]
        self.checks: _CallChecks | None = None
        self._handles: list = []
        self._hooked: list[nn.Module] = []
        self._contexts: list = []

    def __enter__(self) -> "_BackpackSession":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def begin(self, batch_size: int, inputs: Sequence[Tensor]) -> None:
        """Hook the leaf modules and activate ``SumGradSquared``."""
        from backpack import backpack, hook_run_extensions, hook_store_io
        from backpack.extensions import SumGradSquared

        self.checks = checks = _CallChecks(self.model, inputs, batch_size,
                                           self.guarded_parameters)
        for _, module in leaf_modules_with_parameters(self.model):
            self._handles.append(module.register_forward_pre_hook(checks.before,
                                                                  with_kwargs=True))
            self._handles.append(module.register_forward_hook(checks.after))
            if getattr(module, "_backpack_extend", False):
                continue  # the user extended it already: its hooks are in place
            self._handles.append(module.register_forward_hook(hook_store_io))
            self._handles.append(module.register_full_backward_hook(hook_run_extensions))
            self._hooked.append(module)
        caught = warnings.catch_warnings()
        for context in (backpack(SumGradSquared()), caught):
            context.__enter__()
            self._contexts.append(context)
        # expected for a first layer whose input needs no gradient: harmless here
        warnings.filterwarnings("ignore", message="Full backward hook is firing")

    def check_output(self, output) -> None:
        """Refuse a parameter that the outputs reach other than through its layer."""
        for tensor in tensors_in(output):
            self.checks.uses.check(tensor)

    def statistics(self) -> dict[nn.Parameter, ParameterStatistics]:
        """``p.grad`` and BackPACK's ``p.sum_grad_squared``."""
        return _collect_statistics(self.model, self.guarded_parameters)

    def close(self) -> None:
        """Remove the hooks, BackPACK's stored inputs and leftover ``sum_grad_squared``."""
        from backpack import memory_cleanup

        while self._contexts:
            self._contexts.pop().__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._hooked:
            memory_cleanup(module)
        self._hooked.clear()
        for param in self.guarded_parameters:  # left behind when the call failed part-way
            if hasattr(param, "sum_grad_squared"):
                del param.sum_grad_squared


def _collect_statistics(model: nn.Module,
                        parameters: Sequence[nn.Parameter]) -> dict[nn.Parameter,
                                                                    ParameterStatistics]:
    """``p.grad`` and BackPACK's ``p.sum_grad_squared`` (removed from the parameter)."""
    statistics = {}
    for param in parameters:
        if param.grad is None:
            continue
        sum_grad_squared = getattr(param, "sum_grad_squared", None)
        if sum_grad_squared is None:
            name = qualified_names(model).get(param, str(tuple(param.shape)))
            raise used_outside_its_layer_error(name)
        del param.sum_grad_squared
        statistics[param] = ParameterStatistics(param.grad, sum_grad_squared)
    return statistics
