"""Probabilistic models as plain ``nn.Module``s sharing ``LatentModel``'s interface; one file each."""

from vaelab.models.adgm import ADGM, SDGM
from vaelab.models.base import LatentModel, Terms
from vaelab.models.m1m2 import M1M2
from vaelab.models.m2 import M2
from vaelab.models.vae import VAE

__all__ = ["ADGM", "LatentModel", "M1M2", "M2", "SDGM", "Terms", "VAE"]
