"""Serve the deployments from this machine: the pipeline on demand, retraining on schedule and on events.

    medtune server &          # or any Prefect server/Cloud: PREFECT_API_URL decides
    medtune serve             # runs until killed; flow runs execute in subprocesses of this process

Deployments:
- `medtune-pipeline/pipeline`: on demand (`prefect deployment run medtune-pipeline/pipeline`).
- `medtune-retrain/retrain`: on `retrain.schedule_cron` (or every `retrain.schedule_interval` s)
  with trigger "schedule", and on the event `medtune.inbox.batch-added` for this project's
  inbox (what `medtune ingest-new` emits) with trigger "event".
Each with a Prefect concurrency limit of one run at a time. The same flows deploy to a work pool
(process, Docker, Kubernetes) with `prefect deploy` and the repository's prefect.yaml:
docs/orchestration.md.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import serve
from prefect.events import DeploymentEventTrigger

from components.params import load_params
from components.retrain.inbox import EVENT, project_resource
from flows.pipeline import pipeline
from flows.retrain import retrain

CONCURRENCY_LIMIT = 1  # runs of one deployment at a time (prefect.yaml sets the same)


def deployments(root: Path, params: str = "params.yaml") -> list:
    """The two RunnerDeployments (also usable with `.deploy(work_pool_name=...)`)."""
    rp = load_params(root / params).retrain
    base = {"root": str(root), "params": params}
    schedule = (
        {"cron": rp.schedule_cron}
        if rp.schedule_cron
        else ({"interval": timedelta(seconds=rp.schedule_interval)} if rp.schedule_interval else {})
    )
    trigger = DeploymentEventTrigger(
        name="medtune: new labelled batch",
        expect={EVENT},
        match={"prefect.resource.id": project_resource(root)},
        parameters={**base, "trigger": "event"},
    )
    # One run at a time per deployment, enforced by the Prefect server: a further run waits in
    # "AwaitingConcurrencySlot" instead of starting. The workspace lock stays the last guard (and is
    # what orders a pipeline run against a retrain run of the same workspace).
    return [
        pipeline.to_deployment(
            name="pipeline",
            parameters=base,
            concurrency_limit=CONCURRENCY_LIMIT,
            description="The DVC pipeline as Prefect tasks, on demand.",
        ),
        retrain.to_deployment(
            name="retrain",
            parameters={**base, "trigger": "schedule"},
            triggers=[trigger],
            description="Retrain on new labelled batches (schedule and inbox event).",
            concurrency_limit=CONCURRENCY_LIMIT,
            **schedule,
        ),
    ]


def serve_deployments(root: Path, params: str = "params.yaml") -> None:
    serve(*deployments(root, params))
