"""matplotlib figures written as byte-reproducible PNG artefacts.

    fig, ax = figure(4.5, 4.5)
    ax.plot(...)
    save_png(fig, Path("reports/roc.png"))

DVC caches the PNGs a stage writes, so the same figure must give the same bytes on every run:
matplotlib's headless backend (no display on a server or in CI), no version string in the PNG
metadata, a fixed resolution, and an atomic write so a killed run leaves no half-written file.
matplotlib is imported only when a figure is made: importing this module costs nothing.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from components.common import atomic_path

# matplotlib writes its version as the PNG "Software" text chunk; None leaves it out, so a
# matplotlib upgrade that draws the same pixels writes the same bytes.
PNG_METADATA = {"Software": None}
DPI = 100


def figure(width: float, height: float) -> tuple[Any, Any]:
    """(figure, axes) of `width` x `height` inches on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def png_bytes(fig: Any) -> bytes:
    """`fig` as PNG bytes, the same bytes for the same figure; then close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)
    return buf.getvalue()


def save_png(fig: Any, path: Path) -> None:
    """Write `fig` to `path` atomically, the same bytes for the same figure; then close it."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(fig))
