"""`medtune`: the command line. Each sub-command hands its arguments to a module's `main(argv)`
(or to the function FUNCTIONS names for it).

    medtune ingest            # one pipeline stage (what dvc.yaml runs)
    medtune predict model.onnx scans/ -o predictions.csv
    medtune --help

Modules are imported only when their command runs, so `medtune --help` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("components.data.ingest", "stage 1: scan the raw folder and write the manifest (with the patient-level split)"),
    "validate": ("components.data.validate", "stage 2: Great Expectations suite over the manifest"),
    "preprocess": ("components.data.preprocess", "stage 3: decode, window, resize into a uint8 cache"),
    "augment": ("components.data.augment", "stage 4: write a preview grid of the training augmentation"),
    "train": ("components.model.train", "stage 5: fine-tune a pretrained backbone with a new head"),
    "evaluate": ("components.model.evaluate", "stage 6: test metrics with intervals, plots and the gate"),
    "export": ("components.release.export", "stage 7: ONNX export, parity check, metadata and model card"),
    "predict": ("components.release.predict", "run an exported ONNX model on scans and write a CSV"),
    "server": ("flows.commands", "start a local Prefect server (UI) on 127.0.0.1:4200"),
    "serve": ("flows.commands", "serve the Prefect deployments: pipeline on demand, retrain on schedule and on events"),
    "retrain": ("flows.commands", "retrain on new labelled batches in the inbox (--once); champion/challenger promotion"),
    "pipeline": ("flows.commands", "run the pipeline once as a Prefect flow: a task per dvc.yaml stage, `dvc repro` in each"),
    "ingest-new": ("flows.commands", "add a labelled batch to the inbox and emit the retrain event"),
    "trace": ("components.audit.trace", "audit: everything that made a model (data, code, params, evidence); --json"),
    "verify": ("components.audit.verify", "audit: re-hash a model's ONNX, checkpoint and raw scans; exit 1 on a mismatch"),
    "models": ("components.audit.history", "audit: `models list` every model; `models rollback ID` to an earlier one"),
    "preset": ("components.presets", "list the named parameter presets, print one as `dvc exp run -S` flags, or --apply it"),
    "demo-data": ("components.data.demo_data", "write synthetic DICOM demo scans (optionally an extra batch)"),
    "import-npz": ("components.data.importers", "convert a MedMNIST .npz into PNG files plus labels.csv"),
    "import-folders": ("components.data.importers", "copy a folder-per-class tree (split folders optional) plus labels.csv"),
}
# Commands that run a pipeline stage's code (dvc.yaml's `medtune <stage>`): `_run_stage` binds them to
# their starter and holds the stage's lock. Which stages the pipeline has, and their order, is dvc.yaml's
# alone (components.retrain.stages.pipeline_stages reads DVC's graph); this set, spelt out so `medtune --help` imports
# nothing, only says how to run such a command. tests/test_stages.py checks it against dvc.yaml.
STAGE_COMMANDS = frozenset({"ingest", "validate", "preprocess", "augment", "train", "evaluate", "export"})
# Commands whose entry point is not their module's `main(argv)` (one module serving several commands).
# `retrain` answers an empty inbox before it imports flows.retrain (and with it Prefect).
FUNCTIONS: dict[str, str] = {"import-folders": "main_folders", "server": "server_main", "serve": "serve_main",
                             "retrain": "retrain_main", "pipeline": "pipeline_main", "ingest-new": "ingest_new_main"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: medtune COMMAND [ARGS...]", "", "Commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`medtune COMMAND --help` shows the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    entry_point = argv is None  # the process's own command line, not a call from Python code
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"medtune: unknown command {command!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    if command in STAGE_COMMANDS:
        return _run_stage(command, rest, entry_point)
    module = importlib.import_module(COMMANDS[command][0])
    return int(getattr(module, FUNCTIONS.get(command, "main"))(rest) or 0)


def _run_stage(stage: str, rest: list[str], entry_point: bool) -> int:
    """A pipeline stage (what dvc.yaml runs): bound to the process that started it before anything
    else (a stage outlived by its starter would race the next run on the same outputs), then run under
    the stage's lock, so a second writer of the same outputs refuses to start (components.lifetime).
    Only the lock when called from Python code: the caller's process is not the stage's to bind."""
    from components import lifetime
    from components.common import StageError

    try:
        if entry_point:
            lifetime.die_with_starter(f"medtune {stage}")
        if any(a in ("-h", "--help") for a in rest):
            lock = contextlib.nullcontext()  # only prints the options
        elif "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0":
            # One of several processes of your own `torchrun ... medtune train`: rank 0 writes the
            # artefacts and holds the lock; the others would only be refused by it.
            lock = contextlib.nullcontext()
        else:
            lock = lifetime.stage_lock(stage, ".", f"medtune {stage} {' '.join(rest)}".strip())
        with lock:
            module = importlib.import_module(COMMANDS[stage][0])
            return int(module.main(rest) or 0)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
