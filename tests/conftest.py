"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory):
    """A tiny exported medtune model (random weights, real export with its metadata), built once."""
    from test_evaluate import tiny_params
    from test_export import make_project, run_export

    params = tiny_params()
    project = make_project(tmp_path_factory.mktemp("onnx-model"), params)
    run_export(project, params)
    return project["out"] / "model.onnx"
