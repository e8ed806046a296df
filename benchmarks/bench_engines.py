"""Cost of the within-batch variance, as a ratio to a plain forward+backward.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_engines.py [--quick] [--no-memory]
            [--workloads mlp 2c2d ...] [--linear-variants]

(``benchmarks/run_all.py`` runs this and the optimizer-step comparison of ``bench_step.py``
together: the command recorded in ``docs/benchmarks.md``.)

Workloads (issue 4's shapes): MLP 784-512-512-10 at batch 128, the Fashion-MNIST 2c2d at 64,
the CIFAR-10 3c3d at 128, and the char-LSTM (Embedding(83, 128), LSTM 2x128, Linear(128, 83))
at batch 50 x 50 steps, both as the problem set's ``CharRNN`` (two single-layer nn.LSTMs
with a carried state and dropout) and with one 2-layer ``nn.LSTM``.

Methods, each producing the batch gradient and the within-batch variance
``(B sum_n c_n^2 - grad^2) / (B - 1)`` of every parameter:

* every engine of ``msvag_mb`` that ``engine="auto"`` may pick (``extensions``: ours;
  ``backpack``: BackPACK's SumGradSquared; ``vmap``: torch.func), as ``engine.compute`` plus
  the variance formula;
* ``backpack Variance``: BackPACK's own ``Variance`` extension;
* ``GradientVariance``: the full user-facing ``GradientVariance.backward`` with engine
  ``extensions`` (adds its NaN/Inf check and bookkeeping);

against ``plain``: ``loss.backward()`` on the same batch. Methods that refuse a model (at
construction or at run time) are listed as skipped. The methods run interleaved,
round-robin, in a fresh process per workload, and the median is reported (the machine is
shared and noisy).

Peak memory: one child process (glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so
every large tensor is returned to the OS when freed) runs each method once after a
warm-up; the peak resident memory above the resident memory before the step
(``/proc/self/status`` VmHWM after resetting it via ``/proc/self/clear_refs``) is the step's
own peak. Reported: (method's peak - plain's peak) / plain's peak.
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
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import msvag_mb
from msvag_mb.engines import ENGINES
from msvag_mb.problems.models import CharRNN, CIFAR3C3D, FashionMNIST2C2D, SequenceCrossEntropy


class TwoLayerCharLSTM(nn.Module):
    """Embedding(83, 128) + one nn.LSTM(128, 128, num_layers=2) + Linear(128, 83)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(83, 128)
        self.lstm = nn.LSTM(128, 128, num_layers=2, batch_first=True)
        self.output = nn.Linear(128, 83)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.lstm(self.embedding(tokens))[0])


@dataclass
class Workload:
    label: str
    model: Callable[[], nn.Module]
    loss_fn: nn.Module
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    #: issue 4's target for the extensions engine's time ratio (None: none set)
    target: float | None


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 10))


def _images(batch, channels, size, classes):
    return lambda gen: (torch.randn(batch, channels, size, size, generator=gen),
                        torch.randint(0, classes, (batch,), generator=gen))


def _tokens(gen):
    return (torch.randint(0, 83, (50, 50), generator=gen),
            torch.randint(0, 83, (50, 50), generator=gen))


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("MLP 784-512-512-10, B=128", _mlp, nn.CrossEntropyLoss(),
                    _images(128, 1, 28, 10), 1.35),
    "2c2d": Workload("Fashion-MNIST 2c2d, B=64", FashionMNIST2C2D, nn.CrossEntropyLoss(),
                     _images(64, 1, 28, 10), 1.6),
    "3c3d": Workload("CIFAR-10 3c3d, B=128", CIFAR3C3D, nn.CrossEntropyLoss(),
                     _images(128, 3, 32, 10), 1.8),
    "char_rnn": Workload("char-LSTM P4 CharRNN (2 x nn.LSTM, carried state, dropout), "
                         "B=50, T=50", CharRNN, SequenceCrossEntropy(), _tokens, 2.0),
    "lstm2": Workload("char-LSTM, one 2-layer nn.LSTM, B=50, T=50", TwoLayerCharLSTM,
                      SequenceCrossEntropy(), _tokens, 2.0),
}

#: engines compared with ours (column order of the tables)
METHOD_ORDER = ["plain", "extensions", "backpack", "backpack Variance", "vmap",
                "GradientVariance"]
METHOD_LABELS = {"extensions": "ours (extensions)", "backpack": "BackPACK SumGradSquared",
                 "backpack Variance": "BackPACK Variance", "vmap": "vmap",
                 "GradientVariance": "ours via GradientVariance.backward"}


def within_batch_variance_(grad, sum_grad_squared, batch: int):
    """``(B sum_n c_n^2 - grad^2) / (B - 1)`` clamped at 0, in place in ``sum_grad_squared``:
    the formula of ``msvag_mb.batch_statistics.single_batch_variance`` in three kernels
    and no new tensor."""
    return sum_grad_squared.mul_(batch / (batch - 1)).addcmul_(
        grad, grad, value=-1.0 / (batch - 1)).clamp_(min=0.0)


def build(name: str):
    """(model, loss_fn, (x, y), extra modules whose grads the methods fill)."""
    workload = WORKLOADS[name]
    torch.manual_seed(0)
    model = workload.model()
    generator = torch.Generator().manual_seed(0)
    batch = workload.batch(generator)
    if isinstance(model, CharRNN):
        with torch.no_grad():
            model(batch[0])  # carry a state into the timed batches (stateful BPTT)
    return model, workload.loss_fn, batch


def methods(model: nn.Module, loss_fn) -> tuple[dict[str, Callable], list]:
    """name -> callable(x, y) doing one forward+backward with (gradient and) variance;
    only methods that accept ``model``. Also what holds their results between calls
    (modules whose ``.grad`` they fill, the ``GradientVariance``)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def plain(x, y):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    found = {"plain": plain}
    modules = [model]
    for name, engine_cls in sorted(ENGINES.items()):
        if engine_cls.auto_priority is None or engine_cls.unsupported_reason(model) is not None:
            continue
        engine = engine_cls()

        def run(x, y, engine=engine):
            result = engine.compute(model, loss_fn, x, y, params)
            return [within_batch_variance_(s.grad, s.sum_grad_squared, result.units)
                    for s in result.statistics.values()]

        found[name] = run
    if ENGINES["backpack"].unsupported_reason(model) is None:
        from backpack import backpack, extend
        from backpack.extensions import Variance

        try:
            extended = extend(copy.deepcopy(model))
            extended_loss = extend(copy.deepcopy(loss_fn))
        except Exception as error:  # noqa: BLE001 - report and measure the rest
            print(f"  backpack Variance: skipped ({type(error).__name__}: {str(error)[:80]})")
        else:
            def backpack_variance(x, y):
                extended.zero_grad(set_to_none=True)
                with backpack(Variance()):
                    extended_loss(extended(x), y).backward()

            found["backpack Variance"] = backpack_variance
            modules.append(extended)
    if ENGINES["extensions"].unsupported_reason(model) is None:
        gv = msvag_mb.GradientVariance(model, loss_fn, engine="extensions")

        def full_api(x, y):
            gv.zero_grad()
            gv.backward(x, y)

        found["GradientVariance"] = full_api
        modules.append(gv)
    return found, modules


def usable(runs: dict, batch) -> dict:
    """Drop methods that refuse at run time (e.g. BackPACK with a carried LSTM state)."""
    keep = {}
    for name, run in runs.items():
        try:
            run(*batch)
            keep[name] = run
        except Exception as error:  # noqa: BLE001 - report and measure the rest
            print(f"  {name}: skipped ({type(error).__name__}: {str(error)[:90]})")
    return keep


def time_workload(name: str, repeats: int) -> dict[str, float]:
    """Median seconds per call of each usable method, interleaved round-robin, measured in
    a fresh process per workload (as in training, where a process runs one model: the
    allocator's state left by another model changed the LSTM's plain step by up to 30%)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--time-child", name,
                          str(repeats)], capture_output=True, text=True, check=True)
    lines = out.stdout.rstrip().splitlines()
    for line in lines[:-1]:
        print(line)
    return json.loads(lines[-1])


def _time_here(name: str, repeats: int) -> dict[str, float]:
    model, loss_fn, batch = build(name)
    runs = usable(methods(model, loss_fn)[0], batch)
    for run in runs.values():  # warm-up (the usable() call was the first)
        run(*batch)
    times = {method: [] for method in runs}
    for _ in range(repeats):
        for method, run in runs.items():
            start = time.perf_counter()
            run(*batch)
            times[method].append(time.perf_counter() - start)
    return {method: statistics.median(t) for method, t in times.items()}


# -- peak memory ------------------------------------------------------------------------
def _vm(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


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


def step_peaks(name: str) -> dict[str, int]:
    """Peak resident memory (KiB) of one call of each method above the memory before it."""
    model, loss_fn, batch = build(name)
    runs, modules = methods(model, loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = usable(runs, batch)
    peaks = {}
    for method, run in runs.items():
        _clear(modules)
        run(*batch)  # warm-up: one-time allocations (kernel caches, lazy state)
        _clear(modules)
        before = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current VmRSS
        run(*batch)
        peaks[method] = _vm("VmHWM") - before
        _clear(modules)
    return peaks


def measure_memory(names: list[str]) -> dict[str, dict[str, int]]:
    """:func:`step_peaks` of every workload, in one child process (see module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", *names],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- tables ---------------------------------------------------------------------------
def table(times: dict[str, dict[str, float]], peaks: dict[str, dict[str, int]] | None
          ) -> list[str]:
    """Markdown: time ratios (and extra peak memory) per workload and method, targets."""
    present = [m for m in METHOD_ORDER if any(m in t for t in times.values()) and m != "plain"]
    header = ["model", "plain ms"] + [METHOD_LABELS[m] for m in present] + [
        "target (ours)", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, medians in times.items():
        plain = medians["plain"]
        cells = [name, f"{1000 * plain:.1f}"]
        for method in present:
            if method not in medians:
                cells.append("refused")
                continue
            cell = f"{medians[method] / plain:.2f}x"
            if peaks is not None and method in peaks.get(name, {}):
                extra = (peaks[name][method] - peaks[name]["plain"]) / max(
                    peaks[name]["plain"], 1)
                cell += f" ({extra:+.2f})"
            cells.append(cell)
        target = WORKLOADS[name].target
        ours = medians.get("extensions", float("nan")) / plain
        others = [medians[m] / plain for m in ("backpack", "backpack Variance", "vmap")
                  if m in medians]
        met = ours <= target and (not others or ours <= min(others))
        cells += [f"<= {target}x" + (", <= best other" if others else ""),
                  "yes" if met else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def memory_table(peaks: dict[str, dict[str, int]]) -> list[str]:
    present = [m for m in METHOD_ORDER if any(m in p for p in peaks.values())]
    header = ["model"] + [f"{METHOD_LABELS.get(m, m)} MiB" for m in present]
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
        times[name] = time_workload(name, repeats)
    peaks = measure_memory(names) if memory else None
    lines = ["Time per forward+backward with variance / plain forward+backward (median of "
             f"{repeats} interleaved repeats)" + ("; in brackets: extra peak memory of the "
                                                  "step / plain step's own peak" if memory
                                                  else "") + ":", ""]
    lines += table(times, peaks)
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
    parser.add_argument("--memory-child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--time-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # BackPACK warns about containers and first layers on every call; the numbers matter here
    warnings.simplefilter("ignore", UserWarning)
    if args.time_child is not None:
        print(json.dumps(_time_here(args.time_child[0], int(args.time_child[1]))))
        return
    if args.memory_child is not None:
        print(json.dumps({name: step_peaks(name) for name in args.memory_child}))
        return
    repeats = args.repeats or (5 if args.quick else 15)
    print(header())
    if args.linear_variants:
        linear_variants(repeats)
    print("\n".join(run(args.workloads, repeats, memory=not args.no_memory)))


def header() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
            "float32")


if __name__ == "__main__":
    main()
