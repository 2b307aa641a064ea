"""Wall-clock time beside the metrics, for curves of accuracy or bounds against minutes."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class ElapsedTime(pl.Callback):
    """Log ``time/minutes``, the wall-clock minutes since training started (validation included,
    the sanity check not), at the end of every validation epoch."""

    def __init__(self) -> None:
        self.start: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.start is None:
            return
        pl_module.log("time/minutes", (time.perf_counter() - self.start) / 60, on_epoch=True)
