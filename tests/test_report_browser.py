"""A `medtune report` file opened in a real headless browser: the distribution's chromium (`.ci/run`
installs it), driven by Playwright (never Playwright's own downloaded browsers). Every request the page
makes is recorded, and aborted unless it is the file itself or a data: URI; every image must decode.

The second test is the check on the check: the same page with an image and a stylesheet from elsewhere
inserted must show those requests and a broken image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components.audit.report import write_report
from tests.builders import add_report_evidence, tiny_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium on PATH: this test drives the distribution's chromium (`.ci/run` installs it: "
        "apt-get install chromium)",
    ),
]
LOCAL = ("file://", "data:")


@pytest.fixture(scope="module")
def report_file(onnx_model, module_tmp) -> Path:
    """The report of the tiny exported model, with every kind of evidence."""
    project = module_tmp / "project"
    shutil.copytree(onnx_model.parents[1], project)
    add_report_evidence(project, tiny_params())
    done = write_report(project / "models", project.parent / "report.html", project)
    assert done["missing"] == [], done["missing"]
    return Path(done["path"])


def samples(report_file: Path) -> int:
    return len(list((report_file.parent / "project/reports/explanations").rglob("*.png")))


def open_in_chromium(path: Path) -> tuple[list[str], list[dict]]:
    """(every URL the page requested, {src prefix, complete, naturalWidth, naturalHeight} per <img>)."""
    from playwright.sync_api import sync_playwright

    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.route(
                "**/*", lambda route: route.continue_() if route.request.url.startswith(LOCAL) else route.abort()
            )
            page.goto(path.resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.src.slice(0, 40), complete: i.complete, "
                "width: i.naturalWidth, height: i.naturalHeight}))"
            )
        finally:
            browser.close()
    return requested, images


def test_every_image_renders_and_no_request_leaves_the_machine(report_file):
    requested, images = open_in_chromium(report_file)
    assert requested and requested[0] == report_file.resolve().as_uri()
    assert [u for u in requested if not u.startswith(LOCAL)] == []
    # ROC, confusion, training curves, augmentation preview, every explanation sample.
    assert len(images) == 4 + samples(report_file) >= 6, images
    for img in images:
        assert img["src"].startswith("data:image/png;base64,") and img["complete"], img
        assert img["width"] > 0 and img["height"] > 0, img


def test_the_check_sees_a_request_to_elsewhere_and_a_broken_image(report_file, tmp_path):
    tampered = tmp_path / "tampered.html"
    tampered.write_text(
        report_file.read_text(encoding="utf-8").replace(
            "<body>",
            '<body><img src="http://127.0.0.1:9/x.png"><link rel="stylesheet" href="https://example.org/a.css">',
            1,
        ),
        encoding="utf-8",
    )
    requested, images = open_in_chromium(tampered)
    assert {"http://127.0.0.1:9/x.png", "https://example.org/a.css"} <= set(requested), requested
    assert images[0]["width"] == 0 and all(i["width"] > 0 for i in images[1:]), images
