"""``gv.collect()``: the within-batch variance of the user's own forward and backward.

``collect`` must give what ``gv.backward`` gives on the same model and data (single blocks,
accumulation, hand-written losses, mean and sum losses, GradScaler), serve models that
take keyword arguments and compute their own loss, refuse what it cannot do before any
backward pass, and leave everything as it was after any error inside the block.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import msvag_mb
from msvag_mb.engines import ENGINES, UnsupportedModelError
from conftest import PROBLEMS, mlp_problem, sequence_loss

#: the engines that serve collect on one process (from their declared capabilities)
COLLECT_ENGINES = sorted(name for name, cls in ENGINES.items()
                         if cls.serves_collect and not cls.needs_distributed)
EXACT = dict(rtol=1e-10, atol=1e-12)


def loss_for(problem: str, reduction: str):
    if problem == "char_lstm":
        if reduction == "mean":
            return sequence_loss
        return lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                              reduction="sum")
    return nn.CrossEntropyLoss(reduction=reduction)


def statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(p.grad.clone(), p.grad_variance.clone()) for p in model.parameters()]


def assert_statistics(model: nn.Module, expected, **tolerance) -> None:
    tolerance = tolerance or EXACT
    for (name, p), (grad, variance) in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, grad, **tolerance, msg=name)
        torch.testing.assert_close(p.grad_variance, variance, **tolerance, msg=name)


def assert_mean_of_examples(model: nn.Module, batch: int, loss_of_example) -> None:
    """p.grad and p.grad_variance are those of the mean of ``loss_of_example(n)`` over the
    batch: against one autograd call per example."""
    params = list(model.parameters())
    per_example = [torch.autograd.grad(loss_of_example(n), params) for n in range(batch)]
    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.stack([e[i] for e in per_example])
        torch.testing.assert_close(p.grad, g.mean(0), **EXACT, msg=name)
        torch.testing.assert_close(p.grad_variance, g.var(0) / batch, **EXACT, msg=name)


def by_backward(model, loss_fn, batches, engine, reduction, **kwargs):
    gv = msvag_mb.GradientVariance(model, loss_fn, engine=engine, reduction=reduction)
    for x, y in batches:
        gv.backward(x, y, **kwargs)
    result = statistics(model)
    gv.zero_grad()
    return result


def by_collect(model, loss_fn, batches, engine, reduction=None):
    gv = msvag_mb.GradientVariance(model, engine=engine)
    for x, y in batches:
        with gv.collect(reduction=reduction):
            loss_fn(model(x), y).backward()
    return gv


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engines_declare_whether_they_serve_collect(engine):
    cls = ENGINES[engine]
    assert isinstance(cls.serves_collect, bool)
    assert not (cls.serves_collect and cls.reruns_model)  # the user's forward runs once
    overridden = cls.collect_session is not msvag_mb.Engine.collect_session
    assert overridden == cls.serves_collect


# -- collect equals backward ---------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("engine", COLLECT_ENGINES + ["auto"])
def test_collect_equals_backward(engine, problem, reduction):
    model, x, y = PROBLEMS[problem]()
    loss_fn = loss_for(problem, reduction)
    if engine != "auto" and ENGINES[engine].unsupported_reason(model) is not None:
        gv = msvag_mb.GradientVariance(model, engine=engine)
        with pytest.raises(UnsupportedModelError, match=f"engine '{engine}'"):
            with gv.collect():
                pass
        return
    expected = by_backward(model, loss_fn, [(x, y)], engine, reduction)
    # one block needs no declared reduction: the contributions carry the loss's scale
    gv = by_collect(model, loss_fn, [(x, y)], engine)
    assert_statistics(model, expected)
    assert gv.engine_name == msvag_mb.GradientVariance(model, loss_fn,
                                                       engine=engine).engine_name


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("engine", COLLECT_ENGINES)
def test_accumulation_equals_backward(engine, reduction):
    model, x, y = mlp_problem(batch=11)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    batches = [(x[:3], y[:3]), (x[3:7], y[3:7]), (x[7:], y[7:])]
    expected = by_backward(model, loss_fn, batches, engine, reduction)
    by_collect(model, loss_fn, batches, engine, reduction=reduction)
    assert_statistics(model, expected)
    # the same as one call on the concatenated batch
    collected = statistics(model)
    model.zero_grad()
    for (grad, variance), (g, v) in zip(collected, by_backward(model, loss_fn, [(x, y)],
                                                               engine, reduction)):
        torch.testing.assert_close(grad, g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(variance, v, rtol=1e-9, atol=1e-12)
    # blocks and backward calls mix within one cycle
    model.zero_grad()
    gv = msvag_mb.GradientVariance(model, loss_fn, engine=engine)
    gv.backward(*batches[0])
    with gv.collect():
        loss_fn(model(batches[1][0]), batches[1][1]).backward()
    gv.backward(*batches[2])
    assert_statistics(model, expected)


def test_accumulation_needs_the_reduction():
    model, x, y = mlp_problem(batch=8)
    gv = msvag_mb.GradientVariance(model)
    with gv.collect():
        F.cross_entropy(model(x[:4]), y[:4]).backward()
    before = statistics(model)
    with pytest.raises(ValueError, match="reduction"):
        with gv.collect():
            pass
    assert_statistics(model, before)
    with pytest.raises(ValueError, match="reduction changed"):
        gv2 = msvag_mb.GradientVariance(model)
        model.zero_grad()
        with gv2.collect(reduction="mean"):
            F.cross_entropy(model(x[:4]), y[:4]).backward()
        with gv2.collect(reduction="sum"):
            pass


def test_a_hand_written_loss():
    """A loss built by hand from several per-example terms, a mask and a constant factor:
    exact against one backward per example."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y, weight = torch.randn(6, 5), torch.randn(6, 3), torch.rand(6)

    def my_loss(out, y, weight):  # per example: weighted squared error + a Huber term
        huber = F.huber_loss(out, y, reduction="none").sum(1)
        per_example = weight * ((out - y) ** 2).sum(1) + huber
        return 0.5 * per_example.mean()

    gv = msvag_mb.GradientVariance(model)
    with gv.collect():
        my_loss(model(x), y, weight).backward()
    assert_mean_of_examples(model, 6, lambda n: my_loss(model(x[n:n + 1]), y[n:n + 1],
                                                        weight[n:n + 1]))


@pytest.mark.parametrize("engine", COLLECT_ENGINES)
def test_mean_and_sum_losses_give_the_scale_of_their_gradient(engine):
    """One block: the variance follows p.grad's scale, whatever the loss's reduction or a
    constant factor; ``reduction=`` matters only where batches are combined."""
    model, x, y = mlp_problem(batch=8)
    for reduction, factor in (("mean", 1.0), ("sum", 1.0), ("mean", 0.25)):
        model.zero_grad()
        expected = by_backward(model, nn.CrossEntropyLoss(reduction=reduction), [(x, y)],
                               engine, reduction)
        gv = msvag_mb.GradientVariance(model, engine=engine)
        with gv.collect():
            (factor * F.cross_entropy(model(x), y, reduction=reduction)).backward()
        scaled = [(g * factor, v * factor ** 2) for g, v in expected]
        assert_statistics(model, scaled)
        gv.zero_grad()


def test_grad_scaler_as_in_backward():
    model, x, y = mlp_problem(batch=8)
    loss_fn = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    expected = by_backward(model, loss_fn, [(x[:4], y[:4]), (x[4:], y[4:])], "extensions",
                           "mean", scaler=scaler)
    gv = msvag_mb.GradientVariance(model, loss_fn)
    for part in (slice(0, 4), slice(4, 8)):
        with gv.collect(scaler=scaler):
            scaler.scale(loss_fn(model(x[part]), y[part])).backward()
    assert_statistics(model, expected)
    assert all(p.grad_variance_scale == 2.0 ** 10 for p in model.parameters())


def test_autocast_on_the_cpu_as_in_backward():
    """The user's autocast around the forward and the loss, the backward outside it: what
    gv.backward does under the user's autocast."""
    torch.set_default_dtype(torch.float32)
    model, x, y = mlp_problem(batch=8)
    model, x = model.float(), x.float()
    loss_fn = nn.CrossEntropyLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = by_backward(model, loss_fn, [(x, y)], "extensions", "mean")
    gv = msvag_mb.GradientVariance(model, engine="extensions")
    with gv.collect():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert_statistics(model, expected, rtol=1e-6, atol=1e-8)


def test_calling_submodules_instead_of_the_model_is_refused():
    model, x, y = mlp_problem(batch=6)
    gv = msvag_mb.GradientVariance(model)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="call that model itself"):
        with gv.collect():
            F.cross_entropy(model[2](model[1](model[0](x))), y).backward()
    assert_as_before(model, before)


# -- models that take keyword arguments and compute their own loss --------------------------
class TinyCausalLM(nn.Module):
    """Hugging Face style: ``model(input_ids=..., attention_mask=..., labels=...)`` returns a
    dict with ``loss`` (per sequence: the mean over its unmasked tokens; then the mean
    over the sequences) and ``logits``."""

    def __init__(self, vocab: int = 9, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = torch.tanh(self.mix(self.embed(input_ids)))
        if attention_mask is not None:
            hidden = hidden * attention_mask.unsqueeze(-1)
        logits = self.head(hidden)
        out = {"logits": logits}
        if labels is not None:
            tokens = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            mask = attention_mask.to(tokens.dtype)
            out["loss"] = ((tokens * mask).sum(1) / mask.sum(1)).mean()
        return out


def language_batch(batch: int = 5, steps: int = 7):
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 9, (batch, steps), generator=generator)
    mask = torch.ones(batch, steps, dtype=torch.long)
    for n in range(batch):
        mask[n, steps - n:] = 0  # sequences of different lengths
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.roll(-1, 1)}


@pytest.mark.parametrize("engine", COLLECT_ENGINES)
def test_a_model_with_keyword_arguments_that_returns_its_loss(engine):
    torch.manual_seed(5)
    model = TinyCausalLM()
    batch = language_batch()
    gv = msvag_mb.GradientVariance(model, engine=engine)
    if ENGINES[engine].unsupported_reason(model) is not None:
        pytest.skip(f"{engine} refuses the model itself")
    with gv.collect():
        model(**batch)["loss"].backward()
    assert_mean_of_examples(model, 5, lambda n: model(
        **{k: v[n:n + 1] for k, v in batch.items()})["loss"])


def test_batch_size_from_the_arguments_or_given():
    torch.manual_seed(6)

    class WithPositions(nn.Module):  # a (1, T) positions argument beside (B, T) tokens
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(9, 4), nn.Linear(4, 3)

        def forward(self, tokens, positions):
            return self.head(self.embed(tokens) + positions.unsqueeze(-1)).mean(1)

    model = WithPositions()
    tokens, positions = torch.randint(0, 9, (6, 5)), torch.arange(5.0).unsqueeze(0)
    y = torch.randint(0, 3, (6,))
    gv = msvag_mb.GradientVariance(model)
    with pytest.raises(ValueError, match="batch_size=B"):
        with gv.collect():
            F.cross_entropy(model(tokens, positions), y).backward()
    assert all(p.grad is None for p in model.parameters())
    with gv.collect(batch_size=6):
        F.cross_entropy(model(tokens, positions), y).backward()
    assert_mean_of_examples(model, 6, lambda n: F.cross_entropy(
        model(tokens[n:n + 1], positions), y[n:n + 1]))


# -- refusals, before any backward, leaving everything as before ----------------------------
def snapshot(model: nn.Module):
    hooks = [tuple(len(getattr(m, a)) for a in ("_forward_hooks", "_forward_pre_hooks",
                                                "_backward_hooks", "_backward_pre_hooks"))
             for m in model.modules()]
    grads = [(p.grad, getattr(p, "grad_variance", None)) for p in model.parameters()]
    return hooks, grads, [p.detach().clone() for p in model.parameters()]


def assert_as_before(model: nn.Module, before) -> None:
    hooks, grads, values = snapshot(model)
    assert hooks == before[0], "hooks were left behind"
    for (grad, variance), (old_grad, old_variance) in zip(grads, before[1]):
        assert grad is old_grad and variance is old_variance
    for value, old in zip(values, before[2]):
        assert torch.equal(value, old)
    assert not torch.overrides._get_current_function_mode_stack(), "a mode was left active"


@pytest.mark.parametrize("engine", ["vmap", "ghost_batch"])
def test_engines_that_run_the_model_refuse_naming_one_that_works(engine):
    model, _, _ = mlp_problem()
    spec = msvag_mb.GhostBatchEngine(groups=2) if engine == "ghost_batch" else engine
    gv = msvag_mb.GradientVariance(model, engine=spec)
    with pytest.raises(ValueError, match="runs the model itself.*engine='extensions'"):
        with gv.collect():
            pass


class Scaled(nn.Module):
    """A custom module with its own parameter: no per-layer engine knows it (vmap does)."""

    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(4, 2), nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_a_custom_module_as_in_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Scaled())
    x, y = torch.randn(6, 5), torch.randint(0, 2, (6,))
    for engine in COLLECT_ENGINES + ["auto"]:
        if engine != "auto" and ENGINES[engine].unsupported_reason(model) is not None:
            continue
        expected = by_backward(model, nn.CrossEntropyLoss(), [(x, y)], engine, "mean")
        by_collect(model, F.cross_entropy, [(x, y)], engine)
        assert_statistics(model, expected)
        model.zero_grad()


def test_auto_without_a_collect_engine_refuses_naming_backward():
    gv = msvag_mb.GradientVariance(nn.Sequential(nn.Embedding(5, 3, sparse=True)))
    with pytest.raises(UnsupportedModelError, match="gv.backward"):
        with gv.collect():
            pass


def test_refusals_inside_the_block_leave_everything_as_before():
    model, x, y = mlp_problem(batch=8)
    gv = msvag_mb.GradientVariance(model, nn.CrossEntropyLoss())
    gv.backward(x[:4], y[:4])  # a cycle in progress: kept as it is by every refusal
    before = snapshot(model)
    attempts = {
        "an L2 term in the loss": lambda: (F.cross_entropy(model(x[4:]), y[4:])
                                           + model[0].weight.pow(2).sum()).backward(),
        "a second forward": lambda: (model(x[4:]), model(x[4:])),
        "no backward": lambda: model(x[4:]),
        "two backward passes": lambda: twice(F.cross_entropy(model(x[4:]), y[4:])),
        "gradient clipping inside": lambda: (
            F.cross_entropy(model(x[4:]), y[4:]).backward(),
            nn.utils.clip_grad_norm_(model.parameters(), 1e-3)),
        "an error of the user's": lambda: 1 / 0,
    }
    for what, attempt in attempts.items():
        with pytest.raises((UnsupportedModelError, RuntimeError, ValueError,
                            ZeroDivisionError)) as error:
            with gv.collect():
                attempt()
        assert_as_before(model, before)
        print(f"{what}: {error.value}")
    gv.backward(x[4:], y[4:])  # the cycle goes on as if nothing had happened
    result = statistics(model)
    model.zero_grad()
    expected = by_backward(model, nn.CrossEntropyLoss(), [(x, y)], "extensions", "mean")
    for (grad, variance), (g, v) in zip(result, expected):
        torch.testing.assert_close(grad, g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(variance, v, rtol=1e-9, atol=1e-12)


def twice(loss: torch.Tensor) -> None:
    loss.backward(retain_graph=True)
    loss.backward()


def test_a_batch_of_one_is_refused_when_it_starts_a_cycle():
    model, x, y = mlp_problem(batch=6)
    gv = msvag_mb.GradientVariance(model, reduction="mean")
    before = snapshot(model)
    with pytest.raises(ValueError, match="at least 2 examples"):
        with gv.collect():
            F.cross_entropy(model(x[:1]), y[:1]).backward()
    assert_as_before(model, before)


def test_nan_is_refused_and_restored():
    model, x, y = mlp_problem(batch=6)
    gv = msvag_mb.GradientVariance(model)
    before = snapshot(model)
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        with gv.collect():
            F.cross_entropy(model(x), y).backward()
    assert_as_before(model, before)


def test_a_layer_refusal_in_the_forward_names_the_ways_out():
    class Merged(nn.Module):  # the examples merged with the steps into a Linear
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x.flatten(0, 1)).sum(1)

    model = Merged()
    gv = msvag_mb.GradientVariance(model)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="cannot retry.*gv.backward") as error:
        with gv.collect():
            model(torch.randn(5, 3, 4)).sum().backward()
    print(error.value)
    assert_as_before(model, before)


def test_backward_needs_a_loss_fn_and_blocks_do_not_nest():
    model, x, y = mlp_problem()
    gv = msvag_mb.GradientVariance(model)
    with pytest.raises(ValueError, match="without a loss_fn"):
        gv.backward(x, y)
    with pytest.raises(RuntimeError, match="open gv.collect"):
        with gv.collect():
            with gv.collect():
                pass
    assert_as_before(model, snapshot(model))


def test_collect_then_the_optimizer_steps():
    model, x, y = mlp_problem(batch=8)
    reference = copy.deepcopy(model)
    opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch", fused=False)
    opt_ref = msvag_mb.MSVAG(reference.parameters(), lr=0.1, variance="minibatch",
                             fused=False)
    gv = msvag_mb.GradientVariance(model)
    gv_ref = msvag_mb.GradientVariance(reference, nn.CrossEntropyLoss())
    for _ in range(3):
        opt.zero_grad()
        with gv.collect():
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt_ref.zero_grad()
        gv_ref.backward(x, y)
        opt_ref.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **EXACT)


def test_ddp_on_one_process_as_backward(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        model, x, y = mlp_problem(batch=8)
        expected = by_backward(model, nn.CrossEntropyLoss(), [(x, y)], "extensions", "mean")
        ddp = nn.parallel.DistributedDataParallel(model)
        gv = msvag_mb.GradientVariance(ddp)
        with pytest.raises(ValueError, match="reduction"):
            with gv.collect():
                pass
        with gv.collect(reduction="mean"):
            F.cross_entropy(ddp(x), y).backward()
        assert_statistics(model, expected)
    finally:
        dist.destroy_process_group()


# -- exact or refused, on every configuration of tests/test_exact_or_refused.py ------------
def _exact_or_refused_cases():
    from test_exact_or_refused import CASES

    return CASES


@pytest.mark.parametrize("engine", COLLECT_ENGINES + ["auto"])
@pytest.mark.parametrize("case", _exact_or_refused_cases(), ids=lambda case: case.name)
def test_exact_or_refused_in_collect(case, engine):
    from test_exact_or_refused import run_case_in_collect

    run_case_in_collect(case, engine)


# -- two processes -------------------------------------------------------------------------
def _ddp_worker(rank: int, init_file: str, results_dir: str) -> None:
    import json
    import traceback
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2)
    results = {}
    for name, case in (("global batch", _ddp_global_batch), ("error on one rank",
                                                              _ddp_error_on_one_rank)):
        try:
            case(rank)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported by the test
            results[name] = traceback.format_exc()
        dist.barrier()
    Path(results_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _ddp_global_batch(rank: int) -> None:
    """Unequal local batches (3 and 5 examples), two blocks: the global batch's statistics."""
    model, x, y = mlp_problem(batch=16)
    expected = by_backward(copy.deepcopy(model), nn.CrossEntropyLoss(),
                           [(x[:8], y[:8]), (x[8:], y[8:])], "extensions", "mean")
    ddp = nn.parallel.DistributedDataParallel(model)
    gv = msvag_mb.GradientVariance(ddp)
    for start in (0, 8):
        local = slice(start, start + 3) if rank == 0 else slice(start + 3, start + 8)
        with gv.collect(reduction="mean"):
            F.cross_entropy(ddp(x[local]), y[local]).backward()
    assert_statistics(model, expected, rtol=1e-9, atol=1e-12)


def _ddp_error_on_one_rank(rank: int) -> None:
    """An error inside one rank's block: both ranks raise, nothing changes on either."""
    model, x, y = mlp_problem(batch=8)
    ddp = nn.parallel.DistributedDataParallel(model)
    gv = msvag_mb.GradientVariance(ddp, reduction="mean")
    expected = ZeroDivisionError if rank == 1 else RuntimeError
    with pytest.raises(expected):
        with gv.collect():
            loss = F.cross_entropy(ddp(x), y)
            if rank == 1:
                raise ZeroDivisionError("the user's error")
            loss.backward()
    assert all(p.grad is None for p in model.parameters())


def test_two_processes(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        failures = {name: text for name, text in results.items() if text != "ok"}
        assert not failures, f"rank {rank}: {failures}"
