r"""Monitoring: what the variance estimate sees during training.

:class:`VarianceMonitor` hooks into a variance-adapted optimizer (:class:`~msvag_mb.MSVAG`,
:class:`~msvag_mb.SVAG`, :class:`~msvag_mb.AdamStar`) and, every ``every`` steps, recomputes
from ``optimizer.state`` -- without touching it -- the quantities behind the step just
taken, per parameter tensor ("layer"):

.. code-block:: text

    m_t      = m~_t / (1 - beta^(t+1))                          the averaged gradient
    V_t      = the variance the factor divides by:
                 MSVAG, AdamStar:  estimate of var[m_t]   (moving average: rho(beta,t) s_t;
                                                           mini-batch: r_t)
                 SVAG:             estimate of var[g_t]   (moving average: s_t;
                                                           mini-batch: s_hat_t)
    SNR      = m_t^2 / V_t                                      signal-to-noise ratio
    gamma_t  = m_t^2 / (m_t^2 + V_t) = SNR / (1 + SNR)          Eq. (25), in [0, 1]

and writes one record per layer and recorded step: SNR (median, mean, layer ratio), the
quantiles and a fixed-bin histogram of ``gamma`` over the layer's elements, and the mean
estimated variance. Records go to JSON lines, CSV and/or TensorBoard (if
``torch.utils.tensorboard`` imports: ``pip install "msvag_mb[tensorboard]"``).
:func:`plot_monitoring` draws a log.

No formula is written here: ``m_t`` and ``gamma_t`` come from :mod:`msvag_mb.directions`
and ``V_t`` from the estimator's read-only :meth:`~msvag_mb.VarianceEstimator.estimate`,
so any estimator that the fused path accepts is monitored too. After a step
``state["step"] = t + 1``, so the step just taken had index ``t = state["step"] - 1``.
For :class:`~msvag_mb.AdamStar` ``gamma`` is the M-SVAG factor; its step is
``lr * sign(m_t) * sqrt(gamma_t)``. Equations: ``docs/maths.md``, Eqs. (M5) and (25).
"""

from __future__ import annotations

import csv as _csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .directions import adaptation_factor, momentum_moments, step_coefficients
from .ops import TENSOR
from .optimizers import MomentumFamilyOptimizer
from .param_variance import grad_variance_or_none

#: default quantiles of gamma recorded per layer
QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)

_UNSUPPORTED_HINT = (
    "VarianceMonitor reads the variance estimate of msvag_mb's variance-adapted optimizers "
    "(MSVAG, SVAG, AdamStar) with an estimator that can estimate without advancing: the "
    "built-in 'moving_average' and 'minibatch', or a VarianceEstimator that writes "
    "advance() and variance()"
)


class DirectionStatistics(NamedTuple):
    """Element-wise quantities behind the step just taken for one parameter tensor."""

    step: int  #: t, the index (from 0) of the step just taken
    mean: Tensor  #: m_t, the bias-corrected moving average of the gradient
    variance: Tensor  #: V_t, the variance in gamma's denominator (of m_t, or of g_t for SVAG)
    gradient_variance: Tensor | None  #: estimate of var[g_t] (None if not available)
    gamma: Tensor  #: m_t^2 / (m_t^2 + V_t); 0 where both vanish (the element did not move)


def is_supported(optimizer: Optimizer) -> bool:
    """True if :class:`VarianceMonitor` can monitor ``optimizer``.

    That is an msvag_mb optimizer with a variance estimator that can estimate without
    advancing its state (MSVAG, SVAG, AdamStar with ``variance="moving_average"``,
    ``"minibatch"`` or a :class:`~msvag_mb.VarianceEstimator` written as
    ``advance``/``variance``); M-SGD, M-SSD and ``torch.optim.Adam`` keep no variance
    estimate of this kind.
    """
    estimator = getattr(optimizer, "variance_estimator", None)
    return (isinstance(optimizer, MomentumFamilyOptimizer) and estimator is not None
            and estimator.elementwise())


def tensorboard_available() -> bool:
    """True if ``torch.utils.tensorboard`` imports (the ``tensorboard`` package is installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def direction_statistics(optimizer: Optimizer, param: Tensor) -> DirectionStatistics | None:
    """Recompute ``m_t``, the variance estimates and ``gamma_t`` of ``param``'s last step.

    Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()`` (SVAG with
    ``variance="minibatch"`` reads ``p.grad_variance``). Returns ``None`` for a parameter
    that has not taken a step yet. Reads ``optimizer.state[param]`` only; the optimizer is
    unchanged.

    Raises:
        TypeError: ``optimizer`` is not supported (see :func:`is_supported`).
    """
    if not is_supported(optimizer):
        raise TypeError(f"{_UNSUPPORTED_HINT}; got {type(optimizer).__name__}"
                        f"{_estimator_suffix(optimizer)}.")
    state = optimizer.state.get(param)
    if not state or state.get("step", 0) == 0:
        return None
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta = group["beta"]
    t = int(state["step"]) - 1  # the step just taken
    coefficients = step_coefficients(group["lr"], beta, group["weight_decay"], t)
    # g_t is gone (its weight decay used theta_t); no estimate may read moments.grad
    moments = momentum_moments(TENSOR, None, state["exp_avg"], coefficients)
    estimator, target = optimizer.variance_estimator, optimizer.variance_target
    batch_variance = grad_variance_or_none(param) if estimator.requires_batch_variance else None
    variance = estimator.estimate(state, moments, batch_variance, t, beta, target)
    if variance is None:
        raise RuntimeError(
            f"{type(optimizer).__name__} with variance={estimator.name!r} divides by an "
            "estimate that needs p.grad_variance, which is gone: record after "
            "optimizer.step() and before optimizer.zero_grad() (VarianceMonitor(attach=True) "
            "does this)."
        )
    gradient_variance = variance if target == "gradient" else estimator.estimate(
        state, moments, batch_variance, t, beta, "gradient")
    gamma = adaptation_factor(TENSOR, moments, variance)
    return DirectionStatistics(t, moments.mean, variance, gradient_variance, gamma)


def _estimator_suffix(optimizer: Optimizer) -> str:
    estimator = getattr(optimizer, "variance_estimator", None)
    if estimator is None:
        return " (no variance estimate)"
    return f" with variance={type(estimator).__name__}"


def parameter_names(optimizer: Optimizer, model: nn.Module | None = None) -> dict[Tensor, str]:
    """Names for the optimizer's parameters: ``model``'s names, else ``"group{i}.param{j}"``."""
    from_model = {} if model is None else {p: n for n, p in model.named_parameters()}
    names = {}
    for i, group in enumerate(optimizer.param_groups):
        for j, param in enumerate(group["params"]):
            names[param] = from_model.get(param, f"group{i}.param{j}")
    return names


def summarize(
    statistics: DirectionStatistics,
    quantiles: Sequence[float] = QUANTILES,
    bins: int = 10,
    max_elements: int = 2**20,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Reduce one layer's :class:`DirectionStatistics` to a flat, JSON-ready record.

    Keys: ``step``, ``numel``, ``snr_median`` and ``snr_mean`` (of ``m^2/V`` over the
    elements with ``V > 0``), ``snr_layer`` (``sum m^2 / sum V``), ``zero_variance_fraction``,
    ``gamma_mean``, ``gamma_qNN`` per quantile, ``gamma_hist`` (counts in ``bins`` equal bins
    of ``[0, 1]``), ``mean_sq_mean`` (mean ``m^2``), ``variance_mean`` (mean ``V``) and
    ``gradient_variance_mean``. Undefined values (no element with ``V > 0``) are ``None``.
    Quantiles and the SNR median use at most ``max_elements`` elements drawn at random
    (with ``generator``); means and the histogram use all.
    """
    work_dtype = torch.promote_types(statistics.mean.dtype, torch.float32)
    mean_squared = (statistics.mean * statistics.mean).flatten().to(work_dtype)
    variance = statistics.variance.flatten().to(work_dtype)
    gamma = statistics.gamma.flatten().to(work_dtype)
    numel = gamma.numel()
    if numel == 0:
        return {"step": statistics.step, "numel": 0}
    sample = _sample_indices(numel, max_elements, generator, gamma.device)
    positive = variance > 0
    snr = torch.where(positive, mean_squared / torch.where(positive, variance, 1.0),
                      torch.nan)
    snr_sample = snr if sample is None else snr[sample]
    gamma_sample = gamma if sample is None else gamma[sample]
    nan = torch.tensor(math.nan, dtype=work_dtype, device=gamma.device)
    variance_sum = variance.sum()
    scalars = [
        snr_sample.nanquantile(0.5) if bool(positive.any()) else nan,  # as np.median
        snr.nanmean(),
        torch.where(variance_sum > 0, mean_squared.sum() / variance_sum, nan),
        1.0 - positive.to(work_dtype).mean(),
        gamma.mean(),
        *torch.quantile(gamma_sample, torch.tensor(list(quantiles), dtype=work_dtype,
                                                   device=gamma.device)),
        mean_squared.mean(),
        variance.mean(),
        nan if statistics.gradient_variance is None
        else statistics.gradient_variance.to(work_dtype).mean(),
    ]
    values = [_finite_or_none(v) for v in torch.stack(scalars).tolist()]  # one host sync
    histogram = torch.histc(gamma, bins=bins, min=0.0, max=1.0)
    keys = (["snr_median", "snr_mean", "snr_layer", "zero_variance_fraction", "gamma_mean"]
            + [_quantile_key(q) for q in quantiles]
            + ["mean_sq_mean", "variance_mean", "gradient_variance_mean"])
    record: dict[str, Any] = {"step": statistics.step, "numel": numel}
    record.update(zip(keys, values))
    record["gamma_hist"] = [int(c) for c in histogram.tolist()]
    return record


def _quantile_key(q: float) -> str:
    return f"gamma_q{round(100 * q):02d}"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN/Inf


def _sample_indices(numel, max_elements, generator, device) -> Tensor | None:
    if numel <= max_elements:
        return None
    return torch.randint(numel, (max_elements,), generator=generator).to(device)


class VarianceMonitor:
    """Record per layer what the variance adaptation sees, every ``every`` steps.

    Attached as a step post-hook (``attach=True``), it runs after each
    ``optimizer.step()``; on steps that are not due it only counts. Records (one dict per
    layer and recorded step, see :func:`summarize`, plus ``layer``, ``estimator`` and
    ``target``) are kept in :attr:`records` and written as they come.

    Args:
        optimizer: an :class:`~msvag_mb.MSVAG`, :class:`~msvag_mb.SVAG` or
            :class:`~msvag_mb.AdamStar` with a built-in estimator (see :func:`is_supported`).
        model: names the layers (``model.named_parameters()``); optional.
        every: record after steps ``0, every, 2*every, ...`` (counted by the monitor).
        jsonl: path of a JSON-lines log (one record per line); overwritten.
        csv: path of a CSV log (one row per record; ``gamma_hist_NN`` columns); overwritten.
        tensorboard: a log directory or a ``SummaryWriter``: scalars ``<layer>/gamma_median``,
            ``<layer>/snr_median``, ``<layer>/variance_mean`` and histogram ``<layer>/gamma``.
        quantiles: quantiles of gamma to record.
        bins: number of equal histogram bins on ``[0, 1]``.
        max_elements: cap on the elements used for quantiles and medians (random subset).
        keep_records: keep records in memory in :attr:`records`.
        attach: register as ``optimizer.register_step_post_hook``; with ``False`` call
            :meth:`step` yourself after each ``optimizer.step()``.
        append: add to existing ``jsonl``/``csv`` logs (a resumed run) instead of
            overwriting them; a CSV header is written only into an empty file.

    Example::

        opt = msvag_mb.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
        with VarianceMonitor(opt, model, every=10, jsonl="runs/monitor.jsonl"):
            for x, y in batches:
                opt.zero_grad(); gv.backward(x, y); opt.step()  # recorded by the hook
        plot_monitoring("runs/monitor.jsonl", "runs/monitor.png")
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module | None = None,
        *,
        every: int = 10,
        jsonl: str | Path | None = None,
        csv: str | Path | None = None,
        tensorboard: str | Path | Any | None = None,
        quantiles: Sequence[float] = QUANTILES,
        bins: int = 10,
        max_elements: int = 2**20,
        keep_records: bool = True,
        attach: bool = True,
        append: bool = False,
    ) -> None:
        if not is_supported(optimizer):
            raise TypeError(f"{_UNSUPPORTED_HINT}; got {type(optimizer).__name__}"
                            f"{_estimator_suffix(optimizer)}. Monitor a variance-adapted "
                            "optimizer, or check msvag_mb.monitoring.is_supported(opt) first.")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every} (must be an int >= 1)")
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"Invalid bins: {bins} (must be an int >= 1)")
        if not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"Invalid quantiles: {tuple(quantiles)} (each must be in [0, 1])")
        self.optimizer = optimizer
        self.model = model
        self.every = every
        self.quantiles = tuple(quantiles)
        self.bins = bins
        self.max_elements = max_elements
        self.keep_records = keep_records
        #: records so far (if ``keep_records``)
        self.records: list[dict[str, Any]] = []
        #: optimizer steps seen by :meth:`step`
        self.steps_seen = 0
        self._names = parameter_names(optimizer, model)
        self._generator = torch.Generator().manual_seed(0)
        self._estimator = optimizer.variance_estimator.name
        self._target = optimizer.variance_target
        self._jsonl = _open(jsonl, append)
        self._csv_file = _open(csv, append)
        self._csv_writer = None
        if self._csv_file is not None:
            self._csv_writer = _csv.DictWriter(self._csv_file, self.csv_fields(),
                                                      extrasaction="ignore")
            if self._csv_file.tell() == 0:
                self._csv_writer.writeheader()
        self._tensorboard, self._owns_tensorboard = _tensorboard_writer(tensorboard)
        self._handle = optimizer.register_step_post_hook(self._hook) if attach else None

    # -- the hook ----------------------------------------------------------------------------
    def _hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.step()

    def step(self) -> list[dict[str, Any]] | None:
        """Count one optimizer step; record it if due. Returns the new records or None."""
        due = self.steps_seen % self.every == 0
        self.steps_seen += 1
        if not due:
            return None
        return self.record()

    def record(self) -> list[dict[str, Any]]:
        """Record the step just taken now, whether due or not; returns the new records."""
        new_records = []
        for param, statistics in self.factors().items():
            record = {"layer": self._names[param], "estimator": self._estimator,
                      "target": self._target}
            record.update(summarize(statistics, self.quantiles, self.bins,
                                    self.max_elements, self._generator))
            new_records.append(record)
            if self._tensorboard is not None:
                self._write_tensorboard(record, statistics)
        self._write(new_records)
        if self.keep_records:
            self.records.extend(new_records)
        return new_records

    def factors(self) -> dict[Tensor, DirectionStatistics]:
        """Element-wise :class:`DirectionStatistics` of every parameter that has stepped."""
        result = {}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                statistics = direction_statistics(self.optimizer, param)
                if statistics is not None:
                    result[param] = statistics
        return result

    # -- output ------------------------------------------------------------------------------
    def csv_fields(self) -> list[str]:
        """Column names of the CSV log."""
        return (["step", "layer", "estimator", "target", "numel", "snr_median", "snr_mean",
                 "snr_layer", "zero_variance_fraction", "gamma_mean"]
                + [_quantile_key(q) for q in self.quantiles]
                + ["mean_sq_mean", "variance_mean", "gradient_variance_mean"]
                + [f"gamma_hist_{i:02d}" for i in range(self.bins)])

    def _write(self, records: list[dict[str, Any]]) -> None:
        if self._jsonl is not None:  # one write of whole lines (summarize: no NaN/Inf)
            self._jsonl.write("".join(json.dumps(record) + "\n" for record in records))
            self._jsonl.flush()
        if self._csv_writer is not None:
            for record in records:
                row = dict(record)
                for i, count in enumerate(row.pop("gamma_hist", [])):
                    row[f"gamma_hist_{i:02d}"] = count
                self._csv_writer.writerow(row)
            self._csv_file.flush()

    def _write_tensorboard(self, record: dict[str, Any], statistics: DirectionStatistics):
        writer, layer, step = self._tensorboard, record["layer"], record["step"]
        for key in ("gamma_q50", "snr_median", "variance_mean"):
            if record.get(key) is not None:
                tag = "gamma_median" if key == "gamma_q50" else key
                writer.add_scalar(f"{layer}/{tag}", record[key], step)
        if record["numel"] > 0:
            gamma = statistics.gamma.detach().flatten().float().cpu()
            if gamma.numel() > self.max_elements:
                gamma = gamma[_sample_indices(gamma.numel(), self.max_elements,
                                              self._generator, "cpu")]
            edges = torch.linspace(0.0, 1.0, self.bins + 1).numpy()
            writer.add_histogram(f"{layer}/gamma", gamma.numpy(), step, bins=edges)

    def close(self) -> None:
        """Detach the hook and close the files (and a SummaryWriter the monitor opened)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for handle in (self._jsonl, self._csv_file):
            if handle is not None:
                handle.close()
        self._jsonl = self._csv_file = self._csv_writer = None
        if self._tensorboard is not None:
            if self._owns_tensorboard:
                self._tensorboard.close()
            else:
                self._tensorboard.flush()
            self._tensorboard = None

    def __enter__(self) -> VarianceMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open(path: str | Path | None, append: bool = False):
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a" if append else "w", newline="")


def _tensorboard_writer(target) -> tuple[Any, bool]:
    if target is None:
        return None, False
    if isinstance(target, (str, Path)):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "tensorboard= needs the tensorboard package: pip install "
                "'msvag_mb[tensorboard]' (or pip install tensorboard), or pass "
                "tensorboard=None and use the jsonl/csv logs."
            ) from error
        return SummaryWriter(log_dir=str(target)), True
    return target, False


# -- reading and plotting ----------------------------------------------------------------------
def load_monitoring(path: str | Path) -> list[dict[str, Any]]:
    """Read a monitoring log written by :class:`VarianceMonitor` (``.jsonl`` or ``.csv``).

    CSV rows come back as JSON-lines records: numbers parsed, empty cells ``None``, the
    ``gamma_hist_NN`` columns gathered into ``gamma_hist``. A last JSON line cut short (a
    kill while it was written) is left out.
    """
    path = Path(path)
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return [_record_from_row(row) for row in _csv.DictReader(handle)]
    lines = [(number, line) for number, line in enumerate(path.read_text().split("\n"), 1)
             if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as error:
            if position < len(lines) - 1:  # the last line may be cut short by a kill
                raise ValueError(f"{path}, line {number}, is not a JSON record ({error})") \
                    from error
    return records


def _record_from_row(row: dict[str, str]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    histogram = []
    for key, text in row.items():
        if key.startswith("gamma_hist_"):
            histogram.append((key, int(text)))
        elif key in ("layer", "estimator", "target"):
            record[key] = text
        elif text == "":
            record[key] = None
        elif key in ("step", "numel"):
            record[key] = int(text)
        else:
            record[key] = float(text)
    record["gamma_hist"] = [count for _, count in sorted(histogram)]
    return record


def plot_monitoring(
    path: str | Path | Iterable[dict[str, Any]],
    out_png: str | Path,
    layers: Sequence[str] | None = None,
    max_layers: int = 6,
) -> Path:
    """Draw a monitoring log: gamma (median, 25-75 % band), SNR, variance, gamma histogram.

    Args:
        path: a ``.jsonl``/``.csv`` log of :class:`VarianceMonitor`, or its records.
        out_png: where to save the figure (parent folders are created).
        layers: layer names to draw; default: the ``max_layers`` largest layers.
        max_layers: cap when ``layers`` is not given.

    Returns:
        The path of the saved figure.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, any backend

    records = load_monitoring(path) if isinstance(path, (str, Path)) else list(path)
    if not records:
        raise ValueError(f"no monitoring records in {path!s}; was the monitor ever due?")
    if layers is None:
        sizes = {r["layer"]: r.get("numel", 0) for r in records}
        layers = sorted(sizes, key=lambda name: -sizes[name])[:max_layers]
    by_layer = {name: sorted((r for r in records if r["layer"] == name and r.get("numel")),
                             key=lambda r: r["step"]) for name in layers}
    figure = Figure(figsize=(11, 7.5))
    (ax_gamma, ax_snr), (ax_variance, ax_hist) = figure.subplots(2, 2)
    _plot_series(by_layer, ax_gamma, ax_snr, ax_variance)
    _plot_gamma_histogram(by_layer, figure, ax_hist)
    estimator = records[0].get("estimator", "")
    figure.suptitle(f"variance monitor ({estimator} estimate)")
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    return out_png


def _series(rows: list[dict[str, Any]], key: str):
    import numpy as np

    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def _plot_series(by_layer: dict[str, list[dict[str, Any]]], ax_gamma, ax_snr, ax_variance):
    """gamma (median, 25-75 % band), SNR and variance over the steps, one line per layer."""
    import numpy as np

    for name, rows in by_layer.items():
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows])
        (line,) = ax_gamma.plot(steps, _series(rows, "gamma_q50"), label=name)
        if rows[0].get("gamma_q25", "missing") != "missing":
            ax_gamma.fill_between(steps, _series(rows, "gamma_q25"), _series(rows, "gamma_q75"),
                                  color=line.get_color(), alpha=0.2, linewidth=0)
        ax_snr.plot(steps, _series(rows, "snr_median"), label=name)
        ax_variance.plot(steps, _series(rows, "variance_mean"), label=name)
    ax_gamma.set(title="adaptation factor gamma (median, 25-75 %)", xlabel="step t",
                 ylim=(-0.02, 1.02))
    ax_snr.set(title="SNR m^2 / V (median over elements)", xlabel="step t", yscale="log")
    ax_variance.set(title="estimated variance V (mean over elements)", xlabel="step t",
                    yscale="log")
    ax_gamma.legend(fontsize="small")


def _plot_gamma_histogram(by_layer: dict[str, list[dict[str, Any]]], figure, ax_hist):
    """gamma histogram over steps, all drawn layers pooled (fraction of elements per bin)."""
    import numpy as np

    pooled: dict[int, Any] = {}
    for rows in by_layer.values():
        for r in rows:
            counts = np.asarray(r.get("gamma_hist") or [], dtype=float)
            if counts.size:
                pooled[r["step"]] = pooled.get(r["step"], 0) + counts
    if pooled:
        steps = sorted(pooled)
        image = np.stack([pooled[s] / max(pooled[s].sum(), 1.0) for s in steps], axis=1)
        half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
        extent = (steps[0] - half, steps[-1] + half, 0.0, 1.0)  # columns centred on steps
        shown = ax_hist.imshow(image, origin="lower", aspect="auto", extent=extent,
                               cmap="viridis", interpolation="nearest")
        figure.colorbar(shown, ax=ax_hist, label="fraction of elements")
    ax_hist.set(title="distribution of gamma (drawn layers pooled)", xlabel="step t",
                ylabel="gamma")


__all__ = [
    "QUANTILES",
    "DirectionStatistics",
    "VarianceMonitor",
    "direction_statistics",
    "is_supported",
    "load_monitoring",
    "parameter_names",
    "plot_monitoring",
    "summarize",
    "tensorboard_available",
]
