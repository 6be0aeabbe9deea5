"""Fixtures shared by several test modules (pytest finds them here; their builders are in
tests/builders.py and tests/workspace.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.builders import make_project, run_export, tiny_params
from tests.workspace import (
    BIN,
    ROOT,
    UNCOMMITTED_PARAMS,
    base_env,
    drop_batch,
    free_port,
    make_retrain_project,
    retrain,
    set_params,
    stop,
    wait_healthy,
)


def pytest_configure(config):
    """One pytest-xdist worker per core: torch's default of one OpenMP thread per core in every worker
    (and in the medtune and dvc processes a worker starts, which inherit its environment) makes them
    fight for the cores. Two trainings side by side on 2 cores took 15 s each that way, 2.5 s each with
    a thread apiece. Each worker gets its share of the cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory) -> Iterator[Path]:
    """The folder of one test module's shared fixtures, removed when the module ends unless one of its
    tests failed. pytest removes a passing test's tmp_path (tmp_path_retention_policy "failed" in
    pyproject.toml) but keeps `tmp_path_factory.mktemp` folders to the end of the session: the
    module-scoped workspaces alone (each a ~45 MB model several times over, in the workspace, the DVC
    cache and a remote) filled 8 GB of /tmp before they were removed here."""
    failed = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory):
    """A tiny exported medtune model (random weights, real export with its metadata), built once."""
    params = tiny_params()
    project = make_project(tmp_path_factory.mktemp("onnx-model"), params)
    run_export(project, params)
    return project["out"] / "model.onnx"


@pytest.fixture(scope="module")
def salt_free_server(module_tmp):
    """A Prefect server on 127.0.0.1 with its own PREFECT_HOME, and the environment of the `medtune`
    runs that use it: no MEDTUNE_PATIENT_SALT (the public salt is what test_promotion_recovery is
    about), this checkout's code first on PYTHONPATH. One per module that asks for it."""
    tmp = module_tmp / "recovery"
    tmp.mkdir()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = base_env(tmp, api)
    env.pop("MEDTUNE_PATIENT_SALT", None)  # these tests are about the public salt
    # `medtune` subprocesses import the code under test, wherever this checkout is.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    log = tmp / "server.log"
    proc = subprocess.Popen(
        [str(BIN / "medtune"), "server", "--port", str(port)],
        cwd=tmp,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(api, proc, log)
        yield {"env": env, "tmp": tmp}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def killed_after_push(tmp_path_factory, request) -> dict:
    """A workspace whose first promotion was killed right after `dvc push` (nothing committed), beside
    its local DVC remote (../dvc-remote), and the killed run's output. Built once per test process
    (training is most of a test's cost): the first module to ask builds it under the process's base
    temp folder, with that module's Prefect server (`salt_free_server`, started only then), and every user
    copies it (workspace.copy_of). Its retrain run was allowed the public salt, with params.yaml
    changed and not committed before it (UNCOMMITTED_PARAMS)."""
    base = tmp_path_factory.getbasetemp() / "shared-killed-after-push"
    ws, record = base / "ws", base / "killed-run.json"
    if not record.is_file():
        shutil.rmtree(base, ignore_errors=True)  # a build that failed half-way
        env = request.getfixturevalue("salt_free_server")["env"]
        make_retrain_project(ws, env, allow_public_salt=True)
        set_params(ws, UNCOMMITTED_PARAMS)
        drop_batch(ws, env)
        out = retrain(ws, env, kill_after="dvc push")
        record.write_text(
            json.dumps({"args": out.args, "returncode": out.returncode, "stdout": out.stdout, "stderr": out.stderr})
        )
    return {"ws": ws, "out": subprocess.CompletedProcess(**json.loads(record.read_text()))}
