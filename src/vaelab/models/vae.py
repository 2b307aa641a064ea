"""Variational autoencoder (Kingma & Welling 2014) with MLP encoder and decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vaelab.elbo import bernoulli_image, diag_gaussian, elbo_terms
from vaelab.models.base import LatentVariableModel
from vaelab.nets import MLP


class VAE(LatentVariableModel):
    """q(z|x) = N(mu(x), diag sigma^2(x)), p(z) = N(0, I), p(x|z) = Bernoulli(decoder(z))."""

    def __init__(
        self,
        input_shape: Sequence[int],
        z_dim: int = 50,
        hidden: Sequence[int] = (512, 512),
        activation: str = "relu",
        optimizer=None,
    ) -> None:
        super().__init__(input_shape, z_dim, optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        pixels = math.prod(self.input_shape)
        self.encoder = MLP(pixels, hidden, 2 * z_dim, activation)
        self.decoder = MLP(z_dim, list(reversed(hidden)), pixels, activation)

    def encode(self, x: torch.Tensor):
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=-1)
        return diag_gaussian(mu, logvar)

    def decode(self, z: torch.Tensor):
        return bernoulli_image(self.decoder(z).view(-1, *self.input_shape))

    def elbo(self, batch) -> dict[str, torch.Tensor]:
        x, _ = batch
        qz = self.encode(x)
        return elbo_terms(x, self.decode(qz.rsample()), qz)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Mean images of p(x|z) for n draws z ~ p(z)."""
        return self.decode(torch.randn(n, self.z_dim, device=self.device)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x|z) at the posterior mean z = E[q(z|x)] (``y`` is not used)."""
        return self.decode(self.encode(x).mean).mean
