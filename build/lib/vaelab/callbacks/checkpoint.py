"""The checkpoint to resume from: written every epoch and when training is interrupted."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, rewritten after every epoch and on an exception, SIGTERM or
    Ctrl-C, except when the weights are no longer finite: then the previous one stays."""

    def __init__(self, dirpath: str, **kwargs) -> None:
        super().__init__(
            dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
            enable_version_counter=False, save_on_exception=True, **kwargs,
        )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0:
            return  # nothing trained yet (e.g. a configuration error in setup)
        if all(torch.isfinite(p).all() for p in pl_module.parameters()):
            super().on_exception(trainer, pl_module, exception)
        else:
            log.warning("Weights are not finite: %s keeps the last good state.", self.dirpath)
