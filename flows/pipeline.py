"""The pipeline as a Prefect flow: one task per dvc.yaml stage, each calling the same function.

    medtune serve                                   # serves it as deployment medtune-pipeline/pipeline
    prefect deployment run medtune-pipeline/pipeline

Wiring only: every task calls `components.<stage>.main` (what `dvc repro` runs) through
`orchestrate.run_stage`. Around the stages: `dvc add` of the raw folder first (so data/raw.dvc names
the data version trained on) and `dvc commit --force` last (so dvc.lock describes exactly what this
flow produced and `dvc status` is clean). DVC commands run one at a time, in this process, under the
workspace lock; no two flows touch the workspace at once.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from components import common, folders, orchestrate
from components.common import dvc_data_version
from components.params import load_params


def _transient(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's retry_condition_fn signature
    return orchestrate.is_transient(state.data if isinstance(state.data, BaseException) else None)


IO = {"retries": 2, "retry_delay_seconds": 3, "retry_condition_fn": _transient}


def _stage_task(name: str, io_bound: bool):
    def body(params: str) -> None:
        orchestrate.run_stage(name, params)
    body.__name__ = name
    return task(name=name, **(IO if io_bound else {}))(body)


# I/O-bound stages (they read the raw scans or write many files) retry on transient OS errors.
ingest = _stage_task("ingest", io_bound=True)
validate = _stage_task("validate", io_bound=False)
preprocess = _stage_task("preprocess", io_bound=True)
augment = _stage_task("augment", io_bound=False)
train = _stage_task("train", io_bound=False)
evaluate = _stage_task("evaluate", io_bound=False)
export = _stage_task("export", io_bound=True)


@task(name="dvc-add-raw", **IO)
def version_data(raw_dir: str) -> str:
    folders.refuse_links_out(raw_dir)
    common.dvc(".", "add", raw_dir)
    return dvc_data_version(raw_dir)


@task(name="dvc-commit", **IO)
def dvc_commit(stages: list[str]) -> str:
    common.dvc(".", "commit", "--force", *stages)
    return common.dvc(".", "status")


def _read(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        return None
    return json.loads(p.read_text()) if p.suffix == ".json" else p.read_text()


def publish_validation() -> None:
    md = _read("reports/validation.md")
    if md:
        create_markdown_artifact(md, key="medtune-validation", description="Validation summary (Great Expectations)")


def publish_evaluation() -> tuple[dict | None, dict | None]:
    metrics, gate = _read("reports/metrics.json"), _read("reports/gate.json")
    if metrics:
        rows = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float, str))]
        if metrics.get("auroc_ci"):
            rows.append({"metric": "auroc_ci", "value": str(metrics["auroc_ci"])})
        create_table_artifact(rows, key="medtune-metrics", description="Test metrics of this run's model")
    if gate:
        lines = [f"# Gate: {'PASSED' if gate.get('passed') else 'FAILED'}", ""]
        lines += [f"- {r}" for r in gate.get("reasons", [])]
        create_markdown_artifact("\n".join(lines), key="medtune-gate", description="Absolute release gate")
    return metrics, gate


def publish_lineage() -> dict | None:
    lineage = _read("models/lineage.json")
    if lineage:
        create_markdown_artifact("# Lineage of model `%s`\n\n```json\n%s\n```\n" % (
            lineage.get("model_id"), json.dumps(lineage, indent=2, sort_keys=True)),
            key="medtune-lineage", description="models/lineage.json")
    return lineage


@flow(name="medtune-pipeline", log_prints=True)
def pipeline(root: str = ".", params: str = "params.yaml", lock: bool = True) -> dict[str, Any]:
    """ingest -> validate -> preprocess -> augment -> train -> evaluate -> export, then dvc commit.

    Export runs only when the gate passed (it would refuse anyway); the result says which stages ran.
    `lock=False` when the caller (the retrain flow) already holds the workspace lock.
    """
    logger = get_run_logger()
    os.chdir(root)  # stage defaults are relative to the project root; each flow run is its own process
    p = load_params(params)
    holder = f"pipeline flow run (pid {os.getpid()})"
    with (orchestrate.workspace_lock(".", holder, 3600, lambda h: logger.info("waiting for the workspace: %s", h))
          if lock else contextlib.nullcontext()):
        data_version = version_data(p.data.raw_dir)
        ingest(params)
        try:
            validate(params)
        finally:
            publish_validation()  # the summary matters most when validation failed
        preprocess(params)
        augment(params)
        train(params)
        evaluate(params)
        metrics, gate = publish_evaluation()
        ran = [s for s in orchestrate.STAGES if s != "export"]
        if gate and gate.get("passed"):
            export(params)
            ran.append("export")
        else:
            logger.warning("gate failed: export skipped, no model this run (%s)", "; ".join((gate or {}).get("failed", [])))
        status = dvc_commit(ran)
        lineage = publish_lineage() if "export" in ran else None
    logger.info("dvc status after the flow: %s", status or "clean")
    return {"data_version": data_version, "stages": ran, "gate": gate, "metrics": metrics,
            "model_id": (lineage or {}).get("model_id"), "dvc_status": status}
