"""preprocess after an append prepares only the new scans, and writes the bytes a run from scratch writes.

A workspace is synthetic demo DICOMs (components/data/demo_data.py) ingested by the real ingest; every
comparison is against `preprocess` into another folder with an empty pixel cache, file by file.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from components.common import StageError
from components.data import demo_data, pixel_cache, scans, stat_index
from components.data import preprocess as preprocess_module
from components.data.ingest import ingest
from components.data.preprocess import load_split, preprocess
from components.params import load_params, parse_params
from tests.workspace import ROOT, make_workspace, run, tree_digest

SIZE = 16
BATCH = 3  # patients per appended batch, 4 slices each


def params(size: int = SIZE, workers: int = 1, **compute):
    return parse_params(
        {
            "split": {"seed": 1, "val_fraction": 0.25, "test_fraction": 0.25},
            "preprocess": {"image_size": size},
            "compute": {"workers": workers, **compute},
        }
    )


class Workspace:
    """data/raw (demo DICOMs), data/manifest.csv from ingest, data/prepared and data/cache/pixels."""

    def __init__(self, root: Path, patients: int):
        self.root, self.raw, self.data = root, root / "data/raw", root / "data"
        demo_data.generate(self.raw, patients, 4, SIZE, seed=0, classes=["normal", "lesion"])
        self.ingest()

    def ingest(self) -> None:
        ingest(self.raw, self.data, params())

    def append(self, name: str, patients: int = BATCH) -> int:
        n = demo_data.generate(
            self.raw,
            patients,
            4,
            SIZE,
            seed=0,
            classes=["normal", "lesion"],
            patient_offset=demo_data.batch_offset(name),
        )
        self.ingest()
        return n

    def preprocess(self, p=None) -> dict:
        return preprocess(self.data / "manifest.csv", self.raw, self.data / "prepared", p or params())

    def from_scratch(self, p=None) -> dict[str, bytes]:
        """Every file of a preprocess into a fresh folder with an empty cache, with its bytes."""
        out = Path(self.root / "scratch")
        shutil.rmtree(out, ignore_errors=True)
        preprocess(self.data / "manifest.csv", self.raw, out / "prepared", p or params(), cache_dir=out / "cache")
        return tree_digest(out / "prepared")

    def prepared(self) -> dict[str, bytes]:
        return tree_digest(self.data / "prepared")

    def sets(self) -> list[Path]:
        return sorted((self.data / "cache/pixels").iterdir())


@pytest.fixture
def calls(monkeypatch):
    """Count scans.prepare_image calls (in this process: compute.workers = 1)."""
    seen: list[Path] = []
    real = scans.prepare_image

    def counting(path, *args, **kwargs):
        seen.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(scans, "prepare_image", counting)
    return seen


def shard_files(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Each shard file of a settings set with (inode, mtime_ns, bytes): what DVC's stat cache keys on."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.iterdir())
        if p.name.startswith("shard-")
    }


def test_an_append_prepares_only_the_new_scans_and_matches_a_run_from_scratch(tmp_path, calls):
    ws = Workspace(tmp_path / "ws", patients=30)
    ws.preprocess()
    n = len(calls)
    assert n == 120 and len(set(calls)) == 120
    [folder] = ws.sets()
    first = shard_files(folder)
    assert len(first) == 2  # one shard: its .npy and .keys

    calls.clear()
    before = set(ws.raw.rglob("*.dcm"))
    k = ws.append("2024-06")
    meta = ws.preprocess()
    assert k == 12 and sorted(calls) == sorted(set(ws.raw.rglob("*.dcm")) - before)
    assert sum(meta["counts"].values()) == n + k

    # The old shard is untouched (same inode, time and bytes), the new one holds the k scans.
    after = shard_files(folder)
    assert {name: after[name] for name in first} == first and len(after) == 4
    new_keys = [name for name in after if name not in first and name.endswith(".keys")]
    assert len(after[new_keys[0]][2].split()) == k

    # Byte for byte what a run from scratch writes, computed on two local processes.
    assert ws.prepared() == ws.from_scratch(params(workers=2))

    # A rerun with nothing new prepares nothing and adds no shard.
    calls.clear()
    ws.preprocess()
    assert calls == [] and shard_files(folder) == after and ws.prepared() == ws.from_scratch()


def test_a_changed_scan_is_prepared_again_and_a_removed_one_is_not_used(tmp_path, calls):
    ws = Workspace(tmp_path / "ws", patients=12)
    ws.preprocess()
    changed, removed = sorted(ws.raw.rglob("*.dcm"))[:2]
    ds = pydicom.dcmread(changed)
    ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(changed)
    removed.unlink()
    ws.ingest()

    calls.clear()
    ws.preprocess()
    assert calls == [changed]
    assert ws.prepared() == ws.from_scratch()
    assert removed.relative_to(ws.raw).as_posix().encode() not in ws.prepared()["index.csv"]


class Killed(BaseException):
    """A kill: nothing after it runs (not even an `except Exception`)."""


def test_a_killed_run_leaves_debris_that_the_next_run_cleans_up(tmp_path, calls, monkeypatch):
    ws = Workspace(tmp_path / "ws", patients=12)
    ws.preprocess()
    [folder] = ws.sets()
    ws.append("2024-06")
    prepared_before = ws.prepared()

    # Killed after the new shard's .npy was renamed in, before its .keys file was written.
    real = pixel_cache.write_text

    def kill_on_keys(target, text):
        if Path(target).suffix == ".keys":
            raise Killed
        return real(target, text)

    monkeypatch.setattr(pixel_cache, "write_text", kill_on_keys)
    with pytest.raises(Killed):
        ws.preprocess()
    monkeypatch.setattr(pixel_cache, "write_text", real)
    orphans = [p for p in folder.glob("*.npy") if not p.with_suffix(".keys").exists()]
    assert len(orphans) == 1 and ws.prepared() == prepared_before  # data/prepared untouched

    # And a temp file of a write that never finished (a kill skips atomic_path's clean-up).
    (folder / ".shard-0123456789abcdef.npy.x1y2z3.tmp").write_bytes(b"\x93NUMPY half")

    calls.clear()
    ws.preprocess()
    assert len(calls) == BATCH * 4  # the appended scans, prepared again: the orphan did not count
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the temp file is gone
    # The orphan was deleted and the same shard (a name follows from its keys) written whole.
    assert all(p.with_suffix(".keys").is_file() for p in folder.glob("*.npy")) and len(list(folder.glob("*.npy"))) == 2
    assert ws.prepared() == ws.from_scratch()


def test_a_damaged_shard_is_dropped_and_its_scans_prepared_again(tmp_path, calls):
    ws = Workspace(tmp_path / "ws", patients=12)
    ws.preprocess()
    [folder] = ws.sets()
    [npy] = folder.glob("shard-*.npy")
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])  # truncated (a disk filled up, say)

    calls.clear()
    ws.preprocess()
    assert len(calls) == 48 and ws.prepared() == ws.from_scratch()
    # Rewritten whole under the same name (a shard's name follows from its keys).
    assert np.load(npy, allow_pickle=False).shape == (48, 1, SIZE, SIZE)


def test_a_new_image_size_prepares_everything_and_drops_the_old_set(tmp_path, calls):
    ws = Workspace(tmp_path / "ws", patients=12)
    ws.preprocess()
    [old] = ws.sets()

    calls.clear()
    ws.preprocess(params(size=8))
    assert len(calls) == 48
    for split in ("train", "val", "test"):
        images, rows = load_split(ws.data / "prepared", split)
        assert images.shape == (len(rows), 1, 8, 8)
    [new] = ws.sets()
    assert new != old and not old.exists()
    assert ws.prepared() == ws.from_scratch(params(size=8))

    # Going back costs one full preparation (the set was dropped; module doc of pixel_cache).
    calls.clear()
    ws.preprocess()
    assert len(calls) == 48 and load_split(ws.data / "prepared", "train")[0].shape[2:] == (SIZE, SIZE)


def test_many_appends_are_compacted_into_one_shard(tmp_path, calls, monkeypatch):
    monkeypatch.setattr(pixel_cache, "MAX_SHARDS", 2)
    ws = Workspace(tmp_path / "ws", patients=8)
    ws.preprocess()
    [folder] = ws.sets()
    ws.append("b1", patients=1)
    ws.preprocess()
    assert len(list(folder.glob("*.keys"))) == 2
    ws.append("b2", patients=1)
    calls.clear()
    ws.preprocess()
    assert len(calls) == 4  # only the new ones; then a third shard is one too many: merged into one
    [keys] = folder.glob("*.keys")
    assert sorted(keys.read_text().split()) == sorted(set(load_index_keys(ws)))
    assert len(list(folder.iterdir())) == 3  # settings.json, one .npy, its .keys
    assert ws.prepared() == ws.from_scratch()


def load_index_keys(ws: Workspace) -> list[str]:
    return [line.split(",")[3] for line in ws.prepared()["index.csv"].decode().splitlines()[1:]]


def test_store_keeps_nothing_of_a_failed_shard_and_refuses_other_keys(tmp_path):
    store = pixel_cache.open_store(tmp_path, {"image_size": 4}, (1, 4, 4))
    key = "a" * 64
    with pytest.raises(RuntimeError, match="decoding failed"), store.new_shard([key]) as block:
        block[0] = 7
        raise RuntimeError("decoding failed")
    assert store.missing([key]) == [key] and [p.name for p in store.folder.iterdir()] == ["settings.json"]
    with pytest.raises(ValueError, match="sha256"), store.new_shard(["../../etc/passwd"]):
        pass
    with store.new_shard([key]) as block:
        block[0] = 7
    again = pixel_cache.open_store(tmp_path, {"image_size": 4}, (1, 4, 4))
    assert again.missing([key, "b" * 64, key]) == ["b" * 64]
    np.testing.assert_array_equal(again.get(key), np.full((1, 4, 4), 7, np.uint8))
    assert not again.get(key).flags.writeable


def test_copy_to_gathers_keys_from_several_shards_in_any_order(tmp_path):
    store = pixel_cache.open_store(tmp_path, {"image_size": 2}, (1, 2, 2))
    keys = [f"{n:064x}" for n in range(7)]
    for shard in (keys[:4], keys[4:]):
        with store.new_shard(shard) as block:
            for i, key in enumerate(shard):
                block[i] = int(key, 16) * 10
    wanted = [keys[n] for n in (6, 0, 3, 4, 4, 1, 5, 2, 0)]
    out = np.zeros((len(wanted), 1, 2, 2), np.uint8)
    store.copy_to(wanted, out, block=4)  # blocks that straddle both shards
    np.testing.assert_array_equal(out, np.stack([store.get(k) for k in wanted]))


def age(folder: Path) -> None:
    """Date every file back a minute: older than stat_index.RACY_NS when ingest lists it, as scans
    usually are (one written the moment before the listing is not vouched for by its stat)."""
    then = time.time_ns() - 60 * 10**9
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(then, then))


def test_unchanged_scans_are_not_read_again_and_a_changed_one_is_still_refused(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws", patients=6)
    age(ws.raw)
    ws.ingest()  # its stat index now vouches for every scan
    ws.preprocess()
    hashed: list[str] = []
    real = preprocess_module.sha256_file

    def counting(path, *args):
        if Path(path).suffix == ".dcm":  # not scans.py, which cache_settings hashes
            hashed.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(preprocess_module, "sha256_file", counting)
    ws.preprocess()
    assert hashed == []  # 24 cached scans checked against the manifest by their stat alone

    # Without the index (another facts cache) every cached scan is hashed, as it is in a fresh clone.
    preprocess(ws.data / "manifest.csv", ws.raw, ws.data / "prepared", params(), facts_dir=tmp_path / "elsewhere")
    assert len(hashed) == 24

    # Changed after ingest, same size: the stat no longer matches, so it is read, and refused.
    hashed.clear()
    changed = sorted(ws.raw.rglob("*.dcm"))[0]
    size = changed.stat().st_size
    ds = pydicom.dcmread(changed)
    ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(changed)
    assert changed.stat().st_size == size
    with pytest.raises(StageError, match=f"{changed.name}: sha256 is .* but the manifest says .*changed after ingest"):
        ws.preprocess()
    assert hashed == [changed.name]
    assert stat_index.known_hashes(ws.raw, [changed.relative_to(ws.raw).as_posix()], ws.data / "cache/facts") == {}


@pytest.mark.slow
def test_on_a_dask_cluster_the_output_is_the_same_bytes(tmp_path, calls, monkeypatch):
    from distributed import LocalCluster

    ws = Workspace(tmp_path / "ws", patients=12)
    ws.preprocess()
    ws.append("2024-06")
    calls.clear()
    monkeypatch.chdir(ws.root)  # relative paths, as `medtune preprocess` in dvc.yaml has them
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0") as cluster:
        preprocess(
            Path("data/manifest.csv"),
            Path("data/raw"),
            Path("data/prepared"),
            params(dask_scheduler=cluster.scheduler_address),
        )
    assert calls == []  # the new scans were decoded by the cluster's worker processes, not here
    assert ws.prepared() == ws.from_scratch()


@pytest.mark.slow
def test_dvc_repro_after_an_append_adds_one_shard_and_a_clone_pulls_the_cache(tmp_path, calls):
    ws = make_workspace(tmp_path / "ws")
    run(["dvc", "repro", "preprocess"], ws)
    run(["dvc", "remote", "add", "-q", "-d", "local", str(tmp_path / "remote")], ws)
    shutil.copy(ROOT / ".gitignore", ws / ".gitignore")  # as a clone of this project has it
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "first run"], ws)
    [folder] = sorted((ws / "data/cache/pixels").iterdir())
    first = shard_files(folder)

    run(
        [
            "medtune",
            "demo-data",
            "--out",
            "data/raw",
            "--patients",
            "3",
            "--slices",
            "3",
            "--size",
            "32",
            "--batch-name",
            "2024-06",
        ],
        ws,
    )
    run(["dvc", "add", "-q", "data/raw"], ws)
    out = run(["dvc", "repro", "preprocess"], ws)
    assert "9 scan(s) to prepare, 36 in the pixel cache" in out.stdout + out.stderr, out.stdout + out.stderr
    after = shard_files(folder)
    assert {name: after[name] for name in first} == first and len(after) == 4
    # No cache file reaches git (DVC's data/cache/.gitignore and the project's .gitignore list it).
    assert sorted(run(["git", "status", "--porcelain"], ws).stdout.splitlines()) == [" M data/raw.dvc", " M dvc.lock"]
    assert "up to date" in run(["dvc", "status", "preprocess"], ws).stdout

    scratch = tmp_path / "scratch"
    preprocess(
        ws / "data/manifest.csv",
        ws / "data/raw",
        scratch / "prepared",
        load_params(ws / "params.yaml"),
        cache_dir=scratch / "cache",
    )
    assert tree_digest(ws / "data/prepared") == tree_digest(scratch / "prepared")

    # A fresh clone gets the pixel cache with `dvc pull`, and its preprocess prepares nothing.
    run(["git", "commit", "-qam", "append"], ws)
    run(["dvc", "push", "-q"], ws)
    run(["git", "clone", "-q", str(ws), str(tmp_path / "clone")], tmp_path)
    clone = tmp_path / "clone"
    run(["dvc", "pull", "-q", "--with-deps", "preprocess"], clone)
    assert tree_digest(clone / "data/cache/pixels") == tree_digest(ws / "data/cache/pixels")
    calls.clear()
    preprocess(
        clone / "data/manifest.csv", clone / "data/raw", clone / "data/prepared", load_params(clone / "params.yaml")
    )
    assert calls == [] and tree_digest(clone / "data/prepared") == tree_digest(ws / "data/prepared")


def test_shard_rows_are_written_in_order_and_a_short_shard_is_refused(tmp_path):
    store = pixel_cache.open_store(tmp_path, {"image_size": 2}, (1, 2, 2))
    keys = [f"{n:064x}" for n in range(3)]
    with pytest.raises(IndexError, match="next is row 0"), store.new_shard(keys) as block:
        block[1] = 5
    with pytest.raises(ValueError, match="2 of 3 rows"), store.new_shard(keys) as block:
        block[0:2] = 5
    assert store.missing(keys) == keys and [p.name for p in store.folder.iterdir()] == ["settings.json"]
    with store.new_shard(keys) as block:
        block[0] = 1
        block.append(np.full((2, 1, 2, 2), 9, np.uint8))
    [npy] = store.folder.glob("*.npy")
    expected = np.concatenate([np.ones((1, 1, 2, 2), np.uint8), np.full((2, 1, 2, 2), 9, np.uint8)])
    saved = tmp_path / "saved.npy"
    np.save(saved, expected)
    assert npy.read_bytes() == saved.read_bytes()  # the bytes np.save writes
