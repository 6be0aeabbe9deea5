"""`medtune trace`'s text report: the record laid out by audit/templates/trace.txt.j2, one titled
block per section, with the helpers the template calls to format values.

    print(render(trace(model, root)))
"""

from __future__ import annotations

import json
from typing import Any

from components.release.model_card import value_rows
from components.templates import render as render_template

SECTIONS = (
    "model",
    "code",
    "data",
    "split",
    "validation",
    "environment",
    "pretrained",
    "training",
    "evaluation",
    "export",
    "model_card",
    "release",
    "drift",
)
TITLES = {
    "model": "1. Model identity",
    "code": "2. Code version",
    "data": "3. Data version",
    "split": "4. Split",
    "validation": "5. Validation",
    "environment": "6. Environment",
    "pretrained": "7. Pretrained weights",
    "training": "8. Training",
    "evaluation": "9. Evaluation",
    "export": "10. Export",
    "model_card": "11. Model card",
    "release": "12. Release",
    "drift": "13. Data drift at retraining",
}


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return "-" if v is None else str(v)


def _flat(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and bool(v)
        and all(not isinstance(x, (dict, list)) for x in v.values())
        and len(", ".join(f"{a}={_scalar(b)}" for a, b in v.items())) <= 110
    )


def _pairs(v: dict[str, Any], skip_none: bool = False) -> str:
    """A flat mapping on one line: "a=1, b=x" (with skip_none, None values left out)."""
    return ", ".join(f"{a}={_scalar(b)}" for a, b in v.items() if not (skip_none and b is None))


def _listed(v: Any) -> bool:
    """A list shown one item a line."""
    return isinstance(v, list) and bool(v) and all(isinstance(x, (str, dict)) for x in v)


def _metric_lines(metrics: Any) -> list[str]:
    if not isinstance(metrics, dict):
        return [_scalar(metrics)]
    rows = value_rows(metrics)
    if metrics.get("task") == "regression" or (rows and "auroc" not in metrics):  # a record, or a champion's scores
        return [
            ", ".join(
                f"{r['name']} {_scalar(r['value'])} (95% CI {_scalar(r['low'])} - {_scalar(r['high'])})" for r in rows
            )
            + f", n_test {metrics.get('n_test')}"
        ]
    ci = metrics.get("auroc_ci") or [None, None]
    return [
        f"auroc {_scalar(metrics.get('auroc'))} (95% CI {_scalar(ci[0])} - {_scalar(ci[1])}), n_test "
        f"{metrics.get('n_test')}",
        ", ".join(
            f"{k} {_scalar(metrics[k])}"
            for k in ("accuracy", "sensitivity", "specificity", "precision", "f1")
            if k in metrics
        ),
    ]


def _probe_lines(probe: Any) -> list[str]:
    """The gain from fine-tuning in two lines: the probe (its AUROC and start), then fine-tuned minus probe."""
    if not isinstance(probe, dict):
        return [f"gain from fine-tuning: {_scalar(probe)}"]

    def num(v: Any, sign: str = "") -> str:
        return format(v, f"{sign}.3f") if isinstance(v, (int, float)) else "-"

    if "mae_gain" in probe:
        return _probe_mae_lines(probe, num)
    lo, hi = probe.get("probe_auroc_ci") or [None, None]
    glo, ghi = probe.get("auroc_gain_ci") or [None, None]
    return [
        f"linear probe: auroc {num(probe.get('probe_auroc'))} (95% CI {num(lo)} - {num(hi)}); "
        f"{probe.get('probe_start')}, frozen, logistic-regression head C={_scalar(probe.get('C'))}",
        f"gain from fine-tuning: auroc {num(probe.get('fine_tuned_auroc'))} - {num(probe.get('probe_auroc'))} "
        f"= {num(probe.get('auroc_gain'), '+')} (95% CI {num(glo, '+')} to {num(ghi, '+')}, paired bootstrap, "
        f"{probe.get('auroc_gain_bootstrap_valid')} resamples)",
    ]


def _probe_mae_lines(probe: dict[str, Any], num: Any) -> list[str]:
    """A regression's gain in MAE: the probe's MAE (and start), then probe minus fine-tuned (> 0: fine-tuning helped)."""
    lo, hi = probe.get("probe_mae_ci") or [None, None]
    glo, ghi = probe.get("mae_gain_ci") or [None, None]
    return [
        f"linear probe: mae {num(probe.get('probe_mae'))} (95% CI {num(lo)} - {num(hi)}); "
        f"{probe.get('probe_start')}, frozen, ridge-regression head alpha={_scalar(probe.get('alpha'))}",
        f"gain from fine-tuning: mae {num(probe.get('probe_mae'))} (probe) - {num(probe.get('fine_tuned_mae'))} "
        f"= {num(probe.get('mae_gain'), '+')} (95% CI {num(glo, '+')} to {num(ghi, '+')}, paired bootstrap, "
        f"{probe.get('mae_gain_bootstrap_valid')} resamples; > 0: fine-tuning lowered the error)",
    ]


def render(rec: dict[str, Any]) -> str:
    """The readable report (audit/templates/trace.txt.j2): one titled block per section."""
    sections = []
    for name in SECTIONS:
        sec = rec[name]
        if name == "code" and isinstance(sec.get("params"), dict):  # one JSON line per parameter group
            sec = {**sec, "params": {k: json.dumps(v, sort_keys=True) for k, v in sec["params"].items()}}
        sections.append((name, TITLES[name], sec))
    return render_template(
        "audit/templates/trace.txt.j2",
        rec=rec,
        sections=sections,
        scalar=_scalar,
        flat=_flat,
        pairs=_pairs,
        listed=_listed,
        metric_lines=_metric_lines,
        probe_lines=_probe_lines,
        public_salt=public_salt,
        public_salt_note=PUBLIC_SALT_NOTE,
    ).rstrip("\n")


PUBLIC_SALT_NOTE = (
    "real patient ids were hashed with a public salt: anyone with the ids or the scan headers can "
    "re-identify the patients in this model's manifest copies. Set a secret MEDTUNE_PATIENT_SALT "
    "and rerun the pipeline (README, 'Patient salt')."
)


def public_salt(record: Any) -> bool:
    """A lineage's data.patient_salt says real patient ids were hashed with a public salt."""
    return isinstance(record, dict) and record.get("status") == "public" and bool(record.get("real_patient_ids"))
