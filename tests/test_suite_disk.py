"""The suite's own footprint: the workspaces a module shares are removed when the module ends
(tests/conftest.py module_tmp), so the suite's disk use is its largest modules', not their sum."""

from __future__ import annotations

import re

from tests.workspace import ROOT

pytest_plugins = ["pytester"]

INNER = """
import pytest

def test_writes(module_tmp):
    (module_tmp / "model.onnx").write_bytes(b"0" * 1024)
    assert {verdict}
"""


def folders_left(pytester, verdict: str) -> list:
    pytester.makeconftest("from tests.conftest import module_tmp  # noqa: F401")
    pytester.makepyfile(test_inner=INNER.format(verdict=verdict))
    base = pytester.path / "basetemp"
    result = pytester.runpytest_inprocess(f"--basetemp={base}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=verdict == "True", failed=verdict != "True")
    assert base.is_dir()
    return sorted(p for p in base.glob("test_inner*") if not p.is_symlink())


def test_a_passing_modules_folder_is_removed_and_a_failing_ones_kept(pytester, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    assert folders_left(pytester, "True") == []
    kept = folders_left(pytester, "False")
    assert len(kept) == 1 and (kept[0] / "model.onnx").stat().st_size == 1024


def test_module_wide_folders_come_from_module_tmp():
    """tmp_path_factory's folders live to the session's end: only conftest's own fixtures may use it."""
    direct = [
        p.name
        for p in (ROOT / "tests").glob("*.py")
        if p.name != "conftest.py" and re.search(r"tmp_path_factory\.(mktemp|getbasetemp)", p.read_text())
    ]
    assert direct == [], f"{direct} call tmp_path_factory; a module's shared folder is the module_tmp fixture"
