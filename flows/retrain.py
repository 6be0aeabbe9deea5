"""Retraining on new labelled batches, with champion/challenger promotion.

    medtune retrain --once        # one run now; `medtune serve` runs it on schedule and on the inbox event

1. Nothing in the inbox (and no interrupted release to finish): log it and end (no lock, no git, no DVC).
2. A public patient salt with real patient ids stops the run (retrain.allow_public_salt to allow it).
   Each batch is checked on its own (components.retrain.inbox); a bad one goes to quarantine with a report.
3. Good batches are appended to the raw data; train.init_from in params.yaml is set to the champion's
   weights (a warm start; retrain.warm_start) or to null (a cold start from ImageNet, the log says why);
   the pipeline flow runs (dvc add, then `dvc repro` of each stage).
4. components.retrain.challenger.compare decides (gate AND not worse than the champion by the margin).
5. components.retrain.promote.publish records it: dvc push, one git commit, a tag when promoted, then the
   batches are archived. A run killed in there is finished by the next run's recovery, without retraining.
If step 3 or 4 fails (the pipeline stops, e.g. whole-data validation), the workspace goes back to
the last commit and the appended batches go to quarantine with the
error, a `failed` release event is committed, and the run fails; the champion stays.
Runs hold the workspace lock, so a second retrain waits for the first and then finds the inbox empty.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from components.audit import report
from components.common import dvc_data_version
from components.data.labels_csv import labels_file
from components.params import Params, RetrainParams, load_params
from components.release.registry import REPORT, current, model_dir
from components.retrain import challenger, inbox, promote, raw_append, salt_guard, workspace
from components.retrain.stages import check_params_file
from flows.pipeline import IO, on_cluster, pipeline


@task(name="recover-registry")
def recover() -> list[str]:
    return promote.recover(".")


@task(name="check-patient-salt")
def check_salt(params: str, batches: list[str]) -> dict[str, str]:
    """Refuse the run, before anything is appended, when real patient ids would be hashed with a public salt."""
    return salt_guard.refuse_public_salt(".", load_params(params), batches)


@task(name="check-batch")
def check_batch(batch: str, params: str, extra_known: list[dict[str, str]]) -> dict[str, Any]:
    """Read and check one batch against the current manifest plus batches accepted earlier in this run."""
    import pandas as pd

    p = load_params(params)
    rows, problems = inbox.read_batch(batch, p)
    manifest = inbox.current_manifest("data/manifest.csv", p.data.raw_dir, p)
    if extra_known:
        manifest = pd.concat([manifest, pd.DataFrame(extra_known)], ignore_index=True).fillna("")
    mine = raw_append.appended_paths(Path(batch).name, rows, p) if not rows.empty else []
    raw_labels = labels_file(Path(p.data.raw_dir), p.data.labels_csv) if p.data.label_source == "csv" else None
    problems += inbox.check_batch(batch, rows, manifest, p, already_appended=mine, raw_labels=raw_labels)
    return {
        "batch": batch,
        "problems": problems,
        "rows": rows.to_dict("records"),
        "dests": mine,
        "summary": inbox.summary_table(rows, p.data.regression),
    }


@task(name="quarantine-batch", **IO)
def quarantine(batch: str, quarantine_dir: str, problems: list[str], context: dict[str, Any] | None = None) -> str:
    return str(inbox.quarantine(batch, quarantine_dir, problems, {"flow_run_id": flow_run.id, **(context or {})}))


@task(name="append-batch", **IO)
def append(batch: str, rows: list[dict[str, Any]], params: str) -> list[str]:
    import pandas as pd

    p = load_params(params)
    return raw_append.append_to_raw(batch, pd.DataFrame(rows), p.data.raw_dir, p)


@task(name="snapshot-workspace")
def snapshot(params: str, dests: list[str]) -> dict[str, Any]:
    return workspace.snapshot_workspace(".", load_params(params).data.raw_dir, dests)


@task(name="undo-failed-run")
def undo(
    snap: dict[str, Any], dests: list[str], params: str, batches: list[str], error: str, quarantine_dir: str
) -> tuple[list[str], list[dict[str, Any]]]:
    return workspace.undo_failed_run(
        ".", snap, dests, load_params(params), batches, error, quarantine_dir, {"flow_run_id": flow_run.id}
    )


@task(name="record-failure", **IO)
def record_failure(
    error: str, trigger: str, raw_dir: str, batches: list[dict[str, Any]], restored: list[str]
) -> dict[str, Any]:
    return promote.record_failure(
        ".",
        error=error,
        trigger=trigger,
        flow_run_id=flow_run.id,
        data_version=dvc_data_version(raw_dir),
        batches=batches,
        restored=restored,
    )


@task(name="plan-warm-start")
def plan_start(params: str) -> dict[str, Any]:
    """Set train.init_from to the champion's weights (or null, a cold start), as `dvc repro` will read it."""
    plan = workspace.apply_warm_start(".", params)
    get_run_logger().info("%s", plan["reason"])
    return plan


@task(name="compare-champion")
def compare(params: str, metric: str, margin: float) -> dict[str, Any]:
    return challenger.compare(".", load_params(params), metric, margin)


@task(name="record-release", **IO)
def publish(
    decision: dict[str, Any], trigger: str, raw_dir: str, rp: RetrainParams, batches: list[str]
) -> dict[str, Any]:
    """Push, commit, tag, then archive the batches: one release that `recover` finishes if the run dies."""
    return promote.publish(
        ".",
        decision,
        trigger=trigger,
        flow_run_id=flow_run.id,
        data_version=dvc_data_version(raw_dir),
        tag_prefix=rp.tag_prefix,
        remote_url=rp.dvc_remote,
        remote_name=rp.dvc_remote_name,
        batches=batches,
        processed_dir=rp.processed_dir,
        allow_public_salt=rp.allow_public_salt,
    )


@task(name="audit-report")
def audit_report(model_id: str) -> dict[str, Any]:
    """registry/models/<id>/report.html: the model's self-contained audit report (components.audit.report)."""
    return report.write_report(model_id, model_dir(".", model_id) / REPORT, ".")


def _report_champion(logger) -> None:
    """The champion's audit report, written once (after its promotion, or a promotion that recovery
    finished) and linked in the UI. The release is committed by then: a report that cannot be written is
    an error in the log (`medtune report` writes it later), not a failed run."""
    champion = (current(".") or {}).get("model_id")
    if not champion or (model_dir(".", champion) / REPORT).is_file():
        return
    try:
        done = audit_report(champion)
    except Exception as exc:  # noqa: BLE001 - any failure: the promotion stands, the log says what is missing
        logger.error(
            "audit report of model %s not written: %s (`medtune report %s` writes it)", champion, exc, champion
        )
        return
    for title, why in done["missing"]:
        logger.warning("audit report of model %s: %s not available: %s", champion, title, why)
    create_link_artifact(
        Path(done["path"]).resolve().as_uri(),
        link_text=f"audit report of model {champion}",
        key="medtune-report",
        description=f"Audit report of model {champion}: one self-contained HTML file ({done['bytes'] // 1024} KiB)",
    )


@task(name="archive-batch", **IO)
def archive(batch: str, processed_dir: str) -> str:
    return str(inbox.archive(batch, processed_dir))


def _decision_markdown(decision: dict[str, Any], record: dict[str, Any] | None) -> str:
    ch, cp = decision["champion"], decision["challenger"]
    head = "PROMOTED" if decision["promote"] else "KEPT CHAMPION"
    lines = [
        f"# Retrain decision: {head}",
        "",
        f"- challenger: `{cp['model_id']}`, gate {'passed' if (cp.get('gate') or {}).get('passed') else 'FAILED'}",
        f"- champion: `{ch['model_id']}`",
    ]
    if record:
        lines.append(f"- git tag: `{record.get('git_tag')}`, data version `{record.get('data_version')}`")
    lines += ["", "Reasons:"] + [f"- {r}" for r in decision["reasons"]]
    return "\n".join(lines) + "\n"


# The metrics the champion-vs-challenger table shows, by data.task; a regression's with their intervals
# (`<name>_ci`, [low, high], in its evaluation record and in challenger.compare's scores).
SHOWN = {
    "classification": ("auroc", "sensitivity", "specificity", "accuracy", "f1", "n_test"),
    "regression": ("mae", "mae_ci", "rmse", "rmse_ci", "r2", "r2_ci", "n_test"),
}


def _metrics_rows(decision: dict[str, Any], task: str) -> list[dict[str, Any]]:
    comp = decision.get("comparison") or {}
    columns = {
        "challenger (full test)": decision["challenger"]["metrics"],
        "challenger (shared test)": comp.get("challenger"),
        "champion (shared test)": decision["champion"]["metrics"],
    }
    rows = []
    for name in SHOWN[task]:
        cells = {col: (metrics or {}).get(name) for col, metrics in columns.items()}
        # An interval as one cell, "[low, high]" (a list would not fit the table).
        rows.append({"metric": name, **{c: str(v) if isinstance(v, list) else v for c, v in cells.items()}})
    return rows


@flow(name="medtune-retrain", log_prints=True)
def retrain(root: str = ".", params: str = "params.yaml", trigger: str = "manual") -> dict[str, Any]:
    """Retrain when the inbox holds new labelled batches; promote the challenger only if it earns it."""
    logger = get_run_logger()
    os.chdir(root)
    check_params_file(".", params)  # before any batch is appended: the pipeline would refuse it
    p = load_params(params)
    rp = p.retrain
    if not inbox.find_batches(rp.inbox_dir) and not promote.pending("."):
        logger.info("nothing new in %s: no retraining, nothing changed (trigger: %s)", rp.inbox_dir, trigger)
        return {"outcome": "nothing-new", "trigger": trigger}

    holder = f"retrain flow run {flow_run.id} (pid {os.getpid()}, trigger {trigger})"
    with workspace.workspace_lock(
        ".", holder, rp.lock_timeout, lambda h: logger.info("another run holds the workspace (%s); waiting", h)
    ):
        recovered = recover()
        for line in recovered:
            logger.warning("recovery: %s", line)
        batches = [str(b) for b in inbox.find_batches(rp.inbox_dir)]
        if not batches:  # the run we waited for took them, or recovery finished an interrupted release
            _report_champion(logger)
            logger.info("nothing new in %s after waiting: an earlier run processed it", rp.inbox_dir)
            return {"outcome": "recovered" if recovered else "nothing-new", "trigger": trigger, "recovered": recovered}
        # Before any batch is read into a task result, quarantined or appended.
        check_salt(params, batches)
        good, bad = _check_batches(batches, params, rp.quarantine_dir, logger)
        if not good:
            logger.warning("every new batch was quarantined: nothing retrained, the champion stays")
            return {"outcome": "quarantined", "trigger": trigger, "quarantined": bad}
        result, decision = _append_and_run(good, params, p, trigger, logger)
        record = _record_decision(decision, good, trigger, p, logger)
        _report_champion(logger)
    outcome = "promoted" if decision["promote"] else "kept-champion"
    logger.info("retrain %s: %s", outcome, "; ".join(decision["reasons"]))
    return {
        "outcome": outcome,
        "trigger": trigger,
        "model_id": result.get("model_id"),
        "data_version": result.get("data_version"),
        "reasons": decision["reasons"],
        "git_tag": (record or {}).get("git_tag"),
        "quarantined": bad,
    }


def _check_batches(
    batches: list[str], params: str, quarantine_dir: str, logger
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Check each batch in turn (against the data and the batches accepted before it); quarantine the
    bad ones. Returns (the good ones' check results, {batch, quarantine, problems} per bad one)."""
    good, bad, known = [], [], []
    for batch in batches:
        checked = check_batch(batch, params, known)
        if checked["problems"]:
            where = quarantine(batch, quarantine_dir, checked["problems"])
            bad.append({"batch": Path(batch).name, "quarantine": where, "problems": checked["problems"]})
            create_markdown_artifact(
                f"# Quarantined `{Path(batch).name}`\n\nMoved to `{where}`.\n\n"
                + "\n".join(f"- {x}" for x in checked["problems"][:50]),
                key="medtune-quarantine",
            )
            continue
        logger.info("batch %s is good: %s", Path(batch).name, checked["summary"])
        good.append(checked)
        # Where these files will sit in raw (raw_append.raw_destination), so a later batch's duplicate
        # message names the right path.
        known += [
            {"path": dest, "sha256": r["sha256"], "patient": r["patient"], "split": r["split"]}
            for dest, r in zip(checked["dests"], checked["rows"])
        ]
    return good, bad


def _append_and_run(
    good: list[dict[str, Any]], params: str, p: Params, trigger: str, logger
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Append the good batches, run the pipeline and decide: (the pipeline's result, the decision).
    On a failure the run is undone (_fail) and the error raised again."""
    rp = p.retrain
    # Taken before anything changes; a failure here leaves the batches in the inbox for the next run.
    dests = [d for checked in good for d in checked["dests"]]
    snap = snapshot(params, dests)
    try:
        for checked in good:
            append(checked["batch"], checked["rows"], params)
        create_table_artifact(
            [dict(batch=Path(c["batch"]).name, **s) for c in good for s in c["summary"]],
            key="medtune-new-batches",
            description="Appended batches (" + ("targets" if p.data.regression else "label") + " x split)",
        )
        plan_start(params)
        # The stages (and their per-file work) on the Dask cluster when one is configured
        # (flows.pipeline.task_runner). This flow's own tasks stay in its process: small
        # bookkeeping on the workspace (batches, git, the registry), by paths relative to it.
        result = on_cluster(pipeline, params)(root=".", params=params, lock=False)
        decision = compare(params, rp.compare_metric, rp.promotion_margin)
    except Exception as exc:
        _fail(exc, good, snap, dests, params, trigger, p.data.raw_dir, rp.quarantine_dir, logger)
        raise  # the run is marked failed; the champion stays
    workspace.drop_snapshot(".")
    return result, decision


def _record_decision(
    decision: dict[str, Any], good: list[dict[str, Any]], trigger: str, p: Params, logger
) -> dict[str, Any] | None:
    """Publish the decision (or, for the champion itself, only archive the batches) and show it in the
    UI; returns the release record (None when nothing was recorded)."""
    rp = p.retrain
    record = None
    if decision.get("same_model"):
        logger.info("the challenger is the current champion (a resumed run); nothing to record")
        for checked in good:
            archive(checked["batch"], rp.processed_dir)
    else:  # archives the batches last, once the release is committed and tagged
        record = publish(decision, trigger, p.data.raw_dir, rp, [c["batch"] for c in good])
    create_markdown_artifact(
        _decision_markdown(decision, record), key="medtune-decision", description="Champion/challenger decision"
    )
    create_table_artifact(_metrics_rows(decision, p.data.task), key="medtune-champion-vs-challenger")
    return record


def _fail(
    exc: BaseException,
    good: list[dict[str, Any]],
    snap: dict[str, Any],
    dests: list[str],
    params: str,
    trigger: str,
    raw_dir: str,
    quarantine_dir: str,
    logger,
) -> None:
    """After a failure past the append: undo the run, record it, say so. Never masks `exc`."""
    error = f"{type(exc).__name__}: {exc}"
    logger.error("retrain failed after appending %d batch(es): %s; restoring the workspace", len(good), error)
    try:
        restored, where = undo(snap, dests, params, [c["batch"] for c in good], error, quarantine_dir)
    except Exception as e:  # noqa: BLE001 - undo_failed_run does not raise; the task machinery might
        restored, where = (
            [f"FAILED to undo the run: {e}"],
            [{"batch": Path(c["batch"]).name, "quarantine": None} for c in good],
        )
    try:
        record_failure(error, trigger, raw_dir, where, restored)
    except Exception as e:  # noqa: BLE001
        logger.error("could not record the failed event: %s", e)
    create_markdown_artifact(
        f"# Retrain FAILED\n\n`{error}`\n\nBatches quarantined: "
        + ", ".join(f"`{w['batch']}` -> `{w['quarantine']}`" for w in where)
        + "\n\nWorkspace restored:\n"
        + "\n".join(f"- {x}" for x in restored)
        + "\n",
        key="medtune-decision",
        description="Retrain failed; champion kept",
    )
