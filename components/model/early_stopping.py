"""Which epoch of a model's training is kept: the best `train.early_stopping_metric` so far (the first
epoch always, so a checkpoint exists); training stops after `train.patience` epochs without improvement."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger("medtune.train")
MINIMISED = ("val_loss", "val_mae")  # the others (val_auroc, val_accuracy) are maximised


def _improved(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True  # the first epoch is always kept, so a checkpoint exists
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if metric in MINIMISED else value > best


@dataclass
class EarlyStopping:
    """Which epoch is kept so far (the best `metric`), its weights, and how many epochs since it improved."""

    metric: str
    patience: int
    value: float | None = None
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None
    stale: int = 0

    @property
    def best_value(self) -> float | None:
        """The kept epoch's value; None for nan (an undefined AUROC)."""
        return None if isinstance(self.value, float) and math.isnan(self.value) else self.value

    def stop_after(self, row: dict[str, Any], selected: nn.Module) -> bool:
        """Keep this epoch's weights if `metric` improved; True when `patience` epochs in a row have not."""
        if _improved(row[self.metric], self.value, self.metric):
            self.value, self.epoch, self.stale = row[self.metric], row["epoch"], 0
            # In-memory copy on the CPU: later epochs must not overwrite the kept weights.
            # contiguous(): the checkpoint stays in the usual NCHW layout whatever trained it.
            self.state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in selected.state_dict().items()}
            return False
        self.stale += 1
        if self.stale >= self.patience:
            log.info(
                "early stopping after epoch %d: no %s improvement for %d epoch(s)",
                row["epoch"],
                self.metric,
                self.stale,
            )
            return True
        return False
