"""Variational autoencoder (Kingma & Welling 2014)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vaelab.distributions import diag_gaussian
from vaelab.elbo import elbo_terms, log_importance_weight
from vaelab.models.base import LatentVariableModel
from vaelab.nets import Decoder, Encoder


class VAE(LatentVariableModel):
    """q(z|x) = N(mu(x), diag sigma^2(x)), p(z) = N(0, I), p(x|z) the chosen likelihood
    (``net`` and ``likelihood`` as in ``vaelab.nets.net_options`` and ``vaelab.distributions.Likelihood``)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        z_dim: int = 50,
        net: Mapping | None = None,
        likelihood: str | Mapping | None = None,
        optimizer=None,
        compile: bool = False,
    ) -> None:
        super().__init__(input_shape, z_dim, likelihood, optimizer, compile)
        self.save_hyperparameters(ignore=["optimizer"])
        self.encoder = Encoder(net, self.input_shape, 2 * z_dim)
        self.decoder = Decoder(net, z_dim, self.decoder_shape)

    def encode(self, x: torch.Tensor):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return diag_gaussian(mu, logvar)

    def decode(self, z: torch.Tensor):
        """p(x|z) for z of shape (..., z_dim)."""
        return self.likelihood(self.decoder(z))

    def elbo(self, batch) -> dict[str, torch.Tensor]:
        x, _ = batch
        qz = self.encode(x)
        return elbo_terms(x, self.decode(qz.rsample()), qz)

    def log_weights(self, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x, z_i) - log q(z_i|x) for k draws z_i ~ q(z|x), shape (k, B); ``y`` is not used."""
        qz = self.encode(x)
        z = qz.sample((k,))
        return log_importance_weight(x, self.decode(z), qz, z)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Mean images of p(x|z) for n draws z ~ p(z)."""
        return self.decode(torch.randn(n, self.z_dim, device=self.device)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x|z) at the posterior mean z = E[q(z|x)] (``y`` is not used)."""
        return self.decode(self.encode(x).mean).mean
