"""Cost of the within-batch variance, as a ratio to a plain forward+backward.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_engines.py [--quick] [--no-memory]

For the four shapes of issue 4 (MLP 784-512-512-10 at batch 128, the Fashion-MNIST 2c2d at
64, the CIFAR-10 3c3d at 128, the 2-layer char-LSTM at batch 50 x 50 steps) it times one
forward+backward with each registered engine of ``msvag_mb.GradientVariance`` and with
BackPACK's ``Variance`` extension, against a plain ``loss.backward()`` on the same batch.
The methods run interleaved, round-robin, and the median is reported (this machine is
shared and noisy). Peak memory: each method runs in a fresh subprocess, and the extra peak
resident memory over the plain step is reported relative to the plain step's own.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

import msvag_mb
from msvag_mb.engines import ENGINES
from msvag_mb.problems.models import CharRNN, CIFAR3C3D, FashionMNIST2C2D, SequenceCrossEntropy


def workloads() -> dict:
    """name -> (model factory, loss_fn, batch factory)."""
    generator = torch.Generator().manual_seed(0)

    def images(batch, channels, size, classes):
        return lambda: (torch.randn(batch, channels, size, size, generator=generator),
                        torch.randint(0, classes, (batch,), generator=generator))

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                             nn.ReLU(), nn.Linear(512, 10))

    def tokens():
        return (torch.randint(0, 83, (50, 50), generator=generator),
                torch.randint(0, 83, (50, 50), generator=generator))

    return {
        "mlp": (mlp, nn.CrossEntropyLoss(), images(128, 1, 28, 10)),
        "2c2d": (FashionMNIST2C2D, nn.CrossEntropyLoss(), images(64, 1, 28, 10)),
        "3c3d": (CIFAR3C3D, nn.CrossEntropyLoss(), images(128, 3, 32, 10)),
        "char_lstm": (CharRNN, SequenceCrossEntropy(), tokens),
    }


def methods(model: nn.Module, loss_fn) -> dict:
    """name -> callable(x, y) doing one forward+backward; only methods correct for model."""
    def plain(x, y):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    found = {"plain": plain}
    for name, engine in sorted(ENGINES.items()):
        if engine.auto_priority is None or engine.unsupported_reason(model) is not None:
            continue
        gv = msvag_mb.GradientVariance(model, loss_fn, engine=name)

        def run(x, y, gv=gv):
            gv.zero_grad()
            gv.backward(x, y)

        found[name] = run
    if ENGINES["backpack"].unsupported_reason(model) is None:
        from backpack import backpack, extend
        from backpack.extensions import Variance

        extended = extend(copy.deepcopy(model))
        extended_loss = extend(copy.deepcopy(loss_fn)) if isinstance(loss_fn, nn.Module) else loss_fn

        def backpack_variance(x, y):
            extended.zero_grad(set_to_none=True)
            with backpack(Variance()):
                extended_loss(extended(x), y).backward()

        found["backpack Variance"] = backpack_variance
    return found


def usable(model, loss_fn, batch, runs: dict) -> dict:
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
    model_factory, loss_fn, batch_factory = workloads()[name]
    torch.manual_seed(0)
    model = model_factory()
    batch = batch_factory()
    runs = usable(model, loss_fn, batch, methods(model, loss_fn))
    for run in runs.values():  # warm-up
        run(*batch)
    times = {method: [] for method in runs}
    for _ in range(repeats):
        for method, run in runs.items():
            start = time.perf_counter()
            run(*batch)
            times[method].append(time.perf_counter() - start)
    return {method: statistics.median(t) for method, t in times.items()}


def peak_rss_of(workload: str, method: str | None) -> int:
    """Peak resident memory (KiB) of a fresh process running ``method`` 3 times."""
    code = (f"import sys; sys.path.insert(0, {sys.path[0]!r}); import bench_engines as b; "
            f"b._child({workload!r}, {method!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]


def _child(workload: str, method: str | None) -> None:
    model_factory, loss_fn, batch_factory = workloads()[workload]
    torch.manual_seed(0)
    model = model_factory()
    batch = batch_factory()
    if method is not None:
        run = methods(model, loss_fn)[method]
        for _ in range(3):
            run(*batch)
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats, no memory (~1 min)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--workloads", nargs="*", default=list(workloads()))
    args = parser.parse_args()
    # BackPACK warns about containers and first layers on every call; the numbers matter here
    warnings.simplefilter("ignore", UserWarning)
    repeats = 5 if args.quick else 15
    measure_memory = not (args.quick or args.no_memory)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} "
          "interleaved repeats; time ratio = method / plain forward+backward")
    rows = []
    for workload in args.workloads:
        print(f"[{workload}]", flush=True)
        medians = time_workload(workload, repeats)
        memory = {}
        if measure_memory:
            base = peak_rss_of(workload, None)
            plain = peak_rss_of(workload, "plain")
            for method in medians:
                if method != "plain":
                    extra = peak_rss_of(workload, method) - plain
                    memory[method] = extra / max(plain - base, 1)
        for method, seconds in medians.items():
            rows.append((workload, method, 1000 * seconds, seconds / medians["plain"],
                         memory.get(method)))
    print("\n| model | method | ms | time ratio | extra peak memory / plain step's |")
    print("|---|---|---|---|---|")
    for workload, method, ms, ratio, mem in rows:
        mem_text = "" if mem is None else f"{mem:.2f}"
        print(f"| {workload} | {method} | {ms:.1f} | {ratio:.2f} | {mem_text} |")


if __name__ == "__main__":
    main()
