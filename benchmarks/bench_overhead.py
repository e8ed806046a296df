"""Where ``GradientVariance.backward`` spends its time beyond the engine alone (issue 14).

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_engines.py --overhead
            [--quick] [--workloads mlp 2c2d 3c3d char_rnn lstm2]

In a fresh process per workload, four methods run interleaved, round-robin:

* ``plain``: ``loss_fn(model(x), y).backward()``;
* ``engine alone``: ``model.zero_grad(set_to_none=True)``, ``engine.compute`` of the engine
  ``auto`` picks, and the variance formula in place (three kernels per parameter);
* ``GV(<engine>)`` and ``GV(auto)``: ``gv.zero_grad(); gv.backward(x, y)``.

The named steps of :mod:`msvag_mb.gradient_variance` and what they call are wrapped, in
that process only, in ``time.perf_counter`` timers (inclusive times; a wrapper costs about
a microsecond per call): ``zero_grad``, ``backward`` and its steps ``_prepare``
(``engine_candidates``, ``_start_cycle``), ``_batch_statistics`` (``engine.compute``,
``in_parameter_dtype``), ``_combine`` (``combined_statistics`` with
``single_batch_variance``, ``_check_finite`` with ``all_finite``) and ``_commit``
(``set_grad_variance``), and every registered engine's ``unsupported_reason`` (called by
the engine choice and again inside ``compute``); inside the extensions engine, its hooks'
attach, ``check_uses`` (the graph walk for parameters used outside their layer), detach
and the layouts' ``batch_axis``. The source is read, not changed.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections import defaultdict

import torch

import bench_engines
import msvag_mb
from msvag_mb import batch_statistics, gradient_variance
from msvag_mb.extensions import ExampleLayouts, SumGradSquaredHooks
from msvag_mb.gradient_variance import GradientVariance

def _steps(owner, *steps: tuple[int, str]) -> list[tuple[object, str, str]]:
    """``(owner, attribute, label)`` for each ``(depth, attribute)`` of ``owner``: the label
    is the attribute's name, indented two spaces per level of nesting of the calls."""
    return [(owner, attribute, "  " * depth + attribute) for depth, attribute in steps]


#: what is timed: the steps of GradientVariance, and the functions they call
TIMED_METHODS = _steps(GradientVariance, (0, "zero_grad"), (0, "backward"), (1, "_prepare"),
                       (2, "_start_cycle"), (1, "_batch_statistics"), (1, "_combine"),
                       (2, "_check_finite"), (1, "_commit"))
TIMED_FUNCTIONS = (
    _steps(gradient_variance, (2, "engine_candidates"), (2, "in_parameter_dtype"),
           (2, "combined_statistics"), (3, "all_finite"), (2, "set_grad_variance"))
    + _steps(batch_statistics, (3, "single_batch_variance")))
#: inside the extensions engine's compute (only described in the report: not ours to change)
TIMED_EXTENSIONS = [
    (SumGradSquaredHooks, "__enter__", "      hooks attach"),
    (SumGradSquaredHooks, "check_uses", "      hooks.check_uses"),
    (SumGradSquaredHooks, "__exit__", "      hooks detach"),
    (ExampleLayouts, "batch_axis", "      layouts.batch_axis"),
]
FORMULA_LABEL = "  formula in place"
COMPUTE_LABEL = "    engine.compute"


class StepTimer:
    """Inclusive seconds per label within the method call now running."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def timed(self, function, label: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.current[label] += time.perf_counter() - start
                self.calls[label] += 1

        return wrapper

    def take(self) -> dict[str, float]:
        taken, self.current = dict(self.current), defaultdict(float)
        return taken


def install(timer: StepTimer) -> None:
    """Wrap every timed step (static and class methods stay what they were)."""
    methods = TIMED_METHODS + TIMED_EXTENSIONS
    for name, cls in msvag_mb.ENGINES.items():
        methods += [(cls, "compute", COMPUTE_LABEL),
                    (cls, "unsupported_reason", f"      {name}.unsupported_reason")]
    for owner, attribute, label in methods:
        static = inspect.getattr_static(owner, attribute)
        if isinstance(static, staticmethod):
            setattr(owner, attribute, staticmethod(timer.timed(static.__func__, label)))
        elif isinstance(static, classmethod):
            setattr(owner, attribute, classmethod(timer.timed(static.__func__, label)))
        else:
            setattr(owner, attribute, timer.timed(static, label))
    for module, attribute, label in TIMED_FUNCTIONS:
        setattr(module, attribute, timer.timed(getattr(module, attribute), label))


def _runs(name: str, timer: StepTimer):
    """``(runs by method, the engine auto picked, the batch)`` for workload ``name``."""
    model, loss_fn, batch = bench_engines.build(name)
    gv_auto = GradientVariance(model, loss_fn, engine="auto")
    gv_auto.backward(*batch)
    picked = gv_auto.engine_name
    gv_picked = GradientVariance(model, loss_fn, engine=picked)
    engine = msvag_mb.ENGINES[picked]()
    params = [p for p in model.parameters() if p.requires_grad]
    reduction = getattr(loss_fn, "reduction", None)
    formula = timer.timed(bench_engines.within_batch_variance_, FORMULA_LABEL)

    def engine_alone(x, y):
        model.zero_grad(set_to_none=True)
        result = engine.compute(model, loss_fn, x, y, params, reduction)
        for stats in result.statistics.values():
            formula(stats.grad, stats.sum_grad_squared, result.units)

    full_call = bench_engines.full_call
    runs = {"plain": bench_engines.plain_step(model, loss_fn), "engine alone": engine_alone,
            f"GV({picked})": full_call(gv_picked), "GV(auto)": full_call(gv_auto)}
    return runs, picked, batch


def profile_here(name: str, repeats: int) -> dict:
    """Median total and per-step milliseconds of each method (see the module docstring)."""
    timer = StepTimer()
    install(timer)
    runs, picked, batch = _runs(name, timer)
    for run in runs.values():  # warm-up
        run(*batch)
    timer.take()
    samples = {method: defaultdict(list) for method in runs}
    for _ in range(repeats):
        for method, run in runs.items():
            start = time.perf_counter()
            run(*batch)
            total = time.perf_counter() - start
            for label, seconds in timer.take().items():
                samples[method][label].append(seconds)
            samples[method]["total"].append(total)
    medians = {method: {label: 1000 * statistics.median(values)
                        for label, values in by_label.items()}
               for method, by_label in samples.items()}
    return {"picked": picked, "ms": medians, "threads": torch.get_num_threads()}


def _labels(ms: dict[str, dict[str, float]]) -> list[str]:
    """Every label found, in the nesting order of the calls."""
    # unsupported_reason is called both by engine_candidates and inside engine.compute
    reasons = [f"      {name}.unsupported_reason" for name in bench_engines.engine_names()]
    order = ["zero_grad", "backward", "  _prepare", "    engine_candidates", *reasons,
             "    _start_cycle", "  _batch_statistics", COMPUTE_LABEL,
             *[label for *_, label in TIMED_EXTENSIONS], "    in_parameter_dtype", FORMULA_LABEL,
             "  _combine", "    combined_statistics", "      single_batch_variance",
             "    _check_finite", "      all_finite", "  _commit", "    set_grad_variance"]
    found = {label for by_label in ms.values() for label in by_label} - {"total"}
    extra = sorted(found - set(order))
    return [label for label in order if label in found] + extra


def table(name: str, result: dict) -> list[str]:
    """Markdown: the per-step milliseconds of one workload, and each as a share of plain."""
    ms = result["ms"]
    plain = ms["plain"]["total"]
    methods = list(ms)
    header = ["step (inclusive ms)"] + methods
    lines = [f"**{name}** (auto picked `{result['picked']}`; plain {plain:.1f} ms; "
             "in brackets: the step's time in plain steps)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = ["total"] + _labels(ms)
    for label in rows:
        cells = [label.replace(" ", "&nbsp;") if label.startswith(" ") else label]
        for method in methods:
            value = ms[method].get(label)
            cells.append("" if value is None else f"{value:.2f} ({value / plain:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run(names: list[str], repeats: int) -> list[str]:
    """Profile each workload in its own process; the Markdown lines of the tables."""
    lines = [f"Median of {repeats} interleaved repeats, per call:", ""]
    for name in names:
        print(f"[{name}] overhead", flush=True)
        try:
            result = bench_engines._child("--overhead-child", [name, str(repeats)])
        except RuntimeError as error:
            lines += [f"{name}: failed ({str(error)[-300:]})", ""]
            continue
        lines += table(name, result) + [""]
    return lines
