"""Variational autoencoder (Kingma & Welling 2014), conditional on a class when ``num_classes``
is given (the CVAE):

    z ~ p(z) = N(0, I),   x ~ p(x | z [, y])              (generative model; with
                     ``autoregressive``, p(x|z[,y]) = prod_i p(x_i | x_<i, z[, y]))
    q(z | x [, y]) = N(mu(x [, y]), diag sigma^2(x [, y]))  (inference network; or that Gaussian
                     pushed through a normalizing flow, ``posterior=planar|iaf``)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from vaelab.distributions import AutoregressiveBernoulli, Likelihood
from vaelab.elbo import elbo_terms, log_importance_weight
from vaelab.models.base import LatentModel, Terms
from vaelab.nets import MADE, Decoder, Encoder, at_least_single, net_options
from vaelab.posteriors import Posterior, posterior_point


class VAE(LatentModel):
    """``net`` and ``likelihood`` as in ``vaelab.nets.net_options`` and
    ``vaelab.distributions.Likelihood``. With ``num_classes`` every distribution takes the
    class y (one-hot, entering the networks' first dense layer) and ``sample(n, y=9)`` draws
    nines; without, ``y`` arguments are ignored. ``autoregressive``: hidden layer sizes of a
    masked network (``vaelab.nets.MADE``) that makes the Bernoulli likelihood autoregressive,
    its logits the decoder's plus the masked network's on the pixels before each (z entering its
    first hidden layer); None (the default) keeps the pixels independent given z."""

    def __init__(
        self,
        input_shape: Sequence[int],
        z_dim: int = 50,
        num_classes: int | None = None,
        net: Mapping | None = None,
        likelihood: str | Mapping | None = None,
        posterior: str | Mapping | None = None,
        autoregressive: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(z_dim, int) or z_dim <= 0:
            raise ValueError(f"model.z_dim must be a positive integer, got {z_dim}.")
        self.input_shape, self.z_dim, self.num_classes = tuple(input_shape), z_dim, num_classes
        self.likelihood = Likelihood.from_spec(likelihood)
        channels, *size = self.input_shape
        decoder_shape = (self.likelihood.params_per_channel * channels, *size)
        self.posterior = Posterior.from_spec(posterior, z_dim)
        self.encoder = Encoder(net, self.input_shape, self.posterior.num_params, num_classes)
        self.decoder = Decoder(net, z_dim, decoder_shape, num_classes)
        self.made = None
        if autoregressive is not None:
            if not self.likelihood.binary:
                raise ValueError(
                    f"model.autoregressive needs binary pixels (likelihood=bernoulli), not the {self.likelihood}; "
                    "drop model.autoregressive or choose likelihood=bernoulli."
                )
            self.made = MADE(math.prod(self.input_shape), list(autoregressive), z_dim, net_options(net)["activation"])

    @property
    def likelihood_description(self) -> str:
        if self.made is None:
            return repr(self.likelihood)
        return f"{self.likelihood}, autoregressive over the pixels (masked hidden layers {[layer.out_features for layer in self.made.layers]})"

    def _class(self, y: int | torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """The class input: None for an unconditional model; else ``y``, which it needs."""
        if self.num_classes is None:
            return None
        if y is None:
            raise ValueError("This conditional VAE needs the class y of every example.")
        return torch.as_tensor(y, device=like.device)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """q(z|x[,y]): a diagonal Gaussian, or a flow (``posterior``, ``vaelab.posteriors``)."""
        return self.posterior(self.encoder(x, self._class(y, x)))

    def encode_all_classes(self, x: torch.Tensor):
        """q(z|x,y) for every class at once: batch shape (K, B), row k with y = k."""
        return self.posterior(self.encoder.all_classes(x))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None):
        """p(x|z[,y]); z (..., z_dim) and y (...) share their leading dimensions."""
        out = self.decoder(z, self._class(y, z))
        if self.made is None:
            return self.likelihood(out)
        return AutoregressiveBernoulli(out, lambda x: at_least_single(self.made(x.flatten(-3), z)).unflatten(-1, out.shape[-3:]))

    @property
    def supports_dreg(self) -> bool:
        """DReG stops q(z|x)'s parameters in its density, which the Gaussian posterior has."""
        return self.posterior.is_gaussian

    def bound(self, x: torch.Tensor, y: torch.Tensor | None = None, qy_logits: torch.Tensor | None = None) -> Terms:
        """ELBO  L(x[,y]) = E_q(z|x[,y])[log p(x|z[,y])] - KL(q(z|x[,y]) || p(z)), one sample of z
        (``qy_logits`` is not used: the class, where there is one, is given)."""
        qz = self.encode(x, y)
        z = qz.rsample()
        return Terms.from_dict(elbo_terms(x, self.decode(z, y), qz, z), self.bound_name)

    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, k: int, dreg: bool = False) -> torch.Tensor:
        """log p(x, z_i [| y]) - log q(z_i | x [, y]) for k draws z_i ~ q(z|x[,y]), shape (k, B);
        for the CVAE the importance-weighted bound bounds log p(x|y), the class given. ``dreg``:
        for the doubly reparameterized gradient (``vaelab.elbo.log_importance_weight``)."""
        qz = self.encode(x, y)
        z = qz.rsample((k,))
        classes = None if self.num_classes is None else self._class(y, x).expand(k, -1)
        return log_importance_weight(x, self.decode(z, classes), qz, z, dreg=dreg)

    @torch.no_grad()
    def sample(self, n: int, y: int | torch.Tensor | None = None) -> torch.Tensor:
        """Mean images of p(x|z[,y]) for n draws z ~ p(z); ``y`` is one class or n classes."""
        z = torch.randn(n, self.z_dim, device=self.device)
        classes = None if self.num_classes is None else self._class(y, z).expand(n)
        return self.decode(z, classes).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x|z[,y]) at the posterior mean z = E[q(z|x[,y])] (a flow: its base mean, mapped)."""
        return self.decode(posterior_point(self.encode(x, y)), y).mean
