"""components/templates.py: the shared Jinja2 environment and the terminal table helper."""

from __future__ import annotations

import re

import pytest

from components.templates import COMPONENTS, environment, format_table, render


def test_format_table_aligns_each_column_to_its_widest_cell():
    text = format_table([["a", 1, "x"], ["bbbb", 22, "yy"]], ["name", "n", "last"], align="<><")
    assert text.splitlines() == ["name   n  last", "a      1  x", "bbbb  22  yy"]


def test_format_table_without_header_and_without_trailing_spaces():
    text = format_table([("train", "ran"), ("export", "cached (unchanged)"), ("x", "")])
    assert text.splitlines() == ["train   ran", "export  cached (unchanged)", "x"]
    assert format_table([]) == ""


@pytest.mark.parametrize(
    "rows, align, message",
    [
        ([["a", "b"], ["c"]], "", "row 2 has 1 cells, expected 2"),
        ([["a", "b"]], "<", "align '<' must be one of '<' or '>' for each of the 2 columns"),
        ([["a", "b"]], "<^", "align '<^'"),
    ],
)
def test_format_table_refuses_ragged_rows_and_bad_alignment(rows, align, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        format_table(rows, ["h1", "h2"], align=align)


def test_templates_are_not_html_escaped_and_missing_fields_name_file_and_line(tmp_path, monkeypatch):
    env = environment()
    assert env.from_string("{{ x }}").render(x="a < b & c") == "a < b & c"
    # A template whose field the caller forgot: the error names the template file and the line.
    name = "data/templates/validation.md.j2"
    with pytest.raises(ValueError, match=rf"{COMPONENTS / name}:\d+: .*must give that field"):
        render(name, report={"success": True})
