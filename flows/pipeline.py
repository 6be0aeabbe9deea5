"""The pipeline as a Prefect flow. DVC executes, Prefect orchestrates.

    medtune pipeline                                # one run now, in this process
    medtune serve                                   # serves it as deployment medtune-pipeline/pipeline
    prefect deployment run medtune-pipeline/pipeline

One task per dvc.yaml stage, in the order `dvc repro` runs them (DVC's own graph,
stages.pipeline_stages), each running `dvc repro --single-item STAGE` (stages.run_stage).
So DVC decides: a stage whose deps, params and outs match dvc.lock is skipped, one DVC's run cache
knows is restored without running, and dvc.lock is written by DVC for what it ran, never forced. The
task's state says which: Completed (ran) or Skipped (its message: unchanged, or run cache). The lines
dvc and the stage print go to the task's run logger as they come, so training epochs, metrics, gate
reasons and validation failures are in the flow run's logs on the server.

Around the stages: `dvc add` of the raw folder first (so data/raw.dvc names the data version trained
on). A stage that reads reports/gate.json (export) runs only when the gate passed; otherwise its task
ends "Gate failed" and the run has no model (`dvc status` then shows that stage changed, as after a
`dvc repro` that stopped there). DVC commands run one at a time, from this process, under the
workspace lock; no two flows touch the workspace at once. Retries, on transient errors only, and the
artifacts (validation, metrics, gate, lineage) are Prefect's part.

With a Dask scheduler configured (compute.dask_scheduler or MEDTUNE_DASK_SCHEDULER), `on_cluster`
gives the flow Prefect's DaskTaskRunner: see `task_runner`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, State

from components import common, parallel
from components.common import dvc_data_version
from components.data import folders
from components.params import ComputeParams, load_params
from components.retrain import stages
from components.retrain.stages import GATE_FILE, OUTCOMES
from components.retrain.workspace import workspace_lock


def _transient(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's retry_condition_fn signature
    return stages.is_transient(state.data if isinstance(state.data, BaseException) else None)


# Retried only on transient errors (DVC's lock busy, an OSError in a stage); a `dvc repro` again is
# safe: it runs only what is still out of date. Never on a StageError: bad input stays bad.
IO = {"retries": 2, "retry_delay_seconds": 3, "retry_condition_fn": _transient}


def task_runner(compute: ComputeParams):
    """Prefect's DaskTaskRunner on the scheduler map_files would use, or None (Prefect's default:
    threads of the flow's own process).

    What it changes is where a task's process lives, not how many run at once: each task, and the
    `dvc repro` it starts, runs in a Dask worker (on the cluster's machines, which must see the
    workspace at the same absolute path), while the flow still submits the stages one at a time,
    because DVC executes them and two DVC commands in one workspace fail. The stage started there
    is given the scheduler's address, so its per-file work spreads over the same workers.
    """
    address = parallel.scheduler_address(compute)
    if not address:
        return None
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


def on_cluster(flow_obj, params_file: str | Path):
    """`flow_obj` with the task runner that `params_file`'s compute section (or the environment) asks for."""
    runner = task_runner(load_params(params_file).compute)
    return flow_obj if runner is None else flow_obj.with_options(task_runner=runner)


@task(name="dvc-repro", **IO)
def reproduce(stage: str, root: str, scheduler: str | None = None) -> State:
    """`dvc repro --single-item STAGE`; the final state is Completed when it ran, Skipped when DVC skipped it.

    `root` is absolute: on a Dask worker the flow's working directory does not apply."""
    logger = get_run_logger()
    if scheduler:  # the stage reads it from here when it came from the flow's environment, not params.yaml
        os.environ[parallel.DASK_ENV] = scheduler
    run = stages.run_stage(stage, root, logger)
    message = f"{OUTCOMES[run.outcome]} (dvc repro --single-item {stage})"
    logger.log(logging.WARNING if run.outcome == "unknown" else logging.INFO, "%s: %s", stage, message)
    return Completed(
        name="Skipped" if run.outcome in ("skipped", "run-cache") else "Completed", message=message, data=run.outcome
    )


@task(name="gate-refused")
def refuse(stage: str, gate: dict[str, Any]) -> State:
    """A stage that reads the gate (export) after the gate failed: not run, and the state says why."""
    failed = "; ".join(gate.get("failed") or gate.get("reasons") or ["reports/gate.json: passed is false"])
    get_run_logger().warning("gate failed: %s not run, no model this run (%s)", stage, failed)
    return Completed(
        name="Gate failed", message=f"not run: the gate failed ({failed}); no model this run", data="gate-failed"
    )


@task(name="dvc-add-raw", **IO)
def version_data(raw_dir: str, root: str) -> str:
    folders.refuse_links_out(Path(root) / raw_dir)
    common.dvc(root, "add", raw_dir)
    return dvc_data_version(Path(root) / raw_dir)


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
        # Whatever evaluate measured for the task (classification: auroc, its interval, ...; regression: mae,
        # rmse, r2 each with `_ci_low`/`_ci_high`), in metrics.json's order; an interval kept as a
        # [low, high] list goes in one cell, after the numbers.
        rows = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float, str))]
        rows += [{"metric": k, "value": str(v)} for k, v in metrics.items() if isinstance(v, list) and v]
        create_table_artifact(rows, key="medtune-metrics", description="Test metrics of this run's model")
    if gate:
        lines = [f"# Gate: {'PASSED' if gate.get('passed') else 'FAILED'}", ""]
        lines += [f"- {r}" for r in gate.get("reasons", [])]
        create_markdown_artifact("\n".join(lines), key="medtune-gate", description="Absolute release gate")
    return metrics, gate


def publish_lineage() -> dict | None:
    lineage = _read("models/lineage.json")
    if lineage:
        create_markdown_artifact(
            f"# Lineage of model `{lineage.get('model_id')}`\n\n```json\n"
            f"{json.dumps(lineage, indent=2, sort_keys=True)}\n```\n",
            key="medtune-lineage",
            description="models/lineage.json",
        )
    return lineage


# Artifacts by the stage output they show: published after the stage that writes the file (whether it
# ran or was skipped: the file is this run's either way). After a failed stage only the validation
# summary, which matters most when validation failed; the others would be a previous run's.
ARTIFACTS = {"reports/validation.md": "validation", GATE_FILE: "evaluation", "models/lineage.json": "lineage"}


@flow(name="medtune-pipeline", log_prints=True)
def pipeline(root: str = ".", params: str = "params.yaml", lock: bool = True) -> dict[str, Any]:
    """dvc add of the raw folder, then `dvc repro --single-item` of each dvc.yaml stage in DVC's order.

    The result says what each stage did ("ran", "skipped", "run-cache", "gate-failed"); `model_id` is
    None when the gate failed. `params` must be params.yaml: DVC gives the stages that file.
    `lock=False` when the caller (the retrain flow) already holds the workspace lock.
    """
    logger = get_run_logger()
    os.chdir(root)  # stage defaults are relative to the project root; each flow run is its own process
    stages.check_params_file(".", params)
    p = load_params(params)
    holder = f"pipeline flow run (pid {os.getpid()})"
    outcomes: dict[str, str] = {}
    metrics = gate = lineage = None
    with (
        workspace_lock(".", holder, 3600, lambda h: logger.info("waiting for the workspace: %s", h))
        if lock
        else contextlib.nullcontext()
    ):
        here, scheduler = os.getcwd(), parallel.scheduler_address(p.compute)
        data_version = version_data(p.data.raw_dir, here)
        for stage in stages.pipeline_stages("."):
            if GATE_FILE in stage.deps and gate is not None and not gate.get("passed"):
                state = refuse.with_options(name=stage.name, task_run_name=stage.name)(
                    stage.name, gate, return_state=True
                )
                outcomes[stage.name] = state.result()
                continue
            state = reproduce.with_options(name=stage.name, task_run_name=stage.name)(
                stage.name, here, scheduler, return_state=True
            )
            shows = [ARTIFACTS[o] for o in stage.outs if o in ARTIFACTS]
            if state.is_failed():
                if "validation" in shows:
                    publish_validation()
                state.result()  # raises the stage's error: the flow run fails with it
            outcomes[stage.name] = state.result()
            if "validation" in shows:
                publish_validation()
            if "evaluation" in shows:
                metrics, gate = publish_evaluation()
            if "lineage" in shows:
                lineage = publish_lineage()
        status = common.dvc(".", "status")
    ran = [name for name, outcome in outcomes.items() if outcome == "ran"]
    logger.info("stages run: %s; dvc status after the flow: %s", ", ".join(ran) or "none (all up to date)", status)
    return {
        "data_version": data_version,
        "stages": outcomes,
        "ran": ran,
        "gate": gate,
        "metrics": metrics,
        "model_id": (lineage or {}).get("model_id"),
        "dvc_status": status,
        "flow_run_id": str(flow_run.id),
    }
