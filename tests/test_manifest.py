"""The one reader of data/manifest.csv: same cells and same loud errors for every stage and tool."""

import pandas as pd
import pytest

from components.common import StageError
from components.data.manifest import COLUMNS, LISTING_COLUMNS, read_manifest, read_manifest_rows

HEADER = ",".join(COLUMNS)


def line(**cells: str) -> str:
    return ",".join(cells.get(c, "") for c in COLUMNS)


ROW = line(
    path="normal/a.png",
    sha256="ab12",
    label="NA",
    patient="p1",
    width="64",
    height="64",
    channels="1",
    bit_depth="8",
    split="train",
)


def write(tmp_path, text: str):
    path = tmp_path / "manifest.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_cells_are_text_and_empty_cells_are_empty_strings(tmp_path):
    path = write(tmp_path, f"{HEADER}\n{ROW}\n")
    df = read_manifest(path)
    assert list(df.columns) == COLUMNS
    row = df.iloc[0]
    # "NA" is a (wrong) label that validate must see as written, not a missing value.
    assert (row["label"], row["width"], row["modality"], row["error"]) == ("NA", "64", "", "")
    assert read_manifest_rows(path)[0] == dict(row)


def test_absent_manifest_is_an_error_unless_missing_ok(tmp_path):
    with pytest.raises(StageError, match=r"manifest\.csv not found; run `medtune ingest`"):
        read_manifest(tmp_path / "manifest.csv")
    empty = read_manifest(tmp_path / "manifest.csv", missing_ok=True)
    assert isinstance(empty, pd.DataFrame) and empty.empty and list(empty.columns) == COLUMNS


def test_missing_column_names_the_file_and_the_column(tmp_path):
    path = write(tmp_path, "path,sha256,label\na.png,ab12,normal\n")
    with pytest.raises(StageError, match=r"manifest\.csv: missing column\(s\) \['patient', 'split', 'error'\]"):
        read_manifest(path)
    # The audit tools read older manifests: only the listing the content hash covers is required.
    assert read_manifest_rows(path, LISTING_COLUMNS) == [{"path": "a.png", "sha256": "ab12", "label": "normal"}]


def test_a_row_with_the_wrong_number_of_fields_names_its_line(tmp_path):
    path = write(tmp_path, f"{HEADER}\n{ROW}\nnormal/b.png,cd34\n")
    with pytest.raises(StageError, match=rf"manifest\.csv: line 3 has 2 fields; expected {len(COLUMNS)}"):
        read_manifest(path)


def test_binary_garbage_is_a_clear_error(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(StageError, match=r"manifest\.csv: not a readable manifest CSV"):
        read_manifest_rows(path)
