#!/usr/bin/env bash
# Re-pin requirements-predict.lock, the package set of the slim `predict` image, from requirements.lock.
#
#   docker/predict-lock.sh            # run after requirements.lock changes; then review the diff
#
# The set is what `medtune predict`, `trace` and `verify` import (measured with `python -X importtime`;
# docs/docker.md, "The slim predict image"), installed in a throwaway venv with requirements.lock
# as constraints, so every pin is the training image's version. The one exception is ONNX Runtime:
# the CPU build `onnxruntime` at the version of the lock's `onnxruntime-gpu`, because the two
# builds must never share an environment and the slim image has no CUDA.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
# Top level only; pip adds their dependencies. Why each is here:
#   onnxruntime numpy pillow pydicom  predict: the session, arrays, PNG/JPEG and DICOM decoding
#   typer pydantic                    the medtune command (typer needs pydantic); params.py (trace)
#   jinja2                            trace / verify text reports (components/templates.py)
#   ruamel.yaml pyyaml                params.yaml (params.py, trace); dvc.lock and .dvc files (common.py)
#   onnx                              trace / verify name the model of an ONNX file by its metadata
#   dvc dvc-data dvc-objects dvc-s3   verify reads dvc.lock at a release tag and the DVC cache / remote
TOP=(onnxruntime numpy pillow pydicom typer pydantic jinja2 ruamel.yaml pyyaml onnx dvc dvc-data dvc-objects dvc-s3)

ort=$(sed -n 's/^onnxruntime-gpu==//p' "$ROOT/requirements.lock")
[ -n "$ort" ] || { echo "error: $ROOT/requirements.lock pins no onnxruntime-gpu; expected onnxruntime-gpu==X.Y.Z" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{ grep -v -e '^onnxruntime-gpu==' -e '^#' "$ROOT/requirements.lock"; echo "onnxruntime==$ort"; } > "$tmp/constraints.txt"
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$tmp/constraints.txt" "${TOP[@]}"
{
    echo "# The slim predict image (Dockerfile target predict): only what medtune predict, trace and verify"
    echo "# import, at requirements.lock's versions; onnxruntime (CPU) in place of onnxruntime-gpu."
    echo "# Top level: ${TOP[*]}"
    echo "# Install: pip install -r requirements-predict.lock && pip install --no-deps ."
    echo "# Regenerate after changing requirements.lock: docker/predict-lock.sh"
    "$tmp/venv/bin/python" -m pip freeze --disable-pip-version-check
} > "$ROOT/requirements-predict.lock.tmp"
mv "$ROOT/requirements-predict.lock.tmp" "$ROOT/requirements-predict.lock"
echo "wrote $ROOT/requirements-predict.lock ($(grep -c '==' "$ROOT/requirements-predict.lock") pins)"
