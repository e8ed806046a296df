"""Issue 4's benchmark: every engine on the four shapes, and the optimizer step vs Adam.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/run_all.py [--quick] [--no-memory]
            [--no-step] [--workloads mlp 2c2d 3c3d char_rnn lstm2]

One entry point for the two parts, each also runnable alone:

* ``bench_engines.py``: forward+backward with within-batch variance (ours, BackPACK
  SumGradSquared and Variance, vmap, and the full ``GradientVariance.backward``) as a
  ratio to a plain forward+backward, interleaved, with the extra peak memory of each
  method's step relative to the plain step's own peak (one child process);
* ``bench_step.py``: the M-SVAG update (both estimators; for-loop, foreach, fused) against
  the faster of ``torch.optim.Adam``'s for-loop and foreach paths, interleaved.

``--quick`` (5 engine repeats, 7 step repeats) takes about a minute on 2 cores; the full
run (15 and 25) a few minutes. Results and the machine they came from:
``docs/benchmarks.md``. Set ``OMP_WAIT_POLICY=PASSIVE`` on a shared machine: spinning
OpenMP workers of one method would otherwise slow down the next.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_engines  # noqa: E402
import bench_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about a minute)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child")
    parser.add_argument("--no-step", action="store_true", help="skip the step vs Adam")
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
        lines += bench_step.run(7 if args.quick else 25)
    print("\n" + "\n".join(lines))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
