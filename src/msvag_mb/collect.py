"""What ``GradientVariance.collect()`` watches while the user's own code runs.

Inside ``with gv.collect(): loss = ...; loss.backward()`` the library runs nothing itself;
it watches:

* the model's forward (:class:`RootForwardWatch`, two hooks on the root module): where
  the batch starts (its size and the tensors that hold the examples, known when the
  forward starts) and where it ends (its outputs, checked before any backward pass); one
  forward per block;
* every operation outside that forward (:class:`UsesOutsideModel`, a
  :class:`~torch.overrides.TorchFunctionMode` for the block): a guarded parameter that
  takes part in one while gradients are recorded -- an L2 term written into the loss,
  ``F.linear(h, model.emb.weight)`` in the user's code -- adds a term to ``p.grad`` that
  belongs to no example and that the per-layer statistics never see: refused there, in
  the forward, before any backward. Inside the model's forward the mode does nothing (the
  engine's own checks cover it);
* every accumulation into ``p.grad`` (:class:`GradientWrites`): ``p.grad`` at the end of
  the block must be what one backward pass left, unchanged since (not a second backward,
  not clipped in place, not assigned by hand).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from msvag_mb.extensions.uses import tensors_in

from .model_checks import UnsupportedModelError


def example_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors among a forward's arguments (nested too) that have a dim 0, in order:
    positional arguments first, then keyword arguments as given."""
    return [t for t in tensors_in((args, kwargs)) if t.dim() >= 1]


def infer_batch_size(args: tuple, kwargs: dict) -> int:
    """The examples' count: dim 0 of the forward's tensor arguments, which must agree."""
    tensors = example_tensors(args, kwargs)
    if not tensors:
        raise ValueError(
            "gv.collect() cannot tell the batch size: the model's forward got no tensor "
            "argument with a dim 0. Pass it: gv.collect(batch_size=B).")
    sizes = sorted({t.shape[0] for t in tensors})
    if len(sizes) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise ValueError(
            "gv.collect() cannot tell the batch size: the tensor arguments of the model's "
            f"forward differ along dim 0 (shapes {shapes}). Pass the number of examples: "
            "gv.collect(batch_size=B).")
    return sizes[0]


class RootForwardWatch:
    """Hooks on the root module for one ``collect`` block.

    ``on_start(args, kwargs)`` runs when the model's forward starts and
    ``on_output(output)`` when it returns; a second forward in the block is refused.
    """

    def __init__(self, model: nn.Module, on_start: Callable[[tuple, dict], None],
                 on_output: Callable[[object], None]) -> None:
        self.forwards = 0  # forwards started
        self.finished = False  # the forward returned
        self.raised = False  # the forward raised (e.g. the engine refused a layer)
        self.running = False
        self.paused = False  # our own extra forwards (the independence check) pass through
        self._on_start, self._on_output = on_start, on_output
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.paused:
            return
        if self.forwards:
            raise RuntimeError(
                "the model ran a second forward inside one gv.collect() block: use one "
                "block per batch (`with gv.collect(): loss = ...; loss.backward()`); "
                "several blocks before optimizer.step() accumulate.")
        self.forwards += 1
        self.running = True
        self._on_start(args, kwargs)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self.paused:
            return
        was_running, self.running = self.running, False
        if not was_running:
            return
        if output is None:  # the forward raised (an always_call hook runs anyway)
            self.raised = True
            return
        self._on_output(output)
        self.finished = True

    @contextlib.contextmanager
    def pause(self):
        """Let the forwards inside the block through unwatched (our own, not the user's)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def remove(self) -> None:
        """Remove both hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class UsesOutsideModel(TorchFunctionMode):
    """Refuses an operation outside the model's forward that takes a guarded parameter
    and records a gradient for its result (see the module docstring)."""

    def __init__(self, names: dict[nn.Parameter, str], watch: RootForwardWatch) -> None:
        super().__init__()
        self._names = {id(p): name for p, name in names.items()}
        self._watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self._watch.running or not self._names or not torch.is_grad_enabled():
            return result
        if not any(t.requires_grad for t in tensors_in(result)):
            return result  # e.g. p.detach(), or a value only read for logging
        for tensor in tensors_in((args, kwargs)):
            name = self._names.get(id(tensor))
            if name is not None and not self._watch.forwards:
                raise UnsupportedModelError(
                    f"parameter '{name}' is used inside gv.collect() before the model's "
                    "forward ran: gv.collect() watches the forward of the model given to "
                    "GradientVariance; call that model itself in the block (not its "
                    "submodules one by one), once.")
            if name is not None:
                raise UnsupportedModelError(
                    f"parameter '{name}' is used outside the model's forward inside "
                    f"gv.collect() (in {getattr(func, '__name__', func)}): that term of "
                    "the loss belongs to no example, and the per-layer statistics do not see "
                    "it. Put L2 regularisation in the optimizer's weight_decay; compute "
                    "anything else that needs the parameter inside the model's forward, or "
                    "use gv.backward(inputs, targets) with engine='vmap'.")
        return result


class GradientWrites:
    """Records what each backward pass leaves in ``p.grad`` during one ``collect`` block."""

    def __init__(self, params: Sequence[nn.Parameter], names: dict[nn.Parameter, str]) -> None:
        self._written: dict[nn.Parameter, list[tuple[Tensor, int]]] = {p: [] for p in params}
        self._names = names
        self._handles = [p.register_post_accumulate_grad_hook(self._record) for p in params]

    def _record(self, param: nn.Parameter) -> None:
        self._written[param].append((param.grad, param.grad._version))

    def check(self) -> None:
        """Raise unless every ``p.grad`` is what one backward pass left, unchanged."""
        for param, writes in self._written.items():
            name = self._names.get(param, str(tuple(param.shape)))
            if len(writes) > 1:
                raise RuntimeError(
                    f"p.grad of '{name}' was accumulated by {len(writes)} backward passes "
                    "inside one gv.collect() block; run one backward per block (add the "
                    "losses first, or use one block per batch).")
            if param.grad is None:
                continue
            if not writes or writes[0][0] is not param.grad:
                raise RuntimeError(
                    f"p.grad of '{name}' was set inside gv.collect() other than by the "
                    "backward pass; leave p.grad to the backward inside the block.")
            if writes[0][1] != param.grad._version:
                raise RuntimeError(
                    f"p.grad of '{name}' was changed in place inside gv.collect() after the "
                    "backward pass (e.g. gradient clipping); p.grad_variance would not "
                    "describe it. Change gradients only after the block, knowing that the "
                    "optimizer then refuses the stale variance.")

    @property
    def any_written(self) -> bool:
        """Whether any backward pass reached a parameter."""
        return any(self._written.values())

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
