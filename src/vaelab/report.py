"""A model's figures, drawn through the model interface (``vaelab.models.LatentModel``), and
written as PNG and to the loggers: used by the image callback each epoch and by evaluate.py."""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import save_image

from vaelab.models.base import LatentModel
from vaelab.posteriors import posterior_point
from vaelab.viz import analogy_grid, image_grid, normal_quantile_grid, reconstruction_grid, table_grid


@torch.no_grad()
def model_figures(
    model: LatentModel, x: torch.Tensor, y: torch.Tensor, n_samples: int = 64, n_styles: int = 8, manifold: int = 20,
) -> dict[str, torch.Tensor]:
    """The figures of a model for test images ``x`` with labels ``y`` (on the model's device):

    - ``reconstructions``: originals beside their reconstructions;
    - ``samples`` (unconditional models): draws from the prior;
    - ``classes`` (models with ``num_classes``): one row per class, one column per z ~ p(z);
    - ``styles``: one row per z, one column per class;
    - ``analogies``: the first ``n_styles`` test images, then their z decoded with every class;
    - ``manifold`` (unconditional models with z_dim = 2): decoded means over a grid of z quantiles.
    """
    figures = {"reconstructions": reconstruction_grid(x, model.reconstruct(x, y))}
    classes, device = model.num_classes, x.device
    if classes is None:
        figures["samples"] = image_grid(model.sample(n_samples), nrow=max(1, int(n_samples**0.5)))
        if model.z_dim == 2:
            means = model.decode(normal_quantile_grid(manifold).to(device)).mean
            figures["manifold"] = image_grid(means, nrow=manifold)
        return figures
    z = torch.randn(n_styles, model.z_dim, device=device).repeat(classes, 1)
    labels = torch.arange(classes, device=device).repeat_interleave(n_styles)
    table = model.decode(z, labels).mean.view(classes, n_styles, *x.shape[1:])
    figures["classes"] = table_grid(table)
    figures["styles"] = table_grid(table.transpose(0, 1))
    originals, known = x[:n_styles], y[:n_styles]
    style = posterior_point(model.encode(originals, known))  # z of each image, given its class
    every = torch.arange(classes, device=device)
    decoded = model.decode(style.unsqueeze(1).expand(-1, classes, -1), every.expand(len(style), -1)).mean
    figures["analogies"] = analogy_grid(originals, decoded)
    return figures


@torch.no_grad()
def latent_codes(model: LatentModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Posterior means E[q(z|x)] (E[q(z|x,y)] with the true class for conditional models; for a
    flow posterior its base mean mapped through the flow)."""
    return posterior_point(model.encode(x, y))


def save_figures(figures: dict[str, torch.Tensor], out_dir: Path, loggers, step: int, suffix: str = "") -> None:
    """Write each figure as ``<out_dir>/<name><suffix>.png`` and log it as ``images/<name>`` to
    the W&B and TensorBoard loggers among ``loggers``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, image in figures.items():
        save_image(image, out_dir / f"{name}{suffix}.png")
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"images/{name}", images=[image], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"images/{name}", image, step)
