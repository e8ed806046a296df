"""The compiled step: a ``torch.compile``-d kernel built from the estimator's and direction's code.

The eager paths launch one kernel per operation (about ten passes over memory per step);
here ``torch.compile`` fuses the whole update into one loop that reads ``theta, g, m~``,
the estimator state (and ``s_hat``) once and writes them once: the memory traffic of
``torch.optim.Adam(fused=True)``. The kernel is *built from* the code of the per-tensor
path: the momentum and the direction of :mod:`msvag_mb.directions` and the estimator's own
:meth:`~msvag_mb.VarianceEstimator.advance` and :meth:`~msvag_mb.VarianceEstimator.variance`,
run with :data:`msvag_mb.ops.KERNEL`; no formula is written here.

One compiled kernel per configuration (:class:`KernelConfig`: direction, estimator class,
weight decay on or off, device type, dtypes) serves every step and every model: it takes
1-D tensors of any length (``dynamic=True``) and the step's numbers as one tensor of 0-dim
scalars. How a step calls it (``docs/benchmarks.md`` has the measurements):

* a parameter of at least :data:`GATHER_BELOW` elements gets one call, on flat views;
* the smaller ones (a model's biases and norms) are gathered into one flat buffer per
  tensor role (one ``torch.cat`` each), updated by one call and copied back (one
  ``torch._foreach_copy_``): a few calls per step, whatever the number of tensors;
* a call goes straight to the graph Dynamo handed to Inductor once that is safe
  (:class:`_Kernel`), skipping Dynamo's Python wrappers (about 18 us a call, 4 us direct).

Where the kernel cannot be compiled (no C++ compiler, torch.compile unsupported here, an
estimator Dynamo cannot trace), the same code runs eagerly with Python numbers, which is
the per-tensor path, after one warning; ``fused=None`` (the optimizers' default) then
takes the eager path of :mod:`msvag_mb.optimizers` from the next step on.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import Tensor

from .directions import Direction, advance_momentum_, descend_, step_coefficients
from .estimators import VarianceEstimator, VarianceTarget
from .ops import KERNEL, TENSOR, Ops, StepNumber, at_most_threads

#: parameters with fewer elements share one gathered call: below this size, copying them
#: in and out costs less than a call of their own (docs/benchmarks.md)
GATHER_BELOW = 1 << 12
#: calls on fewer elements run on one thread: waking the second thread costs about 8 us
#: on the benchmark machine, what one thread needs for some 30,000 elements
PARALLEL_FROM = 1 << 16
#: each kernel is compiled, and first run, on private tensors of this length, so that a
#: kernel that does not compile fails before any parameter is touched
WARM_UP_ELEMENTS = 1 << 12
#: Inductor options per device type, applied while compiling. On CPU: a parallel loop
#: whose thread count is read at run time (by default the loop is serial or parallel for
#: good, after the size of the first call, which ``dynamic=True`` keeps only as a hint,
#: and the on-disk cache keeps whichever came first)
_INDUCTOR_OPTIONS = {"cpu": {"cpp.dynamic_threads": True}}
#: the devices on which ``fused=None`` compiles (``fused=True`` tries any device)
AUTO_DEVICES = ("cpu", "cuda")

_STEP_NAMES = tuple(step_coefficients(0.0, 0.0, 0.0, 0))
#: the kernels by configuration and device (None: it did not compile)
_KERNELS: dict[tuple[KernelConfig, torch.device], _Kernel | None] = {}
#: configurations whose kernel failed to compile, with the reason
_FAILED: dict[KernelConfig, str] = {}
#: device types on which a kernel failed: ``fused=None`` stays eager there
_BROKEN_DEVICES: set[str] = set()
_MISSING = object()

#: one parameter's tensors: (theta, g, m~, estimator state by name, s_hat or None)
Row = tuple[Tensor, Tensor, Tensor, dict[str, Tensor], Tensor | None]


class KernelConfig(NamedTuple):
    """What one compiled kernel is specialised on (everything else is an argument)."""

    estimator_type: type | None
    direction: Direction
    target: VarianceTarget | None
    estimator_names: tuple[str, ...]  # of its step numbers
    state_keys: tuple[str, ...]  # of its tensors in the optimizer state
    use_weight_decay: bool
    device_type: str
    dtypes: tuple[torch.dtype, torch.dtype | None]  # of theta and of s_hat


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    estimator_state: dict[str, Tensor],
    batch_variance: Tensor | None,
    scalars,
    estimator: VarianceEstimator | None,
    ops: Ops,
    direction: Direction,
    target: VarianceTarget | None,
    estimator_names: tuple[str, ...],
    use_weight_decay: bool,
) -> None:
    """One parameter's step: the per-tensor path's code. ``scalars`` holds the step's
    numbers: Python floats in the eager fallback; in the kernel a tensor of the numbers
    followed by their reciprocals (:func:`_scalars`), made into :class:`StepNumber` s."""
    numbers = scalars
    if ops is KERNEL:
        count = len(_STEP_NAMES) + len(estimator_names)
        numbers = [StepNumber(scalars[i], scalars[count + i]) for i in range(count)]
    coefficients = {name: numbers[i] for i, name in enumerate(_STEP_NAMES)}
    moments = advance_momentum_(ops, param, grad, exp_avg, coefficients, use_weight_decay)
    variance = None
    if estimator is not None:
        own = {name: numbers[len(_STEP_NAMES) + i] for i, name in enumerate(estimator_names)}
        estimator.advance(ops, estimator_state, moments, batch_variance, own)
        variance = estimator.variance(ops, estimator_state, moments, batch_variance, own,
                                      target)
    descend_(ops, param, direction(ops, moments, variance), coefficients)


def _specialised(config: KernelConfig):
    """A private copy of :func:`_update` with the configuration's static options bound.

    Dynamo keeps one cache, with a small recompile limit, per *code object*; a copy per
    configuration keeps the configurations from evicting each other. The estimator
    instance stays an argument (Dynamo guards on what the formulas read from it).
    """
    label = "none" if config.estimator_type is None else config.estimator_type.__name__
    dtypes = "_".join(str(d).removeprefix("torch.") for d in config.dtypes if d is not None)
    name = (f"_update_{config.direction.name}_{label}_{config.target}_"
            f"{int(config.use_weight_decay)}_{config.device_type}_{dtypes}")
    return types.FunctionType(
        _update.__code__.replace(co_name=name), _update.__globals__, name,
        (KERNEL, config.direction, config.target, config.estimator_names,
         config.use_weight_decay),
    )


def _row_tensors(row: Row, scalars: Tensor) -> list[Tensor]:
    """The call's tensors in a fixed order: theta, g, m~, the state, s_hat, the scalars."""
    param, grad, exp_avg, state, variance = row
    return [param, grad, exp_avg, *state.values(),
            *(() if variance is None else (variance,)), scalars]


class _Kernel:
    """One configuration's compiled kernel, called through Dynamo or directly.

    Dynamo's compiled function checks its guards and runs Python wrappers on every call
    (about 18 us on the benchmark machine); calling the graph Dynamo handed to Inductor
    takes about 4 us. The direct call is taken only while it is the call Dynamo would
    make: there is one graph (none was recompiled), each of its arguments was recognised
    at the first call (a tensor of the row, or a length), and the estimator instance
    passed Dynamo's guards once with the attributes it has now (a changed attribute sends
    the next call through Dynamo, which recompiles if the formulas read it). The row's
    dtypes, device type and layout (1-D, contiguous) are fixed by the configuration and
    by how :class:`_Bucket` builds rows; the graph itself asserts sizes and strides.
    """

    def __init__(self, config: KernelConfig) -> None:
        self.options = _INDUCTOR_OPTIONS.get(config.device_type, {})
        self.graphs: list = []  # [example inputs, compiled graph] per Inductor compilation
        self.dynamo = torch.compile(_specialised(config), dynamic=True, fullgraph=True,
                                    backend=self._backend)
        self.plan: list | None = None  # the graph's arguments, as positions in a row
        self.checked: dict[int, tuple[VarianceEstimator, dict]] = {}

    def _backend(self, graph, example_inputs):
        from torch._inductor import config as inductor_config  # imported by now anyway

        with inductor_config.patch(self.options):
            compiled = torch._dynamo.lookup_backend("inductor")(graph, example_inputs)
        self.graphs.append([list(example_inputs), compiled])
        return compiled

    def first_call(self, row: Row, scalars: Tensor, estimator) -> None:
        """Compile (through Dynamo) on ``row``, then learn the graph's arguments."""
        self._through_dynamo(row, scalars, estimator)
        if len(self.graphs) == 1:
            self.plan = _plan(self.graphs[0][0], _row_tensors(row, scalars), row[0].numel())
        for graph in self.graphs:
            graph[0] = None  # the example inputs are the warm-up tensors: let them go
        self._check(estimator)

    def __call__(self, row: Row, scalars: Tensor, estimator) -> None:
        if self.plan is not None and self._checked(estimator):
            tensors = _row_tensors(row, scalars)
            lengths = {-1: row[0].numel(), -2: scalars.numel()}
            self.graphs[0][1](*[tensors[p] if p >= 0 else lengths[p] for p in self.plan])
            return
        compiled = len(self.graphs)
        self._through_dynamo(row, scalars, estimator)
        if len(self.graphs) != compiled:
            self.plan = None  # Dynamo recompiled: from now on its guards choose the graph
        else:
            self._check(estimator)

    def _through_dynamo(self, row: Row, scalars: Tensor, estimator) -> None:
        # Dynamo guards on the intra-op thread count, which the direct calls set per call
        # (one thread for small ones); its calls always see one, so no call recompiles
        with at_most_threads(1):
            self.dynamo(*row, scalars, estimator)

    def _check(self, estimator) -> None:
        if estimator is not None:  # holding the instance keeps its id from being reused
            self.checked[id(estimator)] = (estimator, dict(getattr(estimator, "__dict__", {})))

    def _checked(self, estimator) -> bool:
        if estimator is None:
            return True
        entry = self.checked.get(id(estimator))
        if entry is None or entry[0] is not estimator:
            return False
        now = getattr(estimator, "__dict__", {})
        return len(now) == len(entry[1]) and all(
            entry[1].get(key, _MISSING) is value for key, value in now.items())


def _plan(example_inputs, tensors: list[Tensor], length: int) -> list[int] | None:
    """Where each argument of the graph comes from: a position in ``tensors``, -1 for the
    tensors' length, -2 for the scalars'; None if one is not recognised."""
    positions = {id(t): i for i, t in enumerate(tensors)}
    lengths = {length: -1, tensors[-1].numel(): -2}
    plan = []
    for value in example_inputs:
        if isinstance(value, Tensor) and id(value) in positions:
            plan.append(positions[id(value)])
        elif isinstance(value, torch.SymInt) and value.node.hint in lengths:
            plan.append(lengths[value.node.hint])
        else:
            return None
    return plan


def _kernel(config: KernelConfig, device: torch.device,
            estimator: VarianceEstimator | None) -> _Kernel | None:
    """The kernel of ``config`` on ``device``, compiled at its first use; None (after one
    warning) where it does not compile. ``estimator`` is the instance of that first use
    (each call passes its own)."""
    key = (config, device)
    if key not in _KERNELS:
        _KERNELS[key] = _compile(config, device, estimator)
    return _KERNELS[key]


def _compile(config: KernelConfig, device: torch.device,
             estimator: VarianceEstimator | None) -> _Kernel | None:
    """Compile, and first run, the kernel on private tensors of :data:`WARM_UP_ELEMENTS`."""
    dtype, variance_dtype = config.dtypes

    def zeros(dtype):
        return torch.zeros(WARM_UP_ELEMENTS, dtype=dtype, device=device)

    row = (zeros(dtype), zeros(dtype), zeros(dtype),
           {key: zeros(dtype) for key in config.state_keys},
           None if variance_dtype is None else zeros(variance_dtype))
    scalars = _scalars([1.0] * (len(_STEP_NAMES) + len(config.estimator_names)), device,
                       dtype)
    kernel = _Kernel(config)
    try:
        kernel.first_call(row, scalars, estimator)
    except Exception as error:  # only private tensors were touched
        _compile_failed(config, error)
        return None
    return kernel


def _scalars(values: list[float], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The kernel's ``scalars``: the step's numbers, then their reciprocals (computed here,
    once per step, instead of once per loop iteration); float64 for float64 parameters,
    float32 otherwise. One small host-to-device copy per step."""
    reciprocals = [1.0 / value if value else math.inf for value in values]
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if device.type == "cuda":  # from pinned memory, without waiting for the device
        return torch.tensor(values + reciprocals, dtype=dtype, pin_memory=True).to(
            device, non_blocking=True)
    return torch.tensor(values + reciprocals, device=device, dtype=dtype)


def check_fusable(estimator: VarianceEstimator | None) -> None:
    """Refuse an estimator whose formulas the kernel cannot be built from."""
    if estimator is not None and not estimator.elementwise():
        raise ValueError(
            f"fused=True builds its kernel from the estimator's advance() and variance(); "
            f"{type(estimator).__name__} overrides update() only. Write its formulas as "
            "coefficients(), advance() and variance() (see msvag_mb.VarianceEstimator), or "
            "use foreach=True for a custom estimator that overrides update()."
        )


def _compiler_available() -> bool:
    """torch.compile works in this interpreter and is not switched off; warns once if not."""
    if torch._dynamo.config.disable:  # TORCH_COMPILE_DISABLE=1: the user's choice, no warning
        return False
    return _dynamo_supported()


@functools.lru_cache(maxsize=None)
def _dynamo_supported() -> bool:
    if torch._dynamo.is_dynamo_supported():
        return True
    warnings.warn("msvag_mb: torch.compile is not supported here; the optimizers take their "
                  "eager path (the same maths, slower)", RuntimeWarning, stacklevel=5)
    return False


def use_fused(fused: bool | None, foreach: bool | None,
              estimator: VarianceEstimator | None, device: torch.device) -> bool:
    """Whether a group takes the compiled path: ``fused`` if given; by default (``None``,
    with ``foreach`` not given either) wherever the kernel compiles on this device."""
    if fused is not None:
        return bool(fused)
    return (
        foreach is None
        and device.type in AUTO_DEVICES
        and device.type not in _BROKEN_DEVICES
        and (estimator is None or estimator.elementwise())
        and not torch.compiler.is_compiling()  # inside the user's compiled code: inlined
        and _compiler_available()
    )


def fused_step(
    params: list[Tensor],
    states: list[dict],
    batch_variances: list[Tensor] | None,
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    direction: Direction,
    estimator: VarianceEstimator | None,
    target: VarianceTarget | None,
    estimator_keys: tuple[str, ...] = (),
) -> None:
    """Advance every parameter by one step with the compiled kernel.

    ``estimator_keys`` name the estimator's tensors in each state (``init_state``'s keys).
    """
    buckets: dict[tuple, list[Row]] = defaultdict(list)
    for i, (param, state) in enumerate(zip(params, states)):
        variance = None if batch_variances is None else batch_variances[i]
        row = (param.detach(), param.grad, state["exp_avg"],
               {key: state[key] for key in estimator_keys}, variance)
        key = (param.device, param.dtype, state["step"],
               None if variance is None else variance.dtype,
               variance is None or variance.device == param.device)
        buckets[key].append(row)
    for (device, dtype, step, variance_dtype, same_device), rows in buckets.items():
        own = {} if estimator is None else estimator.coefficients(step, beta, target)
        values = [*step_coefficients(lr, beta, weight_decay, step).values(), *own.values()]
        config = KernelConfig(None if estimator is None else type(estimator), direction,
                              target, tuple(own), estimator_keys, weight_decay != 0,
                              device.type, (dtype, variance_dtype))
        # s_hat on another device than theta: the eager ops say what is wrong
        _Bucket(config, values, estimator, device, compiled=same_device).run(rows)
    for state in states:
        state["step"] += 1


class _Bucket:
    """The step of parameters sharing device, dtypes and step: kernel calls, or eager."""

    def __init__(self, config: KernelConfig, values: list[float],
                 estimator: VarianceEstimator | None, device: torch.device,
                 compiled: bool = True) -> None:
        self.config, self.values, self.estimator = config, values, estimator
        dtype = config.dtypes[0]
        self.kernel = None
        if compiled and dtype.is_floating_point and config not in _FAILED:
            self.kernel = _kernel(config, device, estimator)
        if self.kernel is not None:
            self.scalars = _scalars(values, device, dtype)

    def run(self, rows: list[Row]) -> None:
        """Large contiguous parameters one call each, the others in one gathered call."""
        small = []
        for row in rows:
            views = _flat_views(row) if row[0].numel() >= GATHER_BELOW else None
            if views is None:
                small.append(row)
            elif not self._call(views):
                self._eager(row)
        if sum(row[0].numel() for row in small) < 2:  # a flat size 0 or 1 would recompile
            for row in small:
                self._eager(row)
            return
        cpu = self.config.device_type == "cpu"
        # copies of small tensors: waking a thread costs more
        with at_most_threads(1 if cpu else None):
            gathered = _gather(small)
        if self._call(gathered):
            with at_most_threads(1 if cpu else None):
                _scatter(gathered, small)
        else:
            for row in small:
                self._eager(row)

    def _call(self, row: Row) -> bool:
        """One kernel call; False (after a warning) where the kernel does not compile."""
        if self.kernel is None or self.config in _FAILED:
            return False
        try:
            with at_most_threads(1 if self.config.device_type == "cpu"
                                 and row[0].numel() < PARALLEL_FROM else None):
                self.kernel(row, self.scalars, self.estimator)
        except torch._dynamo.exc.TorchDynamoException as error:  # a recompile, before writing
            _compile_failed(self.config, error)
            return False
        return True

    def _eager(self, row: Row) -> None:
        """The same code eagerly with Python numbers: the per-tensor path."""
        config = self.config
        _update(*row, self.values, self.estimator, TENSOR, config.direction, config.target,
                config.estimator_names, config.use_weight_decay)


def _compile_failed(config: KernelConfig, error: Exception) -> None:
    message = str(error).strip()
    reason = f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"
    _FAILED[config] = reason
    _BROKEN_DEVICES.add(config.device_type)
    warnings.warn(
        f"msvag_mb: the compiled step kernel ({config.direction.name}, "
        f"{getattr(config.estimator_type, '__name__', 'no estimator')}, "
        f"{config.device_type}) did not compile ({reason}); this step runs eagerly (the same "
        "maths, slower), and so do later steps unless fused=True. Pass fused=False to "
        "choose the eager path without trying to compile.",
        RuntimeWarning, stacklevel=5,
    )


def _flat_views(row: Row) -> Row | None:
    """``row`` as 1-D views, or None if one of its tensors is not contiguous."""
    param, grad, exp_avg, state, variance = row
    tensors = (param, grad, exp_avg, *state.values(), *(() if variance is None else (variance,)))
    if not all(t.is_contiguous() for t in tensors):
        return None
    return (param.view(-1), grad.view(-1), exp_avg.view(-1),
            {key: t.view(-1) for key, t in state.items()},
            None if variance is None else variance.view(-1))


def _gather(rows: list[Row]) -> Row:
    """One flat buffer per tensor role, the rows' tensors one after the other."""
    def cat(tensors):  # (biases and norms are 1-D already: no reshape to pay for)
        return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors])

    return (cat([row[0] for row in rows]), cat([row[1] for row in rows]),
            cat([row[2] for row in rows]),
            {key: cat([row[3][key] for row in rows]) for key in rows[0][3]},
            None if rows[0][4] is None else cat([row[4] for row in rows]))


def _scatter(gathered: Row, rows: list[Row]) -> None:
    """Copy the updated theta, m~ and estimator state back into the rows' tensors."""
    sizes = [row[0].numel() for row in rows]
    targets: list[Tensor] = []
    sources: list[Tensor] = []
    for flat, column in ((gathered[0], [row[0] for row in rows]),
                         (gathered[2], [row[2] for row in rows]),
                         *((gathered[3][key], [row[3][key] for row in rows])
                           for key in gathered[3])):
        targets += column
        sources += [piece if t.dim() == 1 else piece.view(t.shape)
                    for piece, t in zip(flat.split(sizes), column)]
    torch._foreach_copy_(targets, sources)
