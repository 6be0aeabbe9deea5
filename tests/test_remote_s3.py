"""DVC remote storage on S3, for real: a promotion pushes to an S3-compatible server, a fresh clone pulls
from it, and `medtune verify` reads models, listings and scans straight from it (no pull needed).

The server is moto's server mode (`moto_server`, a real S3 HTTP endpoint on 127.0.0.1), started here
and stopped by its own process id. Credentials are fake and come from the environment only
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); the remote's URL and `endpointurl` are in .dvc/config,
which the release commits. The release is the retrain flow's, on the shared trained workspace
(conftest's `killed_after_push`, killed right after its first `dvc push`): its DVC
remote is switched to S3 and `promote.recover()`, the first task of every retrain run, records the
release (push, registry copy, commit, tag) exactly as an uninterrupted run does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import workspace
from tests.workspace import BIN, ROOT, free_port, stop, tool_env

pytestmark = pytest.mark.slow

BUCKET = "medtune-test"
# Fake credentials, given to every process through its environment, never written to a file.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "medtune-test-key-2b7f",
    "AWS_SECRET_ACCESS_KEY": "medtune-test-secret-5d1e",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
RECOVER = "import json; from components.retrain import promote; print(json.dumps(promote.recover('.')))"


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return workspace.run(cmd, cwd, env, check, timeout=600)


@pytest.fixture(scope="module")
def s3(module_tmp):
    tmp = module_tmp / "s3"
    tmp.mkdir()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp / "moto.log"
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        cwd=tmp,
        env=tool_env(**S3_ENV),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"moto_server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(endpoint, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"moto_server not answering on {endpoint}:\n{log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.2)
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "client": client}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def released(s3, killed_after_push, module_tmp):
    """The shared workspace, its remote switched to S3, its promotion finished: pushed, committed, tagged."""
    tmp = module_tmp / "release"
    tmp.mkdir()
    ws = tmp / "ws"
    shutil.copytree(killed_after_push["ws"], ws, symlinks=True)  # not its local remote: the release must go to S3
    env = tool_env(PYTHONPATH=str(ROOT), **S3_ENV)
    env.pop("MEDTUNE_PATIENT_SALT", None)  # the shared workspace was built with the (allowed) public salt
    run(["dvc", "remote", "add", "--force", "--default", "medtune", f"s3://{BUCKET}/medtune"], ws, env)
    run(["dvc", "remote", "modify", "medtune", "endpointurl", s3["endpoint"]], ws, env)
    done = json.loads(run([sys.executable, "-c", RECOVER], ws, env).stdout.splitlines()[-1])
    assert any("finishing the interrupted promoted release" in d for d in done), done
    assert not (tmp / "dvc-remote").exists()
    current = json.loads((ws / "registry/current.json").read_text())
    return {"ws": ws, "tmp": tmp, "env": env, "tag": current["git_tag"], "model_id": current["model_id"]}


def clone_at_tag(released: dict, name: str) -> Path:
    clone = released["tmp"] / name
    run(["git", "clone", "-q", str(released["ws"]), str(clone)], released["tmp"], released["env"])
    run(["git", "checkout", "-q", released["tag"]], clone, released["env"])
    return clone


def verify(clone: Path, env: dict) -> tuple[int, dict]:
    out = run(["medtune", "verify", "current", "--json"], clone, env, check=False)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def bad(rep: dict) -> list[dict]:
    return [i for i in rep["items"] if i["status"] != "ok"]


def test_the_dvc_s3_plugin_is_installed_pinned_and_importable(tmp_path):
    import dvc_s3  # noqa: F401
    import s3fs  # noqa: F401

    supports = run([str(BIN / "dvc"), "version"], tmp_path, tool_env()).stdout
    assert "s3 (" in supports, supports
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    assert any(line.startswith("dvc-s3==") for line in lock) and any(line.startswith("moto==") for line in lock)


def test_a_promotion_pushes_to_s3_and_a_fresh_clone_verifies_from_it_and_pulls(released, s3):
    ws, env, tag = released["ws"], released["env"], released["tag"]
    # The release's data and model are in the bucket, under DVC's content-addressed layout.
    keys = {
        o["Key"]
        for page in s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    }
    lock = yaml.safe_load(run(["git", "show", f"{tag}:dvc.lock"], ws, env).stdout)
    onnx_md5 = next(
        o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == "models/model.onnx"
    )
    version = yaml.safe_load(run(["git", "show", f"{tag}:data/raw.dvc"], ws, env).stdout)["outs"][0]["md5"]
    for md5 in (onnx_md5, version):
        assert f"medtune/files/md5/{md5[:2]}/{md5[2:]}" in keys, (md5, sorted(keys)[:5])
    # The tag names the S3 remote and its endpoint; no credential is in any commit.
    config = run(["git", "show", f"{tag}:.dvc/config"], ws, env).stdout
    assert f"s3://{BUCKET}/medtune" in config and s3["endpoint"] in config, config
    revs = run(["git", "rev-list", "--all"], ws, env).stdout.split()
    for secret in (S3_ENV["AWS_ACCESS_KEY_ID"], S3_ENV["AWS_SECRET_ACCESS_KEY"]):
        assert run(["git", "grep", "-a", "-l", secret, *revs], ws, env, check=False).stdout == ""

    # A fresh clone, nothing pulled: verify reads the model files, the listing and every scan from S3.
    clone = clone_at_tag(released, "clone")
    assert not (clone / "data/raw").exists() and not (clone / "models/model.onnx").exists()
    code, rep = verify(clone, env)
    assert code == 0 and rep["ok"], bad(rep)
    by_kind = {i["kind"]: i for i in rep["items"]}
    assert "from DVC remote medtune" in by_kind["onnx"]["detail"] and by_kind["onnx"]["path"].startswith("s3://")
    assert "from DVC remote medtune" in by_kind["checkpoint"]["detail"]
    assert by_kind["data version"]["detail"] == "DVC listing from DVC remote medtune"
    scans = [i for i in rep["items"] if i["kind"] == "scan"]
    assert scans and all(i["detail"] == "from DVC remote medtune" for i in scans)

    # Then `dvc pull` from S3: the clone at the tag is the released state.
    run(["dvc", "pull"], clone, env)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env).stdout
    code, rep = verify(clone, env)
    assert code == 0 and rep["ok"], bad(rep)
    assert all(i["source"].startswith("workspace") for i in rep["items"] if i["kind"] == "scan")


def test_verify_names_a_scan_altered_in_the_s3_remote(released, s3):
    clone, env, client = clone_at_tag(released, "clone-tampered"), released["env"], s3["client"]
    version = yaml.safe_load((clone / "data/raw.dvc").read_text())["outs"][0]["md5"]
    listing = json.loads(
        client.get_object(Bucket=BUCKET, Key=f"medtune/files/md5/{version[:2]}/{version[2:]}")["Body"].read()
    )
    entry = listing[0]
    key = f"medtune/files/md5/{entry['md5'][:2]}/{entry['md5'][2:]}"
    original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=key, Body=b"not the scan")
    try:
        code, rep = verify(clone, env)
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=original)
    assert code == 1
    assert [(i["kind"], i["item"], i["status"]) for i in bad(rep)] == [("scan", entry["relpath"], "mismatch")]
    assert bad(rep)[0]["path"] == f"s3://{BUCKET}/{key}"
