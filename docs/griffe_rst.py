"""Griffe extension: turn the reST markup of msvag_mb's docstrings into Markdown.

The docstrings are Google style (sections ``Args:``, ``Returns:``...) but their prose uses
reST/Sphinx markup, which mkdocstrings would show as raw text. Before the docstrings are
parsed, this extension rewrites, outside code blocks:

* roles ``:class:`~a.b.C``` (also ``:func:``, ``:meth:``, ``:attr:``, ``:mod:``,
  ``:data:``, ``:exc:``, ``:obj:``, ``:const:``) into inline code that links to the
  object's entry in the API reference when it has one (an *optional* autorefs
  cross-reference: a target that is not documented, e.g. a private helper, stays plain
  code and raises no warning). ``~`` keeps the last component as the title, as in Sphinx;
  functions and methods get ``()``;
* ``:math:`x``` into ``\\(x\\)`` and ``.. math::`` directives into ``\\[ ... \\]`` blocks
  (rendered by ``pymdownx.arithmatex`` and MathJax);
* double-backtick literals ````x```` into single-backtick code;
* hyperlinks ```text <url>`_`` into ``[text](url)``;
* reST simple tables (``=====  ====`` borders) into pipe tables;
* ``.. code-block:: lang`` (``.. code::``, ``.. sourcecode::``) directives and ``::``
  literal blocks into fenced code blocks (``::`` blocks are Python, as in Sphinx), keeping
  the indentation so that blocks inside Google sections stay inside them.

Enabled in ``mkdocs.yml``::

    plugins:
      - mkdocstrings:
          handlers:
            python:
              options:
                extensions: [docs/griffe_rst.py:ReSTToMarkdown]
"""

from __future__ import annotations

import re
import textwrap
from typing import Any, Callable

import griffe

__all__ = ["ReSTToMarkdown", "rst_to_markdown"]

_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\.\s+(?P<name>code-block|code|sourcecode|math)::"
                        r"\s*(?P<argument>.*?)\s*$")
_ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|attr|mod|data|exc|obj|const):"
                   r"`(?P<target>[^`]+)`")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_LITERAL = re.compile(r"(?<!`)``(?P<code>[^`]+?)``(?!`)")
_LINK = re.compile(r"`(?P<text>[^`<]+?)\s*<(?P<url>[^>`]+)>`__?")
_EXPLICIT_TITLE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^>]+)>$", re.DOTALL)

# a line griffe's Google parser would take for a section header ("Example:", "Note:" ...)
_SECTION_TITLE = re.compile(r"^\s*(?:[A-Z][a-z]+)(?: [a-z]+)?:$")

Resolver = Callable[[str], "str | None"]


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _take_block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """Lines from ``start`` indented deeper than ``base`` (blank lines included); skips
    directive options (``:linenos:``) and trailing blank lines. Returns (lines, next index)."""
    i = start
    while i < len(lines) and lines[i].strip().startswith(":") and _indent_of(lines[i]) > base:
        i += 1  # directive options
    body: list[str] = []
    while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > base):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
        i -= 1
    while body and not body[0].strip():
        body.pop(0)
    return body, i


_TABLE_BORDER = re.compile(r"^\s*=+(?: +=+)+\s*$")


def _simple_table(lines: list[str], start: int) -> tuple[list[str], int] | None:
    """A reST simple table starting at ``lines[start]`` (a border of ``=`` runs) as a
    Markdown pipe table, with the index after it; ``None`` if it is not one."""
    border = lines[start]
    spans = [m.span() for m in re.finditer(r"=+", border)]
    borders = [start]
    i = start + 1
    while i < len(lines) and lines[i].strip() and len(borders) < 3:
        if lines[i].rstrip() == border.rstrip():
            borders.append(i)
        i += 1
    if len(borders) == 2:  # a table without header: border, rows, border
        header, body = None, range(borders[0] + 1, borders[1])
    elif len(borders) == 3:
        header, body = range(borders[0] + 1, borders[1]), range(borders[1] + 1, borders[2])
    else:
        return None

    def cells(row: str) -> list[str]:
        starts = [a for a, _ in spans]  # a cell runs to the next column (forgiving)
        ends = starts[1:] + [len(row)]
        return [row[a:e].strip().replace("|", "\\|") for a, e in zip(starts, ends)]

    indent = border[:_indent_of(border)]
    head = [" ".join(c) for c in zip(*(cells(lines[r]) for r in header))] if header else \
        [""] * len(spans)
    table = ["", indent + "| " + " | ".join(head) + " |",
             indent + "|" + "|".join("---" for _ in spans) + "|"]
    table += [indent + "| " + " | ".join(cells(lines[r])) + " |" for r in body]
    return table + [""], borders[-1] + 1


def _fence(body: list[str], indent: str, language: str) -> list[str]:
    dedented = textwrap.dedent("\n".join(body)).splitlines()
    return ["", f"{indent}```{language}", *(f"{indent}{line}" if line.strip() else ""
                                           for line in dedented), f"{indent}```", ""]


def _convert_inline(text: str, resolve: Resolver) -> str:
    def role(match: re.Match) -> str:
        kind, target = match["role"], match["target"].strip()
        explicit = _EXPLICIT_TITLE.match(target)
        if explicit:
            title, target = explicit["title"], explicit["target"].strip()
        else:
            short = target.startswith("~")
            target = target.lstrip("~.")
            title = target.rsplit(".", 1)[-1] if short else target
            if kind in ("func", "meth"):
                title += "()"
        identifier = resolve(target)
        if identifier is None:
            return f"`{title}`"
        return f'<code><autoref identifier="{identifier}" optional>{title}</autoref></code>'

    text = _MATH_ROLE.sub(lambda m: rf"\({m['tex']}\)", text)
    text = _ROLE.sub(role, text)
    text = _LINK.sub(lambda m: f"[{m['text']}]({m['url']})", text)
    return _LITERAL.sub(lambda m: f"`{m['code']}`", text)


def rst_to_markdown(text: str, resolve: Resolver = lambda name: None) -> str:
    """Convert the reST markup of one docstring to Markdown (see the module docstring).

    Args:
        text: the docstring, already dedented (``griffe.Docstring.value``).
        resolve: maps a role's target to the identifier of its API entry, or ``None``
            for plain code without a link.

    Returns:
        The Markdown text.
    """
    lines = text.splitlines()
    out: list[str] = []  # finished lines
    prose: list[str] = []  # pending lines outside code, converted together (roles may wrap)

    def flush() -> None:
        if prose:
            out.extend(_convert_inline("\n".join(prose), resolve).split("\n"))
            prose.clear()

    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(("```", "~~~")):
            flush()
            in_fence = not in_fence
            out.append(line)
            i += 1
            continue
        if in_fence:
            out.append(line)
            i += 1
            continue
        directive = _DIRECTIVE.match(line)
        if directive:
            flush()
            indent = directive["indent"]
            body, i = _take_block(lines, i + 1, len(indent))
            if directive["name"] == "math":
                tex = ([directive["argument"]] if directive["argument"] else []) + body
                tex = textwrap.dedent("\n".join(tex)).splitlines()
                out.extend(["", f"{indent}\\[", *(f"{indent}{t}" for t in tex),
                            f"{indent}\\]", ""])
            else:
                out.extend(_fence(body, indent, directive["argument"] or "text"))
            continue
        table = _simple_table(lines, i) if _TABLE_BORDER.match(line) else None
        if table is not None:
            prose.extend(table[0])  # cells may hold roles and literals
            i = table[1]
            continue
        if line.rstrip().endswith("::") and not line.strip().startswith(".."):
            body, following = _take_block(lines, i + 1, _indent_of(line))
            if body:
                stripped = line.rstrip()[:-2].rstrip()
                if stripped:  # "Example::" -> "Example:", "text ::" -> "text"
                    stripped += ":" if line.rstrip()[-3] != " " else ""
                    if _SECTION_TITLE.match(stripped):  # not a Google section: bold text
                        stripped = f"{_indent_of(stripped) * ' '}**{stripped.strip()}**"
                    prose.append(stripped)
                flush()
                # at the top level the fence starts at the margin (deeper would make it an
                # indented code block); inside a Google section item it must stay indented
                # as the item's continuation lines are
                depth = _indent_of(line) and min(_indent_of(b) for b in body if b.strip())
                out.extend(_fence(body, " " * depth, "python"))
                i = following
                continue
        prose.append(line)
        i += 1
    flush()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")


def _resolver(obj: griffe.Object) -> Resolver:
    """Resolve a role's target in ``obj``'s scope (its members, then its parents')."""
    package = obj.package.name

    def resolve(target: str) -> str | None:
        if target.split(".", 1)[0] == package:
            return target
        head, _, rest = target.partition(".")
        try:
            resolved = obj.resolve(head)
        except Exception:  # noqa: BLE001 - unknown name: plain code, no link
            return None
        return f"{resolved}.{rest}" if rest else resolved

    return resolve


class ReSTToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded package from reST markup to Markdown."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Convert the docstrings of ``pkg`` and all its (non-alias) members, once."""
        self._convert_tree(pkg, seen=set())

    def _convert_tree(self, obj: griffe.Object, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        docstring = obj.docstring
        if docstring is not None and not getattr(docstring, "_rst_converted", False):
            docstring.value = rst_to_markdown(docstring.value, _resolver(obj))
            docstring._rst_converted = True
        for member in obj.members.values():
            if not member.is_alias:
                self._convert_tree(member, seen)
