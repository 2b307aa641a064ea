"""The stacked model M1+M2 of Kingma, Rezende, Mohamed & Welling (2014):

    M1:  z1 ~ N(0, I),  x ~ p(x | z1)                     a VAE of the images, trained first, then frozen
    M2:  y ~ Cat(1/K),  z2 ~ N(0, I),  h ~ p(h | y, z2)   M2 on M1's features h = z1[kept]

M2 learns from features drawn afresh from q(z1|x) at every training step (the posterior mean
when classifying outside training), with a Gaussian density p(h|y,z2) (``likelihood=normal``).
Only the dimensions of z1 whose posterior means vary over the training images are kept
(``keep_active``); the others are M1's prior noise and keep M1's prior N(0, I).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vaelab.elbo import stacked_bound
from vaelab.models.base import Terms
from vaelab.models.m2 import M2
from vaelab.models.summed import ClassSummed
from vaelab.models.vae import VAE
from vaelab.nets import net_options
from vaelab.posteriors import posterior_point

# the settings of M1, a VAE (``model=vae``'s names), that M1+M2 takes beside M2's
M1_SETTINGS = ("input_shape", "z_dim", "net", "likelihood", "posterior", "autoregressive")

# a dimension of z1 is active when its posterior mean varies over the images by more than this
# standard deviation (the threshold of Kingma et al.'s code)
ACTIVE_SPREAD = 0.1


@torch.no_grad()
def posterior_means(m1: VAE, images: torch.Tensor) -> torch.Tensor:
    """M1's posterior means for ``images`` (model inputs), the features M2 reads outside training."""
    return torch.cat([posterior_point(m1.encode(x)) for x in images.split(1000)])


def feature_spread(m1: VAE, images: torch.Tensor) -> torch.Tensor:
    """The standard deviation of each dimension of M1's posterior mean over ``images``."""
    return posterior_means(m1, images).std(0)


def active_count(spread: torch.Tensor) -> int:
    """How many dimensions of z1 are active (``ACTIVE_SPREAD``), at least one."""
    return max(int((spread > ACTIVE_SPREAD).sum()), 1)


class M1M2(ClassSummed):
    """M1 is a ``VAE`` of the images built from ``z_dim`` (z1), ``net``, ``likelihood``,
    ``posterior`` and ``autoregressive``, as ``model=vae`` takes them; ``m2`` holds M2's settings (``z_dim``, ``net``,
    ``likelihood``, ``classifier_net``), M2 reading ``features`` dimensions of z1 (null: all).
    M1 is trained (or loaded) before M2 by the stage that ``model=m1m2`` declares
    (``vaelab.stages.PretrainM1``, which also chooses ``features`` and the kept dimensions); the
    model's own checkpoints hold M1's weights, so evaluation needs no stage."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        z_dim: int = 50,
        net: Mapping | None = None,
        likelihood: str | Mapping | None = None,
        posterior: str | Mapping | None = None,
        m2: Mapping | None = None,
        features: int | None = None,
        autoregressive: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_classes)
        self.m1 = VAE(input_shape, z_dim, None, net, likelihood, posterior, autoregressive)
        self.m1.requires_grad_(False)
        n = z_dim if features is None else features
        if not (isinstance(n, int) and 0 < n <= z_dim):
            raise ValueError(f"model.features must be between 1 and z_dim ({z_dim}), or null for all; got {features}.")
        m2 = {"likelihood": "normal", **dict(m2 or {})}
        unknown = set(m2) - {"z_dim", "net", "likelihood", "classifier_net"}
        if unknown:
            raise ValueError(f"model.m2 has no option(s) {sorted(unknown)}; it takes z_dim, net, likelihood and classifier_net.")
        for name in ("net", "classifier_net"):
            if m2.get(name) is not None and net_options(m2[name])["type"] != "mlp":
                raise ValueError(f"M1+M2's M2 reads feature vectors, not images: model.m2.{name} must be an mlp.")
        self.m2 = M2((n, 1, 1), num_classes, **m2)
        if not self.m2.likelihood.continuous:
            raise ValueError(f"M1+M2's M2 models real-valued features: model.m2.likelihood must be normal, not {self.m2.likelihood.type}.")
        self.register_buffer("kept", torch.arange(n))  # the dimensions of z1 that M2 reads
        self.input_shape, self.z_dim = self.m1.input_shape, self.m2.z_dim
        self.likelihood = self.m1.likelihood  # of the images

    @property
    def likelihood_description(self) -> str:
        return self.m1.likelihood_description

    # -- M1 -------------------------------------------------------------------------------
    def keep_active(self, spread: torch.Tensor) -> None:
        """Keep the ``features`` dimensions of z1 with the largest ``spread`` (``feature_spread``)."""
        self.kept.copy_(spread.argsort(descending=True)[: len(self.kept)].sort().values)

    @torch.no_grad()
    def _z1(self, x: torch.Tensor) -> torch.Tensor:
        """z1 ~ q(z1|x) when training, its mean otherwise."""
        qz1 = self.m1.encode(x)
        return qz1.sample() if self.training else posterior_point(qz1)

    def _features(self, z1: torch.Tensor) -> torch.Tensor:
        """h = z1[kept], shaped (..., n, 1, 1) for M2's networks and likelihood."""
        return z1[..., self.kept].unflatten(-1, (-1, 1, 1))

    def _through_m1(self, h: torch.Tensor):
        """p(x|z1) with z1[kept] = h (..., n, 1, 1) and the other dimensions at their prior mean 0."""
        z1 = h.new_zeros(*h.shape[:-3], self.m1.z_dim)
        z1[..., self.kept] = h.flatten(-3)
        return self.m1.decode(z1)

    @torch.no_grad()
    def _m1_draws(self, x: torch.Tensor, sample_shape: torch.Size = torch.Size()):
        """q(z1|x), draws z1 from it and p(x|z1) at them: M1's part of the stacked bound."""
        qz1 = self.m1.encode(x)
        z1 = qz1.sample(sample_shape)
        return qz1, z1, self.m1.decode(z1)

    # -- the interface -----------------------------------------------------------------------
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(y|h), h = M1's features of x."""
        return self.m2.classify(self._features(self._z1(x)))

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """q(z2|h,y) on M1's features, with y = argmax q(y|h) unless given."""
        return self.m2.encode(self._features(self._z1(x)), y)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None):
        """p(x|z1) at z1 = E[p(h|y,z2)]: decoded by M2, then by M1 (y ~ p(y) unless given)."""
        return self._through_m1(self.m2.decode(z, y).mean)

    def bound(self, x: torch.Tensor, y: torch.Tensor | None = None, qy_logits: torch.Tensor | None = None) -> Terms:
        """The stacked bound on log p(x) (``vaelab.elbo.stacked_bound``) at one z1 ~ q(z1|x), with
        M2's L(h,y) when y is given and U(h) otherwise; q(y|h) is computed on the same features
        (``qy_logits``, computed by the caller on other draws of h, is not used). ``kl`` is the
        KL of z2, M2's latent; ``kl_z1`` = log q(z1|x) - log p(z1) with M2's bound in place of
        log p(h), an upper estimate of z1's KL, so that elbo = recon - kl_z1."""
        qz1, z1, px = self._m1_draws(x)
        top = self.m2.bound(self._features(z1), y)
        terms = stacked_bound(x, px, qz1, z1, self.kept, top.elbo)
        return Terms(terms["elbo"], terms["recon"], top.kl, extras={"kl_z1": terms["kl"], **top.extras}, name=self.bound_name)

    def log_weights(self, x: torch.Tensor, y: torch.Tensor | None, k: int, dreg: bool = False) -> torch.Tensor:
        """log w_i = log p(x|z1_i) + log w_M2(h_i) + log N(z1_i[rest]) - log q(z1_i|x), z1_i ~ q(z1|x),
        with M2's class-summed importance weight of h_i = z1_i[kept]: (k, B), a bound on log p(x)."""
        qz1, z1, px = self._m1_draws(x, torch.Size([k]))
        top = self.m2.log_weights(self._features(z1).flatten(0, 1), None, 1, dreg=dreg).view(k, -1)
        return stacked_bound(x, px, qz1, z1, self.kept, top)["elbo"]

    @torch.no_grad()
    def sample(self, n: int, y: int | torch.Tensor | None = None) -> torch.Tensor:
        """Mean images of M1's decoder at M2's mean features for z2 ~ p(z2) and the class(es) y."""
        return self._through_m1(self.m2.sample(n, y)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x -> h -> M2's reconstruction of h -> M1's mean image, with y = argmax q(y|h) unless given."""
        return self._through_m1(self.m2.reconstruct(self._features(self._z1(x)), y)).mean
