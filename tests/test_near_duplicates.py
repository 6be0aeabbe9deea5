"""Near-duplicate images (components.data.near_duplicates): found across formats and exposures, kept in
one split by ingest, and reported by validate when a given split separates them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from components.common import StageError
from components.data import near_duplicates, scan_info
from components.data.ingest import ingest
from components.params import parse_params
from tests.builders import clean_rows, picture, validate_rows, with_validate, write_dicom


def variants(tmp_path, img: np.ndarray) -> dict[str, object]:
    """The same picture as a PNG, as a darker, smaller JPEG, and as a 12-bit DICOM."""
    paths = {"png": tmp_path / "a.png", "jpeg": tmp_path / "b.jpg", "dicom": tmp_path / "c.dcm"}
    Image.fromarray(img).save(paths["png"])
    darker = Image.fromarray((img * 0.7 + 20).astype(np.uint8)).resize((48, 48), Image.Resampling.BILINEAR)
    darker.save(paths["jpeg"], quality=80)
    write_dicom(paths["dicom"], img.astype(np.uint16) * 16)
    return paths


def test_one_picture_in_three_formats_is_alike_and_another_is_not(tmp_path):
    paths = variants(tmp_path, picture(0))
    Image.fromarray(picture(1)).save(tmp_path / "other.png")
    files = [*paths.values(), tmp_path / "other.png"]
    thumbs = near_duplicates.standardise([scan_info.probe(f).thumbnail for f in files])
    corr = thumbs @ thumbs.T
    assert corr[:3, :3].min() >= 0.99, corr  # format, size, exposure and bit depth do not hide it
    assert corr[3, :3].max() < 0.9, corr
    assert near_duplicates.pairs(thumbs, 0.99) == [(0, 1), (0, 2), (1, 2)]


def test_a_flat_image_is_alike_nothing():
    thumbs = near_duplicates.standardise([np.full((32, 32), 7.0), np.full((32, 32), 9.0)])
    assert not thumbs.any() and near_duplicates.pairs(thumbs, 0.5) == []


def test_groups_do_not_chain_each_member_matches_its_leader():
    paths = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    # a~b, b~c, c~d, a~e: a chain of likeness. b is taken by a; c matches only b (no leader), so c
    # leads its own group and takes d; e joins a. Connected components would give one group of five.
    leader = near_duplicates.leaders(5, [(0, 1), (1, 2), (2, 3), (0, 4)])
    assert leader == [0, 0, 2, 2, 0]
    assert near_duplicates.groups(paths, leader) == ["a.png", "a.png", "c.png", "c.png", "a.png"]
    assert near_duplicates.links(leader) == [(0, 1), (2, 3), (0, 4)]
    alone = near_duplicates.leaders(5, [])
    assert near_duplicates.groups(paths, alone) == [""] * 5 and near_duplicates.links(alone) == []


def test_a_series_of_gradually_changing_images_is_not_one_group():
    """Thirty images, each a small step from the last: neighbours correlate >= 0.99, the ends do not."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(32, 32)), rng.normal(size=(32, 32))
    series = [np.cos(t) * a + np.sin(t) * b for t in np.linspace(0, np.pi / 2, 30)]
    thumbs = near_duplicates.standardise(series)
    linked = near_duplicates.pairs(thumbs, 0.99)
    assert (0, 1) in linked and (0, 29) not in linked
    leader = near_duplicates.leaders(30, linked)
    sizes = np.bincount(leader)
    assert sizes.max() < 10, sizes  # each group is the images within reach of its first one


@pytest.mark.parametrize("method", ["stratified", "stable"])
def test_ingest_keeps_near_duplicates_in_one_split(tmp_path, method):
    raw = tmp_path / "raw"
    for i in range(16):  # no patient ids: every image is its own patient
        (raw / ("normal", "lesion")[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(100 + i)).save(raw / ("normal", "lesion")[i % 2] / f"img{i:02d}.png")
    img = np.asarray(Image.open(raw / "lesion/img01.png"))
    Image.fromarray((img * 0.8 + 10).astype(np.uint8)).save(raw / "lesion/copy.jpg", quality=85)
    for seed in range(4):
        split = {"method": method, "seed": seed, "val_fraction": 0.2, "test_fraction": 0.25}
        df = ingest(raw, tmp_path / f"out{seed}", parse_params({"data": {}, "split": split})).set_index("path")
        pair = ["lesion/copy.jpg", "lesion/img01.png"]
        assert df.loc[pair, "split"].nunique() == 1
        assert list(df.loc[pair, "similar_group"]) == ["lesion/copy.jpg"] * 2
        assert (df.drop(index=pair)["similar_group"] == "").all()
    meta = json.loads((tmp_path / "out0/manifest.json").read_text())
    assert meta["near_duplicates"] == {"correlation": 0.99, "groups": 1, "images": 2}

    off = ingest(raw, tmp_path / "off", parse_params({"split": {"near_duplicate_correlation": None}}))
    assert (off["similar_group"] == "").all()


def test_validate_names_near_duplicates_that_a_given_split_separates(tmp_path):
    rows = clean_rows()
    train, test = rows[0], rows[-1]
    train["similar_group"] = test["similar_group"] = train["path"]
    for name in ("strict", "tolerant"):
        (tmp_path / name).mkdir()
    with pytest.raises(
        StageError,
        match=r"near-duplicates of normal/train_0\.png in splits test "
        r"\(lesion/test_1\.png\); train \(normal/train_0\.png\)",
    ):
        validate_rows(tmp_path / "strict", rows)
    report = json.loads((tmp_path / "strict/reports/validation.json").read_text())
    assert report["success"] is False
    assert [f["critical"] for f in report["failures"] if f["name"] == "near_duplicates_in_one_split"] == [True]

    out_json, _ = validate_rows(tmp_path / "tolerant", rows, with_validate(max_near_duplicates=1))
    report = json.loads(out_json.read_text())
    assert report["success"] is True
    assert [(f["name"], f["critical"]) for f in report["failures"]] == [("near_duplicates_in_one_split", False)]
    entry = next(e for e in report["expectations"] if e["name"] == "near_duplicates_in_one_split")
    assert entry["details"]["n_offending"] == 1  # what the model card counts


@pytest.mark.parametrize("pair_cost", [0, 10**9])  # each candidate pair's own dot / always the product
def test_pairs_match_a_float64_search_and_new_against_old_finds_the_same(monkeypatch, pair_cost):
    """The filtered, exact search finds what a plain float64 product finds (away from the threshold by
    more than rounding), whatever the blocks and however the candidates are confirmed; comparing the
    last rows with all finds their share of it."""
    monkeypatch.setattr(near_duplicates, "PAIR_COST", pair_cost)
    rng = np.random.default_rng(5)
    base = np.stack([gaussian_filter(rng.normal(size=(32, 32)), 3) for _ in range(60)])
    noisy = base + rng.normal(size=base.shape) * base.std() * np.linspace(0, 0.4, 60)[:, None, None]
    x = near_duplicates.standardise(list(np.concatenate([base, noisy, rng.normal(size=(20, 32, 32))])))
    corr = x.astype(np.float64) @ x.astype(np.float64).T
    monkeypatch.setattr(near_duplicates, "BLOCK", 7)  # many blocks, uneven edges
    for threshold in (0.5, 0.9, 0.99):
        expected = {(i, j) for i, j in zip(*np.nonzero(corr >= threshold)) if i < j}
        unsure = {(i, j) for i, j in zip(*np.nonzero(abs(corr - threshold) < 1e-6)) if i < j}
        found = set(near_duplicates.pairs(x, threshold))
        assert found ^ expected <= unsure and len(expected) > 10
        # As ingest does after an append: the new rows (the last 25) against every row.
        q = np.stack([near_duplicates.signature(t.reshape(32, 32), 32) for t in x])
        p = near_duplicates.project(q)
        new = range(len(x) - 25, len(x))
        pieces = near_duplicates.linked(p[new.start :], p, lambda r: q[new.start :][r], q.__getitem__, threshold)
        later = {
            (int(min(i + new.start, j)), int(max(i + new.start, j)))
            for a, b in pieces
            for i, j in zip(a, b)
            if i + new.start != j
        }
        assert later == {(i, j) for i, j in found if j in new}
