"""Where the time of issue 14's misses goes: the MLP's variance and the compiled step.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_costs.py
            [--part formula step profile floor compiled_adam allocator] [--workload mlp]
            [--repeats 60] [--rounds 8] [--allocator-workloads mlp 2c2d 3c3d]

* ``formula``: ``batch_statistics.single_batch_variance`` (the variance formula and its
  finiteness sum, in place) on the gradient shapes of ``--workload``, on torch's threads
  and on one thread, against the same expression compiled into one pass
  (``torch.compile(dynamic=True)``); with how many elements the compiled form rounds
  differently;
* ``step``: M-SGD's kernel-only step (``fused=True, check_finite=False``) on the 3c3d
  parameters, split into the time inside the compiled graph's calls and the Python around
  them (median over steps);
* ``profile``: ``torch.profiler`` tables (self CPU time per operator) of a plain
  forward+backward and of ``GradientVariance(engine="auto").backward`` on ``--workload``;
* ``floor`` (a model of ``nn.Linear`` layers: ``--workload mlp``): per call, a plain
  forward+backward; the same with bare hooks (no checks, no bookkeeping) adding one
  contraction ``G^T X`` per layer (the multiply-adds of the analytic floor); adding
  instead the Linear extension's own kernels (the squares, ``(G**2)^T (X**2)``, the bias
  sums); those kernels and ``single_batch_variance`` per parameter; and
  ``GradientVariance(engine="auto").backward``: the distance from the last two is what
  the checks and bookkeeping cost, from the first two what the exact float-pinned
  kernels cost above the floor's multiply-adds;
* ``compiled_adam``: on 20 x 1M, ``torch.optim.Adam(fused=True)`` against Adam's own
  update compiled the way our step kernel is (:class:`_CompiledAdam`: one
  ``dynamic=True`` graph, the step's numbers in a tensor, ``msvag_mb.fused``'s Inductor
  options) and against M-SGD's and M-SVAG's (moving average) kernel-only steps: the same
  bytes through Inductor's loop and through ATen's hand-vectorised fused Adam;
* ``allocator``: plain and ``GradientVariance(auto)`` per call with the
  minor page faults and system time per call, on ``--allocator-workloads``, each in a
  fresh process twice: with glibc's defaults, and with ``MALLOC_TRIM_THRESHOLD_`` and
  ``MALLOC_MMAP_THRESHOLD_`` set high (:data:`KEEP_FREED`), so that freed tensors stay
  in the heap instead of going back to the OS and faulting in again at the next call.

``floor``, ``compiled_adam`` and ``allocator`` take the median of warm blocks: each method
is run 5 times in a row, the first of each block not timed, ``--rounds`` blocks per method,
the methods taking turns block by block (interleaving single calls puts one method's cache
state into the next one's time).

Results and their reading: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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
from msvag_mb.extensions.linear import linear_sum_grad_squared  # noqa: E402
from msvag_mb.ops import at_most_threads  # noqa: E402


#: glibc settings under which freed memory stays in the process (1 GiB thresholds)
KEEP_FREED = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(1 << 30)}


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


def _adam_update(param, grad, exp_avg, exp_avg_sq, scalars):
    """``torch.optim.Adam``'s update (no weight decay): ``scalars`` holds 1 - beta1, beta2,
    1 - beta2, the step size lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t) and eps."""
    exp_avg.lerp_(grad, scalars[0])
    exp_avg_sq.mul_(scalars[1]).addcmul_(grad, grad, value=scalars[2])
    denominator = (exp_avg_sq.sqrt() * scalars[4]).add_(scalars[5])
    param.addcdiv_(exp_avg, denominator, value=-scalars[3])


class _CompiledAdam:
    """Adam's update compiled as our step kernel is (one ``dynamic=True`` graph over flat
    1-D tensors, the step's numbers in one tensor, Inductor's options of
    ``msvag_mb.fused``), stepping its tensors one call each."""

    def __init__(self, params, lr: float = bench_step.LR, betas=(0.9, 0.999), eps=1e-8):
        from torch._inductor import config as inductor_config

        self.params, self.lr, self.betas, self.eps, self.step_count = params, lr, betas, eps, 0
        self.state = [(torch.zeros_like(p).view(-1), torch.zeros_like(p).view(-1))
                      for p in params]
        with inductor_config.patch(fused._INDUCTOR_OPTIONS["cpu"]):
            self.kernel = torch.compile(_adam_update, dynamic=True, fullgraph=True)
            self.step()  # compile here, under the same options

    def step(self) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        t = self.step_count
        scalars = torch.tensor([1 - beta1, beta2, 1 - beta2, self.lr / (1 - beta1 ** t),
                                1 / (1 - beta2 ** t) ** 0.5, self.eps])
        for param, (exp_avg, exp_avg_sq) in zip(self.params, self.state):
            self.kernel(param.detach().view(-1), param.grad.view(-1), exp_avg, exp_avg_sq,
                        scalars)


def compiled_adam(rounds: int) -> None:
    """Adam(fused=True), Adam's update compiled as our kernel is, and M-SGD and M-SVAG
    (moving average) kernel-only, on 20 x 1M: how far Inductor's loop is from ATen's fused
    Adam for the same bytes."""
    params = bench_step.make_parameters(bench_step.SHAPES_20M, "cpu")
    steps = {"Adam(fused=True)": torch.optim.Adam(params, lr=bench_step.LR, fused=True).step,
             "Adam's update compiled": _CompiledAdam(params).step}
    for name, cls in (("M-SGD kernel only", msvag_mb.MSGD),
                      ("M-SVAG moving_average kernel only", msvag_mb.MSVAG)):
        steps[name] = cls(params, lr=bench_step.LR, **bench_step.OURS["kernel only"]).step
    runs = {name: (lambda *_, step=step: step()) for name, step in steps.items()}
    found = _warm_blocks(runs, (), rounds)
    reference = found["Adam(fused=True)"]["ms"]
    for name, row in found.items():
        print(f"  {name}: {row['ms']:.2f} ms ({row['ms'] / reference:.2f}x Adam(fused=True))")


def _hooked_plain(model, loss_fn, on_layer):
    """``run(x, y)``: a plain forward+backward in which every ``nn.Linear``'s backward also
    runs ``on_layer(module, X, G)`` (bare hooks: no checks, no bookkeeping)."""
    def forward_hook(module, inputs, output):
        output.register_hook(lambda grad: on_layer(module, inputs[0].detach(), grad))

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(forward_hook)
    return bench_engines.plain_step(model, loss_fn)


def floor(workload: str, rounds: int) -> None:
    """Plain, then plain with the Linear extension's work added piece by piece through bare
    hooks, then GradientVariance(auto): what is left above the pieces is bookkeeping."""
    runs = {}
    for name in ("plain", "one contraction", "extension's kernels", "kernels + formula"):
        model, loss_fn, batch = bench_engines.build(workload)
        if any(next(m.parameters(recurse=False), None) is not None
               and not isinstance(m, torch.nn.Linear) for m in model.modules()):
            raise SystemExit(f"--part floor needs a model of nn.Linear layers; {workload} "
                             "has others (use --workload mlp)")
        runs[name] = _floor_method(name, model, loss_fn, {})
    model, loss_fn, batch = bench_engines.build(workload)
    runs["GradientVariance(auto)"] = bench_engines.full_call(
        msvag_mb.GradientVariance(model, loss_fn, engine="auto"))
    for run in runs.values():
        run(*batch)
    found = _warm_blocks(runs, batch, rounds)
    plain = found["plain"]["ms"]
    for name, row in found.items():
        print(f"  {name}: {row['ms']:.2f} ms ({row['ms'] / plain:.2f}x plain)")


def _floor_method(name: str, model, loss_fn, kept: dict):
    """One row of :func:`floor`: the bare hooks' work for ``name``."""
    if name == "plain":
        return bench_engines.plain_step(model, loss_fn)
    if name == "one contraction":  # the multiply-adds of the 1.42x floor: G^T X per layer
        return _hooked_plain(model, loss_fn,
                             lambda module, x, g: kept.__setitem__(module, torch.mm(g.t(), x)))

    def extension_kernels(module, x, g):
        kept[module] = linear_sum_grad_squared(x, g, bias=module.bias is not None)

    inner = _hooked_plain(model, loss_fn, extension_kernels)
    if name == "extension's kernels":
        return inner

    def with_formula(x, y):
        inner(x, y)
        for module, (weight_sq, bias_sq) in kept.items():
            single_batch_variance(module.weight.grad, weight_sq, x.shape[0], overwrite=True)
            if bias_sq is not None:
                single_batch_variance(module.bias.grad, bias_sq, x.shape[0], overwrite=True)

    return with_formula


def _warm_blocks(runs: dict, batch, rounds: int, block: int = 5) -> dict:
    """Per method: median seconds, minor faults and system seconds per call, over
    ``rounds`` blocks of ``block`` calls in a row (the first of each block untimed)."""
    found = {name: ([], 0, 0.0) for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            run(*batch)
            times, faults, system = found[name]
            before = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(block - 1):
                start = time.perf_counter()
                run(*batch)
                times.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            found[name] = (times, faults + after.ru_minflt - before.ru_minflt,
                           system + after.ru_stime - before.ru_stime)
    return {name: {"ms": statistics.median(times) * 1e3, "faults": faults / len(times),
                   "system_ms": system * 1e3 / len(times)}
            for name, (times, faults, system) in found.items()}


def _allocator_child(workload: str, rounds: int) -> None:
    model, loss_fn, batch = bench_engines.build(workload)
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="auto")
    runs = {"plain": bench_engines.plain_step(model, loss_fn),
            "gv": bench_engines.full_call(gv)}
    for run in runs.values():
        run(*batch)
    print(json.dumps(_warm_blocks(runs, batch, rounds)))


def allocator(workloads: list[str], rounds: int) -> None:
    """Plain and GradientVariance(auto) with glibc's defaults and with KEEP_FREED."""
    print("| model | glibc | plain ms | GV(auto) ms | GV / plain | faults per call, plain / GV "
          "| system ms per call, plain / GV |")
    print("|---|---|---|---|---|---|---|")
    for workload in workloads:
        for label, extra in (("defaults", {}), ("KEEP_FREED", KEEP_FREED)):
            env = {key: value for key, value in os.environ.items()
                   if key not in KEEP_FREED}
            out = subprocess.run([sys.executable, os.path.abspath(__file__),
                                  "--allocator-child", workload, str(rounds)],
                                 capture_output=True, text=True, env={**env, **extra})
            if out.returncode != 0:
                raise RuntimeError(f"allocator child {workload} failed:\n{out.stderr[-3000:]}")
            found = json.loads(out.stdout.rstrip().splitlines()[-1])
            plain, gv = found["plain"], found["gv"]
            print(f"| {workload} | {label} | {plain['ms']:.1f} | {gv['ms']:.1f} | "
                  f"{gv['ms'] / plain['ms']:.2f}x | {plain['faults']:.0f} / {gv['faults']:.0f} "
                  f"| {plain['system_ms']:.2f} / {gv['system_ms']:.2f} |", flush=True)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--allocator-child":
        warnings.simplefilter("ignore", UserWarning)
        _allocator_child(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = {"formula": lambda args: formula(args.workload, args.repeats),
             "step": lambda args: step(args.repeats * 3),
             "profile": lambda args: profile(args.workload),
             "floor": lambda args: floor(args.workload, args.rounds),
             "compiled_adam": lambda args: compiled_adam(args.rounds),
             "allocator": lambda args: allocator(args.allocator_workloads, args.rounds)}
    parser.add_argument("--part", nargs="*", default=list(parts), choices=list(parts))
    parser.add_argument("--workload", default="mlp", choices=list(bench_engines.WORKLOADS))
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=8,
                        help="floor, compiled_adam and allocator: blocks of 5 calls per "
                             "method (default 8)")
    parser.add_argument("--allocator-workloads", nargs="*", default=["mlp", "2c2d", "3c3d"],
                        choices=list(bench_engines.WORKLOADS))
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    print(bench_engines.header(), flush=True)
    for part in args.part:
        print(f"[{part}]", flush=True)
        parts[part](args)


if __name__ == "__main__":
    main()
