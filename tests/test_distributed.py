"""DistributedDataParallel: 2 CPU processes (gloo) against 1 process on the global batch.

One ``torch.multiprocessing.spawn`` per test session runs every case in both workers (a
process start costs seconds); each worker records per case "ok" or the traceback, and the
parametrised tests below report them one by one. The single-process reference is a
GradientVariance on an identical copy of the model and all 16 examples, which
tests/test_engines.py checks against brute force.
"""

from __future__ import annotations

import copy
import json
import os
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import msvag_mb
from msvag_mb import distributed
from msvag_mb.statistics_allreduce import plan_buckets as _plan_buckets

WORLD = 2
GLOBAL_BATCH = 16
TOL = dict(rtol=1e-10, atol=1e-12)

CASES: dict[str, Callable[[int], None]] = {}


def case(name: str):
    def register(function):
        CASES[name] = function
        return function
    return register


# -- problem --------------------------------------------------------------------------------
def make_problem():
    """Same model and global batch on every rank (fixed seeds), float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(GLOBAL_BATCH, 6), torch.randint(0, 3, (GLOBAL_BATCH,))
    return model, x, y


def local_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def reference(model, x, y, reduction, engine="vmap"):
    """(loss, [(grad, variance)]) from one process on the whole batch."""
    single = copy.deepcopy(model)
    gv = msvag_mb.GradientVariance(single, nn.CrossEntropyLoss(reduction=reduction),
                                   engine=engine)
    loss = gv.backward(x, y)
    return loss, [(p.grad, p.grad_variance) for p in single.parameters()]


def assert_matches(model, expected, what):
    for (name, p), (grad, variance) in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, grad, **TOL, msg=f"{what}: grad of {name}")
        torch.testing.assert_close(p.grad_variance, variance, **TOL,
                                   msg=f"{what}: grad_variance of {name}")


# -- cases (run in every worker) ------------------------------------------------------------
SIZES = {"equal": [8, 8], "unequal": [5, 11], "one_example": [1, 15]}


def per_example_case(engine: str, sizes_name: str, reduction: str):
    def run(rank: int) -> None:
        model, x, y = make_problem()
        expected_loss, expected = reference(model, x, y, reduction)
        ddp = nn.parallel.DistributedDataParallel(model)
        gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(reduction=reduction),
                                       engine=engine)
        part = local_slice(SIZES[sizes_name], rank)
        loss = gv.backward(x[part], y[part])
        torch.testing.assert_close(loss, expected_loss, **TOL)
        assert_matches(model, expected, f"{engine} {sizes_name} {reduction}")
    return run


for _engine in ("backpack", "vmap"):
    for _sizes in ("equal", "unequal"):
        for _reduction in ("mean", "sum"):
            case(f"{_engine}-{_sizes}-{_reduction}")(
                per_example_case(_engine, _sizes, _reduction))
case("backpack-one_example-mean")(per_example_case("backpack", "one_example", "mean"))


def rank_spread_expected(model, x, y, sizes, reduction):
    """sum_r B_r (G_r - gbar)^2 / ((W-1) N) (mean loss; N^2 times for sum), gbar exact."""
    local_means = []
    for rank in range(WORLD):
        part = local_slice(sizes, rank)
        model.zero_grad()
        nn.CrossEntropyLoss()(model(x[part]), y[part]).backward()
        local_means.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    n = sum(sizes)
    weights = torch.tensor(sizes, dtype=torch.float64)
    expected = []
    for i, _ in enumerate(model.parameters()):
        g = torch.stack([means[i] for means in local_means])
        w = weights.reshape(-1, *([1] * (g.dim() - 1)))
        gbar = (w * g).sum(0) / n
        variance = (w * (g - gbar) ** 2).sum(0) / ((WORLD - 1) * n)
        if reduction == "sum":
            gbar, variance = gbar * n, variance * n * n
        expected.append((gbar, variance))
    return expected


def rank_spread_case(sizes_name: str, reduction: str):
    def run(rank: int) -> None:
        model, x, y = make_problem()
        sizes = SIZES[sizes_name]
        expected = rank_spread_expected(copy.deepcopy(model), x, y, sizes, reduction)
        if sizes_name == "equal" and reduction == "mean":
            # equal shards: the ghost-batch estimate with the ranks as the groups
            _, ghost = reference(model, x, y, reduction, msvag_mb.GhostBatchEngine(groups=2))
            for (grad, variance), (g_grad, g_variance) in zip(expected, ghost):
                torch.testing.assert_close(variance, g_variance, **TOL)
        _, per_example = reference(model, x, y, reduction)
        ddp = nn.parallel.DistributedDataParallel(model)
        gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(reduction=reduction),
                                       engine="rank_spread")
        part = local_slice(sizes, rank)
        gv.backward(x[part], y[part])
        assert_matches(model, expected, f"rank_spread {sizes_name} {reduction}")
        for p, (grad, _) in zip(model.parameters(), per_example):
            # the gradient is the exact global one, whatever the shard sizes
            torch.testing.assert_close(p.grad, grad, **TOL)
    return run


for _sizes in ("equal", "unequal"):
    for _reduction in ("mean", "sum"):
        case(f"rank_spread-{_sizes}-{_reduction}")(rank_spread_case(_sizes, _reduction))


@case("accumulation-over-ranks-and-calls")
def accumulation(rank: int) -> None:
    """Two calls per rank of unequal sizes == one process on all 16 examples."""
    model, x, y = make_problem()
    _, expected = reference(model, x, y, "mean")
    ddp = nn.parallel.DistributedDataParallel(model)
    gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(), engine="backpack")
    opt = msvag_mb.MSVAG(ddp.parameters(), lr=0.1, variance="minibatch")
    opt.zero_grad()
    # rank 0: examples 0..2 then 3..6; rank 1: 7..7 then 8..15
    calls = [[slice(0, 3), slice(3, 7)], [slice(7, 8), slice(8, 16)]][rank]
    for part in calls:
        gv.backward(x[part], y[part])
    assert_matches(model, expected, "accumulation")


@case("optimizer-steps-stay-identical-and-ddp-still-works")
def steps(rank: int) -> None:
    """Three MSVAG steps on 2 ranks == on 1 process; then an ordinary DDP step works."""
    model, x, y = make_problem()
    single = copy.deepcopy(model)
    single_gv = msvag_mb.GradientVariance(single, nn.CrossEntropyLoss(), engine="vmap")
    single_opt = msvag_mb.MSVAG(single.parameters(), lr=0.1, variance="minibatch")
    ddp = nn.parallel.DistributedDataParallel(model)
    gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(), engine="vmap")
    opt = msvag_mb.MSVAG(ddp.parameters(), lr=0.1, variance="minibatch")
    part = local_slice(SIZES["unequal"], rank)
    for _ in range(3):
        single_opt.zero_grad()
        single_gv.backward(x, y)
        single_opt.step()
        opt.zero_grad()
        gv.backward(x[part], y[part])
        opt.step()
    for p, q in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    # DDP's reducer was never armed by GradientVariance: a plain DDP iteration still
    # averages the ranks' gradients
    opt.zero_grad()
    ddp(x[part]).sum().backward()
    for p in model.parameters():
        mine = p.grad.clone()
        dist.all_reduce(mine)
        torch.testing.assert_close(p.grad * WORLD, mine, **TOL)


@case("nan-on-one-rank-raises-on-both")
def nan_on_one_rank(rank: int) -> None:
    model, x, y = make_problem()
    ddp = nn.parallel.DistributedDataParallel(model)
    gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(), engine="backpack")
    part = local_slice(SIZES["equal"], rank)
    xs = x[part].clone()
    if rank == 1:
        xs[0, 0] = float("nan")
    try:
        gv.backward(xs, y[part])
    except FloatingPointError as error:
        assert "NaN or Inf" in str(error)
    else:
        raise AssertionError("NaN on rank 1 was not refused on rank " + str(rank))
    assert all(p.grad is None for p in model.parameters())


@case("error-on-one-rank-does-not-hang-the-other")
def error_on_one_rank(rank: int) -> None:
    model, x, y = make_problem()
    ddp = nn.parallel.DistributedDataParallel(model)
    gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(), engine="vmap")
    part = local_slice(SIZES["equal"], rank)
    xs = x[part] if rank == 0 else x[part, :5]  # wrong feature count on rank 1
    expected = RuntimeError
    try:
        gv.backward(xs, y[part])
    except expected as error:
        if rank == 0:
            assert "failed on 1 other rank" in str(error)
    else:
        raise AssertionError(f"rank {rank} did not raise")
    gv.zero_grad()
    gv.backward(x[part], y[part])  # the group is still usable afterwards


@case("global-batch-of-one-is-refused")
def too_small(rank: int) -> None:
    model, x, y = make_problem()
    ddp = nn.parallel.DistributedDataParallel(model)
    gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(), engine="vmap")
    part = local_slice([1, 0], rank)  # rank 1 holds no example at all
    try:
        gv.backward(x[part], y[part])
    except ValueError as error:
        assert "at least 2" in str(error)
    else:
        raise AssertionError("a global batch of 1 example was accepted")
    gv.backward(x[local_slice([2, 0], rank)], y[local_slice([2, 0], rank)])  # 2 is fine


@case("several-buckets")
def several_buckets(rank: int) -> None:
    model, x, y = make_problem()
    _, expected = reference(model, x, y, "mean")
    ddp = nn.parallel.DistributedDataParallel(model)
    cap = 500 / 2 ** 20  # 500 bytes: (S1, S2) of 48 + 8 + 24 + 3 float64 -> 3 buffers
    gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(), engine="vmap",
                                   bucket_cap_mb=cap)
    assert len(_plan_buckets(list(model.parameters()), cap)) == 3
    part = local_slice(SIZES["unequal"], rank)
    gv.backward(x[part], y[part])
    assert_matches(model, expected, "several buckets")


@case("grad-scaler-under-ddp")
def grad_scaler(rank: int) -> None:
    model, x, y = make_problem()
    _, expected = reference(model, x, y, "mean")
    ddp = nn.parallel.DistributedDataParallel(model)
    gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(), engine="vmap")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    part = local_slice(SIZES["unequal"], rank)
    gv.backward(x[part], y[part], scaler=scaler)
    for p, (grad, variance) in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad * 2.0 ** 10, **TOL)
        torch.testing.assert_close(p.grad_variance, variance * 2.0 ** 20, **TOL)
        assert p.grad_variance_scale == 2.0 ** 10


@case("helpers")
def helpers(rank: int) -> None:
    ctx = distributed.init_from_environment()  # the group exists: checks and reuses it
    assert (ctx.rank, ctx.world_size, ctx.is_distributed) == (rank, WORLD, True)
    assert ctx.is_main == (rank == 0) == distributed.is_main_process(ctx)
    assert distributed.is_main_process() == (rank == 0)
    assert not ctx.owns_process_group
    model, x, y = make_problem()
    wrapped = distributed.wrap_model(model, ctx)
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
    assert distributed.unwrap(wrapped) is model
    assert distributed.shard_sizes(16, 2) == [8, 8] and distributed.shard_sizes(5, 2) == [3, 2]
    assert distributed.shard_sizes(1, 2) == [1, 0]
    xs, ys = distributed.shard_batch(x[:5], y[:5], ctx)
    assert torch.equal(ys, y[:3] if rank == 0 else y[3:5])
    (xs, xs2), _ = distributed.shard_batch((x[:5], x[:5]), y[:5], ctx)
    assert torch.equal(xs, xs2) and xs.shape[0] == (3 if rank == 0 else 2)
    seeds = torch.tensor([distributed.rank_seed(7, ctx)])
    gathered = [torch.zeros_like(seeds) for _ in range(WORLD)]
    dist.all_gather(gathered, seeds)
    assert gathered[0] != gathered[1]
    assert distributed.all_reduce_mean(float(rank), ctx) == 0.5
    # the whole recipe of the module docstring: exact equality with one process
    gv = msvag_mb.GradientVariance(wrapped, nn.CrossEntropyLoss(), engine="vmap")
    _, expected = reference(model, x, y, "mean")
    gv.backward(*distributed.shard_batch(x, y, ctx))
    assert_matches(model, expected, "helpers recipe")


# -- the statistics' all-reduce during the backward pass (issue 14) -------------------------
class _Boom(torch.autograd.Function):
    """Identity whose backward raises on the ranks in ``ranks``."""

    @staticmethod
    def forward(ctx, x, fails):
        ctx.fails = fails
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.fails:
            raise RuntimeError("injected failure in the backward pass")
        return grad, None


class _ThreeLayers(nn.Module):
    """6 -> 5 -> 7 -> 3; ``fails``: the backward raises between the last two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(5, 7), nn.Linear(7, 3)
        self.fails = False

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.c(_Boom.apply(h, self.fails))


class _TwiceCalled(nn.Module):
    """A layer called twice: its parameters are finished only after the backward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.shared, self.c = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.a(x))))))
        return self.c(h)


class _CharModel(nn.Module):
    """Embedding, 2-layer LSTM, Linear: the char-RNN's layers on a small scale."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 3)
        self.lstm = nn.LSTM(3, 7, num_layers=2, batch_first=True)
        self.out = nn.Linear(7, 11)

    def forward(self, tokens):
        return self.out(self.lstm(self.emb(tokens))[0]).flatten(0, 1)


def _count_launches_in_backward():
    """Patch StatisticsStream to record, per buffer launched, whether it was launched
    inside a backward pass; returns the record and a function that undoes the patch."""
    from msvag_mb.statistics_allreduce import StatisticsStream

    record: list[bool] = []
    original = StatisticsStream._launch_next

    def launch(self, *args):
        record.append(torch._C._current_graph_task_id() != -1)
        original(self, *args)

    StatisticsStream._launch_next = launch
    return record, lambda: setattr(StatisticsStream, "_launch_next", original)


def _stream_and_post(model, loss_fn, run, cap_mb=None, engine="extensions", **kwargs):
    """``run(gv)`` on two copies of ``model``, streaming and after the backward pass;
    both copies' (grad, variance) per parameter, the returned values and, of the
    streaming run, how many buffers were launched inside the backward pass."""
    outcomes = []
    for streaming in (True, False):
        copy_ = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(copy_)
        options = dict(kwargs, stream_statistics=streaming)
        if cap_mb is not None:
            options["bucket_cap_mb"] = cap_mb
        gv = msvag_mb.GradientVariance(ddp, loss_fn, engine=engine, **options)
        record, undo = _count_launches_in_backward()
        try:
            returned = run(gv, copy_)
        finally:
            undo()
        stats = [(p.grad, getattr(p, "grad_variance", None)) for p in copy_.parameters()]
        outcomes.append((stats, returned, sum(record)))
    return outcomes


def _assert_bitwise(outcomes, what: str) -> None:
    (streamed, returned_s, _), (post, returned_p, _) = outcomes
    for i, ((g1, v1), (g2, v2)) in enumerate(zip(streamed, post)):
        assert (g1 is None) == (g2 is None), f"{what}: grad {i} present on one path only"
        if g1 is not None:
            assert torch.equal(g1, g2), f"{what}: grad {i} differs between the paths"
            assert torch.equal(v1, v2), f"{what}: variance {i} differs between the paths"
    if isinstance(returned_s, torch.Tensor):
        assert torch.equal(returned_s, returned_p), f"{what}: loss differs"


def stream_case(sizes: list[int], reduction: str):
    def run(rank: int) -> None:
        model, x, y = make_problem()
        _, expected = reference(model, x, y, reduction)
        part = local_slice(sizes, rank)
        cap = 200 / 2 ** 20  # every parameter in a buffer of its own
        outcomes = _stream_and_post(model, nn.CrossEntropyLoss(reduction=reduction),
                                    lambda gv, m: gv.backward(x[part], y[part]), cap)
        _assert_bitwise(outcomes, f"{sizes} {reduction}")
        for (grad, variance), (e_grad, e_variance) in zip(outcomes[0][0], expected):
            torch.testing.assert_close(grad, e_grad, **TOL)
            torch.testing.assert_close(variance, e_variance, **TOL)
        # 4 buffers, all but the last (which carries the counts) sent inside the backward
        # pass; none without examples, or on the post-backward path
        launched_in_backward = outcomes[0][2]
        assert launched_in_backward == (0 if sizes[rank] == 0 else 3), launched_in_backward
        assert outcomes[1][2] == 0
    return run


for _sizes in ([8, 8], [5, 11], [16, 0]):
    for _reduction in ("mean", "sum"):
        case(f"stream-{_sizes[0]}+{_sizes[1]}-{_reduction}")(stream_case(_sizes, _reduction))


@case("stream-default-buckets-lstm-and-reuse")
def stream_models(rank: int) -> None:
    """The char model (LSTM layers emit per layer) and a layer called twice (its bucket
    waits for the end of the backward pass), with the default and with tiny buffers."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 11, (6, 5))
    char_y = torch.randint(0, 11, (6 * 5,))
    x, y = torch.randn(GLOBAL_BATCH, 6), torch.randint(0, 3, (GLOBAL_BATCH,))
    problems = [(_CharModel(), tokens, char_y, [2, 4], "auto"),
                (_TwiceCalled(), x, y, [5, 11], "extensions")]
    in_backward = []  # checked after every collective: a rank must not stop early
    for model, inputs, targets, sizes, engine in problems:
        part = local_slice(sizes, rank)
        char = inputs is tokens
        local_y = targets.view(6, 5)[part].reshape(-1) if char else targets[part]
        for cap in (None, 100 / 2 ** 20):
            outcomes = _stream_and_post(
                model, nn.CrossEntropyLoss(),
                lambda gv, m: gv.backward(inputs[part], local_y), cap, engine=engine)
            _assert_bitwise(outcomes, f"{type(model).__name__} cap {cap}")
            if cap is not None:
                in_backward.append(outcomes[0][2])
        single = copy.deepcopy(model)
        msvag_mb.GradientVariance(single, nn.CrossEntropyLoss(), engine="vmap"
                                  if not char else "extensions").backward(inputs, targets)
        for (grad, variance), p in zip(outcomes[0][0], single.parameters()):
            torch.testing.assert_close(grad, p.grad, **TOL)
            torch.testing.assert_close(variance, p.grad_variance, **TOL)
    assert all(n >= 1 for n in in_backward), in_backward  # the output layer's buffers


@case("stream-accumulation-and-collect")
def stream_accumulation_and_collect(rank: int) -> None:
    model, x, y = make_problem()
    _, expected = reference(model, x, y, "mean")
    calls = [[slice(0, 3), slice(3, 7)], [slice(7, 8), slice(8, 16)]][rank]
    cap = 200 / 2 ** 20

    def accumulate(gv, m):
        for part in calls:
            gv.backward(x[part], y[part])

    def collect(gv, m):
        for part in calls:
            with gv.collect():
                nn.CrossEntropyLoss()(m(x[part]), y[part]).backward()

    in_backward = []
    for run in (accumulate, collect):
        outcomes = _stream_and_post(model, nn.CrossEntropyLoss(), run, cap)
        _assert_bitwise(outcomes, run.__name__)
        in_backward.append(outcomes[0][2])
        for (grad, variance), (e_grad, e_variance) in zip(outcomes[0][0], expected):
            torch.testing.assert_close(grad, e_grad, **TOL)
            torch.testing.assert_close(variance, e_variance, **TOL)
    assert in_backward == [2 * 3, 2 * 3], in_backward


@case("stream-on-one-rank-only")
def stream_on_one_rank(rank: int) -> None:
    """The two paths send the same buffers in the same order: ranks may mix them."""
    model, x, y = make_problem()
    _, expected = reference(model, x, y, "sum")
    ddp = nn.parallel.DistributedDataParallel(model)
    gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(reduction="sum"),
                                   engine="extensions", bucket_cap_mb=200 / 2 ** 20,
                                   stream_statistics=rank == 0)
    part = local_slice(SIZES["unequal"], rank)
    gv.backward(x[part], y[part])
    assert_matches(model, expected, "streaming on rank 0 only")


@case("stream-failure-after-buffers-went-out")
def stream_failure(rank: int) -> None:
    """Rank 1's backward raises after its last layer's buffers were sent: both raise,
    nothing changes, and the next call works."""
    torch.manual_seed(0)
    model = _ThreeLayers()
    x, y = torch.randn(GLOBAL_BATCH, 6), torch.randint(0, 3, (GLOBAL_BATCH,))
    ddp = nn.parallel.DistributedDataParallel(model)
    problems = []  # checked after every collective: a rank must not stop early
    for collect in (False, True):
        gv = msvag_mb.GradientVariance(ddp, nn.CrossEntropyLoss(), engine="auto",
                                       bucket_cap_mb=200 / 2 ** 20)
        part = local_slice(SIZES["equal"], rank)
        model.fails = rank == 1
        record, undo = _count_launches_in_backward()
        try:
            if collect:
                with gv.collect():
                    nn.CrossEntropyLoss()(model(x[part]), y[part]).backward()
            else:
                gv.backward(x[part], y[part])
        except RuntimeError as error:
            expected = "failed on 1 other rank" if rank == 0 else "injected failure"
            if expected not in str(error):
                problems.append(f"collect={collect}: {error}")
        else:
            problems.append(f"collect={collect}: rank {rank} did not raise")
        finally:
            undo()
        # rank 1: c.bias and c.weight went out before its backward raised
        if sum(record) != (2 if rank == 1 else 5):
            problems.append(f"collect={collect}: launched in backward {record}")
        if any(p.grad is not None or getattr(p, "grad_variance", None) is not None
               for p in model.parameters()):
            problems.append(f"collect={collect}: the failed call changed the parameters")
        model.fails = False
        gv.zero_grad()
        gv.backward(x[part], y[part])  # the group is still usable afterwards
        ddp.zero_grad()
    assert not problems, problems


# -- the training runner (msvag-train under torchrun) -----------------------------------------
def _runs_dir() -> Path:
    return Path(os.environ["MSVAG_TEST_RESULTS"])


def _train(config, out: str, ctx=None, **kwargs):
    from msvag_mb.runner import train

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the runner's data and models are float32
    try:
        return train(config, _runs_dir() / out, progress=False, distributed=ctx, **kwargs)
    finally:
        torch.set_default_dtype(previous)


def _assert_same_records(records, expected, rtol: float) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for record, reference_record in zip(records, expected):
        for key in ("train_loss", "test_loss", "minibatch_loss"):
            if reference_record[key] is not None:
                assert record[key] == pytest.approx(reference_record[key], rel=rtol), key


@case("train-runner-equals-one-process")
def train_runner(rank: int) -> None:
    from msvag_mb.runner import TrainConfig

    ctx = distributed.init_from_environment()
    # batch 15: shares of 8 and 7 examples, so the loss weighting of unequal shares counts
    for variance in ("minibatch", "moving_average"):
        config = TrainConfig(problem="digits", variance=variance, batch_size=15, steps=6,
                             eval_every=3, data="synthetic")
        result = _train(config, f"ddp-{variance}", ctx)
        assert result.config.world_size == WORLD
        if rank != 0:
            assert result.records == []  # rank 0 alone evaluates and writes
            continue
        assert json.loads((result.run_dir / "config.json").read_text())["world_size"] == WORLD
        single = _train(config, f"single-{variance}")
        assert single.config.world_size == 1
        # the digits CNN has no dropout: the same run up to float32 rounding
        _assert_same_records(result.records, single.records, rtol=1e-5)


@case("train-runner-resume-carried-state")
def train_runner_resume(rank: int) -> None:
    from msvag_mb.runner import TrainConfig

    ctx = distributed.init_from_environment()
    config = TrainConfig(problem="pydoc_char_rnn", variance="minibatch", batch_size=5,
                         steps=4, eval_every=2, data="synthetic")
    full = _train(config, "char-full", ctx)
    _train(config, "char-resumed", ctx, stop_after=2)
    resumed = _train(config, "char-resumed", ctx, resume=True)
    if rank == 0:
        # the carried LSTM state is saved for the global batch (5) and shared out on resume
        checkpoint = torch.load(resumed.run_dir / "checkpoint.pt", weights_only=False)
        assert all(t.shape[1] == 5 for layer in checkpoint["carried_state"] for t in layer)
        _assert_same_records(resumed.records, full.records, rtol=0)
        assert {r.get("engine") for r in full.records} == {"extensions"}


@case("tune-runner")
def tune_runner(rank: int) -> None:
    from msvag_mb.cli import tune_main

    out = _runs_dir() / "tune"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        code = tune_main(["--problem", "digits", "--optimizer", "msgd", "--steps", "6",
                          "--eval-every", "3", "--lr-max", "1", "--grid-points", "2",
                          "--seeds", "2", "--data", "synthetic", "--out", str(out),
                          "--no-progress"])
    finally:
        torch.set_default_dtype(previous)
    assert code == 0
    dist.barrier()  # rank 0 writes the summary after the last run
    summary = json.loads((out / "digits" / "tune_msgd.json").read_text())
    assert summary["grid"] == [1.0, 0.6] and summary["winner_lr"] in summary["grid"]
    # both ranks ran the winner's second seed together (a collective run)
    winner_runs = sorted(p.name for p in (out / "digits").iterdir()
                         if p.name.startswith(f"msgd__lr{summary['winner_lr']:g}__"))
    assert winner_runs == [f"msgd__lr{summary['winner_lr']:g}__seed{s}" for s in (0, 1)]


def worker(rank: int, init_file: str, results_dir: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MSVAG_TEST_RESULTS=results_dir)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    results = {}
    try:
        for name, function in CASES.items():
            try:
                function(rank)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - recorded and reported by the test
                results[name] = traceback.format_exc()
            dist.barrier()  # a failed case must not leave the other rank mid-collective
    finally:
        Path(results_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[str]]:
    directory = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD,
             join=True)
    per_rank = [json.loads((directory / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {name: [ranks.get(name, "not run") for ranks in per_rank] for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes(results, name):
    failures = [f"rank {r}:\n{text}" for r, text in enumerate(results[name]) if text != "ok"]
    assert not failures, "\n".join(failures)


def test_single_process_context_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_from_environment(backend="gloo")
    assert (ctx.rank, ctx.world_size, ctx.is_distributed, ctx.is_main) == (0, 1, False, True)
    model = nn.Linear(2, 2)
    assert distributed.wrap_model(model, ctx) is model
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    assert distributed.shard_batch(x, y, ctx) == (x, y)
    assert distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_from_environment(backend="gloo")


def test_ddp_without_process_group_and_rank_spread_on_one_process_are_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="DistributedDataParallel.*>= 2 processes|torchrun"):
        msvag_mb.GradientVariance(model, nn.MSELoss(), engine="rank_spread").backward(
            torch.randn(4, 3), torch.randn(4, 2))
    assert msvag_mb.engines.ENGINES["rank_spread"].auto_priority is None
