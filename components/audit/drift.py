"""How a model's data compares with its predecessor's (`medtune trace`'s drift section): files added,
removed and changed, the class balance and the image statistics of two manifests.

    drift(new_rows, old_rows)     # manifest rows (read_manifest_rows) of this model and the previous one

A regression's manifests hold each scan's target as its label (text): `drift(..., regression=True)` compares
the targets' distribution (n, min, median, mean, max) instead of a class balance.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any


def _numeric(rows: list[dict[str, str]], col: str) -> dict[str, Any]:
    vals = [float(r[col]) for r in rows if (r.get(col) or "").strip()]
    if not vals:
        return {"n": 0}
    return {
        "n": len(vals),
        "min": min(vals),
        "median": statistics.median(vals),
        "mean": round(statistics.fmean(vals), 3),
        "max": max(vals),
    }


def data_profile(rows: list[dict[str, str]]) -> dict[str, Any]:
    """Class balance and image statistics of one manifest (readable images only)."""
    ok = [r for r in rows if not r.get("error")]
    labels = Counter(r.get("label", "") for r in ok)
    return {
        "n_images": len(rows),
        "n_readable": len(ok),
        "classes": {k: {"n": n, "fraction": round(n / len(ok), 4)} for k, n in sorted(labels.items())} if ok else {},
        "width": _numeric(ok, "width"),
        "height": _numeric(ok, "height"),
        "bit_depth": dict(sorted(Counter(f"{r.get('bit_depth', '')}-bit" for r in ok).items())),
        "channels": dict(sorted(Counter(f"{r.get('channels', '')}-channel" for r in ok).items())),
        "modality": dict(sorted(Counter(r.get("modality", "") for r in ok).items())),
    }


def drift(new_rows: list[dict[str, str]], old_rows: list[dict[str, str]], regression: bool = False) -> dict[str, Any]:
    """How the new manifest compares with the previous one: files, class balance (a regression: the
    targets' distribution), image statistics."""
    new, old = data_profile(new_rows), data_profile(old_rows)
    new_files = {r["path"]: r["sha256"] for r in new_rows}
    old_files = {r["path"]: r["sha256"] for r in old_rows}
    if regression:
        new["classes"] = old["classes"] = {}  # one "class" per distinct target value says nothing
    classes = sorted(set(new["classes"]) | set(old["classes"]))
    balance = {}
    for c in classes:
        a, b = old["classes"].get(c, {"n": 0, "fraction": 0.0}), new["classes"].get(c, {"n": 0, "fraction": 0.0})
        balance[c] = {
            "previous": a["n"],
            "current": b["n"],
            "previous_fraction": a["fraction"],
            "current_fraction": b["fraction"],
            "fraction_change": round(b["fraction"] - a["fraction"], 4),
        }
    summary = []
    biggest = max(balance.items(), key=lambda kv: abs(kv[1]["fraction_change"]), default=None)
    if biggest:
        summary.append(
            f"largest class-balance change: {biggest[0]} {biggest[1]['previous_fraction']:.1%} -> "
            f"{biggest[1]['current_fraction']:.1%}"
        )
    for col in ("width", "height"):
        if old[col].get("n") and new[col].get("n"):
            summary.append(f"{col} median {old[col]['median']:g} -> {new[col]['median']:g} px")
    for col in ("bit_depth", "channels", "modality"):
        if set(old[col]) != set(new[col]):
            summary.append(f"{col} values {sorted(old[col])} -> {sorted(new[col])}")
    target = None
    if regression:
        target = {
            when: _numeric([r for r in rows if not r.get("error")], "label")
            for when, rows in (("previous", old_rows), ("current", new_rows))
        }
        if target["previous"]["n"] and target["current"]["n"]:
            summary.insert(
                0,
                f"target median {target['previous']['median']:g} -> {target['current']['median']:g}, mean {target['previous']['mean']:g} -> {target['current']['mean']:g}",
            )
    if not summary[1:] and biggest and abs(biggest[1]["fraction_change"]) < 0.05:
        summary.append("no notable change in class balance or image statistics")
    return {
        "files": {
            "previous": len(old_files),
            "current": len(new_files),
            "added": len(new_files.keys() - old_files.keys()),
            "removed": len(old_files.keys() - new_files.keys()),
            "changed": sum(1 for p in new_files.keys() & old_files.keys() if new_files[p] != old_files[p]),
        },
        **({"target": target} if regression else {"class_balance": balance}),
        "image_stats": {
            col: {"previous": old[col], "current": new[col]}
            for col in ("width", "height", "bit_depth", "channels", "modality")
        },
        "summary": summary,
    }
