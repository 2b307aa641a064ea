"""Pictures: pure functions from tensors to images (grids and plots, as (3, H, W) floats in
[0, 1]); ``vaelab.report`` draws them for a model. Plots use matplotlib's ``Figure`` directly (no
pyplot state, no display backend)."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.distributions import Normal
from torchvision.utils import make_grid


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Tile a batch (N, C, H, W) with values in [0, 1] into one (3, H', W') image, ``nrow``
    images per row, separated by white lines."""
    return make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, pairs_per_row: int = 8) -> torch.Tensor:
    """Originals and their reconstructions side by side: each row holds ``pairs_per_row``
    (original, reconstruction) pairs."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"Shapes differ: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}.")
    pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
    return image_grid(pairs, nrow=2 * pairs_per_row)


def table_grid(images: torch.Tensor) -> torch.Tensor:
    """Lay out a (rows, cols, C, H, W) table of images as one grid, row by row."""
    return image_grid(images.flatten(0, 1), nrow=images.shape[1])


def analogy_grid(originals: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Analogies: row i shows ``originals[i]`` (N, C, H, W) then ``table[i]`` (N, K, C, H, W),
    the image's style decoded with each of the K classes."""
    return table_grid(torch.cat([originals.unsqueeze(1), table], dim=1))


def normal_quantile_grid(n: int) -> torch.Tensor:
    """(n * n, 2) points z of N(0, I) on an n x n grid of quantiles (1/(2n) ... 1 - 1/(2n)), row by
    row from high z_2 to low and left to right in z_1, for the 2-D latent manifold."""
    q = Normal(0.0, 1.0).icdf((torch.arange(n) + 0.5) / n)
    z2, z1 = torch.meshgrid(q.flip(0), q, indexing="ij")
    return torch.stack([z1, z2], dim=-1).reshape(-1, 2)


def project_2d(z: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Latent codes (N, d) as (N, 2): themselves when d <= 2 (padded with zeros for d = 1),
    else the first two principal components; with the axis description."""
    z = z.detach().float().cpu()
    if z.shape[1] <= 2:
        return torch.nn.functional.pad(z, (0, 2 - z.shape[1])), f"{z.shape[1]}-d z"
    centred = z - z.mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    explained = (s[:2] ** 2).sum() / (s**2).sum()
    return centred @ v[:2].T, f"{z.shape[1]}-d z, first 2 principal components ({explained:.0%} of variance)"


def _render(figure: Figure) -> torch.Tensor:
    """A matplotlib figure as a (3, H, W) image in [0, 1]."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    pixels = np.asarray(Image.open(buffer).convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)


def latent_scatter(z: torch.Tensor, labels: torch.Tensor, num_classes: int, size: float = 6.0) -> torch.Tensor:
    """Scatter of latent codes (N, d) coloured by class, with a legend; codes with d > 2 are
    projected on their first two principal components."""
    points, axes_label = project_2d(z)
    labels = labels.cpu()
    figure = Figure(figsize=(size, size))
    ax = figure.subplots()
    colours = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    for c in range(num_classes):
        chosen = points[labels == c]
        ax.scatter(chosen[:, 0], chosen[:, 1], s=4, alpha=0.6, color=colours(c % colours.N), label=str(c))
    ax.set_title(f"test encodings E[q(z|x)]: {axes_label}", fontsize="medium")
    ax.set_xlabel("axis 1")
    ax.set_ylabel("axis 2")
    ax.legend(title="class", markerscale=3, loc="best", fontsize="small")
    figure.tight_layout()
    return _render(figure)


def confusion_plot(matrix: torch.Tensor, size: float = 5.0) -> torch.Tensor:
    """A confusion matrix (true class x predicted class, counts) as a heat map with its counts."""
    matrix = matrix.detach().cpu()
    k = matrix.shape[0]
    figure = Figure(figsize=(size, size))
    ax = figure.subplots()
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            share = matrix[i, j] / max(1, int(matrix[i].sum()))
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize="x-small",
                    color="white" if share > 0.5 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted class (argmax q(y|x))")
    ax.set_ylabel("true class")
    figure.tight_layout()
    return _render(figure)
