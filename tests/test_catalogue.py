"""Every bad or awkward input of tests/bad_inputs.py through every reader of scans: ingest + validate,
`medtune import-folders`, `medtune ingest-new` + `medtune retrain --once` (a real Prefect flow in a
real git + DVC workspace), and `medtune predict`.

For each: the expected outcome, a message that names the file (or the labels.csv line), no
traceback, the input tree unchanged afterwards, and data/raw unchanged for a quarantined batch.
A new hole found by a user becomes one more Case in bad_inputs.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.data import folder_import, ingest
from components.data import validate as V
from components.params import load_params
from components.release import predict
from components.retrain import inbox
from flows import commands
from tests.bad_inputs import CASES, CLASSES, FILE_CASES, good_tree
from tests.workspace import BIN, make_workspace, run, tool_env

SALT = "catalogue-test-secret"  # a secret salt, as a real workspace has (the public one stops retrain)


def ids(case) -> str:
    return case.name


def digest(folder: Path) -> dict[str, object]:
    """Every entry under folder, links as links (never followed); large files by size and mtime."""
    out: dict[str, object] = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(here, name)
            rel = path.relative_to(folder).as_posix()
            st = path.lstat()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_file():
                out[rel] = (
                    (st.st_size, st.st_mtime_ns)
                    if st.st_size > 2**24
                    else hashlib.sha256(path.read_bytes()).hexdigest()
                )
    return out


def params_file(tmp_path: Path, csv: bool) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"classes": CLASSES, "label_source": "csv" if csv else "folder"},
                "split": {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.25},
                "validate": {"min_images_per_class_split": 1},
            }
        )
    )
    return path


def tree(tmp_path: Path, case, seed: int = 0) -> Path:
    root = tmp_path / "raw"
    good_tree(root, case.csv, seed)
    case.build(root)
    return root


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_ingest_and_validate(case, tmp_path, capsys, caplog):
    root = tree(tmp_path, case)
    before = digest(root)
    params, data, reports = params_file(tmp_path, case.csv), tmp_path / "data", tmp_path / "reports"
    rc = ingest.main(["--raw", str(root), "--out", str(data), "--params", str(params)])
    if rc == 0:
        rc = V.main(
            [
                "--manifest",
                str(data / "manifest.csv"),
                "--manifest-json",
                str(data / "manifest.json"),
                "--out-json",
                str(reports / "validation.json"),
                "--out-md",
                str(reports / "validation.md"),
                "--params",
                str(params),
            ]
        )
    err = capsys.readouterr().err
    assert "Traceback" not in err + caplog.text
    assert digest(root) == before, "the input tree changed"
    if case.ingest == "fail":
        assert rc == 1 and case.named in err, err
    else:
        assert rc == 0, err
        report = (reports / "validation.md").read_text()
        if case.ingest == "warn":
            assert "## Skipped" in report and case.named in report.split("## Skipped")[1], report


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c.imports != "n/a"], ids=ids)
def test_import_folders(case, tmp_path, capsys, caplog):
    root = tree(tmp_path, case)
    before = digest(root)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rc = folder_import.main_folders([str(root), "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert digest(root) == before
    copied = [p for p in out.rglob("*") if case.named in p.relative_to(out).as_posix()] if out.is_dir() else []
    if case.imports == "error":
        assert rc == 1 and case.named in err, err
        return
    assert rc == 0, err
    if case.imports == "copied":
        assert copied and all(not p.is_symlink() for p in copied)
    else:
        assert not copied
        if case.imports == "skipped":
            assert case.named in caplog.text, caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.batch != "quarantine"], ids=ids)
def test_batch_checks(case, batch_workspace, tmp_path, capsys):
    """ingest-new for real (in-process); a batch expected to pass is checked as the flow checks it. The
    quarantines are made by one real `retrain --once` over all bad batches (the next test)."""
    ws, manifest = batch_workspace
    src = tree(tmp_path, case, seed=1)
    before = digest(src)
    rc = commands.ingest_new_main([str(src), "--name", case.name + "-check", "--no-event", "--root", str(ws)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and digest(src) == before
    batch = ws / "data" / "inbox" / f"{case.name}-check"
    try:
        if case.batch == "refused":
            assert rc == 1 and case.named in err and not batch.exists(), err
            return
        assert rc == 0, err
        params = load_params(ws / "params.yaml")
        rows, problems = inbox.read_batch(batch, params)
        problems += inbox.check_batch(batch, rows, manifest, params)
        assert problems == [], problems
    finally:
        shutil.rmtree(batch, ignore_errors=True)


@pytest.fixture(scope="module")
def batch_workspace(module_tmp):
    """A real git + DVC workspace (demo scans, folder per class) and its current manifest."""
    root = module_tmp
    env = tool_env(MEDTUNE_PATIENT_SALT=SALT)
    ws = make_workspace(root / "ws", patients=8, env=env)
    run(["git", "add", "-A"], ws, env)
    run(["git", "commit", "-qm", "workspace"], ws, env)
    params = load_params(ws / "params.yaml")
    return ws, inbox.current_manifest(ws / "data/manifest.csv", ws / "data/raw", params)


@pytest.mark.slow
def test_retrain_once_quarantines_every_bad_batch(batch_workspace, tmp_path):
    ws, _ = batch_workspace
    bad = [c for c in CASES if c.batch == "quarantine"]
    sources = {}
    for case in bad:
        sources[case.name] = src = tree(tmp_path / case.name, case, seed=1)
        assert commands.ingest_new_main([str(src), "--name", case.name, "--no-event", "--root", str(ws)]) == 0
    before_src = {name: digest(src) for name, src in sources.items()}
    raw_before = digest(ws / "data" / "raw")
    env = tool_env(
        MEDTUNE_PATIENT_SALT=SALT,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    env.pop("PREFECT_API_URL", None)
    out = run([str(BIN / "medtune"), "retrain", "--once"], ws, env, check=False, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert json.loads(out.stdout[out.stdout.index("{") :])["outcome"] == "quarantined"
    assert digest(ws / "data" / "raw") == raw_before, "a quarantined batch changed data/raw"
    assert not any((ws / "data" / "inbox").iterdir())
    for case in bad:
        assert digest(sources[case.name]) == before_src[case.name]
        reports = list((ws / "data" / "quarantine").glob(f"{case.name}-2*/report.json"))
        assert len(reports) == 1, case.name
        problems = json.loads(reports[0].read_text())["problems"]
        assert any((case.batch_named or case.named) in p for p in problems), (case.name, problems)


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c.predict != "n/a"], ids=ids)
def test_predict(case, onnx_model, tmp_path, capsys, caplog):
    root = tree(tmp_path, case)
    before = digest(root)
    out = tmp_path / "predictions.csv"
    rc = predict.main([str(onnx_model), str(root), "-o", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err + caplog.text and rc == 0, err
    assert digest(root) == before
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    rows = table[table["path"].str.contains(case.named, regex=False)]
    assert len(table) >= 20 and (table["path"].str.contains("good").sum() >= 20)
    if case.predict == "absent":
        assert rows.empty, rows
    elif case.predict == "error":
        assert len(rows) == 1 and case.named in rows["error"].iloc[0] and rows["predicted"].iloc[0] == "", rows
    else:
        assert len(rows) == 1 and rows["error"].iloc[0] == "" and rows["predicted"].iloc[0] in CLASSES, rows
