"""Cost of the within-batch variance, as a ratio to a plain forward+backward.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_engines.py [--quick] [--no-memory]
            [--workloads mlp 2c2d ...] [--linear-variants] [--overhead]

(``benchmarks/run_all.py`` runs this and the optimizer-step comparison of ``bench_step.py``
together: the command recorded in ``docs/benchmarks.md``.)

Workloads (the table ``WORKLOADS``; ``--workloads`` offers its keys):

* issue 4's shapes: MLP 784-512-512-10 at batch 128, the Fashion-MNIST 2c2d at 64, the
  CIFAR-10 3c3d at 128, and the char-LSTM (Embedding(83, 128), LSTM 2x128,
  Linear(128, 83)) at batch 50 x 50 steps, both as the problem set's ``CharRNN`` (two
  single-layer nn.LSTMs with a carried state and dropout) and with one 2-layer ``nn.LSTM``;
* issue 13's modern architectures: the ``tolstoi_char_transformer`` problem's
  ``CharTransformer`` (4 pre-norm blocks of width 128, tied head, bare positional
  Parameter) at B=32, T=64; an ``nn.TransformerEncoder`` (2 layers, width 128, 4 heads,
  batch-first, feed-forward 512, no dropout) between an Embedding and a read-out at
  B=32, T=64; a 2-layer bidirectional ``nn.GRU`` (hidden 128) with a Linear read-out at
  B=50, T=50; a small CNN with GroupNorm (two conv-GroupNorm-ReLU-pool blocks and a
  Linear) on CIFAR-sized images at B=128.

Methods, each producing the batch gradient and the within-batch variance
``(B sum_n c_n^2 - grad^2) / (B - 1)`` of every parameter:

* ``<engine>`` for every engine in ``msvag_mb.ENGINES`` that accepts the model (the
  engine alone: ``engine.compute`` plus the variance formula in place);
* ``backpack Variance``: BackPACK's own ``Variance`` extension, where the ``backpack``
  engine accepts the model;
* ``GV <engine>`` and ``GV auto``: the full user-facing
  ``GradientVariance(model, loss_fn, engine=...).backward`` (adds its engine choice,
  NaN/Inf check and bookkeeping); the engine ``auto`` picked is reported;

against ``plain``: ``loss.backward()`` on the same batch. A method that refuses a model
(``unsupported_reason``, or at run time) is listed as skipped with the first line of the
refusal. The methods run interleaved, round-robin, in a fresh process per workload, and
the median is reported (the machine is shared and noisy).

Peak memory: one child process (glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so
every large tensor is returned to the OS when freed) runs each method three times
(:data:`PEAK_CALLS`) after a warm-up; the peak resident memory above the resident memory
before the step (``/proc/self/status`` VmHWM after resetting it via
``/proc/self/clear_refs``) is the step's own peak, its median over the three calls.
Reported: (method's peak - plain's peak) / plain's peak.

``--overhead``: where the time between the engine alone and ``GradientVariance.backward``
goes: the named steps of ``msvag_mb.gradient_variance`` (and what they call) timed with
``time.perf_counter`` wrappers installed in a child process, interleaved with plain and the
engine alone (see ``bench_overhead.py`` for the list).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import msvag_mb
from msvag_mb.problems.models import CharRNN, CIFAR3C3D, FashionMNIST2C2D, SequenceCrossEntropy
from msvag_mb.problems.transformer import CharTransformer


class TwoLayerCharLSTM(nn.Module):
    """Embedding(83, 128) + one nn.LSTM(128, 128, num_layers=2) + Linear(128, 83)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(83, 128)
        self.lstm = nn.LSTM(128, 128, num_layers=2, batch_first=True)
        self.output = nn.Linear(128, 83)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.lstm(self.embedding(tokens))[0])


class EncoderCharModel(nn.Module):
    """Embedding(83, 128) + ``nn.TransformerEncoder`` (2 post-norm layers, 4 heads,
    feed-forward 512, batch-first, no dropout) + Linear(128, 83)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(83, 128)
        layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=512, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.output = nn.Linear(128, 83)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.encoder(self.embedding(tokens)))


class BidirectionalGRU(nn.Module):
    """One 2-layer bidirectional nn.GRU(128, 128) and a Linear(256, 83) per step (the model
    of ``bench_recurrent.py``'s ``gru2bi``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(128, 128, num_layers=2, bidirectional=True, batch_first=True)
        self.output = nn.Linear(256, 83)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.gru(x)[0])


def _group_norm_cnn() -> nn.Module:
    """3x32x32 -> conv 32, GroupNorm(8), ReLU, pool -> conv 64, GroupNorm(8), ReLU, pool
    -> Linear(64 * 8 * 8, 10)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


@dataclass(frozen=True)
class Target:
    """A bound that an issue sets on one method of one workload."""

    method: str  # e.g. "extensions" (the engine alone) or "GV auto"
    time: float | None  # at most this many times the plain step
    memory: float | None = None  # extra peak memory at most this fraction of plain's peak
    beat_others: bool = False  # also at most the best per-example method of the others
    source: str = ""

    def describe(self) -> str:
        bounds = [f"<= {self.time}x"] if self.time is not None else []
        bounds += [f"mem <= +{self.memory}"] if self.memory is not None else []
        bounds += ["<= best other"] if self.beat_others else []
        return f"{self.source}: {self.method} " + ", ".join(bounds)


@dataclass
class Workload:
    label: str
    model: Callable[[], nn.Module]
    loss_fn: nn.Module
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    targets: tuple[Target, ...] = field(default_factory=tuple)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 10))


def _images(batch, channels, size, classes):
    return lambda gen: (torch.randn(batch, channels, size, size, generator=gen),
                        torch.randint(0, classes, (batch,), generator=gen))


def _tokens(batch, steps):
    return lambda gen: (torch.randint(0, 83, (batch, steps), generator=gen),
                        torch.randint(0, 83, (batch, steps), generator=gen))


def _features(gen):
    return (torch.randn(50, 50, 128, generator=gen),
            torch.randint(0, 83, (50, 50), generator=gen))


def _issue4(time_ratio: float) -> Target:
    return Target("extensions", time_ratio, beat_others=True, source="issue 4")


def _issue14(time_ratio: float) -> Target:
    return Target("GV auto", time_ratio, source="issue 14")


#: issue 13 §4: GradientVariance with the chosen engine, for each modern architecture
ISSUE13 = Target("GV auto", 1.6, memory=0.25, source="issue 13")

WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("MLP 784-512-512-10, B=128", _mlp, nn.CrossEntropyLoss(),
                    _images(128, 1, 28, 10), (_issue4(1.35), _issue14(1.55))),
    "2c2d": Workload("Fashion-MNIST 2c2d, B=64", FashionMNIST2C2D, nn.CrossEntropyLoss(),
                     _images(64, 1, 28, 10), (_issue4(1.6), _issue14(1.5))),
    "3c3d": Workload("CIFAR-10 3c3d, B=128", CIFAR3C3D, nn.CrossEntropyLoss(),
                     _images(128, 3, 32, 10), (_issue4(1.8), _issue14(1.5))),
    "char_rnn": Workload("char-LSTM P4 CharRNN (2 x nn.LSTM, carried state, dropout), "
                         "B=50, T=50", CharRNN, SequenceCrossEntropy(), _tokens(50, 50),
                         (_issue4(2.0), _issue14(1.5))),
    "lstm2": Workload("char-LSTM, one 2-layer nn.LSTM, B=50, T=50", TwoLayerCharLSTM,
                      SequenceCrossEntropy(), _tokens(50, 50), (_issue4(2.0), _issue14(1.5))),
    "transformer": Workload("tolstoi_char_transformer CharTransformer (4 blocks, width 128, "
                            "tied head), B=32, T=64", CharTransformer, SequenceCrossEntropy(),
                            _tokens(32, 64), (ISSUE13,)),
    "encoder": Workload("nn.TransformerEncoder (2 layers, width 128, 4 heads, batch-first), "
                        "B=32, T=64", EncoderCharModel, SequenceCrossEntropy(),
                        _tokens(32, 64), (ISSUE13,)),
    "bigru": Workload("2-layer bidirectional nn.GRU 128 + Linear(256, 83), B=50, T=50",
                      BidirectionalGRU, SequenceCrossEntropy(), _features, (ISSUE13,)),
    "gn_cnn": Workload("CNN 2 x (conv, GroupNorm, ReLU, pool) + Linear, 3x32x32, B=128",
                       _group_norm_cnn, nn.CrossEntropyLoss(), _images(128, 3, 32, 10),
                       (ISSUE13,)),
}

AUTO = "auto"
GV_PREFIX = "GV "
BACKPACK_VARIANCE = "backpack Variance"


def engine_names() -> list[str]:
    """Every registered engine: those ``auto`` may pick in its order, then the others."""
    engines = msvag_mb.ENGINES

    def key(name):
        priority = engines[name].auto_priority
        return (priority is None, priority or 0, name)

    return sorted(engines, key=key)


def method_order() -> list[str]:
    """Column order: plain, the engines alone, BackPACK's Variance, the full calls."""
    names = engine_names()
    return (["plain"] + names + [BACKPACK_VARIANCE]
            + [GV_PREFIX + name for name in names] + [GV_PREFIX + AUTO])


def method_label(method: str) -> str:
    if method.startswith(GV_PREFIX):
        return f"GradientVariance({method[len(GV_PREFIX):]})"
    return method if method in ("plain", BACKPACK_VARIANCE) else f"{method} alone"


def first_line(error: BaseException | str) -> str:
    """The first line of a refusal, for the skipped list."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    prefix = "" if isinstance(error, str) else f"{type(error).__name__}: "
    return (prefix + line)[:300]


def within_batch_variance_(grad, sum_grad_squared, batch: int):
    """``(B sum_n c_n^2 - grad^2) / (B - 1)`` clamped at 0, in place in ``sum_grad_squared``:
    the formula of ``msvag_mb.batch_statistics.single_batch_variance`` in three kernels
    and no new tensor."""
    return sum_grad_squared.mul_(batch / (batch - 1)).addcmul_(
        grad, grad, value=-1.0 / (batch - 1)).clamp_(min=0.0)


def plain_step(model: nn.Module, loss_fn) -> Callable:
    """``run(x, y)``: one plain forward+backward, the gradients set to None first."""
    def plain(x, y):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    return plain


def full_call(gv: msvag_mb.GradientVariance) -> Callable:
    """``run(x, y)``: ``gv.zero_grad()`` and one ``gv.backward(x, y)``."""
    def call(x, y):
        gv.zero_grad()
        gv.backward(x, y)

    return call


def build(name: str):
    """(model, loss_fn, (x, y)) of workload ``name``, seeded."""
    workload = WORKLOADS[name]
    torch.manual_seed(0)
    model = workload.model()
    generator = torch.Generator().manual_seed(0)
    batch = workload.batch(generator)
    if isinstance(model, CharRNN):
        with torch.no_grad():
            model(batch[0])  # carry a state into the timed batches (stateful BPTT)
    return model, workload.loss_fn, batch


@dataclass
class Methods:
    """What :func:`methods` found for one model."""

    runs: dict[str, Callable] = field(default_factory=dict)  # name -> run(x, y)
    holders: list = field(default_factory=list)  # what holds results between calls
    skipped: dict[str, str] = field(default_factory=dict)  # name -> first line of refusal
    gvs: dict[str, msvag_mb.GradientVariance] = field(default_factory=dict)
    #: name -> the engine whose numbers it computes another way: refused where that is
    prerequisites: dict[str, str] = field(default_factory=dict)


def methods(model: nn.Module, loss_fn) -> Methods:
    """Every method that accepts ``model`` (``unsupported_reason``; run-time refusals are
    found by :func:`usable`), each a callable(x, y) doing one forward+backward with
    (gradient and) variance, and the first line of each refusal."""
    found = Methods(holders=[model])
    found.runs["plain"] = plain_step(model, loss_fn)
    _engines_alone(model, loss_fn, found)
    _backpack_variance(model, loss_fn, found)
    _full_calls(model, loss_fn, found)
    return found


def _engines_alone(model: nn.Module, loss_fn, found: Methods) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    reduction = getattr(loss_fn, "reduction", None)
    for name in engine_names():
        engine_cls = msvag_mb.ENGINES[name]
        reason = engine_cls.unsupported_reason(model)
        if reason is not None:
            found.skipped[name] = first_line(reason)
            continue
        engine = engine_cls()

        def run(x, y, engine=engine):
            model.zero_grad(set_to_none=True)  # an engine may fill p.grad (backward())
            result = engine.compute(model, loss_fn, x, y, params, reduction)
            return [within_batch_variance_(s.grad, s.sum_grad_squared, result.units)
                    for s in result.statistics.values()]

        found.runs[name] = run


def _refused_by(engine: str) -> str:
    return f"the {engine} engine refuses the model (above)"


def _extend_for_backpack(model: nn.Module) -> nn.Module:
    """``backpack.extend(model)`` as BackPACK's users write it, except for the modules that
    own no parameters and hold a submodule named ``output`` or ``input<i>`` (the P4
    ``CharRNN.output``): BackPACK's forward hook stores every hooked module's output and
    inputs under those names, which fails on a submodule, and its first-order extensions
    read only the layers that own parameters. Those modules carry BackPACK's mark of an
    extended module, so ``extend`` passes over them (not over their submodules)."""
    from backpack import extend

    def backpack_io_name(name: str) -> bool:
        return name == "output" or (name.startswith("input") and name[5:].isdigit())

    for module in model.modules():
        owns_parameters = any(p is not None for p in module._parameters.values())
        if not owns_parameters and any(map(backpack_io_name, module._modules)):
            module._backpack_extend = True
    return extend(model)


def _backpack_variance(model: nn.Module, loss_fn, found: Methods) -> None:
    if msvag_mb.ENGINES["backpack"].unsupported_reason(model) is not None:
        found.skipped[BACKPACK_VARIANCE] = _refused_by("backpack")
        return
    from backpack import backpack, extend
    from backpack.extensions import Variance

    # exact only where the backpack engine is (e.g. not with a carried LSTM state, which
    # BackPACK takes for zeros); that engine refuses such models when it runs them
    found.prerequisites[BACKPACK_VARIANCE] = "backpack"
    try:
        extended = _extend_for_backpack(copy.deepcopy(model))
        extended_loss = extend(copy.deepcopy(loss_fn))
    except Exception as error:  # noqa: BLE001 - report and measure the rest
        found.skipped[BACKPACK_VARIANCE] = first_line(error)
        return

    def backpack_variance(x, y):
        extended.zero_grad(set_to_none=True)
        with backpack(Variance()):
            extended_loss(extended(x), y).backward()

    found.runs[BACKPACK_VARIANCE] = backpack_variance
    found.holders.append(extended)


def _full_calls(model: nn.Module, loss_fn, found: Methods) -> None:
    for name in engine_names() + [AUTO]:
        method = GV_PREFIX + name
        reason = None if name == AUTO else msvag_mb.ENGINES[name].unsupported_reason(model)
        if reason is not None:
            found.skipped[method] = first_line(reason)
            continue
        gv = msvag_mb.GradientVariance(model, loss_fn, engine=name)
        found.runs[method] = full_call(gv)
        found.holders.append(gv)
        found.gvs[method] = gv


def usable(found: Methods, batch) -> dict[str, Callable]:
    """The methods that run on ``batch``: those refusing at run time (e.g. BackPACK with a
    carried LSTM state, a layer the extensions cannot trace) move to ``found.skipped``."""
    keep = {}
    for name, run in found.runs.items():
        prerequisite = found.prerequisites.get(name)
        if prerequisite in found.skipped:
            found.skipped[name] = _refused_by(prerequisite)
            continue
        try:
            run(*batch)
            keep[name] = run
        except Exception as error:  # noqa: BLE001 - report and measure the rest
            found.skipped[name] = first_line(error)
    return keep


def auto_pick(found: Methods, keep: dict) -> str | None:
    """The engine ``GV auto`` used in its last call (None if it did not run)."""
    gv = found.gvs.get(GV_PREFIX + AUTO)
    return gv.engine_name if gv is not None and GV_PREFIX + AUTO in keep else None


def _child(flag: str, names: list[str], env: dict | None = None) -> dict:
    """Run this script with a hidden child ``flag``; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), flag, *names],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"child {flag} {' '.join(names)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.rstrip().splitlines()[-1])


def time_workload(name: str, repeats: int) -> dict:
    """``{"medians": seconds per call of each usable method, "skipped": {method: reason},
    "auto": engine}``, interleaved round-robin, measured in a fresh process per workload
    (as in training, where a process runs one model: the allocator's state left by another
    model changed the LSTM's plain step by up to 30%)."""
    return _child("--time-child", [name, str(repeats)])


def _time_here(name: str, repeats: int) -> dict:
    model, loss_fn, batch = build(name)
    found = methods(model, loss_fn)
    runs = usable(found, batch)
    for run in runs.values():  # warm-up (the usable() call was the first)
        run(*batch)
    times = {method: [] for method in runs}
    for _ in range(repeats):
        for method, run in runs.items():
            start = time.perf_counter()
            run(*batch)
            times[method].append(time.perf_counter() - start)
    return {"medians": {method: statistics.median(t) for method, t in times.items()},
            "skipped": found.skipped, "auto": auto_pick(found, runs)}


# -- peak memory ------------------------------------------------------------------------
def _vm(field_name: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _clear(holders: list) -> None:
    """Free every method's results (``.grad``, ``grad_variance``, GradientVariance's)."""
    for holder in holders:
        if isinstance(holder, msvag_mb.GradientVariance):
            holder.zero_grad()
            continue
        for param in holder.parameters():
            param.grad = None
            msvag_mb.param_variance.clear_grad_variance(param)
    gc.collect()


#: calls per method whose peaks give the median: one call's peak moved by up to 10 MiB
#: with what the earlier methods had left in the heap (docs/benchmarks.md)
PEAK_CALLS = 3


def step_peaks(name: str) -> dict[str, int]:
    """Peak resident memory (KiB) of one call of each method above the memory before it
    (the median of :data:`PEAK_CALLS` calls after a warm-up)."""
    model, loss_fn, batch = build(name)
    found = methods(model, loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = usable(found, batch)
    peaks = {}
    for method, run in runs.items():
        _clear(found.holders)
        run(*batch)  # warm-up: one-time allocations (kernel caches, lazy state)
        seen = []
        for _ in range(PEAK_CALLS):
            _clear(found.holders)
            before = _vm("VmRSS")
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current VmRSS
            run(*batch)
            seen.append(_vm("VmHWM") - before)
        peaks[method] = int(statistics.median(seen))
        _clear(found.holders)
    return peaks


def measure_memory(names: list[str]) -> dict[str, dict[str, int]]:
    """:func:`step_peaks` of every workload, in one child process (see module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    return _child("--memory-child", names, env=env)


# -- tables ---------------------------------------------------------------------------
def _extra(peaks: dict[str, dict[str, int]] | None, name: str, method: str) -> float | None:
    """(method's peak - plain's peak) / plain's peak, or None if not measured."""
    row = (peaks or {}).get(name, {})
    if method not in row or "plain" not in row:
        return None
    return (row[method] - row["plain"]) / max(row["plain"], 1)


def _cell(result: dict, peaks, name: str, method: str) -> str:
    medians = result["medians"]
    if method not in medians:
        return "refused"
    cell = f"{medians[method] / medians['plain']:.2f}x"
    extra = _extra(peaks, name, method)
    return cell + (f" ({extra:+.2f})" if extra is not None else "")


def _columns(times: dict[str, dict], wanted) -> list[str]:
    """The wanted methods that ran on at least one workload (the others are only listed
    as refused)."""
    return [m for m in method_order() if wanted(m)
            and any(m in r["medians"] for r in times.values())]


def _met(target: Target, result: dict, peaks, name: str) -> str:
    """``yes``/``no`` (with what failed) for one target; ``-`` if the method did not run."""
    medians = result["medians"]
    if target.method not in medians:
        return "- (refused)"
    ratio = medians[target.method] / medians["plain"]
    failed = []
    if target.time is not None and ratio > target.time:
        failed.append("time")
    extra = _extra(peaks, name, target.method)
    if target.memory is not None and extra is not None and extra > target.memory:
        failed.append("memory")
    others = [medians[m] / medians["plain"] for m in medians
              if m not in ("plain", target.method) and not m.startswith(GV_PREFIX)
              and m in msvag_mb.ENGINES and msvag_mb.ENGINES[m].units_are_examples]
    others += [medians[BACKPACK_VARIANCE] / medians["plain"]] if (
        BACKPACK_VARIANCE in medians) else []
    if target.beat_others and others and ratio > min(others):
        failed.append("slower than another")
    return "no (" + ", ".join(failed) + ")" if failed else "yes"


def engines_table(times: dict[str, dict], peaks) -> list[str]:
    """Markdown: the engines alone (and BackPACK's Variance) per workload."""
    present = _columns(times, lambda m: m != "plain" and not m.startswith(GV_PREFIX))
    header = ["model", "plain ms"] + [method_label(m) for m in present]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in times.items():
        cells = [name, f"{1000 * result['medians']['plain']:.1f}"]
        cells += [_cell(result, peaks, name, m) for m in present]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def full_calls_table(times: dict[str, dict], peaks) -> list[str]:
    """Markdown: GradientVariance.backward per engine and with auto, and the targets."""
    present = _columns(times, lambda m: m.startswith(GV_PREFIX))
    header = (["model", "plain ms"] + [method_label(m) for m in present]
              + ["auto picked", "targets", "met"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in times.items():
        cells = [name, f"{1000 * result['medians']['plain']:.1f}"]
        cells += [_cell(result, peaks, name, m) for m in present]
        targets = WORKLOADS[name].targets
        cells += [result.get("auto") or "-", "; ".join(t.describe() for t in targets),
                  "; ".join(_met(t, result, peaks, name) for t in targets)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def overhead_table(times: dict[str, dict]) -> list[str]:
    """Markdown: time of ``GradientVariance.backward`` over the engine alone, per engine."""
    engines = [n for n in engine_names() if any(
        n in r["medians"] and GV_PREFIX + n in r["medians"] for r in times.values())]
    header = ["model"] + [f"GV({n}) / {n} alone" for n in engines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in times.items():
        medians = result["medians"]
        cells = [name] + [
            f"{medians[GV_PREFIX + n] / medians[n]:.2f} "
            f"(+{(medians[GV_PREFIX + n] - medians[n]) / medians['plain']:.2f} plain)"
            if n in medians and GV_PREFIX + n in medians else "-" for n in engines]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def skipped_list(times: dict[str, dict]) -> list[str]:
    """Markdown bullets: each workload's refused methods and the refusal's first line."""
    workloads: dict[tuple[str, str], list[str]] = {}  # (method, reason) -> workloads
    for name, result in times.items():
        skipped = result["skipped"]
        for method, reason in skipped.items():
            alone = method[len(GV_PREFIX):] if method.startswith(GV_PREFIX) else None
            if alone is not None and skipped.get(alone) == reason:
                continue  # refused alike alone: listed once, with the engine alone
            both = skipped.get(GV_PREFIX + method) == reason
            label = f"{method} (alone and in GradientVariance)" if both else method_label(
                method)
            workloads.setdefault((label, reason), []).append(name)
    return [f"* {', '.join(names)}: {label}: {reason}"
            for (label, reason), names in workloads.items()]


def memory_table(peaks: dict[str, dict[str, int]]) -> list[str]:
    present = [m for m in method_order() if any(m in p for p in peaks.values())]
    header = ["model"] + [f"{method_label(m)} MiB" for m in present]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in peaks.items():
        lines.append("| " + " | ".join(
            [name] + [f"{row[m] / 1024:.1f}" if m in row else "refused" for m in present]) + " |")
    return lines


def linear_variants(repeats: int) -> None:
    """bmm of per-example matrices vs the Gram form, for the char-RNN's decoder shape."""
    from msvag_mb.extensions.linear import linear_weight_sum_grad_squared

    def gram(x, g):
        # sum_n sum_{t,s} (g_nt * g_ns)^T (x_nt * x_ns): B*T^2 rows of outer products
        gg = (g.unsqueeze(2) * g.unsqueeze(1)).flatten(0, 2)
        xx = (x.unsqueeze(2) * x.unsqueeze(1)).flatten(0, 2)
        return gg.t() @ xx

    x, g = torch.randn(50, 50, 128), torch.randn(50, 50, 83)
    torch.testing.assert_close(gram(x, g), linear_weight_sum_grad_squared(x, g), rtol=1e-3,
                               atol=1e-2)
    samples = {"bmm": [], "gram": []}
    for _ in range(repeats):
        for label, fn in (("bmm", linear_weight_sum_grad_squared), ("gram", gram)):
            start = time.perf_counter()
            fn(x, g)
            samples[label].append(time.perf_counter() - start)
    for label, values in samples.items():
        print(f"linear (B=50, T=50, 128->83) {label}: {statistics.median(values) * 1e3:.1f} ms")


def run(names: list[str], repeats: int, memory: bool) -> list[str]:
    """Time (and measure) the workloads; returns the Markdown lines of the tables."""
    times = {}
    for name in names:
        print(f"[{name}] {WORKLOADS[name].label}", flush=True)
        try:
            times[name] = time_workload(name, repeats)
        except RuntimeError as error:  # a broken model or engine: report, measure the rest
            print(f"  failed: {str(error)[-600:]}", flush=True)
            continue
        if times[name].get("auto"):
            print(f"  auto picked: {times[name]['auto']}", flush=True)
        for line in skipped_list({name: times[name]}):
            print(f"  refused: {line[len('* ' + name + ': '):]}", flush=True)
    if not times:
        return ["(no workload could be measured)"]
    peaks = None
    if memory:
        try:
            peaks = measure_memory(list(times))
        except RuntimeError as error:  # e.g. a module being edited: keep the times
            print(f"memory: failed ({str(error)[-600:]})", flush=True)
    bracket = ("; in brackets: extra peak memory of the step / plain step's own peak"
               if memory else "")
    lines = [f"Engines alone: time per forward+backward with variance / plain (median of "
             f"{repeats} interleaved repeats){bracket}:", ""]
    lines += engines_table(times, peaks)
    lines += ["", f"The full `GradientVariance(model, loss_fn, engine=E).backward` call (same "
              f"run){bracket}:", ""]
    lines += full_calls_table(times, peaks)
    lines += ["", "`GradientVariance.backward` over the engine alone (ratio, and the "
              "difference in plain steps):", ""] + overhead_table(times)
    skipped = skipped_list(times)
    if skipped:
        lines += ["", "Refused (first line of the refusal):", ""] + skipped
    if peaks is not None:
        lines += ["", "Peak memory of one step above the memory before it (MiB):", ""]
        lines += memory_table(peaks)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 15 (5 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS),
                        choices=list(WORKLOADS))
    parser.add_argument("--linear-variants", action="store_true",
                        help="also time bmm vs Gram for a Linear layer with a sequence dim")
    parser.add_argument("--overhead", action="store_true",
                        help="only: where GradientVariance.backward's time over the engine "
                             "alone goes (named steps timed)")
    parser.add_argument("--memory-child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--time-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--overhead-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # BackPACK warns about containers and first layers on every call; the numbers matter here
    warnings.simplefilter("ignore", UserWarning)
    if args.time_child is not None:
        print(json.dumps(_time_here(args.time_child[0], int(args.time_child[1]))))
        return
    if args.memory_child is not None:
        print(json.dumps({name: step_peaks(name) for name in args.memory_child}))
        return
    if args.overhead_child is not None:
        import bench_overhead as overhead

        print(json.dumps(overhead.profile_here(args.overhead_child[0],
                                               int(args.overhead_child[1]))))
        return
    repeats = args.repeats or (5 if args.quick else 15)
    print(header())
    if args.overhead:
        import bench_overhead as overhead

        print("\n".join(overhead.run(args.workloads, repeats)))
        return
    if args.linear_variants:
        linear_variants(repeats)
    print("\n".join(run(args.workloads, repeats, memory=not args.no_memory)))


def header() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
            f"float32, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
