"""Every use of a parameter in a forward pass, found in the autograd graph before backward.

A layer extension computes the per-example contributions of the uses it sees: its own
module's calls. A parameter used anywhere else -- a functional call such as
``F.linear(h, self.emb.weight)`` for an output layer tied to the input embedding, or
``self.lin.weight`` used in ``forward`` -- also receives a gradient, whose per-example
contributions that layer never sees; squaring the layer's share alone would be silently
wrong. :class:`ParameterUses` records, for each call of a hooked layer, the edges of the
autograd graph from the operations of that call to its parameters' leaves, and walks the
whole graph of the loss (or of the model's outputs) once, after the forward pass and
before any backward: an edge into a tracked parameter that no call of its layer made is
a use outside the layer. :meth:`ParameterUses.check` refuses it with the parameter's name
(engines that square each layer's share, BackPACK); :meth:`ParameterUses.find` lists the
calls reached and each such use, with the operation that first combines the parameter
with the examples (the ``extensions`` engine adds the uses up,
:mod:`~msvag_mb.extensions.functional`, :mod:`~msvag_mb.extensions.reuse`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from msvag_mb.model_checks import no_examples_use_error, used_outside_its_layer_error

from .layout import NO_EXAMPLES


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


@dataclass
class FunctionalUse:
    """A use of parameters by an operation outside their layers' calls: input ``index`` of
    the autograd node ``consumer`` (whose output holds examples) is computed from
    parameters only, through the nodes between ``entry`` (``consumer.next_functions[
    index]``) and their leaves (the *parameter side*: views, casts, products of
    parameters, ...); ``parameters`` are the tracked ones it reaches."""

    consumer: object
    index: int
    entry: tuple[object, int]
    parameters: list[nn.Parameter] = field(default_factory=list)


@dataclass
class FoundUses:
    """What :meth:`ParameterUses.find` found in the part of the graph it had not seen."""

    #: ``(layer, call number)`` of each recorded call whose outputs the graph reaches
    calls: set[tuple[str, int]] = field(default_factory=set)
    #: uses by operations outside the calls of the parameters' layers
    functional: list[FunctionalUse] = field(default_factory=list)


class ParameterUses:
    """The uses of the tracked parameters that their own layers' calls account for.

    ``tracked`` maps each parameter whose statistics come from its layer's hooks to
    ``(qualified parameter name, layer name)``; ``owners`` (optional) maps a parameter to
    all the layers that hold it (tied modules), an empty set for a bare parameter that no
    layer holds. A call's graph may be entered from outside only through its outputs: an
    operation outside that consumes a node inside (e.g. the weight cast that autocast
    caches and hands to a second, functional use of the weight) is a use outside the
    layer as well.

    :meth:`check` refuses every use outside the layers (engines that cannot add uses up);
    :meth:`find` lists them (the ``extensions`` engine adds them up,
    :mod:`~msvag_mb.extensions.reuse`).
    """

    def __init__(self, tracked: dict[nn.Parameter, tuple[str, str | None]],
                 owners: dict[nn.Parameter, set[str]] | None = None) -> None:
        self._tracked = {id(param): names for param, names in tracked.items()}
        self._params = {id(param): param for param in tracked}
        self._owners = {id(p): ({names[1]} if names[1] is not None else set())
                        for p, names in tracked.items()}
        for param, layers in (owners or {}).items():
            self._owners[id(param)] = set(layers)
        self._owner: dict[object, str] = {}  # node inside a call -> its layer's name
        self._outputs: set[object] = set()  # the nodes of the calls' outputs
        self._feeds: dict[object, str] = {}  # node inside a call -> a parameter it uses
        self._call_of: dict[object, tuple[str, int]] = {}  # output node -> its call
        self._call_count: dict[str, int] = {}
        self._seen: set[object] = set()  # nodes walked by find
        self._parents: dict[object, list[tuple[object, int]]] = {}
        self._examples: dict[object, bool] = {}  # node -> whether its output holds examples
        self._found: set[tuple[object, int]] = set()

    def release(self) -> None:
        """Forget the autograd nodes of this pass (as
        :meth:`~msvag_mb.extensions.layout.ExampleLayouts.release`, and for the same
        reason: the nodes hold hooks that reach this object)."""
        for nodes in (self._owner, self._outputs, self._feeds, self._call_of, self._seen,
                      self._parents, self._examples, self._found):
            nodes.clear()

    def record_call(self, layer: str, args, outputs) -> None:
        """Record the graph of one call of ``layer``: from its outputs back to its inputs."""
        stops = _nodes(args)
        stack = _nodes(outputs)
        self._outputs.update(stack)
        call = (layer, self._call_count.get(layer, 0))
        self._call_count[layer] = call[1] + 1
        for node in stack:
            self._call_of.setdefault(node, call)
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

    def check(self, loss) -> None:
        """Refuse a tracked parameter that ``loss`` (a tensor, or tensors nested in tuples,
        lists and dicts) reaches other than through its layer."""
        if not self._tracked:
            return
        stack, seen = _nodes(loss), set()
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

    # -- every use, for the engine that adds them up ------------------------------------
    def find(self, value, layouts) -> FoundUses:
        """The uses of the tracked parameters in the graph of ``value`` (tensors, possibly
        nested) not seen by an earlier call: the recorded calls it reaches and the
        operations outside those calls that use a tracked parameter (through a chain of
        operations on parameters only). ``layouts``: the forward pass's
        :class:`~msvag_mb.extensions.layout.ExampleLayouts` (which tensors hold examples).

        Refused (:class:`~msvag_mb.model_checks.UnsupportedModelError`): a node inside a
        call consumed from outside it (see the class docstring), and a parameter whose
        use never meets the examples (e.g. a penalty added to the loss).
        """
        found = FoundUses()
        edges = self._walk(_nodes(value), found)
        for param, parent, index in edges:
            if self._owner.get(parent) in self._owners[id(param)]:
                continue  # inside a call of a layer that holds it: that call's use
            self._climb(param, parent, index, layouts, found)
        return found

    def _walk(self, roots: list, found: FoundUses) -> list[tuple[nn.Parameter, object, int]]:
        """Visit the nodes not seen before: their parents, the calls reached, and the edges
        into tracked parameters' leaves."""
        stack, edges = [r for r in roots if r not in self._seen], []
        owners = self._owner
        while stack:
            node = stack.pop()
            if node in self._seen:
                continue
            self._seen.add(node)
            if node in self._call_of:
                found.calls.add(self._call_of[node])
            owner = owners.get(node)
            for index, (child, _) in enumerate(node.next_functions):
                if child is None:
                    continue
                self._parents.setdefault(child, []).append((node, index))
                if type(child) is _LEAF:
                    if id(child.variable) in self._tracked:
                        edges.append((self._params[id(child.variable)], node, index))
                    continue
                inside = owners.get(child)
                if inside is not None and inside != owner and child not in self._outputs \
                        and child in self._feeds:
                    raise used_outside_its_layer_error(self._feeds[child], inside)
                if child not in self._seen:
                    stack.append(child)
        return edges

    def _climb(self, param: nn.Parameter, parent, index: int, layouts,
               found: FoundUses) -> None:
        """From an edge into ``param``'s leaf up through operations on parameters only, to
        the operations whose output holds examples: each is one functional use."""
        frontier, visited = [(parent, index)], set()
        while frontier:
            node, index = frontier.pop()
            if self._holds_examples(node, layouts):
                key = (node, index)
                use = next((u for u in found.functional if (u.consumer, u.index) == key),
                           None)
                if use is None and key not in self._found:
                    self._found.add(key)
                    use = FunctionalUse(node, index, node.next_functions[index])
                    found.functional.append(use)
                if use is not None and all(p is not param for p in use.parameters):
                    use.parameters.append(param)
                continue
            if node in visited:
                continue
            visited.add(node)
            parents = self._parents.get(node)
            if not parents:  # an output (or the loss) computed from parameters only
                raise no_examples_use_error(self._tracked[id(param)][0])
            frontier.extend(parents)

    def _holds_examples(self, node, layouts) -> bool:
        """Whether ``node``'s output depends on the examples: some input does (a model
        input, the output of a node that holds examples), or an input without gradient
        (``None`` edge) carries them in (its output is known to hold examples, or has more
        elements than its inputs with gradient: ``x * p``)."""
        stack = [node]
        while stack:
            current = stack[-1]
            if current in self._call_of:  # a layer's output: no need to look further
                self._examples[current] = True
            if current in self._examples:
                stack.pop()
                continue
            pending = [c for c, _ in current.next_functions
                       if c is not None and type(c) is not _LEAF and c not in self._examples]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self._examples[current] = self._examples_of(current, layouts)
        return self._examples[node]

    def _examples_of(self, node, layouts) -> bool:
        sizes, untracked = [], False
        for child, output_nr in node.next_functions:
            if child is None:
                untracked = True
            elif type(child) is _LEAF:
                if isinstance(layouts.layout(child.variable), tuple):
                    return True  # a model input that requires a gradient
                sizes.append(child.variable.numel())
            elif self._examples[child]:
                return True
            else:
                sizes.append(_numel(child, output_nr))
        if not untracked:
            return False
        traced = layouts.child((node, 0), 0)
        if isinstance(traced, tuple):
            return True
        if traced is NO_EXAMPLES:
            return False
        return not sizes or _numel(node, 0) > max(sizes)


def _numel(node, output_nr: int) -> int:
    """Elements of output ``output_nr`` of the forward operation of ``node``."""
    metadata = node._input_metadata
    return math.prod(metadata[output_nr].shape) if output_nr < len(metadata) else 0
