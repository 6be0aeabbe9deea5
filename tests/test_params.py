"""The params loader: defaults, the project's params.yaml, and loud errors for bad values."""

import json
import pickle
import re
import subprocess
import sys
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
    f.write_text(
        yaml.safe_dump({"train": {"epochs": 2}, "retrain": {"promotion_margin": 0.05, "schedule_cron": "0 * * * *"}})
    )
    p = load_params(f)
    assert p.retrain.promotion_margin == 0.05 and p.retrain.schedule_cron == "0 * * * *" and p.train.epochs == 2
    for raw, fragment in [
        ({"retrain": {"compare_metric": "loss"}}, "retrain.compare_metric = 'loss'"),
        ({"retrain": {"margin": 0.1}}, "unknown key(s) retrain.margin"),
        ({"retrain": {"lock_timeout": -1}}, "retrain.lock_timeout = -1"),
        ({"retrain": {"tag_prefix": "a b"}}, "retrain.tag_prefix"),
    ]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            parse_params(raw)


def test_digest_ignores_the_retrain_and_compute_sections():
    base = parse_params({})
    other = parse_params(
        {
            "retrain": {"promotion_margin": 0.2, "schedule_interval": 60},
            "compute": {"workers": 1, "dask_scheduler": "tcp://127.0.0.1:8786"},
        }
    )
    assert other.digest() == base.digest()
    # The hash of the model-relevant sections only: a lineage's recorded params dict, with or without
    # the `retrain` and `compute` keys, recomputes to the params_sha256 export wrote.
    d = other.to_dict()
    assert "retrain" in d and "compute" in d and params_digest(d) == other.digest()
    d.pop("retrain")
    d.pop("compute")
    assert params_digest(d) == base.digest()


def test_params_digest_is_a_known_answer():
    # Lineages record this digest and `medtune verify` recomputes it from the recorded params, so its
    # form cannot drift: the sha256 of the sections as compact JSON, keys sorted at every level,
    # retrain and compute left out. The answer is coreutils', not a second copy of params_digest:
    #   printf '%s' '{"data":{"classes":["a","b"]},"train":{"epochs":3,"lr":0.01}}' | sha256sum
    known = "e109e887c6064d40eb305fc65a7ee76e393900b74f05e3e6e1477c374db0d0a5"
    shuffled = {
        "train": {"lr": 0.01, "epochs": 3},
        "retrain": {"promotion_margin": 0.2},
        "data": {"classes": ["a", "b"]},
        "compute": {"workers": 1},
    }
    assert params_digest(shuffled) == known
    assert params_digest({**shuffled, "train": {"lr": 0.01, "epochs": 4}}) != known


def test_params_yaml_is_the_defaults_spelt_out():
    # One source per default: params.yaml names every key of every section with the value a project
    # without it gets (parse_params fills missing keys from components/params.py). The committed file:
    # experiments (`dvc exp run -S ...`) change the working copy on purpose.
    from ruamel.yaml import YAML

    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    text = committed.stdout if committed.returncode == 0 else (ROOT / "params.yaml").read_text()
    shipped = YAML(typ="safe", pure=True).load(text)

    def keys(d: dict, prefix: str = "") -> set[str]:
        # tune.space is one value (a mapping of ranges, each spelt with only the keys it needs).
        nested = {k: v for k, v in d.items() if isinstance(v, dict) and f"{prefix}{k}" != "tune.space"}
        return {prefix + k for k in d if k not in nested} | {
            k2 for k, v in nested.items() for k2 in keys(v, f"{prefix}{k}.")
        }

    assert keys(shipped) == keys(parse_params({}).to_dict())
    assert parse_params(shipped) == parse_params({})


def test_gate_defaults_are_the_ones_params_yaml_ships():
    # One gate, not two: a project without evaluate.gate in its params.yaml (or a test using
    # parse_params) must be held to the same floors as the pipeline's own params.yaml.
    from components.params import GateParams

    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["gate"]
    assert shipped == GateParams().to_dict()  # every key spelt out, every value equal
    assert load_params(ROOT / "params.yaml").evaluate.gate == parse_params({}).evaluate.gate


def test_every_wrong_key_is_named_in_one_error(tmp_path):
    # One run of a typo'd params.yaml names every problem, each on its own line with the file.
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  lr: 0\n  optimizer: adam\n  epoch: 3\npreprocess:\n  window: [40]\n")
    with pytest.raises(ValueError) as err:
        load_params(f)
    lines = str(err.value).splitlines()
    assert all(line.startswith(f"{f}: params: ") for line in lines)
    assert [line.split(": params: ", 1)[1] for line in lines] == [
        "unknown key(s) train.epoch; expected some of " + str(sorted(Params().train.to_dict())) + ".",
        "preprocess.window = [40] is invalid; expected 'header', 'minmax' or [center, width>0].",
        "train.optimizer = 'adam' is invalid; expected 'adamw' or 'sgd'.",
        "train.lr = 0.0 is invalid; expected a number > 0.",
    ]  # unknown keys first, then in the order of params.yaml


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"augment": {"hflip": 1.5}}, "augment.hflip = 1.5 is invalid; expected a number in [0, 1]."),
        ({"train": {"ensemble": 0}}, "train.ensemble = 0 is invalid; expected an integer in [1, 20]."),
        ({"augment": {"preview_count": 0}}, "augment.preview_count = 0 is invalid; expected an integer >= 1."),
        (
            {"train": {"warmup_epochs": 8}},
            "train.warmup_epochs = 8.0 is invalid; expected epochs in [0, train.epochs = 8).",
        ),
        ({"train": {"epochs": 2.5}}, "train.epochs = 2.5 is invalid; expected an integer."),
        ({"train": {"amp": 1}}, "train.amp = 1 is invalid; expected true or false."),
        ({"augment": {"scale": [1.0, "x"]}}, "augment.scale = [1.0, 'x'] is invalid; expected a number."),
        ({"data": {"classes": ["a", 1]}}, "data.classes = ['a', 1] is invalid; expected non-empty strings"),
        ({"data": {"classes": ["a", "a"]}}, "data.classes = ['a', 'a'] is invalid; expected unique names."),
        ({"data": {"patient_pattern": "(?P<id>x)"}}, "no group named 'patient'"),
        (
            {"split": {"test_fraction": 0.1, "test_fold": 10}},
            "split.test_fold = 10 is invalid; expected a fold index in 0..9",
        ),
        ({"validate": {"min_size": 64, "max_size": 32}}, "validate.min_size/max_size = (64, 32) is invalid"),
        (
            {"data": {"classes": ["a", "b", "c"]}, "evaluate": {"calibration": "platt"}},
            "evaluate.calibration = 'platt' is invalid; expected 'temperature' or 'none' for 3 classes",
        ),
        ({"evaluate": {"gate": {"min_f1": 0.5}}}, "unknown key(s) evaluate.gate.min_f1"),
        ({"compute": {"dask_scheduler": "host:8786"}}, "compute.dask_scheduler = 'host:8786' is invalid"),
        ({"train": []}, "train = [] is invalid; expected a mapping."),
        ([1, 2], "top level = [1, 2] is invalid; expected a mapping."),
    ],
)
def test_messages_name_key_value_and_expected(raw, message):
    with pytest.raises(ValueError) as err:
        parse_params(raw)
    assert str(err.value).startswith("params: ") and message in str(err.value)


def test_empty_section_means_its_defaults_and_numbers_are_canonical():
    # `train:` with nothing under it is YAML null; a float written as an integer is that float, so
    # the digest does not depend on how a number was spelt.
    assert parse_params({"train": None, "evaluate": {"gate": None}}) == parse_params({})
    assert parse_params(None) == parse_params({})
    as_int = parse_params({"train": {"warmup_epochs": 1}, "preprocess": {"window": [40, 400]}})
    as_float = parse_params({"train": {"warmup_epochs": 1.0}, "preprocess": {"window": [40.0, 400.0]}})
    assert as_int.to_dict() == as_float.to_dict() and as_int.digest() == as_float.digest()
    assert json.dumps(as_int.to_dict()["preprocess"]["window"]) == "[40.0, 400.0]"


def test_params_are_frozen_and_check_revalidates_copies():
    p = parse_params({})
    with pytest.raises(ValueError):
        p.train.lr = 0.5  # frozen: a stage cannot change what the next one reads
    assert p.validate.max_unreadable == 0  # the `validate` section, not pydantic's classmethod
    bad = p.model_copy(update={"train": p.train.model_copy(update={"lr": 0.0})})  # copies skip validation
    with pytest.raises(ValueError, match=re.escape("train.lr = 0.0 is invalid; expected a number > 0.")):
        bad.check()
    assert p.check() is p


def test_to_dict_round_trips_through_yaml():
    p = parse_params(
        {
            "data": {"classes": ["no", "yes"], "patient_pattern": "^(?P<patient>[^_]+)_"},
            "preprocess": {"window": [40, 400]},
            "train": {"init_from": "a" * 64},
        }
    )
    assert p.data.patient_regex().match("p1_x.png")["patient"] == "p1"
    assert parse_params(yaml.safe_load(yaml.safe_dump(p.to_dict()))) == p
    assert p.train.to_dict() == p.to_dict()["train"]
    assert pickle.loads(pickle.dumps(p)) == p  # what a process pool or a Dask worker receives


def test_import_warns_nothing():
    # Params' `validate` section shadows pydantic's deprecated BaseModel.validate; that warning is
    # expected and silenced, and nothing else may warn when a stage imports the module.
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import components.params"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
