"""Small helpers shared by the stages: atomic writes, hashing, JSON, git facts, stage CLIs.

Atomic writes: every artefact is written to a temporary file in the same folder and then
renamed over the target, so a crash at any point leaves either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("medtune")

# The three splits, in this order everywhere (manifest, prepared arrays, reports).
SPLITS = ("train", "val", "test")


class StageError(RuntimeError):
    """A failure the user must act on; the CLI prints its message without a traceback."""


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; artefacts get the usual permissions (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found; run the stage that produces it first (dvc repro).")
    return json.loads(path.read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths appear in metrics; everything else is a bug worth a TypeError.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def processor() -> str:
    """This machine's processor model ("AMD EPYC ...", "Intel(R) Xeon(R) ..."), for the record of a
    training run: seeded CPU training gives the same weights again only on the same kind of processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: Path, data: bytes, remedy: str) -> Any:
    """`data` (the bytes of `path`, already checked against their hash) unpickled as tensors and plain
    containers only (`torch.load(weights_only=True)`): a planted pickle never runs. StageError otherwise,
    ending with `remedy`."""
    import io

    import torch  # here, not at the top: most commands never load weights

    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, ...: all mean "not plain weights"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StageError(
            f"{path}: not a plain file of tensors ({exc.__class__.__name__}: {first}); refused to unpickle it. {remedy}"
        ) from None


def patient_salt(default: str) -> bytes:
    return os.environ.get("MEDTUNE_PATIENT_SALT", default).encode()


PUBLIC_SALT = "medtune-public-salt"  # the shipped default of data.patient_salt: in this code, so public


def salt_status(configured: str) -> dict[str, str]:
    """Which salt `patient_salt(configured)` uses and whether it is secret (never the salt itself):
    {"status": "secret" | "public", "source": ...}. Only MEDTUNE_PATIENT_SALT can be secret: a
    data.patient_salt is in params.yaml, which git commits, and the default is in this code; with a
    public salt anyone with the header values recomputes HMAC(salt, id) and re-identifies patients."""
    env = os.environ.get("MEDTUNE_PATIENT_SALT")
    if env is None:
        return {"status": "public", "source": "params.yaml default" if configured == PUBLIC_SALT else "params.yaml"}
    if not env or env in (configured, PUBLIC_SALT):
        why = "empty" if not env else "equal to the shipped default" if env == PUBLIC_SALT else "equal to params.yaml"
        return {"status": "public", "source": f"MEDTUNE_PATIENT_SALT, {why}"}
    return {"status": "secret", "source": "MEDTUNE_PATIENT_SALT"}


def warn_public_salt(configured: str, where: str, n_real: int, logger: logging.Logger = log) -> bool:
    """One loud warning when `n_real` scans under `where` have real patient ids (labels.csv patient_id,
    DICOM PatientID, data.patient_pattern; not the path fallback) hashed with a public salt. True if it warned."""
    status = salt_status(configured)
    if status["status"] == "secret" or not n_real:
        return False
    logger.warning(
        "%s: the patient ids of %d scan(s) are hashed with a PUBLIC salt (%s): anyone who has the ids or the headers "
        "can recompute the hashed patients in data/manifest.csv and the registry and re-identify them. Set a "
        'secret MEDTUNE_PATIENT_SALT in the environment of every run (`python -c "import secrets; '
        'print(secrets.token_hex(32))"`, kept in a secret store, never in params.yaml or git) and keep the '
        "same one for the life of this workspace (README, 'Patient salt').",
        where,
        n_real,
        status["source"],
    )
    return True


def hash_patient(patient_id: str, salt: bytes) -> str:
    """Pseudonymise a patient id: keyed hash, 16 hex characters. The raw id is never stored."""
    return hmac.new(salt, str(patient_id).strip().encode(), hashlib.sha256).hexdigest()[:16]


def run_tool(args: Sequence[str], root: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run one git/DVC command in the project root; StageError with its output on failure.

    Callers run them one at a time: two DVC commands in one workspace fail on DVC's lock.
    """
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(list(args), cwd=root, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise StageError(
            f"`{' '.join(args)}` failed in {root} (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}"
        )
    return out


def git(root: str | Path, *args: str, check: bool = True) -> str:
    return run_tool(["git", *args], root, check).stdout.strip()


def dvc(root: str | Path, *args: str, check: bool = True) -> str:
    # The dvc beside this interpreter (the venv's), so a served flow finds it without PATH set up.
    here = Path(sys.executable).parent / "dvc"
    return run_tool([str(here) if here.is_file() else "dvc", *args], root, check).stdout.strip()


# What a pipeline run or a release writes into the project: records of the run, not the code that made it.
# (registry/ is components.release.registry.REGISTRY; .dvc/ holds the remote config; *.dvc name data versions.)
RECORD_PATHS = ("dvc.lock", "params.yaml", ".dvc", "registry")
RECORD_GLOBS = ("**/*.dvc", "**/.gitignore")


def dvc_pipeline_paths(root: str | Path = ".") -> dict[str, set[str]]:
    """{"outs", "deps", "params"}: the literal paths dvc.yaml and dvc.lock name (outputs, metrics and
    plots of every stage; dependencies; parameter files), relative to `root`. A path holding `${...}`
    is left out of dvc.yaml's (dvc.lock holds it resolved). Read as plain YAML: no DVC import or lock."""
    import yaml

    found: dict[str, set[str]] = {"outs": set(), "deps": set(), "params": set()}

    def names(items: Any) -> Iterator[str]:
        for item in items or []:  # "path", {"path": {options}} (dvc.yaml) or {"path": ..., "md5": ...} (dvc.lock)
            if isinstance(item, dict):
                item = item.get("path", next(iter(item), None))
            if isinstance(item, str) and "${" not in item:
                yield item.rstrip("/")

    for name in ("dvc.yaml", "dvc.lock"):
        try:
            doc = yaml.safe_load((Path(root) / name).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        stages = doc.get("stages") if isinstance(doc, dict) else None
        for stage in (stages if isinstance(stages, dict) else {}).values():
            if not isinstance(stage, dict):
                continue
            for key in ("outs", "metrics", "plots"):
                found["outs"].update(names(stage.get(key)))
            found["deps"].update(names(stage.get("deps")))
            params = stage.get("params") or []
            if isinstance(params, dict):  # dvc.lock: {file: {key: value}}
                found["params"].update(params)
            else:  # dvc.yaml: "key" (of params.yaml) or {file: [keys]}
                for p in params:
                    found["params"].update(p if isinstance(p, dict) else ["params.yaml"])
    return found


def record_pathspecs(root: str | Path = ".") -> list[str]:
    """git pathspecs that leave out everything a run or a release writes (dvc.lock, parameter files,
    .dvc files and .gitignores, .dvc/, the registry, every pipeline output): what is left is the code."""
    paths = dvc_pipeline_paths(root)
    specs = [f":(exclude,literal){p}" for p in sorted({*RECORD_PATHS, *paths["params"], *paths["outs"]})]
    return specs + [f":(exclude,glob){g}" for g in RECORD_GLOBS]


def git_facts(cwd: str | Path = ".") -> dict[str, Any]:
    """Commit and dirty flag of the working tree's *code*, or 'unknown' outside git.

    `dirty` is True when a tracked file other than the run's own records (record_pathspecs: dvc.lock,
    params.yaml, the data version's .dvc file, outputs, the registry) differs from HEAD, or when a file
    a pipeline stage depends on is not in git at all: either way a checkout of `commit` lacks the code
    that ran. Parameters are recorded in full beside it, and a release commits them with dvc.lock, so a
    changed params.yaml is not dirty code. `modified` lists the paths (relative to the repository root).
    """
    try:
        commit = git(cwd, "rev-parse", "HEAD")
        excluded = record_pathspecs(cwd)
        status = ["git", "status", "--porcelain"]  # run_tool, not git(): the first line's leading blank counts
        lines = run_tool([*status, "--untracked-files=no", "--", ".", *excluded], cwd).stdout.splitlines()
        pipeline = dvc_pipeline_paths(cwd)
        # Dependencies that are neither outputs nor DVC-tracked data must be in git (untracked = not in a clone).
        code_deps = [
            d
            for d in sorted(pipeline["deps"])
            if not any(d == o or d.startswith(o + "/") for o in pipeline["outs"])
            and not (Path(cwd) / f"{d}.dvc").is_file()
        ]
        if code_deps:
            found = run_tool(
                [*status, "--untracked-files=all", "--", *(f":(literal){d}" for d in code_deps), *excluded], cwd
            ).stdout.splitlines()
            lines += [x for x in found if x.startswith("??")]
    except (StageError, FileNotFoundError):
        return {"commit": "unknown", "dirty": None, "modified": []}
    modified = sorted({line[3:].split(" -> ")[-1].strip('"') for line in lines if len(line) > 3})
    return {"commit": commit, "dirty": bool(modified), "modified": modified}


def dvc_data_version(raw_dir: str | Path) -> str:
    """The DVC hash of the raw data folder, read from its .dvc file (`dvc add data/raw`)."""
    import yaml

    dvc_file = Path(str(raw_dir).rstrip("/") + ".dvc")
    if not dvc_file.is_file():
        return "untracked"
    meta = yaml.safe_load(dvc_file.read_text()) or {}
    outs = meta.get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_cli(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None], argv: Sequence[str] | None
) -> int:
    """Parse, run; a StageError (or bad input) is one line on stderr and exit 1, no traceback."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        return int(run(args) or 0)
    except (StageError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def stage_main(
    description: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    params_flag: bool = True,
) -> int:
    """Shared body of every command's `main(argv)`: parse, run, turn expected failures into exit 1."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if params_flag:
        parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_args(parser)
    return run_cli(parser, lambda args: run(args) and 0, argv)  # a stage's return value is not its exit code


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder over `out_dir`. A directory cannot be os.replace'd over a
    non-empty one, so the old folder is first moved aside; it is deleted only once the new one is in."""
    # mkdtemp makes it 0700; the cache should be as readable as any output folder. (Reading the
    # umask would mean setting it, which races with other threads, e.g. Prefect tasks.)
    os.chmod(tmp, 0o755)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
