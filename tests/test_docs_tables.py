"""The tables of the docs name what the registries hold: every layer type with an extension
(``EXTENSIONS``), every engine (``ENGINES``) and ``auto``'s order (``auto_priority``). A
newly registered layer or engine fails here until the docs say what it does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from msvag_mb.engines import ENGINES, auto_candidates
from msvag_mb.extensions import EXTENSIONS
from msvag_mb.runner import engine_choices

ROOT = Path(__file__).resolve().parents[1]
ENGINES_PAGE = ROOT / "docs" / "engines.md"
README = ROOT / "README.md"
#: the words of the engine table's `auto` order column
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")


def table(path: Path, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the rows (lists of cells) of the Markdown table in ``path``
    whose first header cell is ``first_header``."""
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        cells = _cells(line)
        if cells and cells[0] == first_header:
            rows = []
            for row in lines[index + 2:]:  # past the |---| line
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            return cells, rows
    raise AssertionError(f"{path.relative_to(ROOT)} has no table headed '| {first_header} |'")


def _cells(line: str) -> list[str]:
    if not line.startswith("|"):
        return []
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def code_names(cell: str) -> list[str]:
    """The names in backticks in ``cell``, the doc's compact forms expanded: `X1d/2d/3d`
    is X1d, X2d and X3d; `TransformerEncoderLayer`/`DecoderLayer` names both."""
    names = []
    for code in re.findall(r"`([^`]+)`", cell):
        first, *others = code.split("/")
        names.append(first)
        for other in others:
            suffix = re.fullmatch(r"\d+d", other)
            names.append(re.sub(r"\d+d$", other, first) if suffix else other)
    return names


def _engine_name(cell: str) -> str:
    names = code_names(cell)
    assert len(names) == 1, f"an engine cell names one engine in backticks: {cell!r}"
    return names[0]


# -- docs/engines.md: the layer table -----------------------------------------------------
LAYER_TABLE = "layer (with parameters)"


def test_code_names_expands_the_compact_forms():
    assert code_names("`BatchNorm1d/2d/3d` in eval mode, `Conv1d`") == [
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Conv1d"]
    assert code_names("`TransformerEncoderLayer`/`DecoderLayer`") == [
        "TransformerEncoderLayer", "DecoderLayer"]


@pytest.mark.parametrize("layer_type", sorted(EXTENSIONS, key=lambda t: t.__name__),
                         ids=lambda t: t.__name__)
def test_every_registered_layer_type_has_a_row_in_the_layer_table(layer_type):
    header, rows = table(ENGINES_PAGE, LAYER_TABLE)
    extensions_column = 1 + [_engine_name(cell) for cell in header[1:]].index("extensions")
    # the generic fallback's row names modules that have no extension of their own
    named = {name for row in rows if "fallback" not in row[extensions_column]
             for name in code_names(row[0])}
    assert layer_type.__name__ in named, (
        f"{layer_type.__name__} has an extension (extensions/) but no row of the table "
        f"'| {LAYER_TABLE} |' in docs/engines.md names it (the generic fallback's row does "
        "not count): add it to a row, with what each engine does with it")


def test_every_column_of_the_layer_table_is_a_registered_engine():
    header, rows = table(ENGINES_PAGE, LAYER_TABLE)
    columns = [_engine_name(cell) for cell in header[1:]]
    unknown = [name for name in columns if name not in ENGINES]
    assert not unknown, f"docs/engines.md's layer table has columns {unknown}, not in ENGINES"
    assert all(len(row) == len(header) for row in rows), "a row with a missing cell"
    per_example = {name for name, cls in ENGINES.items()
                   if cls.units_are_examples and not cls.needs_distributed}
    assert per_example <= set(columns), (
        f"per-example engines {sorted(per_example - set(columns))} have no column in the "
        "layer table of docs/engines.md")


# -- docs/engines.md: the engine table ----------------------------------------------------
def test_the_engine_table_lists_every_registered_engine_in_autos_order():
    _, rows = table(ENGINES_PAGE, "engine")
    documented = {_engine_name(row[0]): row[-1] for row in rows}
    assert set(documented) == set(ENGINES), (
        f"docs/engines.md's engine table lists {sorted(documented)}, the registry ENGINES "
        f"holds {sorted(ENGINES)}")
    order = [cls.name for cls in auto_candidates()]
    for name, cell in documented.items():
        expected = ORDINALS[order.index(name)] if name in order else "never"
        assert cell.startswith(expected), (
            f"docs/engines.md: `{name}` is tried {expected} by auto (auto_priority "
            f"{ENGINES[name].auto_priority}), the table says {cell!r}")


# -- README.md -----------------------------------------------------------------------------
def test_the_readme_engine_table_lists_the_engines_a_run_can_choose():
    """README's table names what ``--engine`` offers (the engines that run on one process,
    and ``auto``); ``auto``'s row names the engines it tries, in its order."""
    _, rows = table(README, "engine")
    documented = {_engine_name(row[0]): row for row in rows}
    assert set(documented) == set(engine_choices()), (
        f"README.md's engine table lists {sorted(documented)}, --engine offers "
        f"{sorted(engine_choices())}")
    tried = [name for cell in documented["auto"][1:] for name in code_names(cell)]
    assert tried == [cls.name for cls in auto_candidates()], (
        f"README.md: auto tries {[cls.name for cls in auto_candidates()]}, its row says "
        f"{tried}")
