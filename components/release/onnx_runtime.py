"""The one place ONNX Runtime sessions are made (predict, the export parity check, the registry),
and the one reader of the metadata `medtune export` writes into an ONNX file.

CUDA when a GPU build of onnxruntime sees a device, else CPU; kept free of torch and sklearn so
`medtune predict` stays light.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.common import StageError

log = logging.getLogger("medtune.onnx_runtime")

# What a model needs to be run by `medtune predict` (docs/architecture.md lists every key export writes).
REQUIRED_METADATA = ("model_id", "classes", "preprocessing", "input", "output")
# The values export writes as JSON; the others are plain strings. A regression model's target_mean and
# target_std (what its graph applies to the head's output) are JSON numbers, decoded to floats.
JSON_METADATA = (
    "classes",
    "input",
    "normalisation",
    "preprocessing",
    "metrics",
    "gate",
    "pretrained",
    "target_mean",
    "target_std",
)


def _nvidia_driver_present() -> bool:
    """Cheap check before asking ONNX Runtime for CUDA (which logs errors when there is no GPU)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return True  # elsewhere let the session attempt decide
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def make_session(model: Path | bytes, spinning: bool = True) -> Any:
    """An ONNX Runtime session on an ONNX file or serialized graph: the one place sessions are made.

    CUDA only if a GPU build sees a device and the session really got the CUDA provider; else CPU.
    `spinning=False`: ONNX Runtime's threads sleep between operators and runs instead of spin-waiting
    (its default), so they leave the cores to other threads of the process: predict's decoding.
    """
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if ort.get_device() == "GPU" and _nvidia_driver_present():
        ort.set_default_logger_severity(3)  # a failed CUDA set-up is expected on some machines
        try:
            session = ort.InferenceSession(source, options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if session.get_providers()[0] == "CUDAExecutionProvider":
                return session
        except Exception as exc:  # noqa: BLE001 - any CUDA set-up failure means: use the CPU
            log.debug("CUDA provider unavailable (%s); using CPU", exc)
        finally:
            ort.set_default_logger_severity(2)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        name = "the exported graph" if isinstance(model, bytes) else model
        raise StageError(f"{name}: ONNX Runtime cannot load the model ({type(exc).__name__}: {exc}).") from None


def read_metadata(path: Path, session: Any = None, required: Sequence[str] = REQUIRED_METADATA) -> dict[str, Any]:
    """The medtune metadata of the ONNX file `path` (written by `medtune export`), JSON values decoded;
    StageError naming the file and the key if it is not an ONNX file, lacks a `required` key, or holds a
    value that is not valid JSON.

    With `session` (an ONNX Runtime session on `path`) it is read from the session, so running a model
    needs no `onnx` package; without, from the file's protobuf alone (no session, no external weights).
    """
    path = Path(path)
    props = dict(session.get_modelmeta().custom_metadata_map) if session is not None else _metadata_props(path)
    missing = [k for k in required if k not in props]
    if missing:
        raise StageError(
            f"{path}: ONNX file has no medtune metadata (missing keys {missing}); expected a model "
            "exported by `medtune export`, which records the classes and preprocessing."
        )
    return decode_metadata(props, path)


def task_of(meta: Mapping[str, Any]) -> str:
    """A model's task from its metadata or records: "regression" when they say so, else "classification"
    (models exported before regression existed record no task)."""
    return "regression" if meta.get("task") == "regression" else "classification"


def decode_metadata(props: Mapping[str, str], path: Path) -> dict[str, Any]:
    """`props` with the JSON_METADATA values decoded; StageError naming `path` and the key for bad JSON."""
    meta: dict[str, Any] = dict(props)
    for key in JSON_METADATA:
        if key in props:
            try:
                meta[key] = json.loads(props[key])
            except json.JSONDecodeError as exc:
                raise StageError(
                    f"{path}: metadata {key!r} is not valid JSON ({exc.msg} at character {exc.pos}): "
                    f"{props[key][:80]!r}; re-export the model with `medtune export`."
                ) from None
    return meta


def _metadata_props(path: Path) -> dict[str, str]:
    import onnx  # about 0.3 s; parsing the protobuf is far cheaper than an inference session

    if not path.is_file():
        raise StageError(f"{path}: no such file; expected an ONNX file written by `medtune export`.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or any other reason it is not ONNX
        raise StageError(
            f"{path}: not an ONNX file ({type(exc).__name__}: {str(exc)[:120]}); expected a model "
            "written by `medtune export`."
        ) from None
    return {p.key: p.value for p in proto.metadata_props}
