"""Pure picture functions: tensors in, image grids out (used by callbacks and evaluate.py)."""

from __future__ import annotations

import torch
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
