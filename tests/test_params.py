"""The params loader: defaults, the project's params.yaml, and loud errors for bad values."""

from pathlib import Path

import pytest
import yaml

from components.params import Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_yaml_loads():
    p = load_params(ROOT / "params.yaml")
    assert p.data.classes == ["normal", "lesion"]
    assert p.positive_index == 1


def test_defaults_are_valid_and_digest_is_stable():
    assert Params().check().digest() == parse_params({}).digest()
    assert parse_params({"train": {"epochs": 3}}).digest() != parse_params({}).digest()


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"train": {"optimizer": "adam"}}, "train.optimizer = 'adam'"),
        ({"train": {"epochs": 0}}, "train.epochs = 0"),
        ({"train": {"lr": "fast"}}, "train.lr = 'fast'"),
        ({"split": {"test_fraction": 0.7}}, "split.test_fraction = 0.7"),
        ({"data": {"classes": ["a"]}}, "data.classes"),
        ({"preprocess": {"window": [40]}}, "preprocess.window"),
        ({"evaluate": {"positive_class": "tumour"}}, "evaluate.positive_class = 'tumour'"),
        ({"trian": {}}, "unknown key(s) trian"),
        ({"train": {"epoch": 3}}, "unknown key(s) train.epoch"),
    ],
)
def test_bad_values_name_key_and_value(raw, fragment):
    with pytest.raises(ValueError) as err:
        parse_params(raw)
    assert fragment in str(err.value)


def test_yaml_scientific_notation_is_a_number(tmp_path):
    # PyYAML reads "1e-3" as a string; the loader must still take it as a float.
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr": "1e-3"}}))
    assert load_params(f).train.lr == pytest.approx(1e-3)


def test_error_names_the_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train: {batch_size: -1}\n")
    with pytest.raises(ValueError, match=str(f)):
        load_params(f)
