"""predict: ONNX metadata drives the preprocessing; PNG and DICOM in, bad files reported, not fatal."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
from PIL import Image

from components.common import StageError
from components.release.predict import main, predict
from tests.builders import RAW_ID, RAW_NAME, write_dicom


def test_predict_png_dicom_and_corrupt_files(onnx_model, tmp_path):
    scans = tmp_path / "scans"
    (scans / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(scans / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(scans / "nested" / "b.jpg")
    write_dicom(scans / "nested" / "c.dcm", rng.integers(900, 1300, (24, 24)))
    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (scans / "notes.txt").write_text("not a scan")  # skipped when expanding a folder
    extra = tmp_path / "single.png"
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(extra)

    out = tmp_path / "pred.csv"
    table = predict(onnx_model, [scans, extra], out, batch_size=2)
    csv = pd.read_csv(out, keep_default_na=False)
    assert list(csv.columns) == ["path", "prob_normal", "prob_lesion", "predicted", "error"]
    assert len(csv) == len(table) == 5
    names = {p.rsplit("/", 1)[-1]: row for p, row in zip(csv["path"], csv.to_dict("records"))}
    assert set(names) == {"a.png", "b.jpg", "c.dcm", "broken.png", "single.png"}
    assert "broken.png" in names["broken.png"]["error"] and names["broken.png"]["predicted"] == ""
    good = csv[csv["error"] == ""]
    assert len(good) == 4
    probs = good[["prob_normal", "prob_lesion"]].to_numpy(dtype=float)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    expected = np.where(probs[:, 1] >= 0.5, "lesion", "normal")  # the evaluated threshold rule
    assert good["predicted"].tolist() == expected.tolist()
    text = out.read_text()
    assert RAW_NAME not in text and RAW_ID not in text and "Doe" not in text

    # Batch size does not change the answer.
    again = predict(onnx_model, [scans, extra], None, batch_size=32)
    assert np.allclose(
        again[["prob_normal", "prob_lesion"]].to_numpy(dtype=float),
        table[["prob_normal", "prob_lesion"]].to_numpy(dtype=float),
        equal_nan=True,
    )


def test_predict_matches_the_training_preprocessing(onnx_model, tmp_path):
    """A PNG that is already 32x32 grey becomes exactly that prepared array: same probabilities."""
    import onnxruntime as ort

    img = np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    table = predict(onnx_model, [tmp_path / "x.png"], None)
    sess = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    ref = sess.run(["probabilities"], {"image": img[None, None].astype(np.float32) / 255})[0][0]
    assert np.allclose(table[["prob_normal", "prob_lesion"]].to_numpy(dtype=float)[0], ref, atol=1e-6)


def test_predict_repeats_the_recorded_equalization(onnx_model, tmp_path):
    """A model whose metadata says `equalize` gets equalized inputs; older models (no key) do not."""
    import json

    import onnxruntime as ort
    from PIL import ImageOps

    img = np.random.default_rng(2).integers(40, 120, (32, 32), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    proto = onnx.load(str(onnx_model))
    for prop in proto.metadata_props:
        if prop.key == "preprocessing":
            prop.value = json.dumps({**json.loads(prop.value), "equalize": True})
    equalizing = tmp_path / "equalizing.onnx"
    onnx.save(proto, str(equalizing))

    sess = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    equalized = np.asarray(ImageOps.equalize(Image.fromarray(img)))
    for path, x in [(equalizing, equalized), (onnx_model, img)]:
        ref = sess.run(["probabilities"], {"image": x[None, None].astype(np.float32) / 255})[0][0]
        got = predict(path, [tmp_path / "x.png"], None)[["prob_normal", "prob_lesion"]].to_numpy(dtype=float)[0]
        assert np.allclose(got, ref, atol=1e-6), path.name


def test_model_whose_preprocessing_record_lacks_a_setting_is_a_clear_error(onnx_model, tmp_path):
    import json

    proto = onnx.load(str(onnx_model))
    for prop in proto.metadata_props:
        if prop.key == "preprocessing":
            prop.value = json.dumps({k: v for k, v in json.loads(prop.value).items() if k != "image_size"})
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(StageError, match=r"broken\.onnx: the preprocessing record lacks \['image_size'\]"):
        predict(broken, [tmp_path / "x.png"], None)


def test_model_without_metadata_is_a_clear_error(onnx_model, tmp_path, capsys):
    proto = onnx.load(str(onnx_model))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(StageError, match="bare.onnx: ONNX file has no medtune metadata"):
        predict(bare, [tmp_path / "x.png"], None)
    rc = main([str(bare), str(tmp_path / "x.png"), "-o", str(tmp_path / "p.csv")])
    assert rc == 1 and "no medtune metadata" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()

    (tmp_path / "junk.onnx").write_bytes(b"definitely not onnx")
    with pytest.raises(StageError, match="junk.onnx"):
        predict(tmp_path / "junk.onnx", [tmp_path / "x.png"], None)


def test_one_reader_of_the_metadata_with_or_without_a_session(onnx_model, tmp_path):
    """read_metadata gives the same decoded record from the file alone as through a session; a bad
    JSON value or a file that is not ONNX names the file (and the key); lookup's wrapper says None."""
    import json

    from components.audit.lookup import onnx_metadata_id
    from components.release.onnx_runtime import make_session, read_metadata

    meta = read_metadata(onnx_model)
    assert meta == read_metadata(onnx_model, make_session(onnx_model))
    assert meta["classes"] == ["normal", "lesion"] and meta["preprocessing"]["image_size"] == 32
    assert meta["metrics"]["positive_class"] == "lesion" and meta["gate"]["passed"] is True
    assert onnx_metadata_id(onnx_model) == meta["model_id"] and len(meta["model_id"]) == 12

    proto = onnx.load(str(onnx_model))
    for prop in proto.metadata_props:
        if prop.key == "gate":
            prop.value = '{"passed": tru'
    bad = tmp_path / "bad-json.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(StageError, match=r"bad-json\.onnx: metadata 'gate' is not valid JSON .*re-export"):
        read_metadata(bad)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(StageError, match=r"bad-json\.onnx: metadata 'gate' is not valid JSON"):
        predict(bad, [tmp_path / "x.png"], None)

    (tmp_path / "junk.onnx").write_bytes(b"definitely not onnx")
    with pytest.raises(StageError, match=r"junk\.onnx: not an ONNX file \(DecodeError"):
        read_metadata(tmp_path / "junk.onnx")
    with pytest.raises(StageError, match=r"absent\.onnx: no such file"):
        read_metadata(tmp_path / "absent.onnx")
    assert onnx_metadata_id(tmp_path / "junk.onnx") is None
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(StageError, match=r"bare\.onnx: ONNX file has no medtune metadata \(missing keys \['model_id'"):
        read_metadata(tmp_path / "bare.onnx")
    assert onnx_metadata_id(tmp_path / "bare.onnx") is None
    assert json.loads(json.dumps(meta["input"]))["name"] == "image"


def test_main_writes_csv(onnx_model, tmp_path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main([str(onnx_model), str(tmp_path), "-o", str(tmp_path / "out.csv"), "--batch-size", "4"]) == 0
    assert pd.read_csv(tmp_path / "out.csv")["path"].str.endswith("x.png").all()


def test_folders_are_searched_for_visible_scans_only(tmp_path):
    from components.release.predict import expand_paths

    for rel in ["a/x.png", "a/deeper/y.dcm", "a/.ipynb_checkpoints/x.png", "a/__MACOSX/._x.png", "a/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "given.txt").write_bytes(b"")  # a file named on the command line is taken as is
    found, refused = expand_paths([tmp_path / "a", tmp_path / "given.txt"])
    assert refused == {}
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/deeper/y.dcm", "a/x.png", "given.txt"]


def scan_folder(root, n_png=23, n_dicom=5):
    """PNG and DICOM scans of several sizes, an unreadable PNG among them and a link out of the folder."""
    rng = np.random.default_rng(7)
    scans = root / "scans"
    (scans / "deeper").mkdir(parents=True)
    for i in range(n_png):
        size = (40 + i, 30 + 2 * i)
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(scans / f"p{i:02d}.png")
    for i in range(n_dicom):
        write_dicom(scans / "deeper" / f"d{i}.dcm", rng.integers(900, 1300, (24 + i, 24)))
    (scans / "p07.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")  # unreadable, in the middle
    secret = root / "outside.png"
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(secret)
    (scans / "p11-link.png").symlink_to(secret)
    return scans


def test_threaded_decoding_writes_the_serial_csv(onnx_model, tmp_path):
    """Threads decode while ONNX Runtime runs: same CSV bytes as one thread, rows in input order,
    the unreadable file and the link out of the folder still error rows; and the bytes pandas'
    to_csv writes for the same table (the writer `medtune predict` used before)."""
    scans = scan_folder(tmp_path)
    serial = predict(onnx_model, [scans], tmp_path / "serial.csv", batch_size=3, threads=1)
    threaded = predict(onnx_model, [scans], tmp_path / "threaded.csv", batch_size=3, threads=4)
    assert main([str(onnx_model), str(scans), "-o", str(tmp_path / "cli.csv"), "--batch-size", "5"]) == 0
    text = (tmp_path / "serial.csv").read_bytes()
    assert (tmp_path / "threaded.csv").read_bytes() == text == (tmp_path / "cli.csv").read_bytes()
    assert threaded.to_csv(index=False, lineterminator="\n").encode() == text
    pd.testing.assert_frame_equal(serial, threaded)

    from components.release.predict import expand_paths

    assert threaded["path"].tolist() == [f.as_posix() for f in expand_paths([scans])[0]]
    bad = threaded[threaded["error"] != ""]
    assert [p.rsplit("/", 1)[-1] for p in bad["path"]] == ["p07.png", "p11-link.png"]
    assert "not a readable" in bad["error"].iloc[0] and "outside the folder" in bad["error"].iloc[1]
    assert bad["predicted"].tolist() == ["", ""] and bad[["prob_normal", "prob_lesion"]].isna().all().all()
    assert (threaded["error"] == "").sum() == 23 + 5 - 1


def test_decoding_runs_a_bounded_distance_ahead(monkeypatch, tmp_path):
    """However many files, the threads hold at most `ahead` prepared scans the model has not taken."""
    import threading

    from components.release import predict as module

    started, lock = [], threading.Lock()

    def fake_prepare(path, settings):
        with lock:
            started.append(path)
        return np.zeros((1, 2, 2), np.uint8)

    monkeypatch.setattr(module, "_prepare", fake_prepare)
    files = [tmp_path / f"{i}.png" for i in range(50)]
    taken = 0
    for _item in module.prepared(files, {}, threads=3, ahead=4):
        taken += 1
        assert len(started) <= taken + 4
    assert taken == 50 and sorted(started) == sorted(files)


def test_bad_thread_count_is_a_clear_error(onnx_model, tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main([str(onnx_model), str(tmp_path / "x.png"), "-o", str(tmp_path / "p.csv"), "--threads", "0"]) == 1
    assert "--threads 0 is invalid; expected an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def predict_importtime(*args):
    """`medtune predict ARGS` in a process under -X importtime; (process, top-level packages it imported)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    medtune = Path(sys.executable).parent / "medtune"
    out = subprocess.run(
        [sys.executable, "-X", "importtime", str(medtune), "predict", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out, {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", out.stderr, re.M)}


@pytest.mark.slow
def test_the_command_imports_neither_torch_scipy_nor_pandas(onnx_model, tmp_path):
    """`medtune predict` starts fast: the process (run under -X importtime) never imports torch,
    scipy or pandas, and still writes its CSV."""
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "x.png")
    _, imported = predict_importtime(onnx_model, tmp_path, "-o", tmp_path / "p.csv")
    assert {"onnxruntime", "PIL", "numpy"} <= imported  # the probe sees the process's imports
    assert not imported & {"torch", "scipy", "pandas"}, sorted(imported & {"torch", "scipy", "pandas"})
    assert (tmp_path / "p.csv").read_text().startswith("path,prob_normal,prob_lesion,predicted,error\n")


@pytest.mark.slow
def test_explain_imports_torch_and_grad_cam_only_when_asked(onnx_model, tmp_path):
    """With --explain the same command imports torch and grad-cam (lazily: the probe above proves the
    plain run does not) and writes an overlay per scan and the explanation column."""
    (tmp_path / "scans").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "scans" / "x.png")
    _, imported = predict_importtime(
        onnx_model, tmp_path / "scans", "-o", tmp_path / "p.csv", "--explain", tmp_path / "overlays"
    )
    assert {"torch", "pytorch_grad_cam"} <= imported
    assert [p.name for p in (tmp_path / "overlays").iterdir()] == ["x.png"]
    header, row = (tmp_path / "p.csv").read_text().splitlines()
    assert header.endswith(",error,explanation") and row.endswith(f",{(tmp_path / 'overlays' / 'x.png').as_posix()}")
