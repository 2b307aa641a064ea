"""The M2 semi-supervised VAE of Kingma, Rezende, Mohamed & Welling (2014):

    y ~ p(y) = Cat(1/K),   z ~ p(z) = N(0, I),   x ~ p(x | y, z)       (generative model)
    q(y | x) a classifier,  q(z | x, y) = N(mu(x, y), diag sigma^2(x, y))  (inference networks)

The class-conditional parts p(x|y,z) and q(z|x,y) are a conditional ``VAE``; M2 adds p(y)
and q(y|x), and sums y out where labels are missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vaelab.elbo import labeled_bound, log_importance_weight
from vaelab.models.base import Terms
from vaelab.models.summed import ClassSummed
from vaelab.models.vae import VAE
from vaelab.nets import Encoder


class M2(ClassSummed):
    """``bound(x, y)`` is the labeled bound L(x,y), ``bound(x)`` the unlabeled one U(x) (eq. 7
    of the paper); ``classify(x)`` gives the logits of q(y|x). ``net`` builds q(z|x,y) and
    p(x|y,z), ``classifier_net`` q(y|x) (default: ``net``)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        z_dim: int = 50,
        net: Mapping | None = None,
        likelihood: str | Mapping | None = None,
        classifier_net: Mapping | None = None,
        posterior: str | Mapping | None = None,
    ) -> None:
        super().__init__(num_classes)
        self.vae = VAE(input_shape, z_dim, num_classes, net, likelihood, posterior)
        if not self.vae.posterior.is_gaussian:
            raise ValueError(
                f"M2 takes the Gaussian q(z|x,y) (posterior=gaussian); posterior={self.vae.posterior.type} is for the VAE and CVAE."
            )
        self.input_shape, self.z_dim = self.vae.input_shape, z_dim
        self.likelihood = self.vae.likelihood
        self.classifier = Encoder(classifier_net or net, self.input_shape, num_classes)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(y|x)."""
        return self.classifier(x)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """q(z|x,y), with y = argmax q(y|x) unless given."""
        return self.vae.encode(x, self.classify(x).argmax(-1) if y is None else y)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None):
        """p(x|y,z), with y ~ p(y) unless given."""
        if y is None:
            y = torch.randint(self.num_classes, z.shape[:-1], device=z.device)
        return self.vae.decode(z, y)

    def bound(self, x: torch.Tensor, y: torch.Tensor | None = None, qy_logits: torch.Tensor | None = None) -> Terms:
        """With labels, L(x,y) = E_q(z|x,y)[log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)];
        without, U(x) = sum_y q(y|x) L(x,y) + H(q(y|x)) over every class in one batched pass
        (``qy_logits``: q(y|x) when the caller computed it already)."""
        if y is not None:
            qz = self.vae.encode(x, y)
            return Terms.from_dict(labeled_bound(x, self.vae.decode(qz.rsample(), y), qz, self.log_py))
        qz = self.vae.encode_all_classes(x)  # batch shape (K, B)
        per_class = labeled_bound(x, self.vae.decode(qz.rsample(), self.every_class(qz.batch_shape, x.device)), qz, self.log_py)
        return self.sum_classes(per_class, self.classify(x) if qy_logits is None else qy_logits)

    def class_log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x, z_iy | y) - log q(z_iy | x, y) for z_iy ~ q(z|x,y), every class: (k, K, B)."""
        qz = self.vae.encode_all_classes(x)
        z = qz.rsample((k,))  # (k, K, B, z)
        return log_importance_weight(x, self.vae.decode(z, self.every_class(qz.batch_shape, x.device).expand(k, -1, -1)), qz, z)

    @torch.no_grad()
    def sample(self, n: int, y: int | torch.Tensor | None = None) -> torch.Tensor:
        """Mean images of p(x|y,z) for z ~ p(z) and the given class(es), or y ~ p(y)."""
        if y is None:
            y = torch.randint(self.num_classes, (n,), device=self.device)
        return self.vae.sample(n, y)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x|y,z) at z = E[q(z|x,y)], with y = argmax q(y|x) unless given."""
        return self.vae.reconstruct(x, self.classify(x).argmax(-1) if y is None else y)
