"""Engine ``"vmap"``: per-example gradients with ``torch.func``.

Fast path: the usual ``vmap(grad(loss of one example))`` with unbatched parameters. It is
used when the batch loss is the mean or the sum of the per-example losses, which is
checked on the values of each call (no extra forward).

Exact path for any other loss of the batch output (``ignore_index`` or class weights with
mean reduction, custom losses): the model runs once under ``vmap`` with every trainable
parameter *expanded* to one (zero-copy) view per example, so example ``n`` sees its own
copy ``theta_n = theta``; the batch loss is formed from the stacked outputs exactly as
``loss_fn`` defines it, and one ``torch.autograd.grad`` w.r.t. the expanded parameters
returns ``c_n = d loss / d theta_n``: each example's contribution to the batch gradient.

Both paths handle tied weights and a module registered at several places (the swap
names every distinct ``(module, attribute)`` that holds a parameter once, so
``functional_call``'s own untying, which mishandles a module registered twice, is not
used; the model's parameters are checked and restored afterwards whatever happens), leave
``p.grad`` ``None`` for a parameter the loss does not reach (found in the autograd graph
inside the transform), and draw independent dropout masks per example
(``randomness="different"``). Both materialise ``B`` per-example gradients: this is the
general but memory-hungry engine.

Refused (before running the model): ``nn.RNN``/``LSTM``/``GRU`` (torch.func cannot run
them: their fused kernels have no batching rule), ``nn.Embedding`` with ``max_norm`` (it
renormalises the table in place during the forward, which vmap cannot batch), or, when
trainable, with ``sparse=True`` (sparse gradients) or ``scale_grad_by_freq=True`` (couples
the examples), modules extended by BackPACK, and BatchNorm in train mode.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from ..model_checks import (
    FREQUENCY_SCALING_REASON,
    UnsupportedModelError,
    batch_size_of,
    model_fails_on_one_example_error,
    model_inputs,
    train_mode_batchnorm_reason,
)
from .base import Engine, EngineResult, LossFunction, ParameterStatistics, register_engine
from .independence import check_examples_independent


def _module_problem(module: nn.Module) -> str | None:
    """What torch.func cannot do (exactly) with this module, and the fix."""
    if isinstance(module, nn.RNNBase):
        # Measured with torch 2.14: aten::lstm / gru / rnn_tanh have no batching rule
        # ("Batching rule not implemented"), and the unbatched-parameter path fails with
        # a shape mismatch in their backward: vmap raises rather than computing.
        return (f"cannot run under torch.func.vmap: the fused kernels of nn.RNN/LSTM/GRU "
                f"have no vmap batching rule in torch {torch.__version__.split('+')[0]} "
                "(vmap raises). Use engine='extensions' (nn.RNN/LSTM/GRU) or engine='auto'.")
    if getattr(module, "_backpack_extend", False):
        return ("was extended by BackPACK (backpack.extend); its hooks break torch.func "
                "transforms. Use a model that was not extended, or engine='backpack'.")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        trainable = module.weight.requires_grad
        if module.max_norm is not None:
            return ("has max_norm set: it renormalises the table in place during the forward "
                    "pass, which torch.func.vmap cannot batch. Use engine='extensions' (or "
                    "'auto').")
        if trainable and module.scale_grad_by_freq:
            return f"has {FREQUENCY_SCALING_REASON}."
        if trainable and module.sparse:
            return "has sparse=True (sparse gradients); construct it with sparse=False."
    return None


def _swap_names(model: nn.Module, names: dict[nn.Parameter, str]) -> list[tuple[str, str]]:
    """``(path, name)``: every distinct ``(module, attribute)`` that holds one of the
    parameters (``names``: parameter -> its name in ``model.named_parameters()``), once,
    with the name of the parameter it holds. Tied parameters have several paths; a module
    registered at several places has one."""
    seen, paths = set(), []
    for module_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        for attr, param in module.named_parameters(recurse=False):
            if param in names:
                paths.append((f"{module_name}.{attr}" if module_name else attr, names[param]))
    return paths


class _ParametersKept:
    """Check, after the call, that every module still holds its own parameters; put back
    any that a functional call left replaced (the model is never left changed)."""

    def __init__(self, model: nn.Module) -> None:
        self.held = [(module, attr, param)
                     for module in model.modules()
                     for attr, param in module.named_parameters(recurse=False)]

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info) -> None:
        for module, attr, param in self.held:
            if module._parameters.get(attr) is not param:
                module.__dict__.pop(attr, None)
                module._parameters[attr] = param


def _reached(loss: Tensor, params: dict[str, Tensor]) -> set[str]:
    """Names of ``params`` (the tensors the transform passed in) that ``loss`` depends on."""
    by_id = {id(tensor): name for name, tensor in params.items()}
    found, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None) if child is not None else None
            if variable is not None:
                if id(variable) in by_id:
                    found.add(by_id[id(variable)])
            elif child is not None:
                stack.append(child)
    return found


@register_engine
class VmapEngine(Engine):
    """Per-example gradients via ``torch.func.vmap`` over a functional call of the model."""

    name = "vmap"
    auto_priority = 30
    reruns_model = True  # a functional call of the model under torch.func

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Refuses ``nn.RNN``/``LSTM``/``GRU`` layers, Embedding configurations torch.func
        cannot batch or that couple the examples, modules extended by BackPACK and
        BatchNorm in train mode; ``None`` otherwise.
        """
        for name, module in model.named_modules():
            problem = _module_problem(module)
            if problem is not None:
                return f"layer '{name or type(module).__name__}' ({type(module).__name__}) {problem}"
        return train_mode_batchnorm_reason(model)

    def compute(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        inputs: Tensor | Sequence[Tensor],
        targets: Tensor,
        parameters: Sequence[nn.Parameter],
        reduction: str | None = None,
    ) -> EngineResult:
        """Per-example gradients with ``torch.func``: the fast per-example-loss path when the
        batch loss is their mean or sum, else the exact expanded-parameter path.
        """
        with _ParametersKept(model):
            check_examples_independent(model, model_inputs(inputs), engine=self.name)
            result = self._per_example_losses(model, loss_fn, inputs, targets, parameters)
            if result is None:  # the loss does not split into per-example terms
                result = self._expanded_parameters(model, loss_fn, inputs, targets,
                                                   parameters)
        return result

    @staticmethod
    def _vmapped(model: nn.Module, inputs, function, in_dims, *args):
        """``vmap(function)(*args)``. Where the model fails under the transform but runs on
        the whole batch, it does not treat its examples independently (or torch.func cannot
        run it): a refusal (no ``p.grad`` was touched). An error the model also raises on
        the whole batch is the model's own and is raised as it is."""
        try:
            return vmap(function, in_dims=in_dims, randomness="different")(*args)
        except UnsupportedModelError:
            raise
        except (RuntimeError, ValueError, NotImplementedError, IndexError) as error:
            try:
                with torch.no_grad():
                    model(*model_inputs(inputs))
            except Exception:
                raise error from None
            raise model_fails_on_one_example_error(error) from error

    @staticmethod
    def _trainable(model: nn.Module, parameters: Sequence[nn.Parameter]):
        """``(names, swap)``: the reported parameters' names in ``model.named_parameters()``
        and :func:`_swap_names`' ``(path, name)`` pairs for the functional calls."""
        reported = set(parameters)
        by_param = {p: n for n, p in model.named_parameters() if p in reported}
        return list(by_param.values()), _swap_names(model, by_param)

    @staticmethod
    def _call(model: nn.Module, swap: list[tuple[str, str]], params: dict[str, Tensor],
              args: tuple):
        return functional_call(model, {path: params[name] for path, name in swap}, args,
                               tie_weights=False, strict=False)

    @staticmethod
    def _statistics(model, names, contributions, batch_size, reached=None) -> dict:
        by_name = dict(model.named_parameters())
        statistics = {}
        for name, contribution in zip(names, contributions):
            if contribution is None or (reached is not None and name not in reached):
                continue  # the loss does not reach it: p.grad stays None
            flat = contribution.reshape(batch_size, -1)
            grad = flat.sum(0).reshape(contribution.shape[1:])
            sum_grad_squared = torch.einsum("ni,ni->i", flat, flat).reshape(grad.shape)
            statistics[by_name[name]] = ParameterStatistics(grad, sum_grad_squared)
        return statistics

    def _per_example_losses(self, model, loss_fn, inputs, targets, parameters):
        """Fast path: ``vmap(grad(loss of one example))`` with the parameters unbatched.

        Valid when the batch loss is the mean or the sum of the per-example losses; this is
        checked on the values (no extra forward): returns ``None`` when it does not hold
        (e.g. ``ignore_index`` or class weights with mean reduction).
        """
        batch_size = batch_size_of(inputs)
        if not isinstance(targets, Tensor) or targets.shape[:1] != (batch_size,):
            return None
        names, swap = self._trainable(model, parameters)
        reached: set[str] = set()

        def example_loss(params, example_targets, *example_inputs):
            batched = tuple(x.unsqueeze(0) for x in example_inputs)
            output = self._call(model, swap, params, batched)
            loss = loss_fn(output, example_targets.unsqueeze(0))
            reached.update(_reached(loss, params))  # the function is traced once
            return loss, (loss.detach(), tree_map(lambda o: o.detach().squeeze(0), output))

        by_name = dict(model.named_parameters())
        in_dims = (None, 0) + (0,) * len(model_inputs(inputs))
        grads, (losses, outputs) = self._vmapped(
            model, inputs, grad(example_loss, has_aux=True), in_dims,
            {n: by_name[n].detach() for n in names}, targets, *model_inputs(inputs))
        with torch.no_grad():
            batch_loss = loss_fn(outputs, targets)
        scale = None
        for candidate, combined in ((1.0 / batch_size, losses.mean()), (1.0, losses.sum())):
            if torch.allclose(batch_loss, combined, rtol=1e-5, atol=1e-12):
                scale = candidate
                break
        if scale is None:
            return None
        contributions = [grads[n] * scale for n in names]
        statistics = self._statistics(model, names, contributions, batch_size, reached)
        return EngineResult(batch_loss.detach(), batch_size, statistics)

    def _expanded_parameters(self, model, loss_fn, inputs, targets, parameters):
        """Exact path for any loss of the batch output (see the module docstring)."""
        batch_size = batch_size_of(inputs)
        names, swap = self._trainable(model, parameters)
        by_name = dict(model.named_parameters())
        per_example_params = {
            n: by_name[n].detach().expand(batch_size, *by_name[n].shape).requires_grad_()
            for n in names
        }

        def single_example_forward(example_params, *example_inputs):
            batched = tuple(x.unsqueeze(0) for x in example_inputs)
            output = self._call(model, swap, example_params, batched)
            return tree_map(lambda out: out.squeeze(0), output)

        in_dims = (0,) + (0,) * len(model_inputs(inputs))
        outputs = self._vmapped(model, inputs, single_example_forward, in_dims,
                                per_example_params, *model_inputs(inputs))
        loss = loss_fn(outputs, targets)
        contributions = torch.autograd.grad(
            loss, [per_example_params[n] for n in names], allow_unused=True
        )
        statistics = self._statistics(model, names, contributions, batch_size)
        return EngineResult(loss.detach(), batch_size, statistics)
