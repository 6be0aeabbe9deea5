"""The page template that `dvc plots show` / `dvc plots diff` fill: `.dvc/plots/offline.html`.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so without the internet (hospital
networks often have none) it stays blank. The project's `.dvc/config` sets `plots.html_template` to
this page instead, which carries the three libraries inline: DVC puts the plots at `{plot_divs}`,
and, the page having no `{scripts}` placeholder, leaves out its CDN script tags. The page is
committed; this module only rebuilds it (for another version of the libraries):

    pip install --target /tmp/vegajs django-js-lib-vega-embed==6.29.0.3
    python -m components.offline_plots --js /tmp/vegajs/js_lib_vega_embed/static/js_lib_vega_embed

The PyPI package django-js-lib-vega-embed ships the libraries' original release files (vega 5,
vega-lite 5 and vega-embed 6: the majors DVC's page loads); it is only where the files come from,
never a dependency. The libraries are BSD-3-Clause (notice in the page). vega-embed's "Open in Vega
Editor" action, which would send a plot's data to a website, is switched off in the page.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

TEMPLATE = Path(".dvc/plots/offline.html")
SOURCE = "django-js-lib-vega-embed 6.29.0.3 (PyPI)"
# (library, file in the package, version that file must declare), in load order.
LIBRARIES = (
    ("vega", "vega5.js", "5.33.0"),
    ("vega-lite", "vega-lite5.js", "5.23.0"),
    ("vega-embed", "vega-embed6.js", "6.29.0"),
)
LICENSE = """Copyright (c) 2015, University of Washington Interactive Data Lab
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its contributors
  may be used to endorse or promote products derived from this software
  without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT OWNER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE."""
# Every vegaEmbed call (DVC writes one per plot) without the editor action.
NO_EDITOR = """(function () {
  var embed = window.vegaEmbed;
  window.vegaEmbed = function (el, spec, opt) {
    return embed(el, spec, Object.assign({actions: {export: true, source: true, compiled: true, editor: false}},
                                         opt || {}));
  };
})();"""
# DVC's placeholders: plot_divs and refresh_tag are filled; without {scripts} its CDN tags are dropped.
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")
EXTERNAL = re.compile(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def build(js_dir: Path) -> str:
    """The page, with the three libraries from `js_dir` inline; ValueError if a file is not the expected one."""
    scripts, notes = [], []
    for name, filename, version in LIBRARIES:
        code = (js_dir / filename).read_text(encoding="utf-8")
        if f'"{version}"' not in code:
            raise ValueError(f"{js_dir / filename} does not declare {name} version {version}.")
        if "</script" in code.lower() or any(p in code for p in PLACEHOLDERS):
            raise ValueError(f"{js_dir / filename} cannot be inlined: it holds '</script' or a DVC placeholder.")
        notes.append(f"{name} {version} ({filename}, sha256 {hashlib.sha256(code.encode()).hexdigest()})")
        scripts.append(f'<script type="text/javascript">\n{code}\n</script>')
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            "<!--",
            "Page template for `dvc plots show` / `dvc plots diff` that renders without a network:",
            "written by `python -m components.offline_plots` from " + SOURCE + ":",
            *(f"  {n}" for n in notes),
            "",
            "vega, vega-lite and vega-embed:",
            LICENSE,
            "-->",
            "<html>",
            "<head>",
            "    {refresh_tag}",
            '    <meta charset="utf-8">',
            "    <title>DVC Plot</title>",
            *scripts,
            f'<script type="text/javascript">\n{NO_EDITOR}\n</script>',
            "    <style>",
            "        table {",
            "            border-spacing: 15px;",
            "        }",
            "    </style>",
            "</head>",
            "<body>",
            "    {plot_divs}",
            "</body>",
            "</html>",
            "",
        ]
    )
    if EXTERNAL.search(page):
        raise ValueError(f"the page would load something from the network: {EXTERNAL.search(page).group(0)!r}")
    return page


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--js",
        type=Path,
        required=True,
        help="folder holding vega5.js, vega-lite5.js, vega-embed6.js (the static folder of django-js-lib-vega-embed)",
    )
    parser.add_argument("--out", type=Path, default=TEMPLATE, help=f"page to write (default: {TEMPLATE})")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(build(args.js), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
