"""The extension of last resort: per-example gradients of one module by ``torch.func``.

For a module that directly owns requested parameters and has no registered extension
(a custom module, ``nn.PReLU``, ``nn.Bilinear``, ``nn.LayerNorm`` where no extension of
its own is registered, a subclass of a registered layer that overrides its forward), the
contributions of example n to the gradients of its parameters ``theta`` are

    c_n = J_n^T G_n,      J_n = d y_n / d theta,

where ``y_n`` is the module's output for example n alone and ``G_n`` the part of the
output gradient that belongs to example n. During the forward pass the module is run a
second time, under ``torch.func.vmap`` over the examples, on per-example copies
``theta_n`` of its parameters (``theta`` expanded along a new examples axis, no copy): the
vjp of that graph at ``G`` w.r.t. ``theta_n`` is the stack of the ``c_n``, which the output
gradient hook computes chunk by chunk (:data:`~msvag_mb.extensions.core.
MEMORY_BUDGET_ELEMENTS` per chunk) and squares into ``sum_n c_n**2``. The batch axis of
each tensor argument comes from :class:`~msvag_mb.extensions.layout.ExampleLayouts`;
arguments without examples are shared by all examples (``in_dims=None``), and so are
buffers and other constants. This is what Opacus does for layers it has no rule for.

A parameter the forward pass uses several times (the module called twice, its parameter
tied to another layer's, or also used outside the module, ``x * module.scale``) gets, in
example n's gradient, ``c_n = sum_u c_nu`` over its uses, and ``sum_n c_n**2`` needs the
cross terms. Each call therefore keeps its own re-run (:class:`_GenericCall`: the chunks
of the first call must survive the second call's forward), and for such a parameter its
backward hands over the contributions themselves, ``c_nu`` for all ``B`` examples
(:class:`~msvag_mb.extensions.reuse.DenseUse`), which
:mod:`~msvag_mb.extensions.reuse` adds to those of the other uses before squaring.
That holds ``B`` copies of the parameter per call until all uses have arrived: for a
module whose maths is unknown there is no cheaper exact form (no factored ``L_n^T R_n``
as for a Linear); a parameter used once is squared chunk by chunk as above.

Everything that would make the result inexact is refused during the forward pass, before
any backward: the re-run must give the module's own output (else its examples are not
independent, its output's examples cannot be located, or its forward depends on
something the re-run does not see), it must draw no random numbers (``vmap``'s
``randomness="error"``), it must not change buffers or inputs in place, it must run
under ``vmap`` (no data-dependent control flow) and its per-example backward must run (tried
once per module and input signature). A module whose submodules own parameters, or with
hooks of its own (e.g. ``weight_norm``), is refused before the model runs.
"""

from __future__ import annotations

import weakref
from typing import Container, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from msvag_mb.model_checks import (
    UnsupportedModelError,
    ambiguous_batch_axis_error,
    merged_examples_error,
    no_examples_error,
)

from .core import (
    MEMORY_BUDGET_ELEMENTS,
    LayerContext,
    ModuleExtension,
    Removable,
    chunk_size,
    register_fallback_extension,
)
from .layout import MIXED, NO_EXAMPLES, ExampleLayouts
from .reuse import DenseUse

_USE_VMAP = "use engine='vmap' (engine='auto' falls back to it)"


def example_axis(layouts: ExampleLayouts, tensor: Tensor, layer: str, kind: str) -> int | None:
    """The axis of an argument ``tensor`` that holds the examples, ``None`` where it holds
    none (shared by all examples); refused where they are merged, mixed or ambiguous."""
    traced = layouts.layout(tensor)
    shape = tuple(tensor.shape)
    if isinstance(traced, tuple):
        axis, within, _ = traced
        if within != 1 or shape[axis] != layouts.batch_size:
            raise merged_examples_error(layer, shape, layouts.batch_size)
        return axis
    if traced is MIXED:
        raise no_examples_error(layer, kind, shape, mixed=True)
    if traced is NO_EXAMPLES:
        return None
    candidates = [a for a, size in enumerate(shape) if size == layouts.batch_size]
    if len(candidates) > 1:
        raise ambiguous_batch_axis_error(layer, kind, shape, layouts.batch_size, candidates)
    return candidates[0] if candidates else None


def per_example_outputs(module: nn.Module, names: Sequence[str], leaves: list,
                        spec, axes: list[int | None], start: int, size: int):
    """``(theta_n by name, the module's tensor outputs for examples start..start+size)``:
    the module re-run under ``vmap`` on expanded copies of its parameters ``names`` and on
    each example's slice of its arguments, a batch of one (``x[n:n+1]`` along the
    examples' axis: a module reads its inputs' dims by position). Each output is
    ``(size, *shape of the module's output on one example)``."""
    own = dict(module.named_parameters(recurse=False))
    thetas = {n: own[n].detach().expand(size, *own[n].shape).requires_grad_() for n in names}
    # copies: the re-run's graph must not see later in-place changes of the arguments
    sliced = [leaf.detach().narrow(axis, start, size).clone().unflatten(axis, (size, 1))
              if axis is not None else
              (leaf.detach().clone() if isinstance(leaf, Tensor) else leaf)
              for leaf, axis in zip(leaves, axes)]
    tensor_positions = [i for i, leaf in enumerate(sliced) if isinstance(leaf, Tensor)]

    def run(theta: dict, *tensors: Tensor) -> tuple[Tensor, ...]:
        values = list(sliced)
        for position, tensor in zip(tensor_positions, tensors):
            values[position] = tensor
        args, kwargs = tree_unflatten(values, spec)
        output = functional_call(module, theta, tuple(args), kwargs)
        return tuple(t for t in tree_flatten(output)[0] if isinstance(t, Tensor))

    in_dims = (0, *(axes[i] for i in tensor_positions))
    outputs = vmap(run, in_dims=in_dims, randomness="error")(
        thetas, *(sliced[i] for i in tensor_positions))
    return thetas, outputs


def _close(actual: Tensor, expected: Tensor) -> bool:
    """Equal to the rounding of a second evaluation (the re-run may batch its kernels
    differently); integers exactly."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    if not actual.is_floating_point():
        return torch.equal(actual, expected)
    tol = torch.finfo(actual.dtype).eps ** 0.5
    scale = expected.abs().max() if expected.numel() else 0.0
    return torch.allclose(actual, expected, rtol=tol, atol=float(tol * scale))


def as_output_slice(per_example: Tensor, axis: int) -> Tensor:
    """The re-run's ``(size, ..., 1 at axis + 1, ...)`` outputs as the slice
    ``output.narrow(axis, start, size)`` of the module's output."""
    return per_example.squeeze(axis + 1).movedim(0, axis)


def output_axis(output: Tensor, per_example: Tensor, start: int, batch: int) -> int | None:
    """The one axis of the module's ``output`` along which the re-run's ``per_example``
    outputs (examples ``start...``) lie, or ``None``."""
    size = per_example.shape[0]
    one = tuple(per_example.shape[1:])
    found = [k for k in range(output.dim())
             if output.shape[k] == batch and one[k] == 1
             and tuple(output.shape[:k] + output.shape[k + 1:]) == one[:k] + one[k + 1:]
             and _close(as_output_slice(per_example, k), output.detach().narrow(k, start, size))]
    return found[0] if len(found) == 1 else None


class _OutputGradients(torch.autograd.Function):
    """Identity on several outputs whose backward hands all their gradients to one callback
    at once (a per-example contribution sums over the outputs before it is squared)."""

    @staticmethod
    def forward(ctx, callback, *outputs: Tensor):
        """Copies of ``outputs`` (copies: later in-place changes stay legal)."""
        ctx.callback = callback
        ctx.set_materialize_grads(False)
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        """Pass the gradients through, reporting them to the callback first."""
        ctx.callback(grads)
        return (None, *grads)


class _Chunk:
    """One chunk of examples: its ``theta_n`` and re-run outputs, kept for the backward."""

    def __init__(self, start: int, thetas: dict[str, Tensor], outputs: tuple[Tensor, ...]):
        self.start, self.thetas, self.outputs = start, thetas, outputs


def chunk_contributions(chunk: _Chunk, axes: Sequence[int], grads: Sequence[Tensor | None],
                        names: Sequence[str]) -> list[Tensor]:
    """``c_n = J_n^T G_n`` for the examples of one chunk, ``(size, *shape)`` per name in
    ``names`` (zeros where the outputs that got a gradient do not depend on it): the vjp
    of the re-run's outputs at the output gradients ``grads`` (``None``: no gradient) of
    the outputs whose examples lie along ``axes``."""
    size = next(iter(chunk.thetas.values())).shape[0]
    used = [(out, g.narrow(axis, chunk.start, size).movedim(axis, 0).unsqueeze(axis + 1)
             .to(out.dtype))
            for out, g, axis in zip(chunk.outputs, grads, axes)
            if g is not None and out.requires_grad]
    thetas = [chunk.thetas[n] for n in names]
    per_example = torch.autograd.grad([o for o, _ in used], thetas, [g for _, g in used],
                                      allow_unused=True) if used else [None] * len(names)
    return [c if c is not None else torch.zeros_like(theta)
            for theta, c in zip(thetas, per_example)]


def call_statistics(chunks: list[_Chunk], axes: Sequence[int],
                    grads: Sequence[Tensor | None], names: Sequence[str],
                    reused: Container[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``({name: sum_n c_n**2}, {name: c})`` of one call from its output gradients, one
    chunk of examples at a time: squared and summed for the parameters used once, the
    contributions themselves (``c[n] = c_n``, ``(B, *shape)``) for those in ``reused``
    (added to their other uses' before squaring, :mod:`~msvag_mb.extensions.reuse`)."""
    squares: dict[str, Tensor] = {}
    kept: dict[str, list[Tensor]] = {n: [] for n in names if n in reused}
    for chunk in chunks:
        for name, c in zip(names, chunk_contributions(chunk, axes, grads, names)):
            if name in kept:
                kept[name].append(c)
            else:
                value = c.square().sum(0)
                squares[name] = value if name not in squares else squares[name].add_(value)
        chunk.thetas = chunk.outputs = None  # free the chunk's graph
    return squares, {name: torch.cat(values) for name, values in kept.items()}


#: (module type, training, per-leaf shape, dtype and axis) already run backward per example
_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _try_backward(module: nn.Module, chunk: _Chunk, signature: tuple) -> None:
    """Run the per-example backward of one chunk once per module and input signature (a
    ``vmap`` batching rule may fail only in the backward, e.g. a fused recurrent kernel)."""
    seen = _VERIFIED.setdefault(module, set())
    if signature in seen:
        return
    outputs = [o for o in chunk.outputs if o.requires_grad]
    if outputs:
        torch.autograd.grad(outputs, list(chunk.thetas.values()),
                            [torch.ones_like(o) for o in outputs], retain_graph=True,
                            allow_unused=True)
    seen.add(signature)


def _rerun_error(context: LayerContext, module: nn.Module,
                 error: Exception) -> UnsupportedModelError:
    """The refusal of a module that ``torch.func.vmap`` cannot re-run per example."""
    kind = type(module).__name__
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "random" in text:
        why = ("draws random numbers in its own forward (e.g. dropout in train mode), so "
               "its per-example gradients cannot be recomputed; move the randomness into "
               "a submodule of the model outside it (an nn.Dropout after it), call "
               f"model.eval(), or {_USE_VMAP}")
    else:
        why = (f"cannot be re-run per example under torch.func.vmap ({type(error).__name__}: "
               f"{text}); e.g. data-dependent control flow or an operation without a "
               f"batching rule. Make its forward vmap-compatible, or {_USE_VMAP}")
    return UnsupportedModelError(
        f"layer '{context.name}' ({kind}) has no extension of its own, and the generic "
        f"per-example fallback {why}.")


def _unlocated_error(context: LayerContext, module: nn.Module,
                     shape: tuple[int, ...]) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"layer '{context.name}' ({type(module).__name__}) has no extension of its own, and "
        f"the generic per-example fallback cannot locate the examples in its output of shape "
        f"{shape}: re-run on one example at a time, the module gives other values (it mixes "
        "the examples, e.g. across the batch axis, or its examples' axis in the output is "
        "ambiguous). Keep the examples independent and along an axis of their own, or "
        f"{_USE_VMAP}.")


def _changed_in_place_error(context: LayerContext, module: nn.Module,
                            what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"layer '{context.name}' ({type(module).__name__}) has no extension of its own, and "
        f"its forward changes {what} in place, which the generic per-example fallback "
        f"cannot re-run exactly; avoid the in-place change, or {_USE_VMAP}.")


class _GenericCall:
    """One call of an attached module: its re-run's chunks and the examples' axes of its
    outputs, kept until that call's output gradient arrives (a module called several times
    in one forward pass has one of these per call)."""

    def __init__(self, context: LayerContext, names: Sequence[str], chunks: list[_Chunk],
                 axes: list[int]) -> None:
        self.context, self.names = context, names
        self.chunks: list[_Chunk] | None = chunks
        self.axes = axes

    def on_output_gradients(self, grads: Sequence[Tensor | None]) -> None:
        """Emit ``sum_n c_n**2`` of the parameters used once; hand the contributions of
        those used several times to their accumulators."""
        chunks, self.chunks = self.chunks, None
        if chunks is None:  # the re-run's graph is freed after the first backward
            raise RuntimeError(
                f"a second backward pass through the output of layer '{self.context.name}'; "
                "its per-example statistics were formed by the first one.")
        context = self.context
        squares, contributions = call_statistics(chunks, self.axes, grads, self.names,
                                                 context.reused())
        for name, value in squares.items():
            context.emit(name, value)
        for name, values in contributions.items():
            context.add_use(name, DenseUse(values))


class _GenericHooks:
    """The hooks of one attached module for one forward/backward pass (see the module
    docstring): each call of the module creates its own :class:`_GenericCall`;
    :meth:`remove` undoes everything, also the outputs' gradient hooks."""

    def __init__(self, module: nn.Module, context: LayerContext) -> None:
        self.module, self.context = module, context
        self.names = sorted(context.requested)
        self.rerunning = False  # our own hooks stay out of the re-run
        self.versions: tuple | None = None
        self.calls: list[_GenericCall] = []
        self.handles: list[Removable] = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Record the versions of buffers and arguments (changes in place are refused)."""
        if not self.rerunning:
            self.versions = _versions(module, args, kwargs)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Re-run the module per example, check it and hook the output's gradient."""
        if self.rerunning or not torch.is_grad_enabled():
            return None
        context = self.context
        context.count_call()
        buffers, arguments = _versions(module, args, kwargs)
        if buffers != self.versions[0]:
            raise _changed_in_place_error(context, module, "its buffers")
        if arguments != self.versions[1]:
            raise _changed_in_place_error(context, module, "its inputs")
        leaves, spec = tree_flatten((args, kwargs))
        kind = type(module).__name__
        axes = [example_axis(context.layouts, leaf, context.name, kind)
                if isinstance(leaf, Tensor) else None for leaf in leaves]
        chunks = self._rerun(leaves, spec, axes)
        out_leaves, out_spec = tree_flatten(output)
        positions, out_axes = self._locate(out_leaves, chunks)
        signature = (module.training, str(spec), tuple(
            (tuple(leaf.shape), leaf.dtype, axis) for leaf, axis in zip(leaves, axes)
            if isinstance(leaf, Tensor)))
        try:
            _try_backward(module, chunks[0], signature)
        except Exception as error:  # noqa: BLE001  (any failure of the re-run: refused)
            raise _rerun_error(context, module, error) from error
        call = _GenericCall(context, self.names, chunks, out_axes)
        self.calls.append(call)
        return self._hook_outputs(call, args, kwargs, out_leaves, out_spec, positions,
                                  output)

    def _rerun(self, leaves: list, spec, axes: list[int | None]) -> list[_Chunk]:
        batch = self.context.batch_size
        own = dict(self.module.named_parameters(recurse=False))
        step = chunk_size(sum(own[n].numel() for n in self.names), MEMORY_BUDGET_ELEMENTS)
        chunks = []
        self.rerunning = True
        try:
            for start in range(0, batch, step):
                size = min(step, batch - start)
                thetas, outputs = per_example_outputs(self.module, self.names, leaves, spec,
                                                      axes, start, size)
                chunks.append(_Chunk(start, thetas, outputs))
        except UnsupportedModelError:
            raise
        except Exception as error:  # noqa: BLE001  (any failure of the re-run: refused)
            raise _rerun_error(self.context, self.module, error) from error
        finally:
            self.rerunning = False
        return chunks

    def _locate(self, out_leaves: list, chunks: list[_Chunk]) -> tuple[list[int], list[int]]:
        """The positions (among the output's tensors) of the outputs that need a gradient
        and their examples' axes (the chunks keep only those outputs); refused where the
        re-run disagrees with the module's output."""
        tensors = [leaf for leaf in out_leaves if isinstance(leaf, Tensor)]
        batch = self.context.batch_size
        if len(tensors) != len(chunks[0].outputs):
            raise _unlocated_error(self.context, self.module, ())
        positions, axes = [], []
        for j, tensor in enumerate(tensors):
            if not tensor.requires_grad:
                continue
            axis = output_axis(tensor, chunks[0].outputs[j], 0, batch)
            if axis is None or not all(
                    _close(as_output_slice(c.outputs[j], axis),
                           tensor.detach().narrow(axis, c.start, c.outputs[j].shape[0]))
                    for c in chunks[1:]):
                raise _unlocated_error(self.context, self.module, tuple(tensor.shape))
            positions.append(j)
            axes.append(axis)
        for chunk in chunks:
            chunk.outputs = tuple(chunk.outputs[j] for j in positions)
        return positions, axes

    def _hook_outputs(self, call: _GenericCall, args, kwargs, out_leaves, out_spec,
                      positions, output):
        """Hook the gradient of the outputs that need one; register their layouts."""
        context = self.context
        tensor_index = [i for i, leaf in enumerate(out_leaves) if isinstance(leaf, Tensor)]
        hooked = [tensor_index[j] for j in positions]
        if len(hooked) == 1:
            tensor = out_leaves[hooked[0]]
            self.handles.append(tensor.register_hook(
                lambda g: call.on_output_gradients([g])))
        elif hooked:
            copies = _OutputGradients.apply(call.on_output_gradients,
                                            *(out_leaves[i] for i in hooked))
            for i, copy in zip(hooked, copies):
                out_leaves[i] = copy
            output = tree_unflatten(out_leaves, out_spec)
        for i, axis in zip(hooked, call.axes):
            context.layouts.register(out_leaves[i], axis)
        context.uses.record_call(context.name, (args, kwargs), output)
        return output if len(hooked) > 1 else None

    def remove(self) -> None:
        """Remove the outputs' gradient hooks and drop the re-runs' graphs."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for call in self.calls:
            call.chunks = None
        self.calls.clear()


def _versions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[list[int], list[int]]:
    leaves = tree_flatten((args, kwargs))[0]
    return ([b._version for b in module.buffers()],
            [leaf._version for leaf in leaves if isinstance(leaf, Tensor)])


def _own_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


@register_fallback_extension
class GenericExtension(ModuleExtension):
    """Any module that owns its parameters directly: per-example gradients of the module
    alone by a ``vmap``'d re-run of its forward (see the module docstring)."""

    module_types = ()

    #: each call hands over its contributions (:class:`~msvag_mb.extensions.reuse.DenseUse`)
    supports_reuse = True

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Refuse hooks of the module's own and submodules that own parameters."""
        if _own_hooks(module):
            return ("has no extension of its own and hooks of its own (e.g. from "
                    "torch.nn.utils.weight_norm or register_forward_hook), which a "
                    "per-example re-run of its forward would skip or repeat; remove the "
                    f"hooks, or {_USE_VMAP}.")
        for name, child in module.named_modules():
            if child is not module and any(p is not None for p in child._parameters.values()):
                return (f"has no extension of its own, and its submodule '{name}' owns "
                        "parameters too: the generic per-example fallback re-runs the "
                        "module's forward, which would run that submodule a second time. "
                        "Give the module's own parameters a submodule of their own, or "
                        f"{_USE_VMAP}.")
        return None

    def parameter_names(self, module: nn.Module) -> frozenset[str]:
        """All the module's own parameters."""
        return frozenset(n for n, p in module._parameters.items() if p is not None)

    def track_layout(self, module: nn.Module, layouts: ExampleLayouts) -> list[Removable]:
        """Nothing: without the re-run, where its output's examples are is not known (the
        layers after it trace it through the autograd graph, or refuse)."""
        return []

    def attach(self, module: nn.Module, context: LayerContext) -> list[Removable]:
        """Forward pre-hook and forward hook; the output's gradient hook comes later."""
        hooks = _GenericHooks(module, context)
        return [module.register_forward_pre_hook(hooks.before, with_kwargs=True),
                module.register_forward_hook(hooks.after, with_kwargs=True), hooks]
