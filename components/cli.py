"""`medtune`: the command line, on typer. Each sub-command hands its arguments, untouched, to a
module's `main(argv)` (or to the function its COMMANDS entry names), which parses them itself.

    medtune ingest            # one pipeline stage (what dvc.yaml runs)
    medtune predict model.onnx scans/ -o predictions.csv
    medtune --help            # every command; `medtune COMMAND --help` shows one command's options
    medtune --version
    medtune --install-completion   # or --show-completion: shell completion of the command names

Modules are imported only when their command runs, and help is plain text (typer's rich formatting
would import rich), so `medtune --help` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any, NamedTuple

import typer
from typer.core import TyperCommand


class Command(NamedTuple):
    module: str  # imported only when the command runs
    help: str  # the line `medtune --help` shows
    function: str = "main"  # its entry point: `function(argv) -> int`


COMMANDS: dict[str, Command] = {
    "ingest": Command(
        "components.data.ingest", "stage 1: scan the raw folder and write the manifest (with the patient-level split)"
    ),
    "validate": Command("components.data.validate", "stage 2: Great Expectations suite over the manifest"),
    "preprocess": Command("components.data.preprocess", "stage 3: decode, window, resize into a uint8 cache"),
    "augment": Command("components.data.augment", "stage 4: write a preview grid of the training augmentation"),
    "train": Command("components.model.train", "stage 5: fine-tune a pretrained backbone with a new head"),
    "evaluate": Command("components.model.evaluate", "stage 6: test metrics with intervals, plots and the gate"),
    "export": Command("components.release.export", "stage 7: ONNX export, parity check, metadata and model card"),
    "predict": Command("components.release.predict", "run an exported ONNX model on scans and write a CSV"),
    "server": Command("flows.commands", "start a local Prefect server (UI) on 127.0.0.1:4200", "server_main"),
    "serve": Command(
        "flows.commands",
        "serve the Prefect deployments: pipeline on demand, retrain on schedule and on events",
        "serve_main",
    ),
    # retrain_main answers an empty inbox before it imports flows.retrain (and with it Prefect).
    "retrain": Command(
        "flows.commands",
        "retrain on new labelled batches in the inbox (--once); champion/challenger promotion",
        "retrain_main",
    ),
    "pipeline": Command(
        "flows.commands",
        "run the pipeline once as a Prefect flow: a task per dvc.yaml stage, `dvc repro` in each",
        "pipeline_main",
    ),
    "ingest-new": Command(
        "flows.commands", "add a labelled batch to the inbox and emit the retrain event", "ingest_new_main"
    ),
    "trace": Command(
        "components.audit.trace", "audit: everything that made a model (data, code, params, evidence); --json"
    ),
    "verify": Command(
        "components.audit.verify", "audit: re-hash a model's ONNX, checkpoint and raw scans; exit 1 on a mismatch"
    ),
    "models": Command(
        "components.audit.history", "audit: `models list` every model; `models rollback ID` to an earlier one"
    ),
    "report": Command(
        "components.audit.report", "audit: one model's self-contained HTML report (trace, evidence, plots, card)"
    ),
    "tune": Command(
        "components.tune.search",
        "hyperparameter search (Optuna TPE, per-epoch pruning), each trial a DVC experiment; --apply the best",
    ),
    "preset": Command(
        "components.presets", "list the named parameter presets, print one as `dvc exp run -S` flags, or --apply it"
    ),
    "demo-data": Command("components.data.demo_data", "write synthetic DICOM demo scans (optionally an extra batch)"),
    "import-npz": Command("components.data.npz_import", "convert a MedMNIST .npz into PNG files plus labels.csv"),
    "import-folders": Command(
        "components.data.folder_import",
        "copy a folder-per-class tree (split folders optional) plus labels.csv",
        "main_folders",
    ),
}
# Commands that run a pipeline stage's code (dvc.yaml's `medtune <stage>`): `_run_stage` binds them to
# their starter and holds the stage's lock. Which stages the pipeline has, and their order, is dvc.yaml's
# alone (components.retrain.stages.pipeline_stages reads DVC's graph); this set, spelt out so `medtune --help` imports
# nothing, only says how to run such a command. tests/test_stages.py checks it against dvc.yaml.
STAGE_COMMANDS = frozenset({"ingest", "validate", "preprocess", "augment", "train", "evaluate", "export"})


class PassThrough(TyperCommand):
    """A command whose arguments belong to its module's own parser: handed on as given. Not parsed
    here at all (click's extra-args mode would still eat a `--`), and no help option of its own, so
    `medtune COMMAND --help` reaches the module's parser."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.args = list(args)
        return ctx.args


def _show_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"medtune {version('medtune')}")
    except PackageNotFoundError:
        typer.echo(
            "medtune: version unknown: the medtune package is not installed "
            "(expected `pip install -e .` in this checkout)",
            err=True,
        )
        raise typer.Exit(1) from None
    raise typer.Exit()


app = typer.Typer(
    name="medtune",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    options_metavar="",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    epilog="`medtune COMMAND --help` shows the options of one command.",
)


@app.callback()
def _medtune(
    version: Annotated[
        bool, typer.Option("--version", help="print `medtune VERSION` and exit", callback=_show_version, is_eager=True)
    ] = False,
) -> None:
    """Labelled medical scans in, a validated, fine-tuned, gated ONNX classifier out; DVC + Prefect."""


def _register(name: str, command: Command) -> None:
    def run(ctx: typer.Context) -> None:
        if name in STAGE_COMMANDS:
            code = _run_stage(name, ctx.args, ctx.obj["entry_point"])
        else:
            code = _call(name, ctx.args)
        raise typer.Exit(code)  # click's standalone mode would exit 0 whatever a command returned

    # short_help: the whole line in the command list (click would cut it at 45 characters).
    app.command(name, cls=PassThrough, help=command.help, short_help=command.help, add_help_option=False)(run)


for _name, _command in COMMANDS.items():
    _register(_name, _command)


def main(argv: Sequence[str] | None = None) -> int:
    entry_point = argv is None  # the process's own command line, not a call from Python code
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "help":
        argv = ["--help"]
    try:
        # Standalone mode: click reports usage errors (exit 2), --help, --version and the completion
        # options by exiting; so does every command (typer.Exit above, or its own parser's SystemExit).
        # An exception from a command's own code keeps its plain traceback (no typer except hook).
        typer.main.get_command(app).main(argv, prog_name="medtune", obj={"entry_point": entry_point})
    except SystemExit as exc:
        return _exit_code(exc.code)
    return 0


def _exit_code(code: Any) -> int:
    if code is None or isinstance(code, int):
        return int(code or 0)
    print(code, file=sys.stderr)  # sys.exit("message"): Python prints the message and exits 1
    return 1


def _call(name: str, args: list[str]) -> int:
    """Run command `name`'s entry point. argparse names its program after sys.argv[0], so every
    command's usage line reads `usage: medtune NAME ...`, however medtune was started."""
    command = COMMANDS[name]
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as exc:  # e.g. `medtune train` in the slim predict image: no torch there
        print(
            f"error: medtune {name} needs the Python module {exc.name!r}, which is not installed here. The image "
            "built by `make image TARGET=predict` runs only predict, trace and verify; elsewhere install "
            "requirements.lock (`make setup`).",
            file=sys.stderr,
        )
        return 1
    program, sys.argv[0] = sys.argv[0], f"medtune {name}"
    try:
        return int(getattr(module, command.function)(args) or 0)
    finally:
        sys.argv[0] = program


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
            return _call(stage, rest)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
