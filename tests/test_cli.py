"""The `medtune` command: help lists every command, --version, shell completion of the command names,
arguments reach each command's own parser untouched, exit codes (unknown command 2, a busy stage 1),
and `--help` imports no command module."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from importlib.metadata import version

import pytest

from components import cli, lifetime
from tests.workspace import BIN, ROOT, tool_env

HEAVY = {"torch", "pandas", "numpy", "prefect", "dvc", "great_expectations", "rich", "pydantic"}


def flat(text: str) -> str:
    """Help text with its line wrapping undone (the width follows the terminal)."""
    return " ".join(text.split())


@pytest.mark.parametrize("argv", [["--help"], ["-h"], [], ["help"]])
def test_help_lists_every_command_with_its_whole_line(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: medtune COMMAND [ARGS]...\n")
    assert [m.group(1) for m in re.finditer(r"^  (\S+)  ", out.split("\nCommands:\n")[1], re.M)] == list(cli.COMMANDS)
    for name, command in cli.COMMANDS.items():
        assert f"{name} {flat(command.help)}" in flat(out), name  # not cut short
    assert "--version" in out and "--install-completion" in out and "--show-completion" in out


def test_help_imports_no_command_module():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "components.cli", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("Usage: medtune COMMAND"), out.stderr
    imported = set(re.findall(r"^import time:.*\|\s*(\S+)\s*$", out.stderr, re.M))
    assert "typer" in imported  # the probe works
    modules = {c.module for c in cli.COMMANDS.values()}
    assert not imported & modules, sorted(imported & modules)
    packages = {m.split(".")[0] for m in imported}
    assert not packages & HEAVY, sorted(packages & HEAVY)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"medtune {version('medtune')}\n"


@pytest.mark.slow
def test_console_script_version_and_unknown_command():
    out = subprocess.run([str(BIN / "medtune"), "--version"], capture_output=True, text=True, env=tool_env())
    assert (out.returncode, out.stdout) == (0, f"medtune {version('medtune')}\n"), out.stderr
    out = subprocess.run([str(BIN / "medtune"), "trian"], capture_output=True, text=True, env=tool_env())
    assert out.returncode == 2 and "No such command 'trian'" in out.stderr and out.stdout == ""


@pytest.mark.parametrize("argv", [["trian"], ["trian", "--help"]])
def test_unknown_command_exits_2_naming_it(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "No such command 'trian'" in err and "Did you mean 'train'" in err


def test_unknown_option_before_the_command_exits_2(capsys):
    assert cli.main(["--bogus", "train"]) == 2
    assert "No such option: --bogus" in capsys.readouterr().err


def test_show_completion_script(capsys, monkeypatch):
    # Typer's own switch: the shell is the option's value, not the shell pytest runs under (`sh` under make).
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    assert cli.main(["--show-completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "_MEDTUNE_COMPLETE=complete_bash" in script
    assert "complete -o default -F _medtune_completion medtune" in script


def bash_complete(words: str, home: str, source: str) -> list[str]:
    """What bash offers for `words` (the last one being completed), after `source`, through the real
    console script on PATH."""
    script = (
        f"{source}\nCOMP_WORDS=({words}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))\n"
        '_medtune_completion medtune "${COMP_WORDS[COMP_CWORD]}" medtune\nprintf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        env=tool_env(HOME=home),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


@pytest.mark.slow
def test_installed_completion_completes_the_command_names(tmp_path):
    home = str(tmp_path)
    # As a user installs it: from an interactive bash, whose shell the command detects (`; true`: bash
    # would otherwise exec medtune in its own place, leaving no bash to detect).
    out = subprocess.run(
        ["bash", "-c", f"{BIN / 'medtune'} --install-completion; true"],
        capture_output=True,
        text=True,
        env=tool_env(HOME=home),
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / ".bash_completions/medtune.sh").is_file()
    source = "source ~/.bashrc"  # what a new shell does
    assert bash_complete("medtune tr", home, source) == ["train", "trace"]
    assert bash_complete("medtune import-", home, source) == ["import-npz", "import-folders"]
    assert bash_complete("medtune ''", home, source) == list(cli.COMMANDS)
    assert bash_complete("medtune zz", home, source) == []


def test_a_commands_help_reaches_its_own_parser(capsys):
    assert cli.main(["preset", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: medtune preset [-h]")
    assert cli.main(["import-folders", "-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: medtune import-folders") and "--out OUT" in out


def test_a_stages_help_reaches_its_parser_and_takes_no_lock(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ingest", "--help"]) == 0
    out = capsys.readouterr().out
    description = importlib.import_module("components.data.ingest").__doc__.splitlines()[0]
    assert "--params PARAMS" in out and flat(description) in flat(out)
    assert not lifetime.lock_path("ingest", tmp_path).exists()


def test_arguments_reach_the_command_untouched(tmp_path, monkeypatch, capsys):
    """`--` too: a source folder named like an option goes after it, as argparse expects."""
    monkeypatch.chdir(tmp_path)
    for label in ("normal", "pneumonia"):
        (tmp_path / "-odd" / label).mkdir(parents=True)
        (tmp_path / "-odd" / label / f"{label}.png").write_bytes(b"copied as is")
    assert cli.main(["import-folders", "--out", "out", "-odd"]) == 2  # argparse: an unknown option, no src
    assert "required: src" in capsys.readouterr().err
    assert cli.main(["import-folders", "--out", "out", "--", "-odd"]) == 0
    assert (tmp_path / "out/labels.csv").read_text().splitlines() == [
        "path,label",
        "normal/normal.png,normal",
        "pneumonia/pneumonia.png,pneumonia",
    ]


def test_a_usage_error_in_a_commands_parser_is_its_exit_code(capsys):
    assert cli.main(["import-folders"]) == 2  # argparse: src is required
    assert "usage: medtune import-folders" in capsys.readouterr().err


def test_a_busy_stage_exits_1_with_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with lifetime.stage_lock("ingest", tmp_path, "someone else's ingest"):
        assert cli.main(["ingest"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: stage ingest is already running") and "someone else's ingest" in err


def test_every_command_has_its_entry_point():
    for name, command in cli.COMMANDS.items():
        assert callable(getattr(importlib.import_module(command.module), command.function)), name


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "components.cli", "--version"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("medtune "), out.stderr


@pytest.mark.parametrize("command", ["ingest", "import-npz", "predict", "models"])
def test_every_usage_line_names_medtune_and_the_command(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: medtune {command} ")


def test_a_command_whose_packages_are_missing_says_which_and_where_it_runs(monkeypatch, capsys):
    # As `medtune train` in the slim predict image, where torch is not installed.
    monkeypatch.setitem(cli.COMMANDS, "models", cli.Command("no_such_medtune_module", "help"))
    assert cli.main(["models", "list"]) == 1
    err = capsys.readouterr().err
    assert "error: medtune models needs the Python module 'no_such_medtune_module'" in err
    assert "make image TARGET=predict" in err and "Traceback" not in err
