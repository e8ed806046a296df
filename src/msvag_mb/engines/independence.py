"""Are the model's examples independent? Checked on its outputs, before any backward pass.

Per-example gradients exist only when example ``n``'s part of the model's output depends on
example ``n``'s inputs alone. The per-layer engines cannot see every operation between
their layers (``h - h.mean(0)``, ``h.roll(1, 0)``, ``h[idx]`` with repeated rows, a
matrix product across the batch): a model that mixes its examples would get a number that
is not its within-batch variance. So every engine whose units are examples probes the
model once per model and input signature (shapes, dtypes, the arguments that are not
tensors), in eval mode (no dropout to differ) and without gradients: it runs the batch,
then the batch with example ``k``'s inputs replaced by example ``j``'s (every tensor
argument whose dim 0 is the batch), for ``(k, j) = (0, 1)`` and ``(B - 1, 0)``: with
independent examples every other example's output is unchanged (a statistic over the
batch, a roll, a product across it, repeated rows all change some). Where the model runs
on one example alone (``x[n:n+1]``), the batch output must also be the stack of the ``B``
one-example outputs, which catches what a replaced example may leave unchanged
(``h - h.max(0).values``) and a tensor broadcast along the examples' axis (positions
``(T, d)`` added to a sequence-first ``(T, B, d)`` input with ``T == B``: one example's
output is then as large as the batch's); a model that cannot run one example (a state or
a reshape sized for the batch) is decided by the probes alone. A mismatch beyond rounding
is refused (:func:`~msvag_mb.model_checks.examples_not_independent_error`). Outputs
without an axis of size ``B`` (a scalar) are not compared. After
:data:`SIZES_CHECKED_PER_STRUCTURE` shapes of the same argument structure have passed, new
shapes of it are not probed again (dynamic sequence lengths).

The probes leave no trace: training flags, buffers, a carried state and the random number
generators are as before. Forward hooks and other Python side effects of the model's own
code run ``B + 3`` more times per probed signature.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..model_checks import carried_state, examples_not_independent_error

#: model -> the input signatures whose examples were found independent
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()

#: signatures of one structure (argument tree, dtypes, ranks; other sizes) after which that
#: structure is taken as checked: independence is a property of the model's operations, and
#: a loop with dynamic shapes (sequences padded per batch) must not pay three extra
#: forwards at every step
SIZES_CHECKED_PER_STRUCTURE = 3

#: agreement required between the outputs of two forwards of the same examples (other
#: rows in the batch may change how the kernels block their work, hence rounding)
_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-3}


def check_examples_independent(model: nn.Module, args: tuple, kwargs: dict | None = None,
                               *, engine: str, batch_size: int | None = None) -> None:
    """Refuse ``model`` unless replacing one example's inputs changes its output only at
    that example (see the module docstring); examples along dim 0 of the tensor arguments,
    ``batch_size`` of them (default: dim 0 of the first)."""
    kwargs = kwargs or {}
    structure, sizes = _signature(args, kwargs)
    checked = _CHECKED.setdefault(model, set())
    same_structure = sum(1 for seen, _ in checked if seen == structure)
    if (structure, sizes) in checked or same_structure >= SIZES_CHECKED_PER_STRUCTURE:
        return
    detail = output_mismatch(model, args, kwargs, batch_size)
    if detail is not None:
        raise examples_not_independent_error(detail, engine)
    checked.add((structure, sizes))


def _signature(args: tuple, kwargs: dict) -> tuple[tuple, tuple]:
    """``(structure, sizes)`` of a forward's arguments: the argument tree, the tensors'
    dtypes, devices and ranks and the other arguments' values; the tensors' shapes."""
    leaves, spec = tree_flatten((args, kwargs))
    structure = (str(spec), tuple((x.dtype, x.device.type, x.dim()) if isinstance(x, Tensor)
                                  else repr(x)[:200] for x in leaves))
    return structure, tuple(tuple(x.shape) for x in leaves if isinstance(x, Tensor))


def output_mismatch(model: nn.Module, args: tuple, kwargs: dict,
                    batch_size: int | None = None) -> str | None:
    """What the probes found (a mismatch), or ``None`` when the outputs agree or cannot be
    compared."""
    leaves, spec = tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, Tensor) and x.dim() >= 1]
    batch_size = batch_size or (tensors[0].shape[0] if tensors else 0)
    if batch_size < 2:
        return None
    probes = [(0, 1)] + ([(batch_size - 1, 0)] if batch_size > 2 else [])
    with _untouched(model) as restart, torch.no_grad():
        model.eval()
        try:
            whole = tree_flatten(_run(model, restart, args, kwargs))[0]
        except Exception:  # noqa: BLE001  (the real run reports the model's own error)
            return None
        for k, j in probes:
            values = [_replaced(x, k, j, batch_size) for x in leaves]
            probe_args, probe_kwargs = spec.unflatten(values)
            try:
                probed = tree_flatten(_run(model, restart, probe_args, probe_kwargs))[0]
            except Exception:  # noqa: BLE001  (data-dependent failure: nothing to compare)
                return None
            detail = _compare(whole, probed, batch_size, k)
            if detail is not None:
                return detail
        return _stacked_mismatch(model, restart, whole, leaves, spec, batch_size)


def _stacked_mismatch(model: nn.Module, restart, whole: list, leaves: list, spec,
                      batch_size: int) -> str | None:
    """How the batch output differs from the stack of the outputs of each example alone
    (``x[n:n+1]`` of every tensor argument whose dim 0 is the batch), which catches what
    a replaced example may leave unchanged (a maximum over the batch); ``None`` also where
    a one-example run fails (a state or a reshape sized for the batch) or its outputs
    cannot be stacked like the batch's (padding to the longest)."""
    alone = []
    for n in range(batch_size):
        values = [x[n:n + 1] if isinstance(x, Tensor) and x.dim() >= 1
                  and x.shape[0] == batch_size else x for x in leaves]
        one_args, one_kwargs = spec.unflatten(values)
        try:
            alone.append(tree_flatten(_run(model, restart, one_args, one_kwargs))[0])
        except Exception:  # noqa: BLE001  (cannot run one example: the probes decide)
            return None
    for position, tensor in enumerate(whole):
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            continue
        parts = [one[position] if position < len(one) else None for one in alone]
        if not all(isinstance(p, Tensor) for p in parts):
            continue
        shape = tuple(tensor.shape)
        batch_axes = [a for a in range(tensor.dim()) if shape[a] == batch_size]
        if batch_axes and not any(all(p.dim() == tensor.dim() and p.shape[a] == 1
                                      for p in parts) for a in batch_axes):
            return (f"output {position}: shape {shape} for the batch and "
                    f"{tuple(parts[0].shape)} for one example alone")
        axes = [a for a in batch_axes
                if all(tuple(p.shape) == shape[:a] + (1,) + shape[a + 1:] for p in parts)]
        found = [_difference(tensor, torch.cat(parts, dim=a)) for a in axes]
        if axes and all(d is not None for d in found):
            return (f"output {position} of shape {shape}: the batch's differs from the "
                    f"stacked outputs of each example alone {found[0]}")
    return None


def _replaced(x, k: int, j: int, batch_size: int):
    """``x`` with example ``k`` replaced by example ``j`` (tensors whose dim 0 is the batch)."""
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != batch_size:
        return x
    probe = x.detach().clone()
    probe[k] = x[j]
    return probe


def _run(model: nn.Module, restart, args: tuple, kwargs: dict):
    """One forward from the state the model had before the probes (zeros, where it can
    reset one)."""
    restart()
    return model(*args, **kwargs)


def _compare(whole: list, probed: list, batch_size: int, k: int) -> str | None:
    """The first output (of shape ``(..., B at some axis, ...)``) where replacing example
    ``k``'s inputs changed another example's output."""
    others = torch.tensor([n for n in range(batch_size) if n != k])
    for position, (tensor, probe) in enumerate(zip(whole, probed)):
        if (not isinstance(tensor, Tensor) or not tensor.is_floating_point()
                or not isinstance(probe, Tensor) or probe.shape != tensor.shape):
            continue
        index = others.to(tensor.device)
        found = [_difference(tensor.index_select(axis, index), probe.index_select(axis, index))
                 for axis in range(tensor.dim()) if tensor.shape[axis] == batch_size]
        if found and all(d is not None for d in found):
            return (f"output {position} of shape {tuple(tensor.shape)}: replacing example "
                    f"{k}'s inputs changed other examples' outputs {found[0]}")
    return None


def _difference(expected: Tensor, actual: Tensor) -> str | None:
    tolerance = max(_TOLERANCES.get(t.dtype, 5e-2) for t in (expected, actual))
    expected, actual = expected.double(), actual.double()
    scale = float(expected.abs().nan_to_num(posinf=0.0).max()) if expected.numel() else 0.0
    if torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * max(scale, 1e-12),
                      equal_nan=True):
        return None
    error = (actual - expected).nan_to_num(nan=float("inf")).abs().max().item()
    return f"by up to {error:.3g}"


@contextlib.contextmanager
def _untouched(model: nn.Module):
    """Training flags, buffers, the carried state and the random number generators as
    they were before the block; yields ``restart()``, which puts the state back (or resets
    it, where the model can) before each probe."""
    training = [(module, module.training) for module in model.modules()]
    state = carried_state(model)
    reset = getattr(model, "reset_state", None)
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})

    def restart() -> None:
        if callable(reset):
            reset()
        elif state is not None:
            model.set_state(state)

    try:
        with torch.random.fork_rng(devices=devices):
            yield restart
    finally:
        for module, mode in training:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        if state is not None:
            model.set_state(state)
