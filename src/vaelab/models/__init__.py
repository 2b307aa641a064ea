"""LightningModules, one per model, sharing the interface of ``LatentVariableModel``."""

from vaelab.models.base import LatentVariableModel
from vaelab.models.cvae import CVAE
from vaelab.models.ssvae import SSVAE
from vaelab.models.vae import VAE

__all__ = ["CVAE", "LatentVariableModel", "SSVAE", "VAE"]
