"""Named parameter presets (components/presets.yaml): partial params.yaml overrides that won on real data.

    medtune preset                          # list them
    dvc exp run $(medtune preset small-scans)   # one experiment with the preset, recorded by DVC
    medtune preset small-scans --apply      # merge it into params.yaml, keeping its comments

A preset only sets keys that params.yaml already has; it is checked with the same typed `Params`
as params.yaml, so a preset cannot hold a typo.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from components.common import run_cli, write_text
from components.params import load_params, parse_params
from components.templates import format_table

PRESETS_FILE = Path(__file__).with_name("presets.yaml")


def load_presets(path: Path = PRESETS_FILE) -> dict[str, dict[str, Any]]:
    return yaml.safe_load(path.read_text()) or {}


def preset(name: str, path: Path = PRESETS_FILE) -> dict[str, Any]:
    """The params overrides of preset `name`; ValueError naming the known presets."""
    presets = load_presets(path)
    if name not in presets:
        raise ValueError(f"preset {name!r} is unknown; expected one of {sorted(presets)} ({path}).")
    return presets[name]["params"]


def flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: the keys `dvc exp run -S` takes."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        out.update(flatten(value, dotted + ".") if isinstance(value, dict) else {dotted: value})
    return out


def set_flags(overrides: dict[str, Any]) -> list[str]:
    """`-S key=value` pairs; values as JSON, which DVC parses as YAML (lists, numbers, strings)."""
    return [arg for key, value in flatten(overrides).items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def apply(params_path: Path, overrides: dict[str, Any]) -> None:
    """Merge `overrides` into params_path, keeping its comments and order; checked before writing."""
    from ruamel.yaml import YAML  # DVC's own YAML library: round-trips comments

    rt = YAML()
    # Keep "null" spelled out (ruamel would write an empty value, which reads the same but looks unset).
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(params_path.read_text())
    for key, value in flatten(overrides).items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    parse_params(json.loads(json.dumps(doc)))  # ValueError (key, value, expected) before anything is written
    buf = io.StringIO()
    rt.dump(doc, buf)
    write_text(params_path, buf.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune preset", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="preset to print as -S flags (default: list the presets)")
    parser.add_argument("--apply", action="store_true", help="merge the preset into --params instead of printing")
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    def run(args: argparse.Namespace) -> None:
        if not args.name:
            print(
                format_table(
                    ((name, entry.get("description", "")) for name, entry in load_presets().items()),
                    ("preset", "what it is for"),
                )
            )
            return
        overrides = preset(args.name)
        known = flatten(load_params(args.params).to_dict())
        unknown = [k for k in flatten(overrides) if k not in known]
        if unknown:
            raise ValueError(f"preset {args.name!r} sets {unknown}, which {args.params} does not have.")
        if args.apply:
            apply(Path(args.params), overrides)
            print(f"applied preset {args.name!r} to {args.params}: {', '.join(flatten(overrides))}")
        else:
            print(" ".join(set_flags(overrides)))

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
