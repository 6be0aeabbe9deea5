"""The spine end to end: real `dvc repro` in a temporary git repository on tiny synthetic DICOMs.

Checks the ONNX model (symbolic batch, parity, metadata), the no-op rerun, that a parameter
change reruns only downstream stages, the gate refusing export, bad raw files stopping the
pipeline with a named error, and that the raw data is byte-identical afterwards. And that runs
are comparable, as README's "After the demo" block promises: `make demo`'s commit makes HEAD the
baseline, `dvc metrics diff` / `dvc plots diff` after a train.lr change show both runs, `dvc exp
show` lists each experiment's test metrics, metrics files hold numbers only, the plots page needs
no network, and the train stage's outputs are the same bytes every run.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import yaml

from components.common import sha256_file
from tests.workspace import ROOT, make_workspace, run, set_params, tree_digest

pytestmark = pytest.mark.slow

# An attribute that makes a browser fetch something from another host (the page must render offline).
EXTERNAL = re.compile(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)
TEST_METRICS = ("auroc", "sensitivity", "specificity")


def as_cloned(ws):
    """Give the tiny project what a clone of this repository has beside dvc.yaml (its .gitignore,
    which keeps models/, reports/ and dvclive/ out of git, and .dvc/config with the offline plots
    page) and commit it all but the data version: a clone before `make demo`."""
    shutil.copy(ROOT / ".gitignore", ws / ".gitignore")
    shutil.copy(ROOT / ".dvc/config", ws / ".dvc/config")
    shutil.copytree(ROOT / ".dvc/plots", ws / ".dvc/plots")
    run(["git", "add", "-A", "--", ".", ":(exclude)data/raw.dvc", ":(exclude)data/.gitignore"], ws)
    run(["git", "commit", "-qm", "the project, as cloned"], ws)


def plot_specs(page: str) -> dict[str, dict]:
    """The vega-lite spec of every plot on a `dvc plots` page, by the id of its div."""
    return {
        m.group(2): json.loads(m.group(1))
        for m in re.finditer(r"var spec = (\{.*?\});\s*vegaEmbed\('#(\w+)', spec\);", page, re.S)
    }


def train_outputs(ws) -> dict[str, bytes]:
    """Every file of every output dvc.yaml declares for the train stage (outs, metrics, plots), with its bytes."""
    stage = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["train"]
    paths = [
        ws / (o if isinstance(o, str) else next(iter(o)))
        for kind in ("outs", "metrics", "plots")
        for o in stage.get(kind, [])
    ]
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]
    assert files and all(f.is_file() for f in files), paths
    return {f.relative_to(ws).as_posix(): f.read_bytes() for f in files}


def demo_commit(ws):
    """The end of `make demo`: the Makefile's own recipe commits the run as the baseline."""
    return run(["make", "-s", "-f", str(ROOT / "Makefile"), "demo-commit"], ws)


@pytest.fixture(scope="module")
def built(module_tmp):
    ws = make_workspace(module_tmp / "ws")
    as_cloned(ws)
    raw_before = tree_digest(ws / "data/raw")
    first = run(["dvc", "repro"], ws)
    committed = demo_commit(ws)
    return ws, raw_before, first, committed, train_outputs(ws)


def test_repro_builds_a_gated_onnx_model_with_parity_and_metadata(built):
    import onnx
    import onnxruntime as ort

    ws, *_ = built
    model = onnx.load(ws / "models/model.onnx")
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value"), "batch dimension must be symbolic"

    meta = {p.key: p.value for p in model.metadata_props}
    manifest = json.loads((ws / "data/manifest.json").read_text())
    raw_dvc = yaml.safe_load((ws / "data/raw.dvc").read_text())
    assert meta["data_version"] == raw_dvc["outs"][0]["md5"] == manifest["data_version"]
    assert json.loads(meta["classes"]) == ["normal", "lesion"]
    for key in ("model_id", "preprocessing", "normalisation", "params_sha256", "metrics", "gate"):
        assert meta.get(key), key
    assert "git_commit" not in meta  # a run fact: lineage.json (uncached) has it, the cached ONNX does not
    assert json.loads(meta["gate"])["passed"] is True

    exp = json.loads((ws / "reports/export.json").read_text())
    assert exp["max_abs_diff_batch1"] <= 1e-4 and exp["max_abs_diff_batchN"] <= 1e-4

    # The ONNX model reproduces the evaluation's test probabilities from the prepared test images.
    images = np.load(ws / "data/prepared/test.npy").astype(np.float32) / 255.0
    session = ort.InferenceSession(str(ws / "models/model.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert probs.shape == (len(images), 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    assert (ws / "models/model_card.md").read_text().strip()
    for report in (
        "validation.json",
        "validation.md",
        "metrics.json",
        "evaluation.json",
        "roc.png",
        "confusion.png",
        "augment_preview.png",
        "train.json",
    ):
        assert (ws / "reports" / report).is_file(), report
    # DVCLive's per-epoch curves, one file per metric, step = epoch (TINY trains 2 epochs).
    for name in ("train/loss", "val/loss", "val/auroc", "val/accuracy", "lr"):
        lines = (ws / f"dvclive/plots/metrics/{name}.tsv").read_text().splitlines()
        assert lines[0] == f"step\t{name.split('/')[-1]}" and [r.split("\t")[0] for r in lines[1:]] == ["1", "2"]


def test_demo_commit_makes_the_run_head_and_leaves_nothing_behind(built):
    ws, _, _, committed, _ = built
    assert "committed the baseline run" in committed.stdout, committed.stdout
    head = run(["git", "show", "--name-only", "--format=%s", "HEAD"], ws).stdout.split("\n")
    assert head[0].startswith("demo: baseline run"), head
    assert {"data/raw.dvc", "data/.gitignore", "dvc.lock"} <= set(head[1:]), head
    # Everything DVC wrote is committed or ignored (models/, reports/, dvclive/ are in the cache).
    assert run(["git", "status", "--porcelain"], ws).stdout == ""
    # A second `make demo` has nothing to commit.
    again = demo_commit(ws)
    assert "already committed" in again.stdout and run(["git", "rev-list", "--count", "HEAD"], ws).stdout.strip() == "2"


def test_metrics_files_hold_numbers_and_the_record_the_rest(built):
    import onnx

    ws, *_ = built
    metrics = json.loads((ws / "reports/metrics.json").read_text())
    assert all(type(v) in (int, float) for v in metrics.values()), metrics
    for key in (
        *TEST_METRICS,
        "auroc_ci_low",
        "auroc_ci_high",
        "balanced_accuracy",
        "accuracy",
        "f1",
        "threshold",
        "ece",
        "brier",
    ):
        assert key in metrics, key

    def leaves(d):
        return [x for v in d.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    live = json.loads((ws / "dvclive/metrics.json").read_text())
    assert all(type(v) in (int, float) for v in leaves(live)) and "auroc" in live["val"], live
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], ws).stdout)[""]["data"]
    assert set(shown) == {"reports/metrics.json", "dvclive/metrics.json"}, set(shown)
    assert len(leaves({k: v["data"] for k, v in shown.items()})) <= 25  # one readable table

    # The identities and structures live in the evaluation record, which export ships whole.
    record = json.loads((ws / "reports/evaluation.json").read_text())
    assert record["classes"] == ["normal", "lesion"] and record["positive_class"] == "lesion"
    assert record["auroc_ci"] == [metrics["auroc_ci_low"], metrics["auroc_ci_high"]]
    assert np.array(record["confusion_matrix"]).sum() == metrics["n_test"]
    meta = {p.key: p.value for p in onnx.load(ws / "models/model.onnx").metadata_props}
    assert json.loads(meta["metrics"]) == record
    assert json.loads((ws / "models/lineage.json").read_text())["evaluation"]["metrics"] == record


def test_plots_page_renders_without_a_network(built):
    ws, *_ = built
    run(["dvc", "plots", "show"], ws)
    page = (ws / "dvc_plots/index.html").read_text()
    assert not EXTERNAL.search(page), EXTERNAL.search(page).group(0)
    assert 't.version="5.33.0"' in page and "window.vegaEmbed" in page  # vega and vega-embed inline
    specs = plot_specs(page)
    assert {
        "reports_roc_csv",
        "reports_confusion_csv",
        "dvclive_plots_metrics_val_auroc_tsv",
        "dvclive_plots_metrics_train_loss_tsv",
    } <= set(specs), set(specs)
    assert {v["rev"] for v in specs["reports_roc_csv"]["data"]["values"]} == {"workspace"}


def test_no_patient_identifier_reaches_any_artefact(built):
    ws, *_ = built
    needles = [b"DEMO-0", b"Demo^Patient"]
    for folder in (
        "data/manifest.csv",
        "data/manifest.json",
        "data/prepared",
        "models",
        "reports",
        "dvclive",
        "dvc.lock",
    ):
        path = ws / folder
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            blob = f.read_bytes()
            assert not any(n in blob for n in needles), f"patient identifier leaked into {f}"


def test_second_repro_is_a_noop_and_status_is_clean(built):
    ws, *_ = built
    stamp = (ws / "models/model.pt").stat().st_mtime_ns
    again = run(["dvc", "repro"], ws)
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    assert (ws / "models/model.pt").stat().st_mtime_ns == stamp
    assert "up to date" in run(["dvc", "status"], ws).stdout


def test_param_change_reruns_only_downstream_stages(built):
    ws, *_ = built
    set_params(ws, {"evaluate": {"bootstrap": 60}})
    out = run(["dvc", "repro"], ws).stdout
    for stage in ("ingest", "validate", "preprocess", "augment", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert "Running stage 'evaluate'" in out and "Running stage 'export'" in out
    assert "evaluate.bootstrap" in run(["dvc", "params", "diff"], ws).stdout
    run(["dvc", "metrics", "diff"], ws)  # must work against the committed baseline


def test_a_train_lr_change_is_compared_with_the_baseline(built):
    """README's "After the demo": change train.lr, dvc repro, then dvc metrics diff / dvc plots diff."""
    ws, *_ = built
    lr = yaml.safe_load((ws / "params.yaml").read_text())["train"]["lr"]
    set_params(ws, {"train": {"lr": lr / 2}})
    try:
        assert "Running stage 'train'" in run(["dvc", "repro"], ws).stdout
        diff = json.loads(run(["dvc", "metrics", "diff", "--all", "--json"], ws).stdout)
        for name in TEST_METRICS:
            old, new = diff["reports/metrics.json"][name]["old"], diff["reports/metrics.json"][name]["new"]
            assert isinstance(old, (int, float)) and isinstance(new, (int, float)), (name, old, new)
        assert any(v["old"] != v["new"] for v in diff["dvclive/metrics.json"].values())  # another model
        assert "train.lr" in run(["dvc", "params", "diff"], ws).stdout

        run(["dvc", "plots", "diff"], ws)
        page = (ws / "dvc_plots/index.html").read_text()
        specs = plot_specs(page)
        for plot in ("reports_roc_csv", "dvclive_plots_metrics_val_loss_tsv"):  # both runs' curves in one plot
            assert {v["rev"] for v in specs[plot]["data"]["values"]} == {"HEAD", "workspace"}, plot
        assert not EXTERNAL.search(page)
    finally:
        set_params(ws, {"train": {"lr": lr}})  # the next tests start from the baseline's train params


def test_returning_to_earlier_train_params_restores_the_model_from_the_run_cache(built):
    # DVC's run cache skips any stage with a `cache: false` output; train has none, so an
    # experiment that goes back to earlier parameters restores the model instead of retraining.
    ws, *_, baseline = built
    out = run(["dvc", "repro"], ws).stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in out, out
    assert train_outputs(ws) == baseline  # the model and its DVCLive curves


def test_a_forced_train_run_gives_the_same_bytes(built):
    # Nothing that measures the run (throughput, seconds) is in a DVC output: same inputs, same bytes.
    ws, *_, baseline = built
    (ws / "reports/train.json").unlink()
    assert "Running stage 'train'" in run(["dvc", "repro", "--force", "--single-item", "train"], ws).stdout
    assert train_outputs(ws) == baseline
    assert "up to date" in run(["dvc", "status"], ws).stdout
    # The measurements go to the run record (no DVC output), which names the checkpoint it measured.
    record = json.loads((ws / "reports/train.json").read_text())
    assert record["checkpoint_sha256"] == sha256_file(ws / "models/model.pt") and record["throughput_img_s"] > 0


def test_experiments_keep_their_test_metrics(built):
    ws, *_ = built
    lr = yaml.safe_load((ws / "params.yaml").read_text())["train"]["lr"]
    run(["dvc", "exp", "run", "-n", "lr-half", "-S", f"train.lr={lr / 2}"], ws)
    rows = json.loads(run(["dvc", "exp", "show", "--json"], ws).stdout)
    baseline = next(r for r in rows if r["rev"] != "workspace")
    exp = next(e["revs"][0] for e in baseline["experiments"] or [] if e["name"] == "lr-half")
    for row in (baseline, exp):
        metrics = row["data"]["metrics"]
        test = metrics["reports/metrics.json"]["data"]
        assert all(isinstance(test.get(k), (int, float)) for k in TEST_METRICS), (row["name"], test)
        assert isinstance(metrics["dvclive/metrics.json"]["data"]["val"]["loss"], float)
    assert exp["data"]["params"]["params.yaml"]["data"]["train"]["lr"] == lr / 2
    # README's readable view: what differs between the runs, without the dependencies' hashes.
    table = run(["dvc", "exp", "show", "--only-changed", "--drop", ".*/.*", "--csv"], ws).stdout
    header = table.splitlines()[0].split(",")
    assert "auroc" in header and "train.lr" in header and not any("/" in h for h in header), header


def test_raw_data_is_byte_identical_after_runs(built):
    ws, raw_before, *_ = built
    assert tree_digest(ws / "data/raw") == raw_before


def test_failed_gate_stops_before_export(built, tmp_path):
    ws, *_ = built
    set_params(
        ws,
        {
            "evaluate": {"gate": {"min_auroc": 1.0, "min_sensitivity": 1.0, "min_specificity": 1.0}},
            "train": {"lr": 1e-9, "epochs": 1},
        },
    )
    (ws / "models/model.onnx").unlink()
    out = run(["dvc", "repro"], ws, check=False)
    assert out.returncode != 0
    assert "gate" in (out.stdout + out.stderr).lower()
    assert not (ws / "models/model.onnx").exists()
    gate = json.loads((ws / "reports/gate.json").read_text())
    assert gate["passed"] is False and gate["reasons"]
    assert (ws / "reports/metrics.json").is_file()


def test_bad_raw_files_stop_the_pipeline_with_a_named_error(tmp_path):
    ws = make_workspace(tmp_path / "ws", patients=8)
    unreadable = ws / "data/raw/lesion/broken_scan.dcm"
    unreadable.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    src = next((ws / "data/raw/normal").glob("*.dcm"))
    mislabelled = ws / "data/raw/lesoin" / src.name
    mislabelled.parent.mkdir()
    mislabelled.write_bytes(src.read_bytes())
    run(["dvc", "add", "-q", "data/raw"], ws)
    out = run(["dvc", "repro"], ws, check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    # One validation run names every problem: the unreadable file, the unknown label, the duplicate.
    assert "broken_scan.dcm" in text and "lesoin" in text, text
    assert "Traceback" not in text, text
    assert (ws / "reports/validation.md").is_file()
    assert not (ws / "data/prepared").exists() and not (ws / "models/model.pt").exists()
