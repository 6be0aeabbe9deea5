"""`medtune` dispatch: help lists every command; an unknown command fails with exit 2."""

import subprocess
import sys

from components import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_exits_2(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_every_command_has_its_entry_point():
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), cli.FUNCTIONS.get(name, "main"))), name


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "components.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: medtune" in out.stdout
