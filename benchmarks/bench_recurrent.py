"""Cost of the within-batch variance for recurrent layers, as a ratio to a plain step.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_recurrent.py [--repeats 15]
            [--threads 1 2] [--workloads gru2bi char_rnn lstm2] [--no-memory]

Workloads (float32, CPU):

* ``gru2bi``: issue 13's bar, one 2-layer bidirectional ``nn.GRU(128, 128,
  batch_first=True)`` and a ``Linear(256, 83)`` read-out, B=50, T=50, cross-entropy over
  all tokens; target: at most 1.6x the plain step, extra peak memory at most 0.25 of it;
* ``char_rnn``: the problem set's P4 ``CharRNN`` (two single-layer nn.LSTMs, carried
  state, dropout), B=50, T=50;
* ``lstm2``: Embedding(83, 128), one 2-layer ``nn.LSTM(128, 128)``, Linear(128, 83).

Methods: ``plain`` (``loss_fn(model(x), y).backward()``) and ``GradientVariance``
(``GradientVariance(model, loss_fn, engine="extensions").backward(x, y)``: gradient and
within-batch variance of every parameter). Time: median of interleaved repeats, in a fresh
process per workload and thread count (``torch.set_num_threads``). Peak memory, one child
process per workload, each method after a warm-up, two ways:

* *tensors*: the peak of the bytes held by live tensors during the step, above those
  before it, from the allocation events of ``torch.profiler`` (``profile_memory=True``):
  what the step itself needs, independent of the C allocator;
* *RSS* (as ``bench_engines.py``): the peak resident memory above that before the step
  (``VmHWM`` after resetting it via ``/proc/self/clear_refs``; glibc's
  ``MALLOC_MMAP_THRESHOLD_`` at 64 KiB, so freed large tensors go back to the OS). It
  counts every tensor of 64 KiB or more (freshly mapped each step) but not the smaller
  ones, which come from heap pages that earlier steps left resident: the plain CPU GRU's
  autograd graph is mostly per-step ``(B, H)`` tensors of 25 KiB, so RSS sees about a
  third of its step (16 MiB of 48 in ``bench_engines.py``, where every method ran before
  the measured one) and overstates the extra memory of a method made of large buffers.
  The tensor count is the measure to compare; RSS varies with what ran before it.

Reported: time ratio, and (method's peak - plain's peak) / plain's peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import msvag_mb
from msvag_mb.problems.models import CharRNN, SequenceCrossEntropy

from bench_engines import BidirectionalGRU, TwoLayerCharLSTM, _vm  # the same models, RSS


def _tokens(generator):
    return torch.randint(0, 83, (50, 50), generator=generator)


#: name -> (label, model factory, inputs from a generator, target time ratio or None)
WORKLOADS = {
    "gru2bi": ("2-layer bidirectional nn.GRU 128, B=50, T=50", BidirectionalGRU,
               lambda g: torch.randn(50, 50, 128, generator=g), 1.6),
    "char_rnn": ("char-LSTM P4 CharRNN, B=50, T=50", CharRNN, _tokens, None),
    "lstm2": ("char-LSTM, 2-layer nn.LSTM, B=50, T=50", TwoLayerCharLSTM, _tokens, None),
}

#: issue 13's bound on the extra peak memory, relative to the plain step's
MEMORY_TARGET = 0.25


def build(name: str):
    """``(model, loss_fn, x, y, step functions by method name)``."""
    _, factory, inputs, _ = WORKLOADS[name]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model, loss_fn = factory(), SequenceCrossEntropy()
    x, y = inputs(generator), torch.randint(0, 83, (50, 50), generator=generator)
    if isinstance(model, CharRNN):
        with torch.no_grad():
            model(x)  # carry a state into the timed batches (stateful BPTT)
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="extensions")

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def with_variance():
        gv.zero_grad()
        gv.backward(x, y)

    return model, gv, {"plain": plain, "GradientVariance": with_variance}


def time_here(name: str, repeats: int, threads: int) -> dict[str, float]:
    """Median seconds per step of each method, interleaved round-robin."""
    torch.set_num_threads(threads)
    _, _, runs = build(name)
    for run in runs.values():  # warm-up
        run()
        run()
    times = {method: [] for method in runs}
    for _ in range(repeats):
        for method, run in runs.items():
            start = time.perf_counter()
            run()
            times[method].append(time.perf_counter() - start)
    return {method: statistics.median(t) for method, t in times.items()}


def tensor_peak(run) -> int:
    """Peak bytes held by tensors allocated during ``run()`` (allocation events of
    ``torch.profiler``, summed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def peaks_here(name: str) -> dict[str, dict[str, int]]:
    """``{"tensors" | "RSS": {method: peak KiB}}`` of one step of each method."""
    model, gv, runs = build(name)

    def clear():
        gv.zero_grad()
        model.zero_grad(set_to_none=True)
        gc.collect()

    peaks = {"tensors": {}, "RSS": {}}
    for method, run in runs.items():
        clear()
        run()  # warm-up: one-time allocations
        clear()
        before = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current VmRSS
        run()
        peaks["RSS"][method] = _vm("VmHWM") - before
        clear()
        peaks["tensors"][method] = tensor_peak(run) // 1024
        clear()
    return peaks


def _child(args: list[str], env: dict | None = None):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                        choices=list(WORKLOADS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--time-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_child:
        name, repeats, threads = args.time_child
        print(json.dumps(time_here(name, int(repeats), int(threads))))
        return
    if args.memory_child:
        print(json.dumps(peaks_here(args.memory_child)))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}; median of {args.repeats}")
    print("| workload | threads | plain ms | GradientVariance ms | ratio | target |")
    print("|---|---|---|---|---|---|")
    for name in args.workloads:
        label, _, _, target = WORKLOADS[name]
        for threads in args.threads:
            medians = _child(["--time-child", name, str(args.repeats), str(threads)])
            ratio = medians["GradientVariance"] / medians["plain"]
            print(f"| {label} | {threads} | {1000 * medians['plain']:.1f} | "
                  f"{1000 * medians['GradientVariance']:.1f} | {ratio:.2f}x | "
                  f"{'<= %.1fx' % target if target else '-'} |", flush=True)
    if args.no_memory:
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    print("\n| workload | measure | plain peak MiB | GradientVariance peak MiB | extra / plain "
          "| target |")
    print("|---|---|---|---|---|---|")
    for name in args.workloads:
        for measure, peaks in _child(["--memory-child", name], env).items():
            extra = (peaks["GradientVariance"] - peaks["plain"]) / max(peaks["plain"], 1)
            target = f"<= {MEMORY_TARGET}" if WORKLOADS[name][3] else "-"
            print(f"| {WORKLOADS[name][0]} | {measure} | {peaks['plain'] / 1024:.1f} | "
                  f"{peaks['GradientVariance'] / 1024:.1f} | {extra:+.2f} | {target} |",
                  flush=True)


if __name__ == "__main__":
    main()
