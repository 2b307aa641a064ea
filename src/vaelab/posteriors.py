"""Approximate posteriors q(z|x): the encoder's outputs turned into a distribution over z.

- ``gaussian``: N(mu, diag sigma^2), its KL to p(z) in closed form;
- ``planar``: the Gaussian pushed through ``length`` planar maps z + u tanh(w^T z + b)
  (Rezende & Mohamed 2015), u, w, b given by the encoder for each image;
- ``iaf``: the Gaussian pushed through ``length`` inverse autoregressive maps (Kingma et al.
  2016), affine in each z_i given z_<i, made by masked networks (zuko's MADE) that also read a
  ``context`` vector from the encoder; the variable order is reversed between maps.

Flows give log q(z|x) by the change of variables, log q(z) = log N(z_0) - sum_l log |det dz_l/dz_(l-1)|,
for the samples they drew (their transforms remember the last input); the KL then becomes
the Monte-Carlo estimate log q(z|x) - log p(z) (``vaelab.elbo.kl_term``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.distributions import Distribution, TransformedDistribution

from vaelab.distributions import PlanarTransform, diag_gaussian

POSTERIORS = ("gaussian", "planar", "iaf")


class Posterior(nn.Module):
    """Builds q(z|x) from ``num_params`` encoder outputs per image (``forward``)."""

    def __init__(self, z_dim: int, type: str = "gaussian", length: int = 0, hidden: Sequence[int] = (), context: int = 0) -> None:
        super().__init__()
        if type not in POSTERIORS:
            raise ValueError(f"posterior type {type!r} is not one of {', '.join(POSTERIORS)} (posterior=...).")
        if type != "gaussian" and not (isinstance(length, int) and length >= 1):
            raise ValueError(f"model.posterior.length must be a positive integer for a {type} flow, got {length}.")
        self.type, self.z_dim, self.length = type, z_dim, length
        self.num_params = 2 * z_dim
        if type == "planar":
            self.num_params += length * (2 * z_dim + 1)  # u, w, b of each map
        elif type == "iaf":
            if not (isinstance(context, int) and context >= 1):
                raise ValueError(f"model.posterior.context must be a positive integer for iaf, got {context}.")
            from zuko.flows.autoregressive import MaskedAutoregressiveTransform

            self.num_params += context
            order = torch.arange(z_dim)
            self.maps = nn.ModuleList(
                MaskedAutoregressiveTransform(
                    features=z_dim, context=context, hidden_features=tuple(hidden), order=order if i % 2 == 0 else order.flip(0)
                )
                for i in range(length)
            )

    @classmethod
    def from_spec(cls, spec: str | Mapping | None, z_dim: int) -> Posterior:
        """``spec``: a type name, or a mapping with ``type`` and the flow's options."""
        if spec is None or isinstance(spec, str):
            return cls(z_dim, spec or "gaussian")
        return cls(z_dim, **dict(spec))

    @property
    def is_gaussian(self) -> bool:
        return self.type == "gaussian"

    def forward(self, params: torch.Tensor) -> Distribution:
        """q(z|x) from the encoder's outputs ``params`` (..., num_params)."""
        d = self.z_dim
        base = diag_gaussian(params[..., :d], params[..., d : 2 * d])
        if self.type == "gaussian":
            return base
        rest = params[..., 2 * d :]
        if self.type == "planar":
            maps = [PlanarTransform(*torch.split(chunk, [d, d, 1], dim=-1)) for chunk in rest.chunk(self.length, dim=-1)]
        else:
            maps = [remembering(lazy(rest)) for lazy in self.maps]
        return TransformedDistribution(base, maps, validate_args=False)


def remembering(transform):
    """The same autoregressive map, remembering its last input, so that log q of a drawn z needs
    no inversion (which would take one pass per dimension)."""
    from zuko.transforms import AutoregressiveTransform

    return AutoregressiveTransform(transform.meta, transform.passes, cache_size=1)


def posterior_point(qz: Distribution) -> torch.Tensor:
    """A representative z of q(z|x): the mean of a Gaussian; for a flow, its base mean pushed
    through the maps."""
    if not isinstance(qz, TransformedDistribution):
        return qz.mean
    z = qz.base_dist.mean
    for transform in qz.transforms:
        z = transform(z)
    return z
