"""Image grids of prior samples and test reconstructions, written as PNG and sent to every
logger that takes images."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import save_image

from vaelab.viz import image_grid, reconstruction_grid


class ImageLogger(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, draw ``n_samples`` images from the prior and
    reconstruct the first ``n_reconstructions`` test images; save ``<out_dir>/<name>_epochNNN.png``
    and log them as ``images/<name>``. Uses only the model interface (``sample``, ``reconstruct``)."""

    def __init__(
        self, out_dir: str, every_n_epochs: int = 1, n_samples: int = 64, n_reconstructions: int = 32
    ) -> None:
        if every_n_epochs <= 0:
            raise ValueError(f"every_n_epochs must be positive, got {every_n_epochs}.")
        self.out_dir = Path(out_dir)
        self.every_n_epochs = every_n_epochs
        self.n_samples, self.n_reconstructions = n_samples, n_reconstructions

    def grids(self, trainer: pl.Trainer, model: pl.LightningModule) -> dict[str, torch.Tensor]:
        x, _ = trainer.datamodule.example_batch(self.n_reconstructions, split="test")
        x = x.to(model.device)
        nrow = max(1, int(self.n_samples**0.5))
        return {
            "samples": image_grid(model.sample(self.n_samples), nrow=nrow),
            "reconstructions": reconstruction_grid(x, model.reconstruct(x)),
        }

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, grid in self.grids(trainer, pl_module).items():
            save_image(grid, self.out_dir / f"{name}_epoch{trainer.current_epoch:03d}.png")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"images/{name}", images=[grid], step=trainer.global_step)
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"images/{name}", grid, trainer.global_step)
