"""The slim `predict` image's package set (requirements-predict.lock) is enough for `medtune predict`,
`trace` and `verify`, checked without building the image.

Each command runs in a subprocess of this venv whose import system cannot see any installed package
the lock does not pin (torch, pandas, scikit-learn, Prefect, Great Expectations, ...): every finder on
sys.meta_path is wrapped so that those names are not found, exactly as when they are not installed
(`import torch` raises ModuleNotFoundError, importlib.util.find_spec("torch") is None). flows/ is
refused too (the image leaves it out), and DVC for predict and trace, which must not need it.
The lock itself is checked against requirements.lock: the same versions, and ONNX Runtime's CPU
build in place of the GPU one (the import `onnxruntime` this venv's GPU build stands in for).
Top-level names shared by several distributions (a namespace such as `google`) are visible when
any of them is in the lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.builders import write_dicom
from tests.workspace import ROOT, tool_env

LOCK = ROOT / "requirements-predict.lock"
TRAINING_LOCK = ROOT / "requirements.lock"
# What the issue names: none of it may be needed to score a scan with an exported model.
HEAVY = ("torch", "torchvision", "pandas", "sklearn", "scipy", "prefect", "great_expectations", "matplotlib")
# This venv's name for the import the slim image's package provides.
SAME_IMPORT = {"onnxruntime-gpu": "onnxruntime"}
# Always in a venv (python -m venv installs them), never in a pip freeze.
VENV_OWN = {"pip", "setuptools"}

# Runs `medtune ARGS` (python -c HOOK ARGS) with the names in $SLIM_HOOK's "refuse" unfindable, and
# writes which of them were asked for and which top-level modules were imported to its "report".
HOOK = r"""
import atexit, json, os, sys

config = json.loads(os.environ["SLIM_HOOK"])
refuse = frozenset(config["refuse"])
asked = set()
early = refuse & {m.partition(".")[0] for m in sys.modules}
assert not early, f"imported before the hook: {sorted(early)}"


class Unfindable:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in refuse:
            asked.add(name.partition(".")[0])
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Unfindable(f) for f in sys.meta_path]


@atexit.register
def report():
    imported = sorted({m.partition(".")[0] for m in sys.modules})
    with open(config["report"], "w") as f:
        json.dump({"asked": sorted(asked), "imported": imported}, f)


from components.cli import main

sys.argv[0] = "medtune"
sys.exit(main())
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    """{canonical name: version} of a pip-freeze style lock file."""
    found = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            found[canonical(name)] = version.strip()
    return found


def refused_names(*extra: str) -> set[str]:
    """Top-level import names of this venv that no distribution of the slim lock provides."""
    slim = set(pins(LOCK)) | VENV_OWN | {"medtune"}
    refused = {
        top
        for top, dists in packages_distributions().items()
        if not any(SAME_IMPORT.get(canonical(d), canonical(d)) in slim for d in dists)
    }
    return refused | {"flows", *extra}


def slim_medtune(tmp_path: Path, *args: str, refuse: set[str], cwd: Path) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "imports.json"
    report.unlink(missing_ok=True)
    env = tool_env(SLIM_HOOK=json.dumps({"refuse": sorted(refuse), "report": str(report)}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", HOOK, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return out, json.loads(report.read_text())


def test_the_lock_is_the_training_locks_versions_with_the_cpu_onnxruntime():
    slim, training = pins(LOCK), pins(TRAINING_LOCK)
    assert slim["onnxruntime"] == training["onnxruntime-gpu"]
    assert "onnxruntime-gpu" not in slim  # never both builds in one environment
    differ = {n: (v, training.get(n)) for n, v in slim.items() if n != "onnxruntime" and training.get(n) != v}
    assert not differ, f"{differ}: re-pin with docker/predict-lock.sh"
    assert not {canonical(h) for h in (*HEAVY, "scikit-learn", "great-expectations")} & set(slim)
    assert {"numpy", "pillow", "pydicom", "typer", "jinja2", "onnx", "dvc"} <= set(slim)


@pytest.mark.slow
def test_the_hook_hides_what_the_slim_image_lacks(tmp_path):
    """The check below can fail: `medtune train` needs torch, which the hook makes unfindable."""
    refuse = refused_names()
    assert set(HEAVY) <= refuse and not {"numpy", "onnxruntime", "PIL", "dvc", "components"} & refuse
    out, seen = slim_medtune(tmp_path, "train", "--help", refuse=refuse, cwd=tmp_path)
    assert out.returncode != 0 and "needs the Python module 'torch'" in out.stderr, out.stderr[-2000:]
    assert "torch" in seen["asked"] and "torch" not in seen["imported"]


@pytest.mark.slow
def test_predict_scores_with_only_the_slim_packages(onnx_model, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(scans / "a.png")
    write_dicom(scans / "b.dcm", rng.integers(0, 4095, (32, 32), dtype=np.uint16))
    csv = tmp_path / "p.csv"
    out, seen = slim_medtune(
        tmp_path, "predict", str(onnx_model), str(scans), "-o", str(csv), refuse=refused_names("dvc"), cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split(",") for line in csv.read_text().splitlines()]
    assert rows[0] == ["path", "prob_normal", "prob_lesion", "predicted", "error"]
    assert sorted(Path(r[0]).name for r in rows[1:]) == ["a.png", "b.dcm"]
    for _path, normal, lesion, predicted, error in rows[1:]:
        assert error == "" and predicted in ("normal", "lesion")
        assert abs(float(normal) + float(lesion) - 1) < 1e-5
    assert {"onnxruntime", "numpy", "PIL", "pydicom"} <= set(seen["imported"])
    assert not set(HEAVY) & set(seen["imported"]) and "dvc" not in seen["imported"]


def resaved(onnx_model: Path, folder: Path) -> Path:
    """The same model in another file (not byte-identical): trace and verify then read its metadata."""
    import onnx

    proto = onnx.load(str(onnx_model))
    proto.doc_string = "saved again"
    folder.mkdir()
    onnx.save(proto, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.mark.slow
def test_trace_with_only_the_slim_packages(onnx_model, tmp_path):
    project = onnx_model.parent.parent
    refuse = refused_names("dvc")
    out, seen = slim_medtune(tmp_path, "trace", str(onnx_model), "--root", str(project), refuse=refuse, cwd=project)
    assert out.returncode == 0, out.stderr[-3000:]
    model_id = json.loads((onnx_model.parent / "lineage.json").read_text())["model_id"]
    assert out.stdout.startswith(f"medtune trace: model {model_id}") and "1. Model identity" in out.stdout
    assert "jinja2" in seen["imported"]  # the text report's template
    assert not set(HEAVY) & set(seen["imported"]) and "dvc" not in seen["imported"]

    other = resaved(onnx_model, tmp_path / "elsewhere")
    out, seen = slim_medtune(
        tmp_path, "trace", str(other), "--root", str(project), "--json", refuse=refuse, cwd=project
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["model"]["model_id"] == model_id
    assert "onnx" in seen["imported"]  # identified by its metadata, read with the onnx package


@pytest.mark.slow
def test_verify_with_only_the_slim_packages(onnx_model, tmp_path):
    """verify reads the DVC project (here there is none: a note) and names a changed ONNX file's model."""
    project = tmp_path / "project"
    shutil.copytree(onnx_model.parent.parent, project, ignore=shutil.ignore_patterns("model.onnx"))
    resaved(onnx_model, tmp_path / "elsewhere").rename(project / "models/model.onnx")
    out, seen = slim_medtune(tmp_path, "verify", "models/model.onnx", "--json", refuse=refused_names(), cwd=project)
    assert out.returncode == 1, out.stderr[-3000:]  # the ONNX file differs: a mismatch, not a crash
    report = json.loads(out.stdout)
    onnx_item = next(i for i in report["items"] if i["kind"] == "onnx")
    assert onnx_item["status"] != "ok"
    assert {i["kind"] for i in report["items"] if i["status"] == "ok"} >= {"identity", "checkpoint"}
    assert any("DVC" in n for n in report["notes"])
    assert {"dvc", "onnx"} <= set(seen["imported"])
    assert not set(HEAVY) & set(seen["imported"])
