"""What a release needs of the DVC project, read through DVC itself: its configuration, its default
remote, the credentials a release refuses to commit, and the files a release commits.

    dvc_project.ensure_remote(".", "../dvc-remote")      # the default remote, added if none is set
    dvc_project.refuse_secrets_in_config(".")            # StageError: a credential in .dvc/config
    paths, uncached = dvc_project.release_paths(".")     # what a release commits (components.retrain.promote)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from components.common import StageError, dvc

# The release's logger: configuring the remote is one of a release's steps (components.retrain.promote).
log = logging.getLogger("medtune.promote")


def dvc_config(root: str | Path, level: str | None = None) -> dict[str, Any]:
    """The project's DVC configuration as DVC itself reads it: every level merged (system, global,
    .dvc/config, .dvc/config.local), or one file (`level="repo"` is .dvc/config); remotes come as
    {"remote": {name: {option: value}}}. StageError naming the file when DVC cannot read it."""
    from dvc.config import Config, ConfigError

    dvc_dir = Path(root) / ".dvc"
    try:
        config = Config(dvc_dir=str(dvc_dir), validate=level is None)
        return config.read(level) if level else dict(config)
    except ConfigError as exc:
        raise StageError(f"{dvc_dir / 'config'}: not readable as DVC config ({exc})") from exc


def ensure_remote(root: str | Path, url: str, name: str = "medtune") -> str:
    """Make sure a default DVC remote exists; add `url` (a local folder by default) if none is set."""
    root = Path(root)
    current = (dvc_config(root).get("core") or {}).get("remote")
    if current:
        return current
    path = Path(url)
    if "://" not in url:
        (path if path.is_absolute() else root / path).mkdir(parents=True, exist_ok=True)
    dvc(root, "remote", "add", "--force", "--default", name, url)
    log.info("configured DVC remote %s -> %s", name, url)
    return name


# Remote options that hold a secret: they belong in the environment or .dvc/config.local (git-ignored),
# never in .dvc/config, which every release commits.
SECRET_OPTIONS = (
    "access_key_id",
    "secret_access_key",
    "session_token",
    "password",
    "passphrase",
    "token",
    "account_key",
    "sas_token",
    "connection_string",
    "client_secret",
    "gdrive_client_secret",
    "oss_key_id",
    "oss_key_secret",
    "key_secret",
)


def refuse_secrets_in_config(root: str | Path) -> None:
    """StageError when .dvc/config (committed by every release) holds a credential: a secret option of
    a remote, or a password in a remote's URL. Credentials come from the environment (AWS_ACCESS_KEY_ID,
    ...) or `dvc remote modify --local` (.dvc/config.local, which DVC keeps out of git)."""
    path = Path(root) / ".dvc/config"
    found = [
        f"[{section}] {key}"
        for section, options in _sections(dvc_config(root, "repo"))
        for key, value in options.items()
        if key in SECRET_OPTIONS or (key == "url" and urlsplit(str(value)).password)
    ]
    if found:
        raise StageError(
            f"{path} holds credentials ({', '.join(found)}), and a release commits that file to git. "
            "Move them out: `dvc remote modify --local <remote> <option> <value>` (.dvc/config.local, "
            "git-ignored) or the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for S3); "
            "nothing was pushed or committed (docs/orchestration.md, 'Remote storage')."
        )


def _sections(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(header, options) of each section of a DVC config, the header spelt as in the file: `core`, and
    `'remote "name"'` for a named section (which DVC reads as {"remote": {"name": {...}}})."""
    out = []
    for section, options in config.items():
        plain = {k: v for k, v in options.items() if not isinstance(v, dict)}
        out += [(section, plain)] if plain else []
        out += [(f"'{section} \"{name}\"'", sub) for name, sub in options.items() if isinstance(sub, dict)]
    return out


def release_paths(root: str | Path = ".") -> tuple[list[str], list[str]]:
    """What a release commits from the workspace so that a clone at its tag reproduces it, read from
    DVC's own view of the project: `(paths, uncached)`.

    paths: dvc.lock, .dvc/config (the remote), every parameter file a stage reads (params.yaml), every
    `.dvc` file (the data version) and the .gitignore DVC keeps beside each output. uncached: the
    outputs DVC does not cache (`cache: false` in dvc.yaml). `dvc push` cannot carry those, so git
    must, or a clone at the tag misses them and `dvc status` reports them deleted; they are added
    with `git add -f` because the project's .gitignore may hide their folders (models/, reports/).
    Only files that exist are listed.
    """
    from dvc.repo import Repo

    root = Path(root)
    paths, uncached = {"dvc.lock", ".dvc/config", "params.yaml"}, set()
    try:
        repo = Repo(str(root))
    except Exception as exc:  # noqa: BLE001 - NotDvcRepoError and config errors alike
        raise StageError(f"{root}: not readable as a DVC project ({exc}); a release needs one.") from exc
    with repo:

        def rel(path: str) -> str:
            return Path(os.path.relpath(path, repo.root_dir)).as_posix()

        for stage in repo.index.stages:
            if stage.is_data_source:
                paths.add(rel(stage.path))
            for dep in stage.deps:
                if type(dep).__name__ == "ParamsDependency":
                    paths.add(rel(dep.fs_path))
            for out in stage.outs:
                path = rel(out.fs_path)
                paths.add((Path(path).parent / ".gitignore").as_posix())
                if not out.use_cache:
                    uncached.add(path)
    return sorted(p for p in paths if (root / p).exists()), sorted(p for p in uncached if (root / p).exists())
