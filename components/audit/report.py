"""`medtune report MODEL -o report.html`: one model's audit report, a single self-contained HTML file.

    medtune report current -o report.html                  # the champion
    medtune report models/model.onnx -o /media/usb/3f2a9c1e0b7d.html

MODEL is what `medtune trace` takes (an ONNX file, a model directory, a model id or prefix, `current`).
The file holds the 13 sections of the trace, and inside them the evidence: the validation report, the test
metrics with their intervals, the ROC and confusion plots, the training curves (drawn from DVCLive's
dvclive/plots/metrics/*.tsv), the augmentation preview, the explanation samples and the model card
(Markdown rendered to HTML, raw HTML and links left as text). Images are inlined as data: URIs and the
style is inline; there is no script, font or link to anything outside the file, and a Content-Security-
Policy forbids the browser to load any, so it opens the same on an air-gapped machine. The evidence files
come from the workspace or the model's release tag (components.audit.evidence); one that cannot be found
is named in the report and on the terminal, with why. A regression model's report shows MAE, RMSE and
R^2 with their intervals, the gain over the linear probe in MAE, and its predicted-vs-true scatter (drawn
from evaluate's reports/scatter.csv) where a classifier's shows the ROC and confusion plots.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.audit.evidence import Evidence, gather
from components.audit.trace import trace
from components.audit.trace_text import PUBLIC_SALT_NOTE, SECTIONS, TITLES, public_salt
from components.common import run_cli, write_text
from components.plots import figure, png_bytes
from components.release.model_card import interval_rows, value_probe
from components.release.records import NOT_RECORDED, load_lineage
from components.templates import render

TEMPLATE = "audit/templates/report.html.j2"
FIRST_METRICS = ("auroc", "sensitivity", "specificity", "precision", "accuracy", "balanced_accuracy", "f1")
VALUE_METRICS = ("mae", "rmse", "r2")  # a regression's, first in its table
VALUE_LABELS = {"mae": "MAE", "rmse": "RMSE", "r2": "R^2"}
# Numbers of a regression's record that are not test metrics: what its graph applies to the network's output.
NOT_METRICS = ("target_mean", "target_std")


def png_uri(blob: bytes) -> str:
    """The PNG as a data:image/png;base64 URI; ValueError when the bytes are not a readable PNG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            kind = im.format
            im.verify()
    except Exception as exc:  # noqa: BLE001 - Pillow raises several types for a broken file
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if kind != "PNG":
        raise ValueError(f"a {kind} image, expected PNG")
    return "data:image/png;base64," + base64.b64encode(blob).decode("ascii")


def read_curve(name: str, blob: bytes) -> list[tuple[float, float]]:
    """(step, value) rows of one DVCLive metric file (tab-separated; columns timestamp, step, <metric>)."""
    rows = list(csv.reader(io.StringIO(blob.decode("utf-8")), delimiter="\t"))
    if not rows or "step" not in rows[0] or len(rows[0]) < 2:
        raise ValueError(f"{name}: header {rows[0] if rows else 'missing'}; expected DVCLive's step and value columns")
    step, value = rows[0].index("step"), len(rows[0]) - 1
    points = []
    for n, row in enumerate(rows[1:], start=2):
        try:
            points.append((float(row[step]), float(row[value])))
        except (ValueError, IndexError):
            raise ValueError(f"{name} line {n}: {row!r}; expected a numeric step and value") from None
    return points


def curves_png(files: dict[str, bytes], best_epoch: Any) -> bytes:
    """The training curves: one panel per metric (loss, auroc, accuracy, lr), a line per split or member
    (`val/loss.tsv`, `member1/train/loss.tsv`), the kept epoch marked."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for rel, blob in files.items():
        parts = rel.removesuffix(".tsv").split("/")
        panels.setdefault(parts[-1], {})[" ".join(parts[:-1]) or parts[-1]] = read_curve(rel, blob)
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, ax = figure(4.5 * cols, 3.0 * rows)
    ax.remove()
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for axis, (metric, lines) in zip(axes, sorted(panels.items())):
        for label, points in sorted(lines.items()):
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
        if isinstance(best_epoch, int):
            axis.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"kept epoch {best_epoch}")
        axis.set_title(metric)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=7)
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    fig.tight_layout()
    return png_bytes(fig)


def scatter_png(blob: bytes) -> bytes:
    """A regression's predicted-vs-true plot from evaluate's scatter.csv (columns true,predicted), the line
    of perfect predictions drawn; ValueError when the file holds no points."""
    rows = list(csv.DictReader(io.StringIO(blob.decode("utf-8"))))
    try:
        points = [(float(r["true"]), float(r["predicted"])) for r in rows]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"scatter.csv: {rows[:1]}; expected numeric columns true,predicted") from None
    if not points:
        raise ValueError("scatter.csv holds no points (its header only)")
    true, pred = [p[0] for p in points], [p[1] for p in points]
    low, high = min(true + pred), max(true + pred)
    fig, ax = figure(4.5, 4.5)
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="predicted = true")
    ax.scatter(true, pred, s=12, alpha=0.7, label=f"test images ({len(points)})")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def markdown_html(text: str) -> str:
    """Markdown (the model card) as HTML: CommonMark plus tables; raw HTML is escaped, and links, images and
    link references stay text, so nothing in the card can load or point to anything outside the file."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table").disable(["image", "link", "autolink", "reference"])
    return md.render(text)


def metric_rows(metrics: Any) -> list[dict[str, Any]]:
    """The test metrics, each with its 95% interval where one is known: AUROC's bootstrap interval, the
    Wilson interval of each proportion (sensitivity, specificity, precision, accuracy), any `<name>_ci`."""
    if not isinstance(metrics, dict):
        return []
    try:  # a record without a confusion matrix (an older or a stand-in lineage) has no Wilson intervals
        wilson = {r["name"]: r for r in interval_rows(metrics)}
    except (KeyError, ValueError, IndexError, TypeError):
        wilson = {}
    first = VALUE_METRICS + FIRST_METRICS
    names = [k for k in first if k in metrics] + sorted(
        k for k in metrics if k not in first and _number(metrics[k]) and not _bookkeeping(k) and k not in NOT_METRICS
    )
    rows = []
    for name in names:
        ci, w = metrics.get(f"{name}_ci"), wilson.get(name)
        if isinstance(ci, list) and len(ci) == 2:
            # resamples are skipped for AUROC (one class only) and R^2 (targets all equal)
            valid = metrics.get("bootstrap_valid") if name in ("auroc", "r2") else None
            how = "bootstrap" + (f", {valid} valid resamples" if valid is not None else "")
            label = VALUE_LABELS.get(name, name)
            rows.append({"name": label, "value": metrics[name], "low": ci[0], "high": ci[1], "how": how})
        elif w:
            how = f"Wilson, {w['k']}/{w['n']}"
            rows.append({"name": name, "value": metrics[name], "low": w["low"], "high": w["high"], "how": how})
        else:
            rows.append({"name": name, "value": metrics[name], "low": None, "high": None, "how": ""})
    return rows


def probe_comparison(metrics: Any) -> dict[str, Any] | None:
    """The fine-tuned model against the linear probe of its starting backbone (evaluation.json's
    `linear_probe`): both models' metrics with intervals, and the AUROC gain with its paired interval."""
    probe = metrics.get("linear_probe") if isinstance(metrics, dict) else None
    if not isinstance(probe, dict):
        return None
    if metrics.get("task") == "regression":
        return value_probe(metrics)
    context = {k: metrics[k] for k in ("classes", "positive_class") if k in metrics}
    mine = {r["name"]: r for r in metric_rows(metrics)}
    theirs = {r["name"]: r for r in metric_rows({**probe, **context})}
    return {
        "rows": [(mine[k], theirs[k]) for k in FIRST_METRICS if k in mine and k in theirs],
        "gain": probe.get("auroc_gain"),
        "gain_ci": probe.get("auroc_gain_ci") or [None, None],
        "valid": probe.get("auroc_gain_bootstrap_valid"),
        "start": (probe.get("start") or {}).get("description") if isinstance(probe.get("start"), dict) else None,
    }


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bookkeeping(key: str) -> bool:
    return key.endswith(("_ci", "_ci_level")) or key.startswith("bootstrap") or key in ("n_test", "ci_level")


def scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "-"}[v]
    return str(v)


def inline(v: Any, limit: int = 100) -> str | None:
    """A mapping of plain values on one line, "a=1, b=x", when it fits in `limit` characters (else None)."""
    if not isinstance(v, dict) or not v or any(isinstance(x, dict) for x in v.values()):
        return None
    text = ", ".join(f"{k}={_flat(x)}" for k, x in v.items())
    return text if len(text) <= limit else None


def joined(v: Any, limit: int = 120) -> str | None:
    """A list of plain values on one line, "1, 2.5, x", when it fits in `limit` characters (else None)."""
    if not isinstance(v, list) or not v or any(isinstance(x, dict) for x in v):
        return None
    text = ", ".join(_flat(x) for x in v)
    return text if len(text) <= limit else None


def _flat(v: Any) -> str:
    return "[" + ", ".join(_flat(x) for x in v) + "]" if isinstance(v, list) else scalar(v)


def not_recorded(v: Any) -> bool:
    return isinstance(v, str) and v.startswith(NOT_RECORDED)


def _shown(ev: Evidence, **view: Any) -> dict[str, Any]:
    return {"title": ev.item.title, "path": ev.item.path, "source": ev.source, "why": ev.why, **view}


def _figure(ev: Evidence, make=lambda files: next(iter(files.values()))) -> dict[str, Any]:
    """A PNG item as a data: URI (`make` draws it from the files), or why it is not shown."""
    if not ev.found:
        return _shown(ev, uri=None)
    try:
        return _shown(ev, uri=png_uri(make(ev.files)))
    except ValueError as exc:
        return _shown(ev, uri=None, source=None, why=f"{ev.item.path}: {exc}")


GROUPS = {"tp": "true positive", "fp": "false positive", "tn": "true negative", "fn": "false negative"}


def sample_captions(index_blob: bytes | None) -> dict[str, str]:
    """{png file: caption} from the explanations' index.json (group, true and predicted class, probability,
    scan path); {} when there is none or it cannot be read (the file names then serve as captions)."""
    try:
        images = json.loads(index_blob or b"{}").get("images") or []
    except (ValueError, AttributeError):
        return {}
    captions = {}
    for x in images if isinstance(images, list) else []:
        if isinstance(x, dict) and x.get("file") and "target" in x:  # a regression's sample
            e = x.get("error")
            captions[str(x["file"])] = (
                f"{str(x.get('group') or '').replace('-', ' ')}: true {scalar(x.get('target'))}, predicted "
                f"{scalar(x.get('predicted'))}" + (f" (error {e:+.4g})" if _number(e) else "") + f"; {x.get('path')}"
            )
        elif isinstance(x, dict) and x.get("file"):
            p = x.get("probability")
            captions[str(x["file"])] = (
                f"{GROUPS.get(x.get('group'), x.get('group') or '')}: true {x.get('label')}, predicted "
                f"{x.get('predicted')}" + (f" (p = {p:.2f})" if _number(p) else "") + f"; {x.get('path')}"
            )
    return captions


def _samples(ev: Evidence) -> dict[str, Any]:
    captions = sample_captions(ev.files.get("index.json"))
    images = []
    for rel, blob in ev.files.items():
        if not rel.endswith(".png"):
            continue
        caption = captions.get(rel) or rel.removesuffix(".png").replace("/", " / ")
        try:
            images.append({"caption": caption, "uri": png_uri(blob), "why": None})
        except ValueError as exc:
            images.append({"caption": caption, "uri": None, "why": f"{ev.item.path}/{rel}: {exc}"})
    if ev.found and not images:
        return _shown(ev, images=[], source=None, why=f"no .png file under {ev.item.path}/ ({ev.source})")
    return _shown(ev, images=images)


def _validation(ev: Evidence) -> dict[str, Any]:
    if not ev.found:
        return _shown(ev, record=None)
    try:
        return _shown(ev, record=json.loads(next(iter(ev.files.values()))))
    except ValueError as exc:
        return _shown(ev, record=None, source=None, why=f"{ev.item.path} is not valid JSON ({exc})")


def shown(evidence: dict[str, Evidence], lineage: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the template shows of each evidence item: {title, path, source, why} and its figure's data:
    URI (`uri`), the explanation samples (`images`) or the validation record (`record`)."""
    best = (lineage.get("training") or {}).get("best_epoch")
    shows = {
        "validation": _validation,
        "training_curves": lambda ev: _figure(ev, lambda files: curves_png(files, best)),
        "scatter": lambda ev: _figure(ev, lambda files: scatter_png(next(iter(files.values())))),
        "explanations": _samples,
    }
    return {key: shows.get(key, _figure)(ev) for key, ev in evidence.items()}


def _section(rec: dict[str, Any], name: str) -> Any:
    sec = rec[name]
    if name == "code" and isinstance(sec.get("params"), dict):  # one line per parameter group
        sec = {**sec, "params": {k: inline(v, limit=10_000) or v for k, v in sec["params"].items()}}
    return sec


def report(model: str | Path, root: str | Path = ".") -> tuple[str, dict[str, Any]]:
    """(the HTML, a summary: model_id, data_version, git_commit, evidence {key: source or None}, missing
    [(title, why)], notes) of one model's audit report."""
    rec = trace(model, root)
    lineage = load_lineage(rec["resolved"]["lineage"])
    tag = rec["release"]["git_tag"]
    found, notes = gather(lineage, root, None if not_recorded(tag) else tag)
    evidence = shown(found, lineage)
    card = rec["model_card"]
    html = render(
        TEMPLATE,
        rec=rec,
        sections=[(name, TITLES[name], _section(rec, name)) for name in SECTIONS],
        evidence=evidence,
        notes=notes,
        metric_rows=metric_rows(rec["evaluation"]["metrics"]),
        probe=probe_comparison(rec["evaluation"]["metrics"]),
        regression=isinstance(rec["evaluation"]["metrics"], dict)
        and rec["evaluation"]["metrics"].get("task") == "regression",
        card_html=markdown_html(card["text"]) if isinstance(card, dict) else None,
        scalar=scalar,
        inline=inline,
        joined=joined,
        not_recorded=not_recorded,
        public_salt=public_salt,
        public_salt_note=PUBLIC_SALT_NOTE,
    )
    missing = [(ev["title"], ev["why"]) for ev in evidence.values() if ev["why"]]
    missing += [
        (f"explanation sample {x['caption']}", x["why"]) for x in evidence["explanations"]["images"] if x["why"]
    ]
    summary = {
        "model_id": rec["model"]["model_id"],
        "data_version": rec["data"]["data_version"],
        "git_commit": rec["code"]["git_commit"],
        "evidence": {k: ev["source"] for k, ev in evidence.items()},
        "missing": missing,
        "notes": notes,
    }
    return html, summary


def write_report(model: str | Path, out: str | Path, root: str | Path = ".") -> dict[str, Any]:
    """Write the report to `out` (atomically); returns report()'s summary plus `path` and `bytes`."""
    html, summary = report(model, root)
    path = write_text(out, html)
    return {**summary, "path": str(path), "bytes": path.stat().st_size}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medtune report",
        description="Write one model's audit report: a self-contained HTML file (the 13 trace sections, "
        "validation, metrics with intervals, ROC, confusion, training curves, augmentation preview, "
        "explanation samples, model card) that opens without a network.",
    )
    parser.add_argument(
        "model",
        help="an ONNX file, a model directory (models/, registry/models/<id>), a model id or prefix, or current",
    )
    parser.add_argument("-o", "--out", default="report.html", help="the HTML file to write (default: report.html)")
    parser.add_argument("--root", default=".", help="project root: models/, reports/, registry/, .dvc/ (default: .)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    def run(args: argparse.Namespace) -> int:
        done = write_report(args.model, args.out, args.root)
        print(
            f"wrote {done['path']} ({done['bytes'] / 1024:.0f} KiB): model {done['model_id']}, data version "
            f"{done['data_version']}, commit {done['git_commit']}"
        )
        for title, why in done["missing"]:
            print(f"  not available: {title}: {why}")
        for note in done["notes"]:
            print(f"  note: {note}")
        return 0

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
