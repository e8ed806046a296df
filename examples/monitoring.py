"""What the variance estimate sees during training: M-SVAG on the digits CNN, monitored.

Trains M-SVAG twice (moving-average and mini-batch variance estimate) on the digits problem
of ``compare_estimators.py`` with a :class:`msvag_mb.monitoring.VarianceMonitor` attached.
Per layer and every few steps the monitor records the gradient signal-to-noise ratio
``SNR = m^2 / V``, the adaptation factor ``gamma = m^2 / (m^2 + V)`` (quantiles and a
histogram) and the estimated variance ``V``. The script prints how ``gamma`` evolves and
draws each log with :func:`msvag_mb.monitoring.plot_monitoring`.

What to look for: early in training the gradient dominates its noise (``gamma`` near 1,
M-SVAG steps like M-SGD); as the loss falls the noise takes over, ``gamma`` drops and
M-SVAG shortens its steps element by element -- a per-element step-size schedule it sets
itself. The moving-average estimate starts with ``gamma = 1`` everywhere (its first step is
an SGD step); the mini-batch estimate adapts from the first step.

    python examples/monitoring.py            # 2 x 600 steps (well under a minute)
    python examples/monitoring.py --quick    # 2 x 30 steps (seconds)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import msvag_mb
from msvag_mb.monitoring import VarianceMonitor, plot_monitoring, tensorboard_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_estimators import digits_data, make_cnn  # noqa: E402  (the same problem)


def train(variance: str, steps: int, every: int, out: Path, tensorboard: bool):
    """Train M-SVAG with a monitor attached; returns the monitor (its records in memory)."""
    x_train, y_train, _, _ = digits_data()
    torch.manual_seed(0)
    model = make_cnn()
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.6, beta=0.9, variance=variance)
    loss_fn = nn.CrossEntropyLoss()
    gv = msvag_mb.GradientVariance(model, loss_fn)
    order = torch.Generator().manual_seed(1)
    monitor = VarianceMonitor(
        opt, model, every=every,
        jsonl=out / f"monitor_{variance}.jsonl",
        tensorboard=out / "tensorboard" / variance if tensorboard else None,
    )
    with monitor:  # the monitor runs as a step hook; close() detaches it
        for step in range(steps):
            index = torch.randint(len(x_train), (32,), generator=order)
            opt.zero_grad()
            if variance == "minibatch":
                loss = gv.backward(x_train[index], y_train[index])
            else:
                loss = loss_fn(model(x_train[index]), y_train[index])
                loss.backward()
            opt.step()
    print(f"\nM-SVAG, variance={variance!r}: final batch loss {loss.item():.4f}")
    return monitor


def print_table(records: list[dict], steps_to_show: int = 5) -> None:
    """gamma quartiles and SNR median per layer at a few recorded steps."""
    steps = sorted({r["step"] for r in records})
    shown = steps[:: max(1, len(steps) // steps_to_show)][:steps_to_show]
    shown += [steps[-1]] if steps[-1] not in shown else []
    print(f"{'step':>5}  {'layer':<10} {'gamma q25':>9} {'q50':>6} {'q75':>6} "
          f"{'SNR median':>11} {'mean V':>10}")
    for step in shown:
        for r in (r for r in records if r["step"] == step):
            snr = "undefined" if r["snr_median"] is None else f"{r['snr_median']:.3g}"
            print(f"{step:>5}  {r['layer']:<10} {r['gamma_q25']:>9.3f} {r['gamma_q50']:>6.3f} "
                  f"{r['gamma_q75']:>6.3f} {snr:>11} {r['variance_mean']:>10.3g}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 steps per estimator")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=10, help="record every N steps")
    parser.add_argument("--out", type=Path, default=Path("runs/monitoring"))
    parser.add_argument("--no-tensorboard", action="store_true",
                        help="skip TensorBoard even if it is installed")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every = 30, 5
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    tensorboard = tensorboard_available() and not args.no_tensorboard
    for variance in ("moving_average", "minibatch"):
        monitor = train(variance, args.steps, args.every, args.out, tensorboard)
        print_table(monitor.records)
        png = plot_monitoring(monitor.records, args.out / f"monitor_{variance}.png")
        print(f"wrote {args.out / f'monitor_{variance}.jsonl'} and {png}")
    if tensorboard:
        print(f"TensorBoard: tensorboard --logdir {args.out / 'tensorboard'}")


if __name__ == "__main__":
    main()
