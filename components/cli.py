"""`medtune`: the command line. Each sub-command hands its arguments to a module's `main(argv)`
(or to the function FUNCTIONS names for it).

    medtune ingest            # one pipeline stage (what dvc.yaml runs)
    medtune predict model.onnx scans/ -o predictions.csv
    medtune --help

Modules are imported only when their command runs, so `medtune --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("components.ingest", "stage 1: scan the raw folder and write the manifest (with the patient-level split)"),
    "validate": ("components.validate", "stage 2: Great Expectations suite over the manifest"),
    "preprocess": ("components.preprocess", "stage 3: decode, window, resize into a uint8 cache"),
    "augment": ("components.augment", "stage 4: write a preview grid of the training augmentation"),
    "train": ("components.train", "stage 5: fine-tune a pretrained backbone with a new head"),
    "evaluate": ("components.evaluate", "stage 6: test metrics with intervals, plots and the gate"),
    "export": ("components.export", "stage 7: ONNX export, parity check, metadata and model card"),
    "predict": ("components.predict", "run an exported ONNX model on scans and write a CSV"),
    "server": ("components.orchestrate", "start a local Prefect server (UI) on 127.0.0.1:4200"),
    "serve": ("flows.serve", "serve the Prefect deployments: pipeline on demand, retrain on schedule and on events"),
    "retrain": ("flows.retrain", "retrain on new labelled batches in the inbox (--once); champion/challenger promotion"),
    "ingest-new": ("components.inbox", "add a labelled batch to the inbox and emit the retrain event"),
    "trace": ("components.trace", "audit: everything that made a model (data, code, params, evidence); --json"),
    "verify": ("components.verify", "audit: re-hash a model's ONNX, checkpoint and raw scans; exit 1 on a mismatch"),
    "models": ("components.audit", "audit: `models list` every model; `models rollback ID` to an earlier one"),
    "preset": ("components.presets", "list the named parameter presets, print one as `dvc exp run -S` flags, or --apply it"),
    "demo-data": ("components.demo_data", "write synthetic DICOM demo scans (optionally an extra batch)"),
    "import-npz": ("components.importers", "convert a MedMNIST .npz into PNG files plus labels.csv"),
    "import-folders": ("components.importers", "copy a folder-per-class tree (split folders optional) plus labels.csv"),
}
# Commands whose entry point is not their module's `main(argv)` (one module serving several commands).
FUNCTIONS: dict[str, str] = {"import-folders": "main_folders"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: medtune COMMAND [ARGS...]", "", "Commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`medtune COMMAND --help` shows the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"medtune: unknown command {command!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(getattr(module, FUNCTIONS.get(command, "main"))(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
