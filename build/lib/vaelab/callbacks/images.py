"""The model's figures each epoch, written as PNG and sent to every logger that takes images."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from vaelab.report import model_figures, save_figures


class ImageLogger(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, write the figures of ``vaelab.report.model_figures``
    (reconstructions of the first ``n_reconstructions`` test images; prior samples, or class,
    style and analogy grids for conditional models; the latent manifold when z_dim = 2) as
    ``<out_dir>/<name>_epochNNN.png`` and log them as ``images/<name>`` to every logger that
    takes images."""

    def __init__(
        self,
        out_dir: str,
        every_n_epochs: int = 1,
        n_samples: int = 64,
        n_reconstructions: int = 32,
        n_styles: int = 8,
    ) -> None:
        if every_n_epochs <= 0:
            raise ValueError(f"every_n_epochs must be positive, got {every_n_epochs}.")
        self.out_dir = Path(out_dir)
        self.every_n_epochs = every_n_epochs
        self.n_samples, self.n_reconstructions, self.n_styles = n_samples, n_reconstructions, n_styles

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        x, y = trainer.datamodule.example_batch(self.n_reconstructions, split="test")
        figures = model_figures(pl_module.model, x.to(pl_module.device), y.to(pl_module.device), self.n_samples, self.n_styles)
        save_figures(figures, self.out_dir, trainer.loggers, trainer.global_step, suffix=f"_epoch{trainer.current_epoch:03d}")

