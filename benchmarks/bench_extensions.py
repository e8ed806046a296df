"""Cost of engine 'extensions' (and BackPACK's SumGradSquared) relative to a plain step.

Usage:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_extensions.py [--repeats N]
                                                                      [--linear-variants]

For each workload it prints the median over interleaved repeats of
(forward + backward with per-example statistics) / (plain forward + backward), float32:

* MLP 784-512-512-10, batch 128 (issue target <= 1.35x);
* Fashion-MNIST 2c2d, batch 64 (target <= 1.6x);
* char-LSTM, Embedding(83, 128) + LSTM 128 + Linear(128, 83), batch 50 x 50 steps, both as
  the problem set's CharRNN (two single-layer LSTMs, carried state, dropout) and with one
  2-layer nn.LSTM (target <= 2.0x).

BackPACK is timed where it supports the model (not the LSTMs: it refuses initial states
and num_layers > 1). ``--linear-variants`` times the two ways of forming
``sum_n (G_n^T X_n)**2`` for a Linear layer with a sequence dim (bmm vs Gram).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from msvag_mb.engines.backpack_engine import BackpackEngine
from msvag_mb.engines.extensions_engine import ExtensionsEngine
from msvag_mb.problems.models import CharRNN, FashionMNIST2C2D, SequenceCrossEntropy


class TwoLayerCharLSTM(nn.Module):
    """Embedding(83, 128) + one nn.LSTM(128, 128, num_layers=2) + Linear(128, 83)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(83, 128)
        self.lstm = nn.LSTM(128, 128, num_layers=2, batch_first=True)
        self.output = nn.Linear(128, 83)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.lstm(self.embedding(tokens))[0])


def workloads() -> dict:
    """name -> (model, loss_fn, inputs, targets)."""
    generator = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                        nn.ReLU(), nn.Linear(512, 10))
    tokens = torch.randint(0, 83, (50, 50), generator=generator)
    next_tokens = torch.randint(0, 83, (50, 50), generator=generator)
    char_rnn = CharRNN()
    char_rnn(tokens)  # carry a state into the timed batches
    return {
        "mlp (B=128)": (mlp, nn.CrossEntropyLoss(), torch.randn(128, 1, 28, 28,
                                                                generator=generator),
                        torch.randint(0, 10, (128,), generator=generator)),
        "2c2d (B=64)": (FashionMNIST2C2D(), nn.CrossEntropyLoss(),
                        torch.randn(64, 1, 28, 28, generator=generator),
                        torch.randint(0, 10, (64,), generator=generator)),
        "char_rnn P4 (B=50,T=50)": (char_rnn, SequenceCrossEntropy(), tokens, next_tokens),
        "char_lstm 2-layer (B=50,T=50)": (TwoLayerCharLSTM(), SequenceCrossEntropy(), tokens,
                                          next_tokens),
    }


def methods(model: nn.Module, loss_fn) -> dict:
    """name -> callable(x, y) running one forward + backward."""
    params = [p for p in model.parameters() if p.requires_grad]

    def plain(x, y):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    found = {"plain": plain}
    for engine in (ExtensionsEngine, BackpackEngine):
        if engine.unsupported_reason(model) is not None:
            continue
        if engine is BackpackEngine and any(isinstance(m, nn.LSTM) for m in model.modules()):
            continue  # refuses the carried state at run time / num_layers > 1 up front

        def run(x, y, engine=engine()):
            model.zero_grad(set_to_none=True)
            engine.compute(model, loss_fn, x, y, params)
            model.zero_grad(set_to_none=True)

        found[engine.name] = run
    return found


def ratios(repeats: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"median of {repeats} interleaved repeats")
    for name, (model, loss_fn, x, y) in workloads().items():
        timed = methods(model, loss_fn)
        times = {method: [] for method in timed}
        for method in timed.values():  # warm-up
            method(x, y)
        for _ in range(repeats):
            for method_name, method in timed.items():
                start = time.perf_counter()
                method(x, y)
                times[method_name].append(time.perf_counter() - start)
        plain = statistics.median(times["plain"])
        line = f"{name:32s} plain {plain * 1e3:7.1f} ms"
        for method_name in timed:
            if method_name != "plain":
                ratio = statistics.median(times[method_name]) / plain
                line += f"   {method_name} {ratio:4.2f}x"
        print(line)


def linear_variants(repeats: int) -> None:
    """bmm of per-example matrices vs the Gram form, for the char-RNN's decoder shape."""
    from msvag_mb.extensions.linear import linear_weight_sum_grad_squared

    def gram(x, g):
        # sum_n sum_{t,s} (g_nt * g_ns)^T (x_nt * x_ns): B*T^2 rows of outer products
        gg = (g.unsqueeze(2) * g.unsqueeze(1)).flatten(0, 2)
        xx = (x.unsqueeze(2) * x.unsqueeze(1)).flatten(0, 2)
        return gg.t() @ xx

    x, g = torch.randn(50, 50, 128), torch.randn(50, 50, 83)
    torch.testing.assert_close(gram(x, g), linear_weight_sum_grad_squared(x, g), rtol=1e-3,
                               atol=1e-2)
    for label, fn in (("bmm", linear_weight_sum_grad_squared), ("gram", gram)):
        fn(x, g)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x, g)
            samples.append(time.perf_counter() - start)
        print(f"linear (B=50, T=50, 128->83) {label}: {statistics.median(samples) * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--linear-variants", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.linear_variants:
        linear_variants(args.repeats)
    ratios(args.repeats)


if __name__ == "__main__":
    main()
