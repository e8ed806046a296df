"""Issues 4, 13 and 14's benchmark: every engine on each workload, and the step vs Adam.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/run_all.py [--quick] [--no-memory]
            [--no-step] [--no-first-step]
            [--workloads mlp 2c2d 3c3d char_rnn lstm2 transformer encoder bigru gn_cnn]

One entry point for the two parts, each also runnable alone:

* ``bench_engines.py``: forward+backward with within-batch variance as a ratio to a plain
  forward+backward, interleaved: every engine of ``msvag_mb.ENGINES`` alone (ours,
  BackPACK's SumGradSquared, vmap, ghost batches), BackPACK's Variance, and the full
  ``GradientVariance(model, loss_fn, engine=E).backward`` for every engine and ``"auto"``
  (which engine it picked is printed); refusals listed by their first line; with the extra
  peak memory of each method's step relative to the plain step's own peak (one child
  process). The workloads (``--workloads``) are the keys of ``bench_engines.WORKLOADS``:
  issue 4's four shapes and issue 13's modern architectures (the char transformer
  problem's model, ``nn.TransformerEncoder``, a bidirectional ``nn.GRU``, a GroupNorm CNN);
* ``bench_step.py``: the update of every member x estimator (without flags, and the
  compiled kernel alone) against ``torch.optim.Adam`` with ``fused=True``, ``foreach=True``
  and without flags, on the 3c3d parameters, 20 x 1M and 200 small tensors, interleaved;
  then the first-step (compilation) cost in child processes, with a cold and a warm
  Inductor cache (``--no-first-step`` skips it); on CUDA too where a GPU is present.

``--quick`` (5 engine repeats, 9 step rounds) takes a few minutes on 2 cores; the full
run (15 and 25) longer. Results and the machine they came from:
``docs/benchmarks.md``. Set ``OMP_WAIT_POLICY=PASSIVE`` on a shared machine: spinning
OpenMP workers of one method would otherwise slow down the next.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_engines  # noqa: E402
import bench_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about a minute)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child")
    parser.add_argument("--no-step", action="store_true", help="skip the step vs Adam")
    parser.add_argument("--no-first-step", action="store_true",
                        help="skip the step's first-step (compilation) cost")
    parser.add_argument("--workloads", nargs="*", default=list(bench_engines.WORKLOADS),
                        choices=list(bench_engines.WORKLOADS))
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # BackPACK warns on every call
    start = time.perf_counter()
    print(bench_engines.header(), flush=True)
    lines = ["## Engines", ""]
    lines += bench_engines.run(args.workloads, 5 if args.quick else 15,
                               memory=not args.no_memory)
    if not args.no_step:
        lines += ["", "## Optimizer step (update only) vs torch.optim.Adam", ""]
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            lines += bench_step.run(9 if args.quick else 25, device,
                                    first_step=not args.no_first_step)
    print("\n" + "\n".join(lines))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
