"""Compare M-SGD, M-SSD, Adam and M-SVAG (both variance estimates) on two small real problems.

The problems (both real data bundled with the installed packages, nothing to download):

* ``digits``: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes; a
  fixed stratified split of 1,437 training and 360 test images), a small CNN, batch 32.
* ``pydoc_char_rnn``: CPython's bundled documentation text (``pydoc_data.topics``, 372k
  training and 93k test characters, 103 symbols), the paper's P4 character model (two
  LSTM layers, dropout 0.2, stateful truncated back-propagation over windows of 50
  characters) *narrowed* to 64 units and 16 sequences per batch so that it trains here in
  seconds. Accuracy is next-character accuracy; losses are per character.

Mean cross-entropy, constant step sizes. Every method runs from the same initialisations
and the same batches for each seed (on the text problem the seed changes the
initialisation and the dropout masks). Prints one table per problem and writes one figure
(training loss and test accuracy against steps, mean over seeds with min-max band) and the
numbers as JSON.

    python examples/compare_estimators.py            # 3 seeds, 150 + 120 steps (about a minute)
    python examples/compare_estimators.py --quick    # 1 seed, 30 + 20 steps (seconds)

The step sizes were picked once per method and problem from a small grid (1, 3, 6 x 10^k;
2 seeds, best final test accuracy; digits at 300 steps, the text problem at this example's
120 steps); both M-SVAG variants use the same step size, so they differ only in the
variance estimate. As in the paper,
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
from torch import Tensor, nn

import msvag_mb
from msvag_mb.problems.data import CharBatches, load_pydoc_text
from msvag_mb.problems.models import CharRNN, SequenceCrossEntropy

#: method name -> how to build its optimizer (see :func:`make_optimizer`)
METHODS = {
    "M-SGD": "msgd",
    "M-SSD": "mssd",
    "Adam": "adam",
    "M-SVAG (moving average)": "msvag_ma",
    "M-SVAG (mini-batch)": "msvag_mb",
}

#: problem -> its settings: steps (full run, --quick), batch size, number of evaluations
#: along the run, step size per method
PROBLEMS = {
    "digits": {
        "steps": (150, 30), "batch": 32, "evaluations": 15,
        "lr": {"M-SGD": 0.6, "M-SSD": 3e-3, "Adam": 1e-2,
               "M-SVAG (moving average)": 0.6, "M-SVAG (mini-batch)": 0.6},
    },
    "pydoc_char_rnn": {
        "steps": (120, 20), "batch": 16, "evaluations": 8,
        "lr": {"M-SGD": 3.0, "M-SSD": 3e-3, "Adam": 3e-2,
               "M-SVAG (moving average)": 6.0, "M-SVAG (mini-batch)": 6.0},
    },
}


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer of method ``kind`` (a value of :data:`METHODS`), beta = 0.9."""
    if kind == "msgd":
        return msvag_mb.MSGD(params, lr=lr, beta=0.9)
    if kind == "mssd":
        return msvag_mb.MSSD(params, lr=lr, beta=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    variance = "moving_average" if kind == "msvag_ma" else "minibatch"
    return msvag_mb.MSVAG(params, lr=lr, beta=0.9, variance=variance)


def digits_data(test_fraction: float = 0.2, seed: int = 0):
    """The digits as float tensors ``(x_train, y_train, x_test, y_test)``, x in [0, 1]
    (a fixed stratified split)."""
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


class Task:
    """One problem as the training loop sees it: a model, batches, a loss, an evaluation."""

    loss_fn: nn.Module

    def make_model(self) -> nn.Module:
        """A freshly initialised model (seed the global RNG first)."""
        raise NotImplementedError

    def train_batch(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        """The batch of step ``step``, the same for every method of seed ``seed``."""
        raise NotImplementedError

    def before_step(self, model: nn.Module, step: int) -> None:
        """Hook before each training step (the text task resets its LSTM state here)."""

    def evaluate(self, model: nn.Module) -> tuple[float, float, float]:
        """``(train loss, test loss, test accuracy)`` of ``model``."""
        raise NotImplementedError


class DigitsTask(Task):
    """scikit-learn's digits, the CNN below, reshuffled batches every epoch."""

    def __init__(self, batch: int) -> None:
        self.x_train, self.y_train, self.x_test, self.y_test = digits_data()
        self.batch = batch
        self.loss_fn = nn.CrossEntropyLoss()
        self._orders: dict[tuple[int, int], Tensor] = {}

    def make_model(self) -> nn.Module:
        """The CNN of :func:`make_cnn`."""
        return make_cnn()

    def train_batch(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        """Shuffled without replacement per epoch (the order depends on seed and epoch);
        the incomplete last batch of an epoch is dropped."""
        per_epoch = len(self.x_train) // self.batch
        epoch, position = divmod(step, per_epoch)
        if (seed, epoch) not in self._orders:
            generator = torch.Generator().manual_seed(1000 * (seed + 1) + epoch)
            self._orders[(seed, epoch)] = torch.randperm(len(self.x_train), generator=generator)
        index = self._orders[(seed, epoch)][position * self.batch:(position + 1) * self.batch]
        return self.x_train[index], self.y_train[index]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float, float]:
        """Loss on the whole training set; loss and accuracy on the test set."""
        train_loss = self.loss_fn(model(self.x_train), self.y_train).item()
        outputs = model(self.x_test)
        test_loss = self.loss_fn(outputs, self.y_test).item()
        return train_loss, test_loss, (outputs.argmax(1) == self.y_test).float().mean().item()


class CharTask(Task):
    """``pydoc_char_rnn`` with a narrowed P4 model: windows in order, carried LSTM state."""

    def __init__(self, batch: int, hidden: int = 64, seq_len: int = 50,
                 eval_windows: int = 6) -> None:
        self.data = load_pydoc_text()
        self.batches = CharBatches(self.data, batch, seq_len)
        self.hidden = hidden
        self.eval_windows = eval_windows
        self.loss_fn = SequenceCrossEntropy()

    def make_model(self) -> nn.Module:
        """The P4 architecture (embedding, 2 LSTM layers, dropout 0.2) with ``hidden`` units."""
        return CharRNN(len(self.data.vocabulary), hidden_size=self.hidden,
                       embedding_dim=self.hidden)

    def train_batch(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        """The windows in corpus order (row i continues row i of the previous window)."""
        return self.batches.train_batch(step)

    def before_step(self, model: nn.Module, step: int) -> None:
        """Each epoch starts from a zero LSTM state."""
        if self.batches.is_epoch_start(step):
            model.reset_state()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float, float]:
        """Loss on the first ``eval_windows`` training windows, loss and next-character
        accuracy on the first ``eval_windows`` test windows, each pass from a zero state,
        without dropout; the training state is restored afterwards."""
        saved = model.get_state()
        model.eval()
        results = []
        for xs, ys in ((self.batches.train_x, self.batches.train_y),
                       (self.batches.test_x, self.batches.test_y)):
            model.reset_state()
            loss = correct = 0.0
            for x, y in zip(xs[:self.eval_windows], ys[:self.eval_windows]):
                logits = model(x)
                loss += self.loss_fn(logits, y).item()
                correct += (logits.argmax(-1) == y).float().mean().item()
            results.append((loss / self.eval_windows, correct / self.eval_windows))
        model.train()
        model.set_state(saved)
        (train_loss, _), (test_loss, test_accuracy) = results
        return train_loss, test_loss, test_accuracy


def run(task: Task, kind: str, lr: float, seed: int, steps: int, eval_every: int,
        engine: str) -> dict:
    """Train one method from seed ``seed``; returns its curves and timings."""
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_optimizer(kind, model.parameters(), lr)
    gv = msvag_mb.GradientVariance(model, task.loss_fn, engine=engine) \
        if kind == "msvag_mb" else None
    torch.manual_seed(10_000 + seed)  # the same dropout masks for every method
    curve = {"step": [], "train_loss": [], "test_loss": [], "test_accuracy": []}
    train_time = 0.0
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            for key, value in zip(curve, (step, *task.evaluate(model))):
                curve[key].append(value)
        if step == steps:
            break
        x, y = task.train_batch(step, seed)
        start = time.perf_counter()
        task.before_step(model, step)
        opt.zero_grad()
        if gv is not None:
            gv.backward(x, y)  # p.grad and p.grad_variance
        else:
            task.loss_fn(model(x), y).backward()
        opt.step()
        train_time += time.perf_counter() - start
    curve["ms_per_step"] = 1000 * train_time / steps
    curve["engine"] = gv.engine_name if gv is not None else None
    return curve


def summary_table(results: dict, lrs: dict) -> str:
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
            f"{name:<25} {lrs[name]:>7.0e} "
            f"{train_loss[0]:>8.4f} ± {train_loss[1]:<6.4f} "
            f"{test_loss[0]:>8.4f} ± {test_loss[1]:<6.4f} "
            f"{100 * test_accuracy[0]:>6.2f} ± {100 * test_accuracy[1]:<5.2f} "
            f"{100 * best:>10.2f} {ms:>8.2f}")
    return "\n".join(lines)


def plot(all_results: dict, out_png: Path) -> None:
    """One row per problem: training loss and test accuracy against steps."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.0 * len(all_results)))
    axes = figure.subplots(len(all_results), 2, squeeze=False)
    for (ax_loss, ax_accuracy), (problem, entry) in zip(axes, all_results.items()):
        for name, runs in entry["results"].items():
            steps = np.array(runs[0]["step"])
            for ax, key in ((ax_loss, "train_loss"), (ax_accuracy, "test_accuracy")):
                values = np.array([r[key] for r in runs])
                (line,) = ax.plot(steps, values.mean(0), label=name,
                                  linestyle="--" if "mini-batch" in name else "-")
                if len(runs) > 1:
                    ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15,
                                    color=line.get_color(), linewidth=0)
        ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title=entry["title"])
        ax_accuracy.set(xlabel="step", ylabel="test accuracy", title=entry["title"])
        ax_accuracy.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    """Run every method on every problem; print the tables, write the figure and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 seed and a few steps per problem (a smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--engine", default="auto", help="GradientVariance engine")
    parser.add_argument("--out", type=Path, default=Path("runs/compare_estimators"))
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    all_results = {}
    for problem in args.problems:
        settings = PROBLEMS[problem]
        steps = settings["steps"][1 if args.quick else 0]
        task = (DigitsTask if problem == "digits" else CharTask)(settings["batch"])
        eval_every = max(1, steps // settings["evaluations"])
        results = {name: [run(task, kind, settings["lr"][name], seed, steps, eval_every,
                              args.engine) for seed in range(seeds)]
                   for name, kind in METHODS.items()}
        title = f"{problem}, batch {settings['batch']}, {steps} steps, {seeds} seed(s)"
        print(title)
        print(summary_table(results, settings["lr"]))
        print(f"(mini-batch variance from engine "
              f"'{results['M-SVAG (mini-batch)'][0]['engine']}')\n")
        all_results[problem] = {"title": title, "lr": settings["lr"], "results": results}
    plot(all_results, args.out / "compare_estimators.png")
    with (args.out / "results.json").open("w") as handle:
        json.dump(all_results, handle)
    print(f"wrote {args.out / 'compare_estimators.png'} and {args.out / 'results.json'}")
    return all_results


if __name__ == "__main__":
    main()
