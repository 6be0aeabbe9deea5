"""`medtune verify MODEL`: re-hash everything a model's lineage names; exit 1 on any mismatch.

    medtune verify models/                   # the workspace model
    medtune verify 3f2a9c1e0b7d --json       # an old model from the registry

Checked, each reported by name: the ONNX file and the checkpoint (in the model's folder, the
registry, or the DVC cache / any DVC remote at the model's release tag), the manifest copy and
its content hash, the DVC listing of the data version, and every raw scan of that data version.
Scans come from the workspace when `data/raw.dvc` still names the model's data version and the raw
folder exists (a changed or missing file there is then a finding), otherwise from the DVC cache or
a DVC remote, by the md5 the data version's listing (`<data_version>.dir`) gives each scan.
Everything DVC-specific is read through DVC itself: the cache and the remotes are its object databases
(`dvc.repo.Repo`, configured from .dvc/config, config.local and the environment), so an S3 or any other
remote is read directly and a fresh clone can be verified without `dvc pull`; the md5 of a model file
at its release tag is what DVC's index of that commit says (dvc.yaml + dvc.lock); a listing is read
by dvc-data's Tree.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.audit.lookup import add_common_args, resolve_model
from components.audit.model_files import check_manifest, check_model_file
from components.audit.raw_scans import check_scans
from components.audit.stores import dvc_stores, tag_outs
from components.audit.verify_items import MISMATCH, OK, item
from components.common import run_cli
from components.release.records import events_for, read_releases, registry_dir
from components.templates import render as render_template


def verify(ref: str | Path, root: str | Path = ".") -> dict[str, Any]:
    """Re-hash what the lineage names. `ok` is True only when every item matches."""
    root = Path(root)
    m = resolve_model(ref, root, by_content=False)
    L = m.lineage
    tag = next(
        (e.get("git_tag") for e in events_for(read_releases(registry_dir(root)), m.model_id) if e.get("git_tag")), None
    )
    stores, notes = dvc_stores(root)
    outs = tag_outs(root, tag, notes)
    ckpt = L.get("checkpoint_sha256")
    items = [
        item(
            "model_id",
            "identity",
            OK if ckpt and ckpt[:12] == m.model_id else MISMATCH,
            m.lineage_path,
            m.model_id,
            (ckpt or "")[:12] or None,
            "model id = first 12 hex of the checkpoint sha256",
        )
    ]
    items += check_model_file(m, "model.onnx", "models/model.onnx", L.get("onnx_sha256"), tag, outs, stores, "onnx")
    items += check_model_file(m, "model.pt", "models/model.pt", ckpt, tag, outs, stores, "checkpoint")
    manifest_items, manifest = check_manifest(m, root)
    items += manifest_items
    if manifest is not None:
        items += check_scans(m, root, manifest, stores)
    bad = [i for i in items if i["status"] != OK]
    return {
        "model_id": m.model_id,
        "lineage": str(m.lineage_path),
        "git_tag": tag,
        "ok": not bad,
        "checked": len(items),
        "failed": len(bad),
        "notes": list(m.notes) + notes,
        "items": items,
    }


def _finding(i: dict[str, Any]) -> tuple[str, str, str]:
    """One checked item as (STATUS, kind, what: the item, where it was read, and for a failure the hashes)."""
    what = i["item"]
    if i["path"] and i["path"] != i["item"]:
        what += f"  [{i['path']}]"
    if i["status"] != OK:
        what += f"  expected {(i['expected'] or '-')[:16]}, found {(i['actual'] or '-')[:16]}"
    return i["status"].upper(), i["kind"], what + (f"  ({i['detail']})" if i["detail"] else "")


def render(rep: dict[str, Any]) -> str:
    """The readable report (audit/templates/verify.txt.j2): every item but the matching scans, which are
    counted in one line."""
    scans = [i for i in rep["items"] if i["kind"] == "scan"]
    findings = [_finding(i) for i in rep["items"] if not (i["kind"] == "scan" and i["status"] == OK)]
    return render_template(
        "audit/templates/verify.txt.j2",
        rep=rep,
        findings=findings,
        scans=scans,
        scans_ok=sum(i["status"] == OK for i in scans),
    ).rstrip("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medtune verify",
        description="Re-hash the ONNX file, the checkpoint "
        "and every raw scan a model's lineage names; exit 1 on any mismatch.",
    )
    parser.add_argument("model", help="an ONNX file, a model directory, a model id (or prefix), or `current`")
    add_common_args(parser)

    def run(args: argparse.Namespace) -> int:
        rep = verify(args.model, args.root)
        print(json.dumps(rep, indent=2) if args.json else render(rep))
        return 0 if rep["ok"] else 1

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
