"""What is checked on a model before per-example statistics, and the refusals, written once.

The engines (:mod:`msvag_mb.engines`) and the per-layer extensions
(:mod:`msvag_mb.extensions`) both ask these questions of a model -- which parameters are
tied, which layers work in place, which BatchNorm layers are in train mode, where the
examples are -- and refuse with the same words, so each refusal is phrased here and
nowhere else: :class:`UnsupportedModelError` names the layer and the fix.

This module imports nothing else from the package (a ground-floor module).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class UnsupportedModelError(ValueError):
    """A model (or one of its layers) cannot be handled by the requested engine.

    Raised before any backward pass; the message names the layer and the fix.
    """


#: why train-mode BatchNorm is refused, and what to do (after "... is in train mode: ")
TRAIN_MODE_BATCHNORM_FIX = (
    "examples are not independent, so per-example gradients are undefined. Call "
    "model.eval() for these layers, or use engine=msvag_mb.GhostBatchEngine(groups=K)."
)


#: why ``nn.Embedding(scale_grad_by_freq=True)`` is refused (after "... has ")
FREQUENCY_SCALING_REASON = (
    "scale_grad_by_freq=True, which scales each example's gradient by counts over the "
    "whole batch (examples are not independent, so no per-example gradients exist); "
    "construct it with scale_grad_by_freq=False"
)


# -- inputs ----------------------------------------------------------------------------------
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


# -- questions about a model ------------------------------------------------------------------
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


def leaf_modules_with_parameters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that directly own trainable parameters."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


# -- refusals ----------------------------------------------------------------------------------
def train_mode_batchnorm_reason(model: nn.Module) -> str | None:
    """Why per-example engines refuse ``model`` because of train-mode BatchNorm, or None."""
    batchnorm = train_mode_batchnorm(model)
    if not batchnorm:
        return None
    return f"BatchNorm layer '{batchnorm[0]}' is in train mode: {TRAIN_MODE_BATCHNORM_FIX}"


def sparse_gradients_reason(model: nn.Module) -> str | None:
    """Why engines that square gradients refuse a trainable layer with sparse gradients."""
    for name, module in model.named_modules():
        if getattr(module, "sparse", False) is True and any(
                p.requires_grad for p in module.parameters(recurse=False)):
            return (f"layer '{name}' ({type(module).__name__}) has sparse=True (sparse "
                    "gradients, which the statistics cannot square); construct it with "
                    "sparse=False.")
    return None


def tied_weights_reason(model: nn.Module) -> str | None:
    """Why per-layer engines refuse ``model`` because two modules share a Parameter, or None."""
    tied = find_tied_parameters(model)
    if not tied:
        return None
    first, second = tied[0]
    return (f"tied weights: '{first}' and '{second}' are one Parameter; per-layer statistics "
            "square each module's share separately and would give wrong variances. Use "
            "engine='vmap' or 'extensions' (or 'auto'), which add the shares up per example "
            "before squaring.")


def unbatched_input_error(layer: str, kind: str, shape: tuple[int, ...]) -> UnsupportedModelError:
    """The refusal of a layer input without an examples dim (raised while the model runs)."""
    return UnsupportedModelError(
        f"layer '{layer}' ({kind}) got an unbatched input of shape {tuple(shape)}; pass "
        "inputs with the examples along dim 0."
    )


def used_outside_its_layer_error(parameter: str, layer: str | None = None) -> UnsupportedModelError:
    """The refusal of a parameter that the forward pass uses outside its layer's own call
    (found in the autograd graph before the backward pass), or that received a gradient
    without its layer reporting statistics."""
    where = f" ('{layer}')" if layer else ""
    return UnsupportedModelError(
        f"parameter '{parameter}' received a gradient outside its layer{where} in this "
        "forward pass: it is used by an operation outside that layer's own call (e.g. a "
        "functional call such as F.linear(h, emb.weight) for weight tying), whose "
        "per-example contributions this engine's per-layer statistics do not see. Use "
        "engine='extensions' (which adds up the uses of a parameter, also outside its "
        "layer) or engine='vmap' (engine='auto' falls back to them)."
    )


def no_examples_use_error(parameter: str) -> UnsupportedModelError:
    """A parameter used in a term that holds no examples (found before the backward pass)."""
    return UnsupportedModelError(
        f"parameter '{parameter}' is used in a term computed from parameters only that "
        "never meets the examples (e.g. a penalty such as p.pow(2).sum() added to the loss, "
        "or an output that holds no examples): that term belongs to no example, so it "
        "would be counted in every example's gradient. Put L2 regularisation in the "
        "optimizer's weight_decay and keep the loss a sum or mean of per-example terms."
    )


def unsupported_use_error(parameter: str, operation: str, why: str) -> UnsupportedModelError:
    """A use of a parameter outside its layer (or of a bare parameter) by an operation
    whose per-example contributions the ``extensions`` engine cannot form exactly."""
    return UnsupportedModelError(
        f"parameter '{parameter}' is used by an operation ({operation}) outside the layers "
        f"that engine 'extensions' handles, and {why}. Supported are a parameter (or a "
        "view, cast or product of parameters) added to, subtracted from, multiplied "
        "with or dividing a tensor with the examples along one axis of its own (and not "
        "varying along that axis), F.linear / matmul with it as the weight, and "
        "F.embedding with it as the table. Use engine='vmap' (engine='auto' falls back "
        "to it)."
    )


def reused_layer_error(layer: str, kind: str, uses: int) -> UnsupportedModelError:
    """A layer whose parameters are used several times, where its extension cannot hand
    over per-example contributions to add them up before squaring."""
    return UnsupportedModelError(
        f"layer '{layer}' ({kind}) has parameters used {uses} times in one forward pass "
        "(the layer called more than once, tied to another layer, or used outside it): "
        "the per-example contributions of all uses must be added before squaring, which "
        f"the {kind} extension cannot do. Use engine='vmap' (engine='auto' falls back to "
        "it) where it applies."
    )


def model_fails_on_one_example_error(error: BaseException) -> UnsupportedModelError:
    """The refusal of a model that torch.func.vmap cannot run one example at a time."""
    return UnsupportedModelError(
        "engine 'vmap' runs the model on one example at a time (torch.func.vmap over "
        f"model(x[n:n+1])), and that failed while the model runs on the whole batch: "
        f"{type(error).__name__}: {error}. Either the model does not treat its examples "
        "independently (e.g. a layer applied across the batch axis; then no per-example "
        "gradients exist), or torch.func cannot run one of its operations; check that "
        "model(x[:1]) works, and use engine='extensions' or 'backpack' where they apply, or "
        "engine=msvag_mb.GhostBatchEngine(groups=K)."
    )


def carried_state(model: nn.Module):
    """The state a model carries from call to call (``get_state``/``set_state``, the
    ``CarriesState`` protocol of the problems), or ``None``: a refused or extra forward
    pass may have advanced it, and what runs next must start where that one did."""
    get_state, set_state = getattr(model, "get_state", None), getattr(model, "set_state", None)
    return get_state() if callable(get_state) and callable(set_state) else None


def examples_not_independent_error(detail: str, engine: str) -> UnsupportedModelError:
    """The refusal of a model whose examples are not independent (found by probing its
    outputs once per input signature, in eval mode, without gradients:
    :mod:`msvag_mb.engines.independence`)."""
    return UnsupportedModelError(
        f"engine '{engine}' computes per-example statistics, and the model's examples are "
        f"not independent ({detail}; probed once per input shapes, in eval mode: replacing "
        "one example's inputs must change only that example's outputs, and the batch's "
        "outputs must be the stack of each example's alone): it mixes the examples "
        "(e.g. a statistic over dim 0 such as h - h.mean(0), h.roll(1, 0), h[idx] with "
        "repeated rows, a product across the batch) or broadcasts a tensor along the "
        "examples' axis (e.g. positions (T, d) added to a sequence-first (T, B, d) input "
        "with T == B), so no per-example gradients exist. Make the examples independent, "
        "or use engine=msvag_mb.GhostBatchEngine(groups=K)."
    )


# -- where the examples are (msvag_mb.extensions.layout) --------------------------------------
_VMAP_FIX = "or use engine='vmap' (engine='auto' falls back to it)"
_USE_VMAP = "Use engine='vmap' (engine='auto' falls back to it)"


def merged_examples_error(layer: str, shape: tuple[int, ...], batch: int) -> UnsupportedModelError:
    """A layer input in which the examples have no axis of their own."""
    return UnsupportedModelError(
        f"layer '{layer}' got an input of shape {tuple(shape)} with no batch axis of size "
        f"{batch} of its own: the model merges the examples with another axis before this "
        "layer (e.g. x.flatten(0, 1)) or drops some, or the input holds no examples (e.g. "
        "positions from torch.arange), so per-example contributions cannot be separated. "
        f"Keep the examples along their own axis, {_VMAP_FIX}."
    )


def ambiguous_batch_axis_error(layer: str, kind: str, shape: tuple[int, ...], batch: int,
                               axes: Sequence[int]) -> UnsupportedModelError:
    """A layer input with several axes of size B whose examples' axis cannot be traced."""
    return UnsupportedModelError(
        f"layer '{layer}' ({kind}) got an input of shape {tuple(shape)} whose dims "
        f"{', '.join(map(str, axes))} all have the batch size {batch}, and the batch axis is "
        "ambiguous: it cannot be traced back to the model's inputs (an operation on the way "
        "that the engine does not follow, or a copy of an input that needs no gradient, "
        "e.g. x.t().contiguous()). Use a batch size different from the other dims' sizes, "
        f"pass the layer a view of the input (x.t()), {_VMAP_FIX}."
    )


def wrong_batch_axis_error(layer: str, kind: str, shape: tuple[int, ...],
                           axis: int) -> UnsupportedModelError:
    """A layer input whose examples lie along an axis the layer cannot take them from."""
    return UnsupportedModelError(
        f"layer '{layer}' ({kind}) got an input of shape {tuple(shape)} with the examples "
        f"along dim {axis}, which this engine cannot take them from for a {kind} layer "
        "(the layer would mix the examples, or the engine assumes them along dim 0). "
        f"Keep the examples along dim 0 for this layer, {_VMAP_FIX}."
    )


def no_examples_error(layer: str, kind: str, shape: tuple[int, ...],
                      mixed: bool = False) -> UnsupportedModelError:
    """A layer input that holds no examples, or in which they cannot be told apart."""
    if mixed:
        return UnsupportedModelError(
            f"layer '{layer}' ({kind}) got an input of shape {tuple(shape)} in which the "
            "examples cannot be told apart: either it combines tensors whose examples lie "
            "along different axes (e.g. an embedding of torch.arange positions, which holds "
            "no examples, added to per-example features; use engine='vmap', to which "
            "engine='auto' falls back), or the model mixes its examples (an operation along "
            f"their axis, e.g. a statistic over dim 0 such as h - h.mean(0); {_INDEPENDENT})."
        )
    return UnsupportedModelError(
        f"layer '{layer}' ({kind}) got an input of shape {tuple(shape)} that holds no "
        "examples (it is computed from parameters only, e.g. a positional parameter), so "
        "its use is shared by all examples; its per-example contributions cannot be "
        f"computed from the layer alone. {_USE_VMAP}."
    )


_INDEPENDENT = ("make the examples independent (apply the operation along another dim), or "
                "use engine=msvag_mb.GhostBatchEngine(groups=K), whose units are groups of "
                "examples")


def examples_combined_error(layer: str, kind: str, shape: tuple[int, ...],
                            operation: str) -> UnsupportedModelError:
    """A layer input computed by an operation along the examples' axis, which combines,
    reorders or selects the examples (found by ``msvag_mb.extensions.layout``)."""
    return UnsupportedModelError(
        f"layer '{layer}' ({kind}) got an input of shape {tuple(shape)} computed by an "
        f"operation along the examples' axis ({operation}): the model mixes its examples "
        "(e.g. a statistic over dim 0 such as h - h.mean(0), h / h.norm(dim=0) or "
        "h.max(0); a softmax, cumsum or sort over dim 0; h.roll(1, 0), h.flip(0), h[idx] "
        "or h[:k] along dim 0; a product across the batch such as ones(B, B) @ h), so the "
        "rows of this input are not the examples one by one and per-example gradients "
        f"cannot be formed. {_INDEPENDENT[0].upper()}{_INDEPENDENT[1:]}."
    )
