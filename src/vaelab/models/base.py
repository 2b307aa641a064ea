"""The interface every probabilistic model implements, and the terms its bound returns.

A model is a plain ``nn.Module`` that reads like its generative story: no Lightning, no data
module, no files. ``vaelab.lit.LitModel`` trains any of them with an objective
(``vaelab.objectives``); callbacks, ``vaelab.report`` and evaluate.py use nothing but this
interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributions import Distribution

from vaelab.distributions import Likelihood


@dataclass
class Terms:
    """Per-example terms of a bound, each of shape (batch,), in nats (summed over pixels and
    latent dimensions).

    ``elbo`` is the bound itself, logged under ``name`` (the model's ``bound_name``); ``recon``
    is E_q[log p(x|.)]; ``kl`` the KL of the model's z to its prior and nothing else; ``extras``
    holds every other term, latent ones included (M2: ``entropy`` of q(y|x); ADGM: ``kl_a``).
    """

    elbo: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = "elbo"

    @classmethod
    def from_dict(cls, terms: dict[str, torch.Tensor], name: str = "elbo") -> Terms:
        """``elbo``, ``recon`` and ``kl`` from ``terms``, every other entry as an extra."""
        terms = dict(terms)
        return cls(terms.pop("elbo"), terms.pop("recon"), terms.pop("kl"), extras=terms, name=name)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Every term by its metric name."""
        return {self.name: self.elbo, "recon": self.recon, "kl": self.kl, **self.extras}


class LatentModel(nn.Module, ABC):
    """A latent-variable model of images x (and classes y when ``num_classes`` is set).

    - ``encode(x, y=None)`` -> q(z|x[,y]) and ``decode(z, y=None)`` -> p(x|z[,y]), distributions;
    - ``bound(x, y=None, qy_logits=None)`` -> ``Terms``: the bound that training maximises, per
      example; ``qy_logits`` is q(y|x) when the caller has computed it (models that sum y out
      may use it, the others ignore it);
    - ``log_weights(x, y, k, dreg=False)`` -> (k, B) reparameterized log importance weights
      log p(x, z_i) - log q(z_i|x) (``vaelab.elbo.iwae_bound`` turns them into L_k; ``dreg``
      prepares them for the doubly reparameterized gradient where ``supports_dreg``);
    - ``sample(n, y=None)`` and ``reconstruct(x, y=None)`` -> mean images;
    - ``classify(x)`` -> logits of q(y|x), for models with a classifier (``has_classifier``);
    - ``likelihood``: p(x|.)'s family, which says whether it models binary pixels
      (``likelihood.binary``) or real values (``likelihood.continuous``).
    """

    input_shape: tuple[int, ...]
    z_dim: int
    likelihood: Likelihood
    num_classes: int | None = None  # None: the model does not condition on a class
    has_classifier = False
    # decoder rows per importance sample and image (a model that sums y out decodes every class)
    rows_per_sample = 1

    @property
    def bound_name(self) -> str:
        """The one name of the model's bound in metrics: ``elbo`` bounds log p(x) (for models
        with a classifier too: y is summed out); ``elbo_given_y`` bounds log p(x|y), for a
        conditional model fed the true class."""
        return "elbo_given_y" if self.num_classes is not None and not self.has_classifier else "elbo"

    @property
    def supports_dreg(self) -> bool:
        """Whether ``log_weights(..., dreg=True)`` is defined (a Gaussian q(z|x), weights not summed over classes)."""
        return False

    @abstractmethod
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Distribution: ...

    @abstractmethod
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> Distribution: ...

    @abstractmethod
    def bound(self, x: torch.Tensor, y: torch.Tensor | None = None, qy_logits: torch.Tensor | None = None) -> Terms: ...

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
