"""What a run returns (:class:`RunResult`) and the plain-text table of several (:func:`summarize`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import TrainConfig


@dataclass
class RunResult:
    """What :func:`~msvag_mb.runner.train` returns."""

    run_dir: Path
    config: TrainConfig
    records: list[dict[str, Any]]
    diverged: bool
    completed: bool
    #: the trained model (not saved by this object; the checkpoint holds it)
    model: nn.Module | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last record (the final evaluation, or the divergence)."""
        return self.records[-1]

    @property
    def best_test_accuracy(self) -> float:
        """Highest test accuracy over the records (NaN if none was evaluated)."""
        values = [r["test_accuracy"] for r in self.records if r.get("test_accuracy") is not None]
        return max(values) if values else float("nan")


def summarize(results: list[RunResult]) -> str:
    """A plain-text table of final train loss and test accuracy per run."""
    lines = [f"{'method':<28} {'lr':>8} {'seed':>4} {'train loss':>10} {'test loss':>9} "
             f"{'test acc':>8} {'best acc':>8}"]
    for result in results:
        final = result.final
        if result.diverged:
            lines.append(f"{result.config.display_name:<28} {result.config.lr:>8g} "
                         f"{result.config.seed:>4} {'diverged at step ' + str(final['step']):>30}")
            continue
        lines.append(
            f"{result.config.display_name:<28} {result.config.lr:>8g} {result.config.seed:>4} "
            f"{final['train_loss']:>10.4f} {final['test_loss']:>9.4f} "
            f"{final['test_accuracy']:>8.4f} {result.best_test_accuracy:>8.4f}"
        )
    return "\n".join(lines)


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (a diverged run records NaN losses)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def differing_records(recorded: list[dict[str, Any]], rerun: list[dict[str, Any]],
                      until: int) -> list[str]:
    """How the records of a rerun differ from the recorded ones up to step ``until``
    (empty: identical, bit for bit, in every field); a record missing on either side is a
    difference."""
    wanted = {r["step"]: r for r in recorded if r["step"] <= until}
    got = {r["step"]: r for r in rerun if r["step"] <= until}
    differences = [f"step {step}: only in the {'recorded run' if step in wanted else 'rerun'}"
                   for step in sorted(set(wanted) ^ set(got))]
    for step in sorted(set(wanted) & set(got)):
        fields = sorted(k for k in set(wanted[step]) | set(got[step])
                        if not _same(wanted[step].get(k), got[step].get(k)))
        differences += [f"step {step}: {k} recorded {wanted[step].get(k)!r}, rerun "
                        f"{got[step].get(k)!r}" for k in fields]
    return differences

