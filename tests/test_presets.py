"""Named presets: every one is valid params, prints as dvc exp run flags, applies keeping comments."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from components.params import load_params, parse_params
from components.presets import apply, flatten, load_presets, main, preset, set_flags

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_is_valid_and_only_sets_existing_keys():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    known = set(flatten(base))
    assert load_presets()
    for name, entry in load_presets().items():
        assert entry["description"], name
        assert set(flatten(entry["params"])) <= known, name
        merged = yaml.safe_load((ROOT / "params.yaml").read_text())
        for key, value in flatten(entry["params"]).items():
            *parents, leaf = key.split(".")
            node = merged
            for part in parents:
                node = node[part]
            node[leaf] = value
        parse_params(merged)


def test_flags_and_apply(tmp_path, capsys):
    assert set_flags({"train": {"lr": 0.01, "backbone": "resnet18"}, "augment": {"scale": [0.9, 1.0]}}) == [
        "-S",
        "train.lr=0.01",
        "-S",
        'train.backbone="resnet18"',
        "-S",
        "augment.scale=[0.9, 1.0]",
    ]
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    name = next(iter(load_presets()))
    assert main([name, "--params", str(params)]) == 0
    assert capsys.readouterr().out.split() == set_flags(preset(name))
    assert main([name, "--apply", "--params", str(params)]) == 0
    text = params.read_text()
    assert "# medtune parameters" in text and "patient_pattern: null" in text  # comments and nulls kept
    applied = load_params(params).to_dict()
    for key, value in flatten(preset(name)).items():
        section, *rest = key.split(".")
        node = applied[section]
        for part in rest:
            node = node[part]
        assert node == value, key


def test_unknown_preset_and_invalid_values_are_clear(tmp_path, capsys):
    assert main(["no-such", "--params", str(ROOT / "params.yaml")]) == 1
    assert "preset 'no-such' is unknown; expected one of" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_bytes()
    with pytest.raises(ValueError, match=r"train.lr = -1.0 is invalid"):
        apply(params, {"train": {"lr": -1}})
    assert params.read_bytes() == before  # nothing written


def test_params_read_as_dvc_writes_them_yes_and_no_stay_class_names(tmp_path):
    # `dvc exp run -S` rewrites params.yaml without quotes; YAML 1.1 would read yes/no as booleans.
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  classes:\n  - no\n  - yes\nevaluate:\n  positive_class: yes\n  threshold: 5e-1\n")
    p = load_params(params)
    assert p.data.classes == ["no", "yes"] and p.evaluate.positive_class == "yes" and p.evaluate.threshold == 0.5
    with pytest.raises(ValueError, match=r"data.classes = \[True, 'b'\] is invalid; expected non-empty strings"):
        parse_params({"data": {"classes": [True, "b"]}})


def test_listing_names_every_preset_with_its_description(capsys):
    assert main([]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    presets = load_presets()
    assert header.split() == ["preset", "what", "it", "is", "for"]
    assert [line.split()[0] for line in lines] == list(presets)
    assert all(line.endswith(entry["description"]) for line, entry in zip(lines, presets.values()))
    assert len({line.index(entry["description"]) for line, entry in zip(lines, presets.values())}) == 1  # one column
