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
