"""LightningModules, one per model, sharing the interface of ``LatentVariableModel``."""

from vaelab.models.base import LatentVariableModel
from vaelab.models.vae import VAE

__all__ = ["LatentVariableModel", "VAE"]
