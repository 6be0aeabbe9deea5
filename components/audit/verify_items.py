"""One checked item of `medtune verify`: its status and the record every check returns."""

from __future__ import annotations

from typing import Any

OK, MISMATCH, MISSING = "ok", "mismatch", "missing"


def item(
    name: str,
    kind: str,
    status: str,
    path: Any = None,
    expected: str | None = None,
    actual: str | None = None,
    detail: str = "",
) -> dict[str, Any]:
    return {
        "item": name,
        "kind": kind,
        "status": status,
        "path": None if path is None else str(path),
        "expected": expected,
        "actual": actual,
        "detail": detail,
    }
