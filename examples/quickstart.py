"""The README example, runnable: M-SVAG with both variance estimates on one batch of data.

    python examples/quickstart.py            # 100 steps
    python examples/quickstart.py --quick    # 10 steps
"""

import argparse

import torch
from torch import nn

import msvag_mb

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="10 steps instead of 100")
steps = 10 if parser.parse_args().quick else 100

torch.manual_seed(0)
x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
loss_fn = nn.CrossEntropyLoss()

for variance in ("moving_average", "minibatch"):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, beta=0.9, variance=variance)
    gv = msvag_mb.GradientVariance(model, loss_fn, engine="auto")  # for "minibatch"
    for step in range(steps):
        opt.zero_grad()
        if variance == "moving_average":  # 1. an ordinary torch optimizer (Alg. 1)
            loss = loss_fn(model(x), y)
            loss.backward()
        else:  # 2. p.grad and p.grad_variance from per-example statistics (Alg. 5)
            loss = gv.backward(x, y)
        opt.step()
    engine = f", engine {gv.engine_name}" if variance == "minibatch" else ""
    print(f"{variance:>14}: loss after {steps} steps {loss.item():.4f}{engine}")
