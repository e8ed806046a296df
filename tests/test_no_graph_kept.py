"""No call keeps its forward pass alive.

The extensions' gradient hooks stay on the autograd graph (inside autograd Functions, on
intermediate tensors) and reach objects that hold the graph's nodes: a reference cycle
through autograd's C++ graph, which Python's garbage collector cannot see. Left in place,
each call kept its layer inputs and activations (on a transformer encoder about 27 MiB a
call, without bound). Here a call's inputs and every tensor a module
returned during it must be freed once the caller drops them, for every per-example engine
and ``"auto"``, on one case per registered layer extension (and the fallback) and on the
traps (reused and tied parameters, functional uses), whether the call was exact or refused.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_exact_or_refused import CASES, PER_EXAMPLE_ENGINES, Trial, trap_cases

import msvag_mb
from msvag_mb.engines import UnsupportedModelError
from msvag_mb.extensions.core import EXTENSIONS, FALLBACK_EXTENSION, extension_for


def _one_case_per_extension() -> list:
    """The first case whose model has a layer of each registered extension."""
    wanted = {id(e): e for e in [*EXTENSIONS.values(), *FALLBACK_EXTENSION]}
    chosen = []
    for case in CASES:
        torch.manual_seed(0)
        found = {id(extension_for(m)) for m in case.build().modules()} & set(wanted)
        if found:
            chosen.append(case)
            for key in found:
                wanted.pop(key)
        if not wanted:
            break
    assert not wanted, f"no case covers {[type(e).__name__ for e in wanted.values()]}"
    return chosen


_PER_EXTENSION = _one_case_per_extension()
LEAK_CASES = _PER_EXTENSION + [case for case in trap_cases()
                               if case.name not in {c.name for c in _PER_EXTENSION}]


def _tensors_of_one_call(case, engine) -> list[weakref.ref]:
    """Weak references to a call's inputs, targets and module outputs; the call's own
    strong references are gone when this returns."""
    trial = Trial.of(case)
    trial.remove_hooks()
    inputs = tuple(t.clone() for t in trial.inputs)
    targets = trial.targets.clone()
    kept = [weakref.ref(t) for t in (*inputs, targets)]

    def note_outputs(module, args, output):
        for tensor in output if isinstance(output, tuple) else (output,):
            if isinstance(tensor, torch.Tensor):
                kept.append(weakref.ref(tensor))

    handle = torch.nn.modules.module.register_module_forward_hook(note_outputs)
    try:
        gradient_variance = msvag_mb.GradientVariance(trial.model, case.loss(), engine=engine)
        gradient_variance.backward(inputs, targets)
    except UnsupportedModelError:
        pass
    finally:
        handle.remove()
    return kept


@pytest.mark.parametrize("engine", PER_EXAMPLE_ENGINES + ["auto"])
@pytest.mark.parametrize("case", LEAK_CASES, ids=lambda case: case.name)
def test_a_call_keeps_no_tensor_of_its_pass(case, engine):
    kept = _tensors_of_one_call(case, engine)
    gc.collect()
    alive = [tuple(r().shape) for r in kept if r() is not None]
    assert not alive, f"{len(alive)} tensors of the pass outlived the call: {alive[:8]}"


def test_the_check_sees_a_kept_graph(monkeypatch):
    """With the cycle left in place (the layouts and uses not released), a recurrent
    layer's call keeps its input: the test above can fail."""
    from msvag_mb.extensions.layout import ExampleLayouts
    from msvag_mb.extensions.uses import ParameterUses

    monkeypatch.setattr(ExampleLayouts, "release", lambda self: None)
    monkeypatch.setattr(ParameterUses, "release", lambda self: None)
    case = next(c for c in CASES if c.name.startswith("LSTM-"))
    kept = _tensors_of_one_call(case, "extensions")
    gc.collect()
    assert any(r() is not None for r in kept)
