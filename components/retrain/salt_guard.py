"""The patient-salt refusals of a retrain: real patient ids hashed with a public salt must not be
committed or pushed by a release (see components.common.salt_status).

    salt_guard.refuse_public_salt(".", params, batches)   # before a retrain appends anything
    salt_guard.refuse_public_salt_record(root, allow)     # publish's own guard: ingest's record of the salt
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from components import common
from components.common import StageError
from components.params import Params


def refuse_public_salt(root: str | Path, params: Params, batches: Sequence[str | Path] = ()) -> dict[str, str]:
    """Raise StageError when this retrain would hash real patient ids with a public salt (see
    common.salt_status) and `retrain.allow_public_salt` is false; else return the salt status.

    Real ids: the raw data's (data/manifest.json of the last ingest) or any of `batches`' (read as
    the batch check reads them). Run before anything is appended: a promotion commits the hashed
    manifest to git and pushes the data, and a public salt makes those hashes re-identifiable.
    """
    from components.data.ingest import NO_PATIENT
    from components.retrain import inbox

    status = common.salt_status(params.data.patient_salt)
    if status["status"] == "secret" or params.retrain.allow_public_salt:
        return status
    found = []
    manifest = Path(root) / "data/manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        recorded = meta.get("patient_salt") or {}
        real = recorded.get("real_patient_ids", meta.get("patient_source", NO_PATIENT) != NO_PATIENT)
        if real:
            found.append(f"the raw data (patients from {meta.get('patient_source')}, {manifest})")
    for batch in batches:
        rows, _ = inbox.read_batch(batch, params)
        n = int((rows["patient"] != "").sum()) if len(rows) else 0
        if n:
            found.append(f"batch {batch} ({n} scan(s) with a patient id)")
    if found:
        raise StageError(
            f"patient salt: {' and '.join(found)} would be hashed with a public salt ({status['source']}), and a "
            "promotion commits and pushes those hashes, which anyone with the ids or headers can reverse. Nothing was "
            "appended; the batches stay in the inbox. Set a secret MEDTUNE_PATIENT_SALT in the environment of the "
            "run (the Prefect worker's; the same salt this workspace was built with, if it had one), or set "
            "retrain.allow_public_salt: true in params.yaml only if the patient ids are made up (README, 'Patient salt')."
        )
    return status


def refuse_public_salt_record(root: Path, allow: bool) -> None:
    """publish's own guard, for callers other than the retrain flow: ingest's record of the salt."""
    manifest = root / "data/manifest.json"
    recorded = (json.loads(manifest.read_text()).get("patient_salt") if manifest.is_file() else None) or {}
    if not allow and recorded.get("status") == "public" and recorded.get("real_patient_ids"):
        raise StageError(
            f"{manifest}: real patient ids were hashed with a public salt ({recorded.get('source')}); "
            "not recording (nothing committed or pushed). Set a secret MEDTUNE_PATIENT_SALT and rerun the "
            "pipeline, or pass allow_public_salt (retrain.allow_public_salt: true) for made-up ids."
        )
