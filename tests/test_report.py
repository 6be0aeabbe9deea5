"""`medtune report`: one model's audit report as a self-contained HTML file.

The project is real: git and DVC, a random-weight model through the real evaluate and export stages (so
the lineage names the commit it was exported at), the augmentation preview from the augment stage, DVCLive
curves written by train's writer, two explanation PNGs. The release is what a promotion leaves: the
evidence in DVC (`dvc add`), the uncached validation report in git, the registry folder, a release line,
current.json and a tag. Then the report is read back from the workspace, and from the tag once the
workspace holds other outputs, or none.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from components import cli
from components.audit import report
from components.audit.trace_text import TITLES
from components.release.registry import record_release, set_current, store_model
from tests.builders import add_report_evidence, make_project, run_export, tiny_params
from tests.workspace import run

pytestmark = pytest.mark.slow

DATA_VERSION = "f00dfeed" * 4 + ".dir"
EVIDENCE = [
    "reports/roc.png",
    "reports/confusion.png",
    "reports/augment_preview.png",
    "dvclive",
    "reports/explanations",
]
SOURCES = {"validation", "roc", "confusion", "augment_preview", "training_curves", "explanations"}


@pytest.fixture(scope="module")
def project(module_tmp):
    """A model exported at a commit, its evidence in the workspace, then released: tag model-<id>."""
    ws = module_tmp / "ws"
    ws.mkdir()
    params = tiny_params()
    run(["git", "init", "-q"], ws)
    run(["dvc", "init", "-q"], ws)
    p = make_project(ws, params)
    manifest = json.loads(p["manifest"].read_text())
    p["manifest"].write_text(json.dumps({**manifest, "data_version": DATA_VERSION}))
    add_report_evidence(ws, params)
    (ws / ".gitignore").write_text("/models/\n/data/\n/reports/\n/dvclive/\n")
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "the code and records a model is exported at"], ws)
    head = run(["git", "rev-parse", "HEAD"], ws).stdout.strip()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)  # export records the commit of its working directory
        run_export(p, params)
    lineage = json.loads((ws / "models/lineage.json").read_text())
    mid, tag = lineage["model_id"], f"model-{lineage['model_id']}"
    assert lineage["code"]["git_commit"] == head and lineage["data"]["data_version"] == DATA_VERSION
    # The release: evidence cached by DVC, validation.json (an uncached output) in git, the registry.
    (ws / ".gitignore").write_text("/models/\n/data/\n")
    run(["dvc", "add", "-q", *EVIDENCE], ws)
    store_model(ws, mid)
    record_release(ws, {"event": "promoted", "model_id": mid, "trigger": "manual", "git_tag": tag})
    set_current(ws, mid, tag)
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", f"promote {mid}"], ws)
    run(["git", "tag", "-a", tag, "-m", "release"], ws)
    originals = {rel: (ws / rel).read_bytes() for rel in ("reports/roc.png", "reports/augment_preview.png")}
    samples = len(list((ws / "reports/explanations").rglob("*.png")))
    return {"ws": ws, "mid": mid, "tag": tag, "head": head, "originals": originals, "samples": samples}


@pytest.fixture
def copy(project, tmp_path):
    """A throw-away copy of the project (git and the DVC cache included) to change."""
    dst = tmp_path / "ws"
    shutil.copytree(project["ws"], dst, symlinks=True)
    for f in dst.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # DVC makes cache files read-only
    return dst


class Page(HTMLParser):
    """Every tag, every attribute that can point at a resource, every CSS url() and @import."""

    RESOURCE_ATTRS = {"src", "href", "srcset", "poster", "data", "action", "formaction", "background", "xlink:href"}

    def __init__(self, html: str):
        super().__init__()
        self.tags, self.refs, self.attrs, self.css, self.text = [], [], [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            self.attrs.append((tag, name, value or ""))
            if name in self.RESOURCE_ATTRS:
                self.refs.append((tag, name, value or ""))
            if name == "style":
                self.css.append(value or "")

    def handle_data(self, data):
        (self.css if self.lasttag == "style" else self.text).append(data)


def check_self_contained(html: str) -> Page:
    page = Page(html)
    assert not {"script", "link", "iframe", "object", "embed", "base", "frame", "audio", "video"} & set(page.tags)
    for tag, name, value in page.refs:
        assert value.startswith("data:") or (value.startswith("#") and name == "href"), (tag, name, value[:80])
    for tag, name, value in page.attrs:
        if name != "content":  # the CSP meta names no URL either; checked below
            assert not re.match(r"\s*(https?:)?//", value), (tag, name, value[:80])
        assert "http://" not in value and "https://" not in value, (tag, name, value[:80])
    css = "\n".join(page.css)
    assert "@import" not in css and "@font-face" not in css
    assert all(u.strip("'\" ").startswith("data:") for u in re.findall(r"url\(([^)]*)\)", css))
    csp = next(v for t, n, v in page.attrs if t == "meta" and n == "content" and "default-src" in v)
    assert "default-src 'none'" in csp and "img-src data:" in csp
    return page


def png_images(page: Page) -> list:
    from PIL import Image

    images = []
    for tag, _name, value in page.refs:
        if tag == "img":
            head, _, b64 = value.partition(",")
            assert head == "data:image/png;base64", head
            blob = base64.b64decode(b64, validate=True)
            with Image.open(io.BytesIO(blob)) as im:
                im.load()
                assert im.format == "PNG" and im.width > 0 and im.height > 0
            images.append(blob)
    return images


def test_the_workspace_models_report_is_self_contained_and_names_its_data_and_commit(project, tmp_path):
    ws, mid = project["ws"], project["mid"]
    out = tmp_path / "report.html"
    done = report.write_report(ws / "models/model.onnx", out, ws)
    html = out.read_text(encoding="utf-8")
    page = check_self_contained(html)
    text = " ".join(page.text)
    assert DATA_VERSION in text and project["head"] in text and mid in text
    for title in TITLES.values():
        assert title in text, title
    assert done["missing"] == [] and set(done["evidence"]) == SOURCES
    assert set(done["evidence"].values()) == {"workspace"}
    images = png_images(page)
    # ROC, confusion, training curves, augmentation preview and every explanation sample.
    assert len(images) == 4 + project["samples"] >= 6
    assert project["originals"]["reports/roc.png"] in images
    assert project["originals"]["reports/augment_preview.png"] in images
    # The metrics with their intervals, the validation summary, the rendered card.
    lineage = json.loads((ws / "models/lineage.json").read_text())
    low, high = lineage["evaluation"]["metrics"]["auroc_ci"]
    assert f"{low:.3f} - {high:.3f}" in html and "Wilson, " in html
    assert "near_duplicates_in_one_split" in text and "size_range" in text
    assert "<h1>Model card: medtune classifier <code>" in html and "<th>split</th>" in html
    assert "true_positive_1" in text
    probe = lineage["evaluation"]["metrics"]["linear_probe"]  # evaluate.linear_probe is on by default
    assert f"fine-tuned minus probe: <strong>{probe['auroc_gain']:+.3f}</strong>" in html
    assert done["bytes"] == out.stat().st_size


def test_a_released_models_evidence_comes_from_its_tag_when_the_workspace_moved_on(project, copy):
    """Evaluated again since (reports/evaluation.json differs), no dvclive/: the workspace is not this
    model's evidence; git and the DVC cache at the release tag are."""
    mid, tag = project["mid"], project["tag"]
    record = copy / "reports/evaluation.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "auroc": 0.123}))
    shutil.rmtree(copy / "dvclive")
    for rel in ("reports/roc.png", "reports/augment_preview.png"):
        (copy / rel).write_bytes(b"not this model's plot")
    html, done = report.report(mid, copy)
    assert set(done["evidence"].values()) == {f"release tag {tag}"} and done["missing"] == []
    assert any("reports/evaluation.json is another evaluation" in n for n in done["notes"]), done["notes"]
    images = png_images(check_self_contained(html))
    assert len(images) == 4 + project["samples"]
    assert project["originals"]["reports/roc.png"] in images
    assert project["originals"]["reports/augment_preview.png"] in images


def test_evidence_that_cannot_be_found_is_named_with_why(project, copy, capsys):
    """No workspace outputs and an empty DVC cache (no remote): git still holds validation.json at the tag;
    every other item says it is not available and why, in the report and on the terminal."""
    mid, tag = project["mid"], project["tag"]
    for rel in ("models", "reports", "dvclive", ".dvc/cache"):
        shutil.rmtree(copy / rel)
    out = copy.parent / "r.html"
    assert cli.main(["report", mid[:6], "-o", str(out), "--root", str(copy)]) == 0
    printed = capsys.readouterr().out
    assert f"model {mid}" in printed and DATA_VERSION in printed and project["head"] in printed
    html = out.read_text(encoding="utf-8")
    page = check_self_contained(html)
    assert png_images(page) == []
    for title in ("ROC curve", "confusion matrix", "augmentation preview", "training curves", "explanation samples"):
        line = next(x for x in printed.splitlines() if x.startswith(f"  not available: {title}: "))
        assert "no exported model in the workspace" in line and f"at release tag {tag}" in line, line
        assert f"{title} not available: " in html
    # validation.json, an output DVC does not cache, is in git at the tag.
    assert "validation report" not in printed and "near_duplicates_in_one_split" in html
    assert f"From <code>reports/validation.json</code> (release tag {tag})." in html


def test_the_card_and_every_value_are_escaped_and_link_nowhere(project, copy):
    card = copy / "models/model_card.md"
    card.write_text(
        card.read_text()
        + "\n<script>alert(1)</script>\n\n![scan](https://example.org/x.png) [docs](http://example.org/d)"
        + " <https://example.org/a>\n\n[ref]: https://example.org/r\n"
    )
    lineage_path = copy / "models/lineage.json"
    lineage = json.loads(lineage_path.read_text())
    lineage["environment"]["device"] = '<img src="https://example.org/t.png"> cpu'
    lineage_path.write_text(json.dumps(lineage))
    html, _ = report.report(copy / "models", copy)
    page = check_self_contained(html)
    text = " ".join(page.text)
    assert "<script>alert(1)</script>" in text and '<img src="https://example.org/t.png"> cpu' in text
    assert "&lt;script&gt;" in html and "https://example.org/x.png" in text  # shown as text, never loaded
    assert len(png_images(page)) == 4 + project["samples"]


def test_a_broken_evidence_file_is_named_not_embedded(project, copy):
    (copy / "reports/confusion.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (copy / "dvclive/plots/metrics/val/loss.tsv").write_text("timestamp\tstep\tloss\n1\t1\t0.5\n2\ttwo\t0.4\n")
    html, done = report.report(copy / "models", copy)
    missing = dict(done["missing"])
    assert missing["confusion matrix"].startswith("reports/confusion.png: not a readable image")
    assert "val/loss.tsv line 3: ['2', 'two', '0.4']; expected a numeric step and value" in missing["training curves"]
    assert done["evidence"]["confusion"] is None
    assert len(png_images(check_self_contained(html))) == 2 + project["samples"]


def test_metric_rows_give_each_interval_and_how_it_was_made():
    metrics = {
        "classes": ["normal", "lesion"],
        "positive_class": "lesion",
        "confusion_matrix": [[8, 2], [1, 9]],
        "auroc": 0.9,
        "auroc_ci": [0.8, 0.97],
        "bootstrap_valid": 998,
        "sensitivity": 0.9,
        "specificity": 0.8,
        "precision": 9 / 11,
        "accuracy": 0.85,
        "f1": 0.857,
        "n_test": 20,
        "gain_auroc": 0.05,
        "gain_auroc_ci": [-0.02, 0.11],
    }
    rows = {r["name"]: r for r in report.metric_rows(metrics)}
    assert list(rows)[:5] == ["auroc", "sensitivity", "specificity", "precision", "accuracy"]
    assert rows["auroc"]["how"] == "bootstrap, 998 valid resamples" and rows["auroc"]["low"] == 0.8
    assert rows["sensitivity"]["how"] == "Wilson, 9/10" and 0.55 < rows["sensitivity"]["low"] < 0.6
    assert rows["gain_auroc"]["how"] == "bootstrap" and rows["gain_auroc"]["high"] == 0.11
    assert rows["f1"]["low"] is None and "n_test" not in rows and "bootstrap_valid" not in rows


def test_probe_comparison_pairs_both_models_metrics_and_gives_the_gain():
    metrics = {
        "classes": ["normal", "lesion"],
        "positive_class": "lesion",
        "confusion_matrix": [[8, 2], [1, 9]],
        "auroc": 0.9,
        "auroc_ci": [0.8, 0.97],
        "sensitivity": 0.9,
        "specificity": 0.8,
        "precision": 9 / 11,
        "accuracy": 0.85,
        "linear_probe": {
            "start": {"description": "ImageNet resnet18 weights"},
            "confusion_matrix": [[6, 4], [3, 7]],
            "auroc": 0.7,
            "auroc_ci": [0.5, 0.85],
            "sensitivity": 0.7,
            "specificity": 0.6,
            "precision": 7 / 11,
            "accuracy": 0.65,
            "auroc_gain": 0.2,
            "auroc_gain_ci": [0.05, 0.33],
            "auroc_gain_bootstrap_valid": 40,
        },
    }
    cmp = report.probe_comparison(metrics)
    assert [(a["name"], a["value"], b["value"]) for a, b in cmp["rows"]] == [
        ("auroc", 0.9, 0.7),
        ("sensitivity", 0.9, 0.7),
        ("specificity", 0.8, 0.6),
        ("precision", 9 / 11, 7 / 11),
        ("accuracy", 0.85, 0.65),
    ]
    assert cmp["rows"][1][1]["how"] == "Wilson, 7/10" and cmp["rows"][0][1]["low"] == 0.5
    assert (cmp["gain"], cmp["gain_ci"], cmp["valid"]) == (0.2, [0.05, 0.33], 40)
    assert cmp["start"] == "ImageNet resnet18 weights"
    assert report.probe_comparison({"auroc": 0.9}) is None


def test_sample_captions_say_what_each_explanation_shows():
    index = {
        "images": [
            {
                "file": "fn-4bd8.png",
                "group": "fn",
                "label": "lesion",
                "predicted": "normal",
                "probability": 0.31,
                "path": "lesion/test_2.png",
            },
            {"file": "odd.png", "group": "other"},
        ]
    }
    captions = report.sample_captions(json.dumps(index).encode())
    assert captions["fn-4bd8.png"] == "false negative: true lesion, predicted normal (p = 0.31); lesion/test_2.png"
    assert captions["odd.png"].startswith("other: true None")
    assert (
        report.sample_captions(b"[1, 2]") == report.sample_captions(b"{not json") == report.sample_captions(None) == {}
    )


def test_png_uri_refuses_what_is_not_a_png():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="JPEG")
    with pytest.raises(ValueError, match="a JPEG image, expected PNG"):
        report.png_uri(buf.getvalue())
    with pytest.raises(ValueError, match="not a readable image"):
        report.png_uri(b"<svg/>")


def test_an_unknown_model_is_one_error_line(project, tmp_path, capsys):
    assert cli.main(["report", "abcdef", "-o", str(tmp_path / "x.html"), "--root", str(project["ws"])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model 'abcdef' not found") and not (tmp_path / "x.html").exists()
