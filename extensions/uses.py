"""Every use of a parameter in a forward pass, found in the autograd graph before backward.

A layer extension computes the per-example contributions of the uses it sees: its own
module's calls. A parameter used anywhere else -- a functional call such as
``F.linear(h, self.emb.weight)`` for an output layer tied to the input embedding, or
``self.lin.weight`` used in ``forward`` -- also receives a gradient, whose per-example
contributions that layer never sees; squaring the layer's share alone would be silently
wrong. :class:`ParameterUses` records, for each call of a hooked layer, the edges of the
autograd graph from the operations of that call to its parameters' leaves, and
:meth:`ParameterUses.check` walks the whole graph of the loss once, after the forward pass
and before any backward: an edge into a tracked parameter that no call of its layer made
is a use outside the layer, refused with the parameter's name.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from msvag_mb.model_checks import used_outside_its_layer_error


def tensors_in(value) -> Iterator[Tensor]:
    """The tensors of a module's arguments or outputs (nested tuples, lists, dicts)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


#: the type of the autograd graph's leaf nodes (where a parameter's gradient accumulates)
_LEAF = type(torch.zeros(1, requires_grad=True).expand(1).grad_fn.next_functions[0][0])


def _nodes(value) -> list:
    """The autograd nodes of the tensors in ``value`` (skipping those without one)."""
    if isinstance(value, Tensor):
        return [] if value.grad_fn is None else [value.grad_fn]
    return [t.grad_fn for t in tensors_in(value) if t.grad_fn is not None]


class ParameterUses:
    """The uses of the tracked parameters that their own layers' calls account for.

    ``tracked`` maps each parameter whose statistics come from its layer's hooks to
    ``(qualified parameter name, layer name)``. A call's graph may be entered from outside
    only through its outputs: an operation outside that consumes a node inside (e.g. the
    weight cast that autocast caches and hands to a second, functional use of the weight)
    is a use outside the layer as well.
    """

    def __init__(self, tracked: dict[nn.Parameter, tuple[str, str]]) -> None:
        self._tracked = {id(param): names for param, names in tracked.items()}
        self._owner: dict[object, str] = {}  # node inside a call -> its layer's name
        self._outputs: set[object] = set()  # the nodes of the calls' outputs
        self._feeds: dict[object, str] = {}  # node inside a call -> a parameter it uses

    def record_call(self, layer: str, args, outputs) -> None:
        """Record the graph of one call of ``layer``: from its outputs back to its inputs."""
        stops = _nodes(args)
        stack = _nodes(outputs)
        self._outputs.update(stack)
        owner, tracked = self._owner, self._tracked
        while stack:
            node = stack.pop()
            if node in owner or node in stops:
                continue
            owner[node] = layer
            for child, _ in node.next_functions:
                if child is None:
                    continue
                if type(child) is _LEAF:
                    names = tracked.get(id(child.variable))
                    if names is not None:
                        self._feeds[node] = names[0]
                elif child not in owner:
                    stack.append(child)

    def check(self, loss: Tensor) -> None:
        """Refuse a tracked parameter that ``loss`` reaches other than through its layer."""
        if not self._tracked or loss.grad_fn is None:
            return
        stack, seen = [loss.grad_fn], set()
        owners, tracked = self._owner, self._tracked
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            owner = owners.get(node)
            for child, _ in node.next_functions:
                if child is None:
                    continue
                if type(child) is _LEAF:
                    names = tracked.get(id(child.variable))
                    if names is not None and owner != names[1]:
                        raise used_outside_its_layer_error(*names)
                    continue
                inside = owners.get(child)
                if inside is not None and inside != owner and child not in self._outputs \
                        and child in self._feeds:
                    raise used_outside_its_layer_error(self._feeds[child], inside)
                if child not in seen:
                    stack.append(child)
