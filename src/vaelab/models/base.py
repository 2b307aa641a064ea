"""The interface every probabilistic model implements, and the terms its bound returns.

A model is a plain ``nn.Module`` that reads like its generative story: no Lightning, no data
module. ``vaelab.lit.LitModel`` trains any of them; callbacks, ``vaelab.report`` and
evaluate.py use nothing but this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributions import Distribution


@dataclass
class Terms:
    """Per-example terms of a bound, each of shape (batch,), in nats (summed over pixels and
    latent dimensions).

    ``elbo`` is the bound itself: on log p(x), or on log p(x|y) when ``given_y`` (a
    conditional model fed the true class); ``recon`` is E_q[log p(x|.)], ``kl`` the KL of the
    posterior to the prior; ``extras`` holds model-specific terms (M2: ``entropy`` of q(y|x)).
    """

    elbo: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    given_y: bool = False

    @property
    def name(self) -> str:
        """The bound's metric name: ``elbo`` bounds log p(x), ``elbo_given_y`` log p(x|y)."""
        return "elbo_given_y" if self.given_y else "elbo"

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Every term by its metric name."""
        return {self.name: self.elbo, "recon": self.recon, "kl": self.kl, **self.extras}


class LatentModel(nn.Module, ABC):
    """A latent-variable model of images x (and classes y when ``num_classes`` is set).

    - ``encode(x, y=None)`` -> q(z|x[,y]) and ``decode(z, y=None)`` -> p(x|z[,y]), distributions;
    - ``bound(x, y=None)`` -> ``Terms``: the bound that training maximises, per example;
    - ``log_weights(x, y, k, dreg=False)`` -> (k, B) reparameterized log importance weights
      log p(x, z_i) - log q(z_i|x) (``vaelab.elbo.iwae_bound`` turns them into L_k; ``dreg``
      prepares them for the doubly reparameterized gradient, ``vaelab.elbo.dreg_surrogate``);
    - ``sample(n, y=None)`` and ``reconstruct(x, y=None)`` -> mean images;
    - ``classify(x)`` -> logits of q(y|x), for models with a classifier (``has_classifier``).
    """

    input_shape: tuple[int, ...]
    z_dim: int
    num_classes: int | None = None  # None: the model does not condition on a class
    has_classifier = False
    # decoder rows per importance sample and image (M2 decodes every class)
    rows_per_sample = 1

    @abstractmethod
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Distribution: ...

    @abstractmethod
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> Distribution: ...

    @abstractmethod
    def bound(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Terms: ...

    @abstractmethod
    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, k: int, dreg: bool = False) -> torch.Tensor: ...

    @abstractmethod
    def sample(self, n: int, y: int | torch.Tensor | None = None) -> torch.Tensor: ...

    @abstractmethod
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...

    @property
    def likelihood_description(self) -> str:
        """p(x|.) in words, for reports."""
        return repr(self.likelihood)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no classifier q(y|x).")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
