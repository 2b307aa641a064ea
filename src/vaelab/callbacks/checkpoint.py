"""The checkpoint to resume from: written every epoch and when training is interrupted, never
with weights known to be bad."""

from __future__ import annotations

import errno
import logging
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, rewritten after every epoch and on an exception, SIGTERM or
    Ctrl-C, except when the state is known to be bad: a validation metric that is not finite, a
    run stopped by a non-finite loss or gradient (the weights at that step gave it), or weights
    that are not finite. Then the previous one stays, as it does when a full disk stopped the run."""

    def __init__(self, dirpath: str, **kwargs) -> None:
        super().__init__(
            dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
            enable_version_counter=False, save_on_exception=True, **kwargs,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.bad_validation(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bad = self.bad_validation(trainer)
        if bad and not trainer.sanity_checking:
            log.warning("%s is not finite: %s keeps the last good state.", bad, self.dirpath)
            return
        super().on_validation_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0:
            return  # nothing trained yet (e.g. a configuration error in setup)
        if isinstance(exception, FloatingPointError):
            log.warning("Training diverged: %s keeps the last good state.", self.dirpath)
        elif isinstance(exception, OSError) and exception.errno == errno.ENOSPC:
            log.warning("The disk is full: %s keeps the last state written.", self.dirpath)
        elif not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            log.warning("Weights are not finite: %s keeps the last good state.", self.dirpath)
        else:
            super().on_exception(trainer, pl_module, exception)

    @staticmethod
    def bad_validation(trainer: pl.Trainer) -> str | None:
        """The first validation metric of this epoch that is not finite, if any."""
        return next((name for name, value in trainer.callback_metrics.items()
                     if name.startswith("val/") and not math.isfinite(float(value))), None)
