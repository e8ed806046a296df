"""The files of a run folder, ``<out>/<problem>/<label>__lr<lr>__seed<seed>/`` (or, when that
name holds a run of another configuration, the detailed name of
:meth:`~msvag_mb.runner.config.TrainConfig.detailed_run_name`; :func:`run_dir_for`):

* ``config.json``: the :class:`~msvag_mb.runner.config.TrainConfig` (everything that
  determines the result);
* ``metrics.jsonl``: one JSON record per evaluation (step 0, every ``eval_every`` steps,
  and the last step): step size, loss and accuracy on the full test set and on an equally
  sized slice of the training set, the mean mini-batch loss since the previous record;
* ``checkpoint.pt``: model, optimizer, scheduler and carried state at the last record, or
  at the step a Ctrl-C stopped (``resume=True`` continues from it with the same result as
  an uninterrupted run);
* ``monitor.jsonl`` (with ``monitor=N``): what the variance adaptation saw every ``N`` steps,
  per layer (:class:`msvag_mb.monitoring.VarianceMonitor`; ``msvag-plot`` draws it), and
  ``tensorboard/`` with the same scalars when TensorBoard is installed.

Each file is read and written here only: records (:func:`read_records`,
:func:`append_record`, :func:`write_records`; standard JSON, a non-finite number written as
the string ``"inf"``, ``"-inf"`` or ``"nan"`` and read back as the float; a line cut short
by a kill or a full disk is dropped when it is the last), checkpoints
(:func:`save_checkpoint`, :func:`load_checkpoint`, both atomic on save), the resume check
(:func:`existing_checkpoint`) and :func:`load_run`. A file that cannot be read or written
raises :class:`RunFileError`: one line naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig

#: how a non-finite float is written in the records (JSON has no Infinity or NaN)
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class RunFileError(OSError):
    """A run folder's file cannot be read or written; the message names it and the fix."""


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        """``config.json``."""
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``."""
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        """``checkpoint.pt``."""
        return self.root / "checkpoint.pt"

    @property
    def monitor(self) -> Path:
        """``monitor.jsonl``."""
        return self.root / "monitor.jsonl"

    @property
    def tensorboard(self) -> Path:
        """``tensorboard/``."""
        return self.root / "tensorboard"

    def holds_run(self) -> bool:
        """Whether a run was started here (records or a checkpoint exist)."""
        return self.root.exists() and (self.metrics.exists() or self.checkpoint.exists())


def run_dir_for(config: TrainConfig, out: str | os.PathLike) -> Path:
    """The folder of a resolved config: ``<out>/<problem>/<label>__lr<lr>__seed<seed>``,
    unless that holds a run of another configuration; then
    :meth:`~msvag_mb.runner.config.TrainConfig.detailed_run_name`, which no other
    configuration shares. A run keeps its folder: the first configuration to take a plain
    name keeps it, so existing folders resume under the same arguments."""
    plain = RunFiles(Path(out) / config.problem / config.run_name())
    if not plain.holds_run() or not differing_fields(plain, config):
        return plain.root
    return plain.root.parent / config.detailed_run_name()


def holds_run_of(config: TrainConfig, out: str | os.PathLike) -> bool:
    """Whether a run of ``config`` (resolved) was started below ``out``."""
    files = RunFiles(run_dir_for(config, out))
    return files.holds_run() and not differing_fields(files, config)


def files_for(config: TrainConfig, out: str | os.PathLike, *, resume: bool) -> RunFiles:
    """The run folder's files of ``config`` (resolved; :func:`run_dir_for`); ``resume``
    refuses when no run of ``config`` exists but its plain name holds another's, which
    the user probably meant to continue."""
    files = RunFiles(run_dir_for(config, out))
    plain = RunFiles(Path(out) / config.problem / config.run_name())
    if resume and files.root != plain.root and not files.holds_run():
        raise ValueError(f"cannot resume {plain.root}: it holds a run of other settings "
                         f"({differing_fields(plain, config)}) and no run of these settings "
                         "exists; use that run's arguments to continue it, or drop --resume "
                         f"to start a new run (in {files.root.name})")
    return files


# -- records -----------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its string (standard JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _decoded(record: Any) -> Any:
    if isinstance(record, dict):
        return {key: _NON_FINITE.get(item, item) if isinstance(item, str) else item
                for key, item in record.items()}
    return record


def record_line(record: dict[str, Any]) -> str:
    """One record as a line of standard JSON (non-finite numbers as strings)."""
    return json.dumps(_finite(record), allow_nan=False) + "\n"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (none if it does not exist). A last line cut short (a
    kill or a full disk while it was written) is dropped with a warning; any other line
    that is not a JSON record raises :class:`RunFileError` naming the file and line."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise RunFileError(f"cannot read {path} ({error}); restore it or delete it") from error
    records = []
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if position == len(numbered) - 1:
                warnings.warn(f"{path}: dropped line {number}, cut short ({error})",
                              stacklevel=2)
                break
            raise RunFileError(f"{path}, line {number}, is not a JSON record ({error}); "
                               "delete that line or restore the file") from error
        records.append(_decoded(record))
    return records


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a JSONL file by ``records`` (atomically: a temporary file, then a rename)."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write("".join(record_line(record) for record in records))
        os.replace(tmp, path)
    except BaseException as error:  # a full disk, or a second Ctrl-C: no *.tmp stays
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(path, error) from error
        raise


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Add one record at the end of a JSONL file (one write of the whole line)."""
    try:
        with open(path, "a") as handle:
            handle.write(record_line(record))
    except OSError as error:
        raise _write_error(path, error) from error


def _write_error(path: Path, error: BaseException) -> RunFileError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RunFileError(f"could not write {path} ({reason[:160]}): free disk space or fix "
                        f"the permissions of {path.parent}, then rerun with --resume")


# -- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, then a rename: a checkpoint is whole or absent
    (a failed save removes the temporary file and leaves the previous checkpoint)."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as error:  # a full disk, or a second Ctrl-C: no *.tmp stays
        tmp.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):  # full disk: inline_container.cc
            raise _write_error(path, error) from error
        raise


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint of :func:`save_checkpoint`, its tensors on ``device``."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a checkpoint of msvag-train")
    except Exception as error:  # truncated zip: OSError, RuntimeError, EOFError, ...
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else \
            type(error).__name__
        raise RunFileError(f"cannot resume from {path}: it is damaged ({reason}); restore "
                           "it from a copy, or pass --overwrite to train the run again") \
            from error
    return state


# -- config.json and the resume check ----------------------------------------------------------
def write_config(files: RunFiles, config: TrainConfig) -> None:
    """Create the folder and write ``config.json``."""
    try:
        files.root.mkdir(parents=True, exist_ok=True)
        files.config.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    except OSError as error:
        raise RunFileError(f"cannot write {files.config} ({error.strerror or error}); pass "
                           "--out a folder you can write to") from error


def _saved_config(files: RunFiles) -> dict[str, Any]:
    """``config.json`` as a dict, through :class:`TrainConfig` so that a field added since
    the run was saved is defaulted (a field this version does not know stays, and differs)."""
    try:
        saved = json.loads(files.config.read_text())
    except (OSError, ValueError) as error:
        raise RunFileError(f"cannot read {files.config} ({error}); restore it, or pass "
                           "--overwrite to train the run again") from error
    try:
        return dataclasses.asdict(TrainConfig(**saved))
    except TypeError:
        return saved


def differing_fields(files: RunFiles, config: TrainConfig) -> str:
    """The settings in which the run saved in ``files`` differs from ``config``
    (``"beta: 0.5 there, 0.9 here"``; empty if none, or if no ``config.json`` exists)."""
    if not files.config.exists():
        return ""
    saved, wanted = _saved_config(files), dataclasses.asdict(config)
    return "; ".join(f"{field}: {_shown(saved, field)} there, {_shown(wanted, field)} here"
                     for field in sorted(set(saved) | set(wanted))
                     if field not in saved or field not in wanted
                     or saved[field] != wanted[field])


def _shown(values: dict[str, Any], field: str) -> str:
    return repr(values[field]) if field in values else "unset"


def existing_checkpoint(files: RunFiles, config: TrainConfig, *, resume: bool,
                        overwrite: bool, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint to resume from, or ``None`` to start afresh; refuses to resume a
    different config, to replace a run that was asked for neither, and to replace a run of
    another configuration at all."""
    if not files.holds_run():
        return None
    differences = differing_fields(files, config)
    if differences and (resume or overwrite):
        raise ValueError(f"cannot {'resume' if resume else 'replace'} {files.root}: it holds "
                         f"a run of other settings ({differences}); use those arguments, "
                         "or another --out")
    if overwrite:
        return None
    if resume and files.checkpoint.exists():
        return load_checkpoint(files.checkpoint, device)
    if resume and [r["step"] for r in read_records(files.metrics)] in ([], [0]):
        return None  # stopped before its first checkpoint: nothing to lose
    if resume:
        raise FileExistsError(f"{files.root} holds records but no checkpoint.pt to resume "
                              "from; pass --overwrite to train the run again")
    raise FileExistsError(f"{files.root} already holds a run; pass --resume to continue it "
                          "or --overwrite to start it again")


def load_run(run_dir: str | os.PathLike) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """Config and records of a run folder."""
    files = RunFiles(Path(run_dir))
    try:
        config = TrainConfig(**json.loads(files.config.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise RunFileError(f"cannot read {files.config} ({error})") from error
    return config, read_records(files.metrics)
