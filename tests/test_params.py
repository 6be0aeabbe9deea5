"""The params loader: defaults, the project's params.yaml, and loud errors for bad values."""

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from components.params import Params, RetrainParams, load_params, params_digest, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_yaml_loads():
    p = load_params(ROOT / "params.yaml")
    assert p.data.classes == ["normal", "lesion"]
    assert p.positive_index == 1
    assert p.retrain == RetrainParams()  # params.yaml spells out the defaults


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
        ({"preprocess": {"equalize": "yes"}}, "preprocess.equalize"),
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


def test_retrain_section_defaults_and_errors(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    assert load_params(f).retrain == RetrainParams()
    f.write_text(yaml.safe_dump({"train": {"epochs": 2},
                                 "retrain": {"promotion_margin": 0.05, "schedule_cron": "0 * * * *"}}))
    p = load_params(f)
    assert p.retrain.promotion_margin == 0.05 and p.retrain.schedule_cron == "0 * * * *" and p.train.epochs == 2
    for raw, fragment in [({"retrain": {"compare_metric": "loss"}}, "retrain.compare_metric = 'loss'"),
                          ({"retrain": {"margin": 0.1}}, "unknown key(s) retrain.margin"),
                          ({"retrain": {"lock_timeout": -1}}, "retrain.lock_timeout = -1"),
                          ({"retrain": {"tag_prefix": "a b"}}, "retrain.tag_prefix")]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            parse_params(raw)


def test_digest_ignores_the_retrain_and_compute_sections():
    base = parse_params({})
    other = parse_params({"retrain": {"promotion_margin": 0.2, "schedule_interval": 60},
                          "compute": {"workers": 1, "dask_scheduler": "tcp://127.0.0.1:8786"}})
    assert other.digest() == base.digest()
    # The hash of the model-relevant sections only: a lineage's recorded params dict, with or without
    # the `retrain` and `compute` keys, recomputes to the params_sha256 export wrote.
    d = other.to_dict()
    assert "retrain" in d and "compute" in d and params_digest(d) == other.digest()
    d.pop("retrain")
    d.pop("compute")
    blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    assert params_digest(d) == hashlib.sha256(blob).hexdigest() == base.digest()


def test_params_yaml_is_the_defaults_spelt_out():
    # One source per default: params.yaml names every key of every section with the value a project
    # without it gets (parse_params fills missing keys from components/params.py). The committed file:
    # experiments (`dvc exp run -S ...`) change the working copy on purpose.
    from ruamel.yaml import YAML

    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    text = committed.stdout if committed.returncode == 0 else (ROOT / "params.yaml").read_text()
    shipped = YAML(typ="safe", pure=True).load(text)

    def keys(d: dict, prefix: str = "") -> set[str]:
        return {k2 for k, v in d.items() for k2 in (keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k})}

    assert keys(shipped) == keys(parse_params({}).to_dict())
    assert parse_params(shipped) == parse_params({})


def test_gate_defaults_are_the_ones_params_yaml_ships():
    # One gate, not two: a project without evaluate.gate in its params.yaml (or a test using
    # parse_params) must be held to the same floors as the pipeline's own params.yaml.
    from dataclasses import asdict

    from components.params import GateParams

    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["gate"]
    assert shipped == asdict(GateParams())  # every key spelt out, every value equal
    assert load_params(ROOT / "params.yaml").evaluate.gate == parse_params({}).evaluate.gate
