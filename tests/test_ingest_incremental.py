"""Ingest reads what is new (components.data.scan_facts): the same manifest bytes as a run from scratch,
with only appended or changed scans hashed and decoded, and near-duplicates found across old and new."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import common, parallel
from components.data import demo_data, fact_shards, scan_facts, scan_info, stat_index
from components.data.ingest import find_scans, ingest
from components.params import parse_params
from tests.builders import picture

SPLIT = {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.25}


def params(**split):
    return parse_params(
        {"data": {"patient_pattern": r"^(?P<patient>p\d+)_"}, "split": {**SPLIT, **split}, "compute": {"workers": 1}}
    )


def add_pngs(raw: Path, first: int, count: int) -> list[str]:
    """Distinct pictures p<NN>_0.png, label by parity; returns their relative paths."""
    rels = []
    for n in range(first, first + count):
        rel = f"{('normal', 'lesion')[n % 2]}/p{n:03d}_0.png"
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(1000 + n, 32)).save(raw / rel)
        rels.append(rel)
    return rels


def age(raw: Path) -> None:
    """Date the files written in the last 30 s back a minute. A file written the moment before ingest
    lists is hashed again by the next run (stat_index.RACY_NS), so tests that count hashing age them."""
    now = time.time_ns()
    for p in raw.rglob("*"):
        if p.is_file() and p.stat().st_mtime_ns > now - 30 * 10**9:
            os.utime(p, ns=(now - 60 * 10**9,) * 2)


@pytest.fixture
def raw(tmp_path) -> Path:
    """PNGs, DICOMs with patient ids (demo data), a byte-identical copy, a near-duplicate, an unreadable file."""
    raw = tmp_path / "raw"
    demo_data.generate(raw, patients=6, slices=2, size=32, seed=0, classes=["normal", "lesion"])
    add_pngs(raw, 0, 16)
    shutil.copy(raw / "lesion/p001_0.png", raw / "lesion/p101_0.png")
    img = np.asarray(Image.open(raw / "normal/p002_0.png"))
    Image.fromarray((img * 0.8 + 10).astype(np.uint8)).save(raw / "normal/p102_0.jpg", quality=90)
    (raw / "normal/p103_0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    age(raw)
    return raw


class Count:
    """Calls of scan_info.probe and common.sha256_file (compute.workers = 1: all in this process), by file name."""

    def __init__(self, monkeypatch):
        self.probed, self.hashed = [], []
        probe, sha = scan_info.probe, common.sha256_file
        monkeypatch.setattr(scan_info, "probe", lambda p: (self.probed.append(Path(p).name), probe(p))[1])
        monkeypatch.setattr(common, "sha256_file", lambda p, *a: (self.hashed.append(Path(p).name), sha(p, *a))[1])

    def reset(self):
        self.probed.clear()
        self.hashed.clear()


def outputs(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in ("manifest.csv", "manifest.json")}


def from_scratch(raw: Path, before: Path, tmp: Path, p=None) -> dict[str, bytes]:
    """The outputs of a run without a cache, given the manifest the incremental run saw (its splits)."""
    out = tmp / f"scratch{len(list(tmp.glob('scratch*')))}"
    out.mkdir()
    if (before / "manifest.csv").is_file():
        shutil.copy(before / "manifest.csv", out / "manifest.csv")
    ingest(raw, out, p or params(), cache_dir=out / "empty-cache")
    return outputs(out)


def test_append_change_and_removal_give_the_bytes_of_a_run_from_scratch(raw, tmp_path, monkeypatch):
    out, prev = tmp_path / "data", tmp_path / "prev"
    count = Count(monkeypatch)
    ingest(raw, out, params())
    # 12 DICOMs, 16 PNGs, the near-duplicate and the unreadable file; the copy has p001_0.png's bytes.
    assert len(count.probed) == len(set(count.probed)) == 12 + 16 + 2

    def step():
        age(raw)
        shutil.copytree(out, prev, dirs_exist_ok=True, ignore=shutil.ignore_patterns("cache"))
        count.reset()
        ingest(raw, out, params())
        seen = sorted(count.probed), sorted(count.hashed)
        assert outputs(out) == from_scratch(raw, prev, tmp_path)
        return seen

    new = [Path(r).name for r in add_pngs(raw, 200, 4)]
    shutil.copy(raw / "lesion/p003_0.png", raw / "lesion/p205_0.png")  # known bytes: hashed, not read
    img = np.asarray(Image.open(raw / "lesion/p005_0.png"))  # a near-duplicate of an old scan
    Image.fromarray((img * 0.9).astype(np.uint8)).save(raw / "lesion/p207_0.jpg", quality=90)
    probed, hashed = step()
    assert probed == sorted(new + ["p207_0.jpg"])
    assert hashed == sorted(new + ["p205_0.png", "p207_0.jpg"])
    df = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False).set_index("path")
    assert df.loc["lesion/p207_0.jpg", "similar_group"] == df.loc["lesion/p005_0.png", "similar_group"] != ""
    assert df.loc["lesion/p205_0.png", "similar_group"] == df.loc["lesion/p003_0.png", "similar_group"] != ""
    assert df.loc["normal/p102_0.jpg", "similar_group"] == "normal/p002_0.png"

    Image.fromarray(picture(7, 32)).save(raw / "normal/p004_0.png")  # changed content
    (raw / "lesion/p007_0.png").unlink()  # removed
    probed, hashed = step()
    assert probed == hashed == ["p004_0.png"]
    assert "lesion/p007_0.png" not in (out / "manifest.csv").read_text()

    probed, hashed = step()  # nothing changed: nothing read, and the bytes stay
    assert probed == hashed == []


def test_only_new_scans_are_read_and_a_fresh_index_rehashes_without_decoding(raw, tmp_path, monkeypatch):
    out = tmp_path / "data"
    ingest(raw, out, params())
    count = Count(monkeypatch)
    new = add_pngs(raw, 300, 4)
    age(raw)
    ingest(raw, out, params())
    assert sorted(count.probed) == sorted(Path(r).name for r in new)
    assert sorted(count.hashed) == sorted(Path(r).name for r in new)  # the rest known by their stat

    # Another place (a clone after `dvc pull`): the facts are there, the stat index is not.
    clone = tmp_path / "clone"
    shutil.copytree(out / "cache/facts", clone / "facts")
    shutil.copy(out / "manifest.csv", clone / "manifest.csv")
    assert not stat_index.index_path(clone / "facts", raw).exists()
    count.reset()
    ingest(raw, clone, params(), cache_dir=clone / "facts")
    assert count.probed == [] and sorted(count.hashed) == sorted(Path(r).name for r in find_scans(raw).scans)
    assert outputs(clone) == outputs(out) and stat_index.index_path(clone / "facts", raw).is_file()


def test_a_scan_written_just_before_the_listing_is_hashed_again_but_not_read(raw, tmp_path, monkeypatch):
    new = [Path(r).name for r in add_pngs(raw, 400, 3)]  # not aged: as fresh as a scan copied in just now
    ingest(raw, tmp_path / "data", params())
    count = Count(monkeypatch)
    ingest(raw, tmp_path / "data", params())
    assert count.probed == [] and sorted(count.hashed) == sorted(new)


def test_another_salt_rereads_only_dicoms_with_a_patient_id_and_no_id_reaches_the_cache(raw, tmp_path, monkeypatch):
    out = tmp_path / "data"
    ingest(raw, out, params())
    count = Count(monkeypatch)
    monkeypatch.setenv("MEDTUNE_PATIENT_SALT", "another-secret")
    ingest(raw, out, params())
    assert sorted(count.probed) == sorted(p.name for p in raw.rglob("*.dcm")) and len(count.probed) == 12
    assert outputs(out) == from_scratch(raw, out, tmp_path)
    stored = b"".join(p.read_bytes() for p in (out / "cache/facts").iterdir())
    stored += stat_index.index_path(out / "cache/facts", raw).read_bytes()
    assert b"DEMO-0" not in stored and b"Demo^Patient" not in stored and b"another-secret" not in stored


def test_a_kill_between_shards_or_mid_write_leaves_a_usable_cache(raw, tmp_path, monkeypatch):
    out = tmp_path / "data"
    monkeypatch.setattr(scan_facts, "SHARD_ROWS", 8)
    write = fact_shards.Store.write

    def die_after_two(store, *args):
        if len(store.names) == 2:
            raise KeyboardInterrupt  # a kill once two shards are stored
        write(store, *args)

    monkeypatch.setattr(fact_shards.Store, "write", die_after_two)
    with pytest.raises(KeyboardInterrupt):
        ingest(raw, out, params())
    monkeypatch.setattr(fact_shards.Store, "write", write)
    facts = out / "cache/facts"
    assert sorted(p.name for p in facts.iterdir()) == ["shard-000000.npz", "shard-000001.npz"]
    (facts / ".shard-000002.npz.x1y2.tmp").write_bytes(b"half a shard")  # killed mid-write
    count = Count(monkeypatch)
    ingest(raw, out, params())
    assert len(count.probed) == 30 - 16  # two shards of 8 were kept
    assert not list(facts.glob(".*.tmp"))
    assert outputs(out) == from_scratch(raw, tmp_path / "none", tmp_path)

    # A damaged shard (a copy cut short) is deleted and its scans read again.
    last = sorted(facts.glob("shard-??????.npz"))[-1]
    pairs = sorted(facts.glob("shard-??????.pairs-0.99.npz"))[0]
    for damaged in (last, pairs):
        damaged.write_bytes(damaged.read_bytes()[:100])
    count.reset()
    ingest(raw, out, params())
    assert 0 < len(count.probed) <= 8 and outputs(out) == from_scratch(raw, out, tmp_path)


def test_pairs_of_old_scans_are_kept_and_a_new_threshold_is_searched_once(raw, tmp_path, monkeypatch):
    out, facts = tmp_path / "data", tmp_path / "data/cache/facts"
    ingest(raw, out, params())
    first = facts / "shard-000000.pairs-0.99.npz"
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    add_pngs(raw, 500, 3)
    ingest(raw, out, params())
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp  # not searched again
    assert (facts / "shard-000001.pairs-0.99.npz").is_file()
    ingest(raw, out, params(near_duplicate_correlation=0.9))
    assert sorted(p.name for p in facts.glob("*.pairs-0.9.npz")) == [
        "shard-000000.pairs-0.9.npz",
        "shard-000001.pairs-0.9.npz",
    ]
    assert outputs(out) == from_scratch(raw, out, tmp_path, params(near_duplicate_correlation=0.9))


def test_facts_of_another_format_are_dropped_and_read_again(raw, tmp_path, monkeypatch):
    out = tmp_path / "data"
    ingest(raw, out, params())
    before = outputs(out)
    monkeypatch.setattr(fact_shards, "FORMAT", fact_shards.FORMAT + 1)
    count = Count(monkeypatch)
    ingest(raw, out, params())
    assert len(count.probed) == 30 and outputs(out) == before
    assert sorted(p.name for p in (out / "cache/facts").glob("shard-*")) == [
        "shard-000000.npz",
        "shard-000000.pairs-0.99.npz",
    ]


@pytest.mark.slow
def test_dvc_repro_keeps_the_cache_as_a_persistent_output_out_of_git(tmp_path):
    from tests.workspace import make_workspace, run

    ws = make_workspace(tmp_path / "ws", patients=6)
    run(["dvc", "repro", "ingest"], ws)
    facts = ws / "data/cache/facts"
    assert sorted(p.name for p in facts.iterdir()) == ["shard-000000.npz", "shard-000000.pairs-0.99.npz"]
    assert list((ws / ".dvc/tmp" / stat_index.INDEX_DIR).glob("*.json"))  # the stat index: machine-local
    lock = (ws / "dvc.lock").read_text()
    assert "path: data/cache/facts" in lock
    untracked = run(["git", "status", "--porcelain", "--untracked-files=all"], ws).stdout
    assert "data/cache/facts" not in untracked and "scan-stats" not in untracked, untracked

    # An append: ingest reruns, adds one shard (the old one untouched), and the stage is then up to date.
    stamp = (facts / "shard-000000.npz").stat().st_mtime_ns
    run(
        [
            "medtune",
            "demo-data",
            "--out",
            "data/raw",
            "--patients",
            "2",
            "--slices",
            "2",
            "--size",
            "32",
            "--batch-name",
            "more",
        ],
        ws,
    )
    run(["dvc", "add", "-q", "data/raw"], ws)
    run(["dvc", "repro", "ingest"], ws)
    assert (facts / "shard-000000.npz").stat().st_mtime_ns == stamp
    assert (facts / "shard-000001.npz").is_file()
    assert "changed" not in run(["dvc", "status", "ingest"], ws).stdout
    untracked = run(["git", "status", "--porcelain", "--untracked-files=all"], ws).stdout
    assert "data/cache/facts" not in untracked, untracked


def test_new_scans_are_read_in_worker_processes_with_the_same_result(raw, tmp_path, monkeypatch):
    add_pngs(raw, 600, 140)
    # Too little work to pay for a pool's start: pretend a start is free, so two processes read them.
    monkeypatch.setattr(parallel, "WORKER_START_SECONDS", 1e-4)
    pools, real = [], parallel._map_local
    monkeypatch.setattr(
        parallel, "_map_local", lambda fn, items, n, desc: (pools.append(n), real(fn, items, n, desc))[1]
    )
    pooled = parse_params(
        {"data": {"patient_pattern": r"^(?P<patient>p\d+)_"}, "split": SPLIT, "compute": {"workers": 2}}
    )
    ingest(raw, tmp_path / "pooled", pooled)
    ingest(raw, tmp_path / "alone", params())
    assert pools == [2]  # the probe, on two processes (hashing 5 MB stays in this one)
    assert outputs(tmp_path / "pooled") == outputs(tmp_path / "alone")
