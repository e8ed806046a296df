"""Where the time of two issue-14 misses goes: the MLP's variance and the 3c3d step.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_costs.py [--part formula step profile]
            [--workload mlp] [--repeats 60]

* ``formula``: ``batch_statistics.single_batch_variance`` (the variance formula and its
  finiteness sum, in place) on the gradient shapes of ``--workload``, on torch's threads
  and on one thread, against the same expression compiled into one pass
  (``torch.compile(dynamic=True)``); with how many elements the compiled form rounds
  differently;
* ``step``: M-SGD's kernel-only step (``fused=True, check_finite=False``) on the 3c3d
  parameters, split into the time inside the compiled graph's calls and the Python around
  them (median over steps);
* ``profile``: ``torch.profiler`` tables (self CPU time per operator) of a plain
  forward+backward and of ``GradientVariance(engine="auto").backward`` on ``--workload``.

Results and their reading: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_engines  # noqa: E402
import bench_step  # noqa: E402

import msvag_mb  # noqa: E402
from msvag_mb import fused  # noqa: E402
from msvag_mb.batch_statistics import single_batch_variance  # noqa: E402
from msvag_mb.ops import at_most_threads  # noqa: E402


def _median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _one_pass(sum_grad_squared, grad, units):
    variance = (sum_grad_squared * units - grad * grad) / (units - 1)
    sum_grad_squared.copy_(variance.clamp(min=0.0))
    return variance.sum(dtype=torch.float32)


def formula(workload: str, repeats: int) -> None:
    """The variance formula three ways on ``workload``'s gradient shapes."""
    model = bench_engines.build(workload)[0]
    grads = [torch.randn(p.shape) for p in model.parameters()]
    sums = [torch.rand(p.shape) * g.abs() * 2 for p, g in zip(model.parameters(), grads)]
    units, compiled = 128, torch.compile(_one_pass, dynamic=True, fullgraph=True)
    units_tensor = torch.tensor(float(units))

    def eager(fresh):
        for grad, total in zip(grads, fresh):
            single_batch_variance(grad, total, units, overwrite=True)

    def one_thread(fresh):
        with at_most_threads(1):
            eager(fresh)

    def one_pass(fresh):
        for grad, total in zip(grads, fresh):
            compiled(total, grad, units_tensor)

    for run in (eager, one_thread, one_pass):
        run([s.clone() for s in sums])  # warm-up (and the compilation)
        ms = _median_ms(lambda: run([s.clone() for s in sums]), repeats)
        clone_ms = _median_ms(lambda: [s.clone() for s in sums], repeats)
        print(f"  {run.__name__}: {ms - clone_ms:.3f} ms (the clones' {clone_ms:.3f} ms taken off)")
    ours, theirs = [s.clone() for s in sums], [s.clone() for s in sums]
    eager(ours)
    one_pass(theirs)
    differ = sum(int((a != b).sum()) for a, b in zip(ours, theirs))
    print(f"  compiled against eager: {differ} of {sum(s.numel() for s in sums)} elements differ")


def step(repeats: int) -> None:
    """M-SGD's kernel-only step on the 3c3d parameters: inside the kernel calls and around."""
    params = bench_step.make_parameters(bench_step.SHAPES_3C3D, "cpu")
    optimizer = msvag_mb.MSGD(params, lr=1e-3, fused=True, check_finite=False)
    optimizer.step()
    optimizer.step()
    kernel = next(k for k in fused._KERNELS.values() if k is not None)
    graph, inside = kernel.graphs[0][1], []

    def timed_graph(*args):
        start = time.perf_counter()
        result = graph(*args)
        inside.append(time.perf_counter() - start)
        return result

    kernel.graphs[0][1] = timed_graph
    rows = []
    for _ in range(repeats):
        inside.clear()
        start = time.perf_counter()
        optimizer.step()
        rows.append((time.perf_counter() - start, sum(inside), len(inside)))
    total, in_calls, calls = sorted(rows)[len(rows) // 2]
    print(f"  step {total * 1e3:.3f} ms: {in_calls * 1e3:.3f} ms inside {calls} calls of the "
          f"compiled graph, {(total - in_calls) * 1e3:.3f} ms around them")


def profile(workload: str, rows: int = 25) -> None:
    """Self CPU time per operator, three calls each of plain and of GradientVariance(auto)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, loss_fn, (x, y) = bench_engines.build(workload)
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="auto")
    runs = {"plain": bench_engines.plain_step(model, loss_fn),
            "GradientVariance(auto)": bench_engines.full_call(gv)}
    for name, run in runs.items():
        run(x, y)
        run(x, y)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run(x, y)
        print(f"  {name} (3 calls):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="*", default=["formula", "step", "profile"],
                        choices=["formula", "step", "profile"])
    parser.add_argument("--workload", default="mlp", choices=list(bench_engines.WORKLOADS))
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    print(bench_engines.header(), flush=True)
    for part in args.part:
        print(f"[{part}]", flush=True)
        if part == "formula":
            formula(args.workload, args.repeats)
        elif part == "step":
            step(args.repeats * 3)
        else:
            profile(args.workload)


if __name__ == "__main__":
    main()
