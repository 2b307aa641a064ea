"""Image grids of prior samples and test reconstructions, written as PNG and sent to every
logger that takes images."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import save_image

from vaelab.viz import image_grid, reconstruction_grid, table_grid


class ImageLogger(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, write image grids as
    ``<out_dir>/<name>_epochNNN.png`` and log them as ``images/<name>`` to every logger that
    takes images. Uses only the model interface (``sample``, ``decode``, ``reconstruct``):

    - ``reconstructions``: the first ``n_reconstructions`` test images beside their reconstructions;
    - ``samples`` (unconditional models): ``n_samples`` draws from the prior;
    - ``classes`` (models with ``num_classes``): one row per class, one column per z ~ p(z);
    - ``styles`` (same models): one row per z ("handwriting style"), one column per class.
    """

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

    @torch.no_grad()
    def grids(self, trainer: pl.Trainer, model: pl.LightningModule) -> dict[str, torch.Tensor]:
        x, y = trainer.datamodule.example_batch(self.n_reconstructions, split="test")
        x, y = x.to(model.device), y.to(model.device)
        grids = {"reconstructions": reconstruction_grid(x, model.reconstruct(x, y))}
        classes = getattr(model, "num_classes", None)
        if classes is None:
            grids["samples"] = image_grid(model.sample(self.n_samples), nrow=max(1, int(self.n_samples**0.5)))
            return grids
        z = torch.randn(self.n_styles, model.z_dim, device=model.device).repeat(classes, 1)
        labels = torch.arange(classes, device=model.device).repeat_interleave(self.n_styles)
        table = model.decode(z, labels).mean.view(classes, self.n_styles, *x.shape[1:])
        grids["classes"] = table_grid(table)
        grids["styles"] = table_grid(table.transpose(0, 1))
        return grids

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
