"""Which batches the retrain inbox holds, without reading any of them.

One listing for the retrain flow (through `components.retrain.inbox`) and for `medtune retrain --once`, which
asks it before Prefect, the workspace lock, git or DVC: an empty inbox is answered in a fraction of a
second (`orchestrate.cmd_retrain`). Hence no imports beyond the standard library here.
"""

from __future__ import annotations

from pathlib import Path


def find_batches(inbox_dir: str | Path) -> list[Path]:
    """Ready batches in the inbox, oldest name first; ignores "."/"_"-prefixed folders and files.

    A batch being copied in sits under a dot-name until it is renamed (`inbox.add_to_inbox`), so it
    is never picked up half-written.
    """
    inbox = Path(inbox_dir)
    if not inbox.is_dir():
        return []
    return sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
