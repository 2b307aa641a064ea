"""Summing the class out: the part shared by every model with a classifier q(y|x) (M2,
ADGM/SDGM, M1+M2). Where a label is missing the class is a latent variable with the uniform
prior p(y) = Cat(1/K), summed out exactly over all K classes in one batched pass:

    U(x) = sum_y q(y|x) L(x,y) + H(q(y|x))              (Kingma et al. 2014, eq. 7)
    w    = sum_y p(y) p(x, z_y | y) / q(z_y | x, y)     (an importance weight of p(x))
"""

from __future__ import annotations

import math

import torch

from vaelab.elbo import unlabeled_bound
from vaelab.models.base import LatentModel, Terms


class ClassSummed(LatentModel):
    """A model with a classifier whose unlabeled bound and importance weights sum y out.
    Subclasses give the per-class terms (``bound``) and per-class log weights
    (``class_log_weights``); the sums are written here once."""

    has_classifier = True

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.rows_per_sample = num_classes  # importance weights decode every class
        self.log_py = -math.log(num_classes)  # p(y) = Cat(uniform)

    def every_class(self, batch_shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The classes y = 0..K-1 along the first of ``batch_shape`` (K, ...), broadcast over the rest."""
        return torch.arange(self.num_classes, device=device).view(-1, *[1] * (len(batch_shape) - 1)).expand(batch_shape)

    def sum_classes(self, per_class: dict[str, torch.Tensor], qy_logits: torch.Tensor) -> Terms:
        """U(x) from the labeled-bound terms of every class (each (K, ...)) and q(y|x)'s logits
        (..., K): every term as its expectation under q(y|x), with ``entropy`` = H(q(y|x))."""
        return Terms.from_dict(unlabeled_bound(per_class, qy_logits), self.bound_name)

    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, k: int, dreg: bool = False) -> torch.Tensor:
        """(k, B) log importance weights of p(x) with y summed out exactly: log sum_y p(y) w_y
        over ``class_log_weights`` (k, K, B). ``y`` (labels) is not used; the doubly
        reparameterized gradient is not defined for class-summed weights."""
        if dreg:
            raise ValueError(f"{type(self).__name__}'s importance weights sum over the classes: the DReG estimator is not defined for them.")
        return torch.logsumexp(self.class_log_weights(x, k) + self.log_py, dim=1)

    def class_log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x, z_iy | y) - log q(z_iy | x, y) for k draws per class, shape (k, K, B)."""
        raise NotImplementedError(f"{type(self).__name__} gives its class-summed weights itself.")
