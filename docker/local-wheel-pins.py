"""Print the pins of a lock file that a local wheel folder can satisfy, one `name==version` a line.

    python docker/local-wheel-pins.py requirements.lock /wheels/0 /wheels/1 > local.txt
    pip install --no-index --no-deps --find-links /wheels/0 --find-links /wheels/1 -r local.txt

Why: given the same file on an index and in a --find-links folder, pip downloads the index's copy,
so a local folder of torch/CUDA wheels saves nothing by itself. Installing these pins offline first
leaves the normal `pip install -r requirements.lock` nothing to download for them. Only wheels this
interpreter can install count (platform and Python tags checked).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
from pip._vendor.packaging.version import InvalidVersion, Version


def local_wheels(folders: list[str]) -> set[tuple[str, str]]:
    """(canonical name, version) of every wheel in `folders` that installs on this interpreter."""
    supported = set(sys_tags())
    found = set()
    for folder in folders:
        for path in Path(folder).glob("*.whl"):
            try:
                name, version, _build, tags = parse_wheel_filename(path.name)
            except ValueError:
                continue
            if supported & set(tags):
                found.add((canonicalize_name(name), str(version)))
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    lock, folders = argv[0], argv[1:]
    available = local_wheels(folders)
    for line in Path(lock).read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if not sep:
            continue
        try:
            key = (canonicalize_name(name), str(Version(version.strip())))
        except InvalidVersion:
            continue
        if key in available:
            print(f"{name.strip()}=={version.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
