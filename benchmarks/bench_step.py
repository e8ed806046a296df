"""Optimizer step (update only) against torch.optim.Adam, measured side by side.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_step.py [--quick] [--device cpu]
            [--workloads 3c3d 20x1M 200small] [--no-first-step]
(also run by ``benchmarks/run_all.py``)

Parameter sets: the CIFAR-10 3c3d network's tensors (895,210 entries), 20 tensors of 1M,
and 200 small tensors (the biases and norms of a 25-layer transformer of width 768,
249,600 entries: per-call overhead matters there).

Every method steps the *same* parameters (fixed random gradients and within-batch
variances, never changed; each method has its own state); the methods run round-robin,
one step each per round, the order rotated from round to round, and every ratio is the
median over rounds of (the method's time / the reference's time in the same round), so
that load changes during the run hit both alike. Methods:

* ``torch.optim.Adam``: ``fused=True``, ``foreach=True``, and without flags (what torch
  picks: the for-loop on CPU, foreach on CUDA);
* every member x estimator without flags (the compiled kernel where torch.compile works;
  the NaN/Inf check of ``check_finite=True`` included), and ``fused=True,
  check_finite=False``: the kernel alone, as Adam (which has no such check);
* M-SVAG's eager paths (``foreach=False`` and ``foreach=True``), the reference.

First-step cost (skipped by ``--no-first-step``): child processes time the first steps of
M-SVAG without flags on the 3c3d parameters with an empty Inductor cache (cold: a new
machine or torch version) and again with the cache that run left (warm: every later run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import msvag_mb
from msvag_mb.param_variance import set_grad_variance

SHAPES_3C3D = [(64, 3, 5, 5), (64,), (96, 64, 3, 3), (96,), (128, 96, 3, 3), (128,),
               (512, 1152), (512,), (256, 512), (256,), (10, 256), (10,)]
SHAPES_20M = [(1_000_000,)] * 20
#: per layer: two LayerNorms (weight, bias), the attention's qkv and output biases, the
#: MLP's two biases
SHAPES_SMALL = [(768,), (768,), (2304,), (768,), (768,), (768,), (3072,), (768,)] * 25
WORKLOADS = {"3c3d": ("3c3d parameters (895,210 in 12 tensors)", SHAPES_3C3D),
             "20x1M": ("20 tensors x 1M", SHAPES_20M),
             "200small": ("200 small tensors (249,600: biases and norms)", SHAPES_SMALL)}
MEMBERS = {"M-SGD": (msvag_mb.MSGD, (None,)), "M-SSD": (msvag_mb.MSSD, (None,)),
           "M-SVAG": (msvag_mb.MSVAG, ("moving_average", "minibatch")),
           "SVAG": (msvag_mb.SVAG, ("moving_average", "minibatch")),
           "ADAM*": (msvag_mb.AdamStar, ("moving_average", "minibatch"))}
LR = 1e-3
ADAM = {"fused": dict(fused=True), "foreach": dict(foreach=True), "no flags": {}}
#: our paths: (label, options)
OURS = {"no flags": {}, "kernel only": dict(fused=True, check_finite=False)}
EAGER = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True)}


def methods() -> dict[tuple, object]:
    """(member, estimator, path) -> factory(params), Adam's as ("Adam", None, path)."""
    table = {("Adam", None, path): (lambda p, o=options: torch.optim.Adam(p, lr=LR, **o))
             for path, options in ADAM.items()}
    for member, (cls, variances) in MEMBERS.items():
        for variance in variances:
            own = {} if variance is None else {"variance": variance}
            paths = dict(OURS, **(EAGER if member == "M-SVAG" else {}))
            for path, options in paths.items():
                table[(member, variance, path)] = (
                    lambda p, c=cls, o={**own, **options}: c(p, lr=LR, **o))
    return table


def make_parameters(shapes, device) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))
        param.grad = torch.randn(shape, generator=generator).to(device)
        set_grad_variance(param, torch.rand(shape, generator=generator).to(device))
        params.append(param)
    return params


def measure(shapes, rounds: int, device: str, clock=time.perf_counter) -> dict[tuple, list[float]]:
    """Seconds per step of every method by ``clock``, one list entry per round."""
    params = make_parameters(shapes, device)
    optimizers = {}
    for name, factory in methods().items():
        optimizer = factory(params)
        optimizer.step()  # warm-up (and the compilation of the kernels)
        optimizer.step()
        optimizers[name] = optimizer
    names = list(optimizers)
    times: dict[tuple, list[float]] = {name: [] for name in names}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = clock()
            optimizers[name].step()
            sync()
            times[name].append(clock() - start)
    return times


def ratio(times, name, reference) -> float:
    """Median over rounds of the time of ``name`` over that of ``reference``."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference]))


def report(label: str, times) -> list[str]:
    """The workload's table: each member x estimator against Adam's three paths."""
    adam = {path: 1000 * statistics.median(times[("Adam", None, path)]) for path in ADAM}
    lines = [f"### {label}", "",
             "Adam ms/step: " + ", ".join(f"{path} {ms:.2f}" for path, ms in adam.items()),
             "", "| member | estimator | path | ms/step | vs Adam fused | vs Adam foreach | "
             "vs Adam no flags |", "|---|---|---|---|---|---|---|"]
    for name in times:
        if name[0] == "Adam":
            continue
        member, variance, path = name
        lines.append(
            f"| {member} | {variance or '-'} | {path} | "
            f"{1000 * statistics.median(times[name]):.2f} | "
            + " | ".join(f"{ratio(times, name, ('Adam', None, p)):.2f}x" for p in ADAM) + " |")
    return lines + [""] + targets(times) + [""]


def targets(times) -> list[str]:
    """Issue 14's step goals, one line per member x estimator."""
    lines = []
    for member, (_, variances) in MEMBERS.items():
        for variance in variances:
            goal = 1.15 if variance == "minibatch" else 1.0
            fastest = min(ratio(times, (member, variance, path), ("Adam", None, "fused"))
                          for path in OURS)
            default = ratio(times, (member, variance, "no flags"), ("Adam", None, "no flags"))
            lines.append(
                f"- {member} {variance or ''}: fastest path {fastest:.2f}x Adam fused "
                f"(goal <= {goal}x: {'met' if fastest <= goal else 'missed'}); without flags "
                f"{default:.2f}x Adam without flags (goal <= 1.0x: "
                f"{'met' if default <= 1.0 else 'missed'})")
    return lines


_FIRST_STEPS = r"""
import json, sys, time
start = time.perf_counter()
import torch, msvag_mb
sys.path.insert(0, {here!r})
from bench_step import SHAPES_3C3D, make_parameters
imported = time.perf_counter() - start
result = {{"import_s": imported}}
for variance in ("moving_average", "minibatch"):
    optimizer = msvag_mb.MSVAG(make_parameters(SHAPES_3C3D, {device!r}), lr=1e-3,
                               variance=variance)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    result[variance] = seconds
print(json.dumps(result))
"""


def first_steps(device: str) -> list[str]:
    """The first steps without flags, with an empty and with a filled Inductor cache."""
    code = _FIRST_STEPS.format(here=os.path.dirname(os.path.abspath(__file__)), device=device)
    lines = ["### First steps of M-SVAG without flags (3c3d parameters)", "",
             "| Inductor cache | import s | moving_average: 1st step s | 2nd ms | 3rd ms | "
             "then minibatch: 1st step s | 2nd ms |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache,
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        for label in ("cold (empty)", "warm (filled by the cold run)"):
            out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            ma, mb = r["moving_average"], r["minibatch"]
            lines.append(f"| {label} | {r['import_s']:.1f} | {ma[0]:.1f} | "
                         f"{1000 * ma[1]:.1f} | {1000 * ma[2]:.1f} | {mb[0]:.1f} | "
                         f"{1000 * mb[1]:.1f} |")
    return lines + [""]


def run(rounds: int, device: str = "cpu", workloads=tuple(WORKLOADS),
        first_step: bool = True) -> list[str]:
    """The workloads' tables (and the first-step costs); returns Markdown lines."""
    lines = [f"Device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{rounds} rounds; ratios: median over rounds of the per-round ratio.", ""]
    for key in workloads:
        label, shapes = WORKLOADS[key]
        print(f"[step] {label}", flush=True)
        lines += report(label, measure(shapes, rounds, device))
    if first_step:
        print("[step] first steps (child processes)", flush=True)
        lines += first_steps(device)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (9 instead of 25)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS),
                        choices=list(WORKLOADS))
    parser.add_argument("--no-first-step", action="store_true",
                        help="skip the first-step (compilation) cost")
    args = parser.parse_args()
    print("\n".join(run(9 if args.quick else 25, args.device, args.workloads,
                        not args.no_first_step)))


if __name__ == "__main__":
    main()
