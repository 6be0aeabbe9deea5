"""Check the CSV that `medtune predict` wrote in an image: every scan scored, none unreadable; with a
second CSV (the same model and scans scored on the host), the same paths and classes, and the
probabilities equal within TOLERANCE.

    python3 docker/compare-predictions.py image.csv [host.csv]

Exits 1 naming the first difference. Standard library only: it runs on the host, with any Python 3.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter

TOLERANCE = 1e-5  # the same ONNX Runtime release on the same CPU: its CPU and GPU builds share the kernels


def read(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{path}: no rows; expected one row per scan")
    bad = [r for r in rows if r.get("error")]
    if bad:
        sys.exit(f"{path}: {len(bad)} of {len(rows)} scans unreadable, first {bad[0]['path']}: {bad[0]['error']}")
    return rows


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    image = read(argv[0])
    print(f"predictions in the image: {len(image)} scans, {dict(Counter(r['predicted'] for r in image))}")
    if len(argv) == 1:
        return 0
    host = read(argv[1])
    if [r["path"] for r in image] != [r["path"] for r in host]:
        sys.exit(f"{argv[0]} and {argv[1]} list other scans ({len(image)} and {len(host)} rows)")
    columns = [c for c in image[0] if c.startswith("prob_")]
    worst = 0.0
    for a, b in zip(image, host, strict=True):
        if a["predicted"] != b["predicted"]:
            sys.exit(f"{a['path']}: predicted {a['predicted']} in the image, {b['predicted']} on the host")
        worst = max([worst] + [abs(float(a[c]) - float(b[c])) for c in columns])
    if worst > TOLERANCE:
        sys.exit(f"probabilities differ by up to {worst:.2e} between the image and the host; expected <= {TOLERANCE}")
    print(f"same as the host's predictions: {len(image)} scans, max |difference| {worst:.1e} over {columns}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
