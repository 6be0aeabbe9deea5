"""Text people read, laid out in one place: documents are Jinja2 templates, terminal tables format_table.

    from components.templates import render, format_table
    md = render("data/templates/validation.md.j2", report=report)      # a document (Markdown, a report)
    print(format_table(rows, ["model_id", "date", "status"]))         # a column table for a terminal

A template lives beside the code that fills it, in components/<folder>/templates/, and is named by its
path under components/: the same path, with `components/` in front, is what a dvc.yaml stage lists in
its deps when its code renders it (tests/test_dvc_yaml.py checks that). The code computes the values;
a template only lays them out. Inside a template, `format_table` is available as a function too.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

COMPONENTS = Path(__file__).resolve().parent


@functools.cache
def environment() -> jinja2.Environment:
    """The one Jinja2 environment: templates under components/, a missing field an error (StrictUndefined:
    never a silently empty cell in a report), block tags that leave no blank lines behind them."""
    import jinja2  # here, not at the top: `medtune --help` and format_table's users import nothing

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(COMPONENTS),
        undefined=jinja2.StrictUndefined,
        # Markdown and plain text are not HTML: escaping would turn "a < b" into "a &lt; b".
        autoescape=jinja2.select_autoescape(("html", "htm", "xml"), default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals["format_table"] = format_table
    return env


def render(template_name: str, **context: Any) -> str:
    """The template components/<template_name> filled with `context`. A field the template reads and the
    context lacks is a ValueError naming the template file and line."""
    import jinja2

    template = environment().get_template(template_name)
    try:
        return template.render(**context)
    except jinja2.UndefinedError as exc:
        # Jinja rewrites the traceback so that its frames point into the template file.
        line = next(
            (frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == template.filename),
            "?",
        )
        raise ValueError(
            f"{template.filename}:{line}: {exc}; the code that renders {template_name} must give that field"
        ) from exc


def format_table(
    rows: Iterable[Sequence[Any]], columns: Sequence[str] | None = None, align: str = "", sep: str = "  "
) -> str:
    """Rows as aligned text columns, under a header line of `columns` when given. Each column is as
    wide as its widest cell; `align` has one '<' (left, the default) or '>' (right) per column. No line
    ends in spaces (the last column is not padded)."""
    table = ([[str(c) for c in columns]] if columns is not None else []) + [[str(c) for c in row] for row in rows]
    if not table:
        return ""
    n = len(table[0])
    align = align or "<" * n
    if len(align) != n or set(align) - {"<", ">"}:
        raise ValueError(f"format_table: align {align!r} must be one of '<' or '>' for each of the {n} columns")
    for i, row in enumerate(table[1 if columns is not None else 0 :], start=1):
        if len(row) != n:
            raise ValueError(f"format_table: row {i} has {len(row)} cells, expected {n}: {row}")
    widths = [max(len(row[i]) for row in table) for i in range(n)]
    return "\n".join(sep.join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip() for row in table)
