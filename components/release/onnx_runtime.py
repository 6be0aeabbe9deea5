"""The one place ONNX Runtime sessions are made (predict, the export parity check, the registry).

CUDA when a GPU build of onnxruntime sees a device, else CPU; kept free of torch and sklearn so
`medtune predict` stays light.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from components.common import StageError

log = logging.getLogger("medtune.onnx_runtime")


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
            session = ort.InferenceSession(source, options,
                                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
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
