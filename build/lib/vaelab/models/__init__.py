"""Probabilistic models as plain ``nn.Module``s sharing ``LatentModel``'s interface; one file each."""

from vaelab.models.base import LatentModel, Terms
from vaelab.models.m2 import M2
from vaelab.models.vae import VAE

__all__ = ["LatentModel", "M2", "Terms", "VAE"]
