"""Conditional VAE: every distribution conditioned on a one-hot class c."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vaelab.distributions import diag_gaussian
from vaelab.elbo import elbo_terms, log_importance_weight
from vaelab.models.base import LatentVariableModel
from vaelab.nets import Decoder, Encoder


class CVAE(LatentVariableModel):
    """q(z|x,c) = N(mu(x,c), diag sigma^2(x,c)), p(z|c) = N(0, I), p(x|z,c) the chosen likelihood;
    ``sample(n, y)`` generates images of class y ("generate a 9")."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        z_dim: int = 50,
        net: Mapping | None = None,
        likelihood: str | Mapping | None = None,
        optimizer=None,
        compile: bool = False,
    ) -> None:
        super().__init__(input_shape, z_dim, likelihood, optimizer, compile)
        self.save_hyperparameters(ignore=["optimizer"])
        self.num_classes = num_classes
        self.encoder = Encoder(net, self.input_shape, 2 * z_dim, num_classes)
        self.decoder = Decoder(net, z_dim, self.decoder_shape, num_classes)

    def encode(self, x: torch.Tensor, y: torch.Tensor):
        mu, logvar = self.encoder(x, y).chunk(2, dim=-1)
        return diag_gaussian(mu, logvar)

    def decode(self, z: torch.Tensor, y: torch.Tensor):
        """p(x|z,y); z (..., z_dim) and y (...) share their leading dimensions."""
        return self.likelihood(self.decoder(z, y))

    def elbo(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        qz = self.encode(x, y)
        return elbo_terms(x, self.decode(qz.rsample(), y), qz)

    def log_weights(self, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x, z_i | y) - log q(z_i | x, y) for k draws z_i ~ q(z|x,y), shape (k, B): the
        importance-weighted bound of this model bounds log p(x|y), the class given."""
        qz = self.encode(x, y)
        z = qz.sample((k,))
        return log_importance_weight(x, self.decode(z, y.expand(k, -1)), qz, z)

    @torch.no_grad()
    def sample(self, n: int, y: int | torch.Tensor) -> torch.Tensor:
        """Mean images of p(x|z,y) for n draws z ~ p(z); ``y`` is one class or n classes."""
        y = torch.as_tensor(y, device=self.device).expand(n)
        return self.decode(torch.randn(n, self.z_dim, device=self.device), y).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z,y) at the posterior mean z = E[q(z|x,y)]."""
        return self.decode(self.encode(x, y).mean, y).mean
