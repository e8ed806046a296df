"""DDP with ``GradientVariance`` against plain DDP, 2 gloo processes and 1 (issue 14).

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_ddp.py [--rounds 15]
            [--workloads 2c2d char_rnn] [--json out.json]

Workloads: the ``fmnist_2c2d`` model on a global batch of 128 Fashion-MNIST-shaped images
and the ``tolstoi_char_rnn`` model (2 LSTM layers of 128, carried state, dropout) on a
global batch of 50 sequences of 50 characters; random data of those shapes.

Each setting runs in its own processes (``torch.multiprocessing.spawn``, gloo over a file,
one thread per process):

* 1 process, no DDP, on the whole global batch and on one rank's share of it (the second
  separates what communication costs from how the engine's cost changes with the batch
  size): ``plain`` is ``loss_fn(model(x), y).backward()``, ``GV`` is
  ``GradientVariance(model, loss_fn, engine="extensions").backward(x, y)``;
* 2 processes, half of the global batch each: ``plain`` is DDP's own step
  (``loss_fn(ddp(x), y).backward()``: its reducer all-reduces the gradient in buckets during
  the backward pass); ``GV stream`` is ``GradientVariance(ddp, ...)``, whose statistics'
  buffers go out during the backward pass; ``GV post`` the same with
  ``stream_statistics=False`` (every buffer after the backward pass, as before issue 14).

The methods run round-robin, one step each per round, the order rotated from round to
round, every step after a barrier; a ratio is the median over rounds of (the method's time
on rank 0 / ``plain``'s in the same round), so that load changes hit both alike. Printed:
the ratios and, for 2 processes, their difference to the 1-process ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import msvag_mb
from msvag_mb.problems.models import CharRNN, FashionMNIST2C2D, SequenceCrossEntropy

#: name -> (label, model, loss, global batch of (x, y) from a generator)
WORKLOADS = {
    "2c2d": ("fmnist_2c2d, B=128 global", FashionMNIST2C2D, nn.CrossEntropyLoss,
             lambda g: (torch.randn(128, 1, 28, 28, generator=g),
                        torch.randint(0, 10, (128,), generator=g))),
    "char_rnn": ("tolstoi_char_rnn CharRNN, B=50 global, T=50", CharRNN,
                 SequenceCrossEntropy,
                 lambda g: (torch.randint(0, 83, (50, 50), generator=g),
                            torch.randint(0, 83, (50, 50), generator=g))),
}


def _setup(name: str, rank: int, world: int):
    """(model, loss_fn, x, y of rank ``rank`` of ``world``), the model seeded alike on
    every rank."""
    _, build, loss_cls, batch = WORKLOADS[name]
    torch.manual_seed(0)
    model = build()
    x, y = batch(torch.Generator().manual_seed(0))
    share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    x, y = x[share], y[share]
    if isinstance(model, CharRNN):
        with torch.no_grad():
            model(x)  # carry a state into the timed batches (stateful BPTT)
    return model, loss_cls(), x, y


def _methods(model: nn.Module, loss_fn, world: int) -> dict:
    """name -> one step (forward and backward, gradients cleared first)."""
    if world == 1:
        gv = msvag_mb.GradientVariance(model, loss_fn, engine="extensions")

        def plain(x, y):
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()

        def variance(x, y):
            gv.zero_grad()
            gv.backward(x, y)
        return {"plain": plain, "GV": variance}
    ddp = nn.parallel.DistributedDataParallel(model)
    stream = msvag_mb.GradientVariance(ddp, loss_fn, engine="extensions")
    post = msvag_mb.GradientVariance(ddp, loss_fn, engine="extensions",
                                     stream_statistics=False)

    def ddp_plain(x, y):
        ddp.zero_grad(set_to_none=True)
        loss_fn(ddp(x), y).backward()

    def with_gv(gv):
        def step(x, y):
            gv.zero_grad()
            gv.backward(x, y)
        return step
    return {"plain": ddp_plain, "GV stream": with_gv(stream), "GV post": with_gv(post)}


def _time(methods: dict, x, y, rounds: int, world: int) -> dict:
    """Per method: the median time (ms) and the median per-round ratio to ``plain``."""
    names = list(methods)
    times = {name: [] for name in names}
    for round_ in range(rounds + 2):  # two warm-up rounds
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            methods[name](x, y)
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: {"ms": 1e3 * statistics.median(times[name]),
                   "ratio": statistics.median(t / p for t, p in zip(times[name],
                                                                     times["plain"]))}
            for name in names}


def _worker(rank: int, world: int, init_file: str, out: str, names: list[str],
            rounds: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        results = {}
        for name in names:
            model, loss_fn, x, y = _setup(name, rank, world)
            results[name] = _time(_methods(model, loss_fn, world), x, y, rounds, world)
            if world == 1:  # the same on the share of one of 2 ranks
                model, loss_fn, x, y = _setup(name, 0, 2)
                results[name + "/share"] = _time(_methods(model, loss_fn, 1), x, y, rounds, 1)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run(world: int, names: list[str], rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "results.json")
        mp.spawn(_worker, args=(world, os.path.join(directory, "init"), out, names, rounds),
                 nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def report(single: dict, double: dict) -> list[str]:
    lines = []
    for name in double:
        one, share = single[name]["GV"]["ratio"], single[name + "/share"]["GV"]["ratio"]
        lines.append(f"{WORKLOADS[name][0]}")
        for label, entry in (("global batch", single[name]),
                             ("one share", single[name + "/share"])):
            lines.append(f"  1 process, {label:12s}: plain {entry['plain']['ms']:7.1f} ms, "
                         f"GV {entry['GV']['ms']:7.1f} ms, ratio {entry['GV']['ratio']:.2f}")
        lines.append(f"  2 processes: plain DDP {double[name]['plain']['ms']:7.1f} ms")
        for method in ("GV post", "GV stream"):
            entry = double[name][method]
            lines.append(f"    {method:9s} {entry['ms']:7.1f} ms, ratio {entry['ratio']:.2f}"
                         f" ({entry['ratio'] - one:+.2f} vs 1 process on the global batch, "
                         f"{entry['ratio'] - share:+.2f} on one share)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                        choices=list(WORKLOADS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    single = run(1, args.workloads, args.rounds)
    double = run(2, args.workloads, args.rounds)
    print("\n".join(report(single, double)))
    if args.json is not None:
        args.json.write_text(json.dumps({"1": single, "2": double}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
