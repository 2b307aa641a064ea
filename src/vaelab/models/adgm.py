"""The auxiliary deep generative models of Maaloe, Sonderby, Sonderby & Winther (2016):

    inference   q(a|x) q(y|a,x) q(z|a,y,x)
    ADGM        p(y) p(z) p(x|y,z) p(a|x,y,z)      a is generated last, from everything
    SDGM        p(y) p(z) p(a|y,z) p(x|a,y,z)      a skips ahead to x: a second stochastic layer

with p(y) = Cat(1/K), p(z) = N(0, I) and diagonal Gaussians for a and z. The auxiliary variable
makes the classifier q(y|x) = E_q(a|x)[q(y|a,x)] and q(z|x,y) infinite mixtures. y is summed out
of the unlabeled bound as in M2, at each draw of a.

As the authors' code (larsmaaloee/auxiliary-deep-generative-models): every network has two
hidden layers of 500 with batch normalisation, a and z have 100 dimensions, and the bounds
average ``samples`` draws of a per example. Where code and paper differ we follow the paper's
bound: the unlabeled one weighs each class by q(y|a,x) at the a the class's bound was drawn
with (the code weighs by q(y|a,x) averaged over the draws).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch.distributions import Independent

from vaelab.distributions import Likelihood, diag_gaussian
from vaelab.elbo import auxiliary_bound, log_importance_weight
from vaelab.models.base import Terms
from vaelab.models.summed import ClassSummed
from vaelab.nets import Decoder, Encoder, dense, net_options
from vaelab.nets.networks import at_least_single
from vaelab.posteriors import Posterior


# the floor of every log-variance (a standard deviation of 3e-4): a learned p(a|.) and q(a|x)
# can otherwise narrow together until the gradients of their densities overflow
MIN_LOG_VAR = -16.0


def gaussian(params: torch.Tensor) -> Independent:
    """A diagonal Gaussian from a network's (..., 2 * dim) outputs: means, then log-variances
    (at least ``MIN_LOG_VAR``)."""
    mu, logvar = params.chunk(2, -1)
    return diag_gaussian(mu, logvar.clamp_min(MIN_LOG_VAR))


class ADGM(ClassSummed):
    """The ADGM; ``SDGM`` is the same model with ``skip``. Every network is built from ``net``
    (its image input or output and dense layers; a, z and y enter the first dense layer), but the
    classifier q(y|a,x) from ``classifier_net`` if given (a convolutional one computes the image's
    features once for all draws of a); ``samples`` draws of a per example enter the bounds and the
    training classifier, ``classify_samples`` the classifier outside training; ``posterior`` must
    be Gaussian."""

    skip = False

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        z_dim: int = 100,
        a_dim: int = 100,
        net: Mapping | None = None,
        likelihood: str | Mapping | None = None,
        samples: int = 1,
        classify_samples: int = 10,
        posterior: str | Mapping | None = None,
        classifier_net: Mapping | None = None,
    ) -> None:
        super().__init__(num_classes)
        kind = Posterior.from_spec(posterior, z_dim).type
        if kind != "gaussian":
            raise ValueError(f"The {type(self).__name__} takes the Gaussian q(z|a,x,y) (posterior=gaussian); posterior={kind} is for the VAE and CVAE.")
        for name, value in {"z_dim": z_dim, "a_dim": a_dim, "samples": samples, "classify_samples": classify_samples}.items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"model.{name} must be a positive integer, got {value}.")
        self.input_shape, self.z_dim, self.a_dim = tuple(input_shape), z_dim, a_dim
        self.samples, self.classify_samples = samples, classify_samples
        self.likelihood = Likelihood.from_spec(likelihood)
        channels, *size = self.input_shape
        decoder_shape = (self.likelihood.params_per_channel * channels, *size)
        self.qa = Encoder(net, self.input_shape, 2 * a_dim)
        self.qy = Encoder(classifier_net or net, self.input_shape, num_classes, more=[a_dim])
        self.qz = Encoder(net, self.input_shape, 2 * z_dim, num_classes, more=[a_dim])
        if self.skip:
            self.pa = dense(z_dim, 2 * a_dim, net_options(net), num_classes, reverse=True)
            self.px = Decoder(net, a_dim + z_dim, decoder_shape, num_classes)
        else:
            self.pa = Encoder(net, self.input_shape, 2 * a_dim, num_classes, more=[z_dim])
            self.px = Decoder(net, z_dim, decoder_shape, num_classes)

    # -- the distributions ---------------------------------------------------------------
    def posterior_a(self, x: torch.Tensor) -> Independent:
        """q(a|x)."""
        return gaussian(self.qa(x))

    def prior_a(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> Independent:
        """p(a|x,y,z) (ADGM) or p(a|y,z) (SDGM); z (..., B, z_dim) and y (..., B)."""
        return gaussian(at_least_single(self.pa(z, y=y)) if self.skip else self.pa(x, y, more=(z,)))

    def observation(self, a: torch.Tensor | None, z: torch.Tensor, y: torch.Tensor):
        """p(x|y,z) (ADGM, ``a`` unused) or p(x|a,y,z) (SDGM)."""
        return self.likelihood(self.px(torch.cat([a, z], -1) if self.skip else z, y))

    def classify_at(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Logits of q(y|a,x) for draws a (..., B, a_dim)."""
        return self.qy(x, more=(a,))

    def classify(self, x: torch.Tensor, qa: Independent | None = None) -> torch.Tensor:
        """Logits of q(y|x) = E_q(a|x)[q(y|a,x)], estimated as log (1/S) sum_s q(y|a_s,x) with
        S = ``samples`` draws of a in training, ``classify_samples`` otherwise (``qa``: q(a|x) if
        the caller has it)."""
        draws = self.samples if self.training else self.classify_samples
        a = (self.posterior_a(x) if qa is None else qa).rsample((draws,))
        return torch.logsumexp(self.classify_at(x, a).log_softmax(-1), 0) - math.log(draws)

    def _mean_a_and_class(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean of q(a|x), and y, or argmax q(y|x) when y is not given."""
        qa = self.posterior_a(x)
        return qa.mean, self.classify(x, qa).argmax(-1) if y is None else y

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """q(z|a,x,y) at the mean of q(a|x), with y = argmax q(y|x) unless given."""
        a, y = self._mean_a_and_class(x, y)
        return gaussian(self.qz(x, y, more=(a,)))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None):
        """p(x|y,z), with y ~ p(y) unless given (SDGM: at the mean of p(a|y,z))."""
        if y is None:
            y = torch.randint(self.num_classes, z.shape[:-1], device=z.device)
        a = self.prior_a(None, z, y).mean if self.skip else None
        return self.observation(a, z, y)

    # -- the bounds ----------------------------------------------------------------------
    def _bound_terms(self, x: torch.Tensor, qa: Independent, a: torch.Tensor, y: torch.Tensor, qz: Independent) -> dict[str, torch.Tensor]:
        """``elbo.auxiliary_bound`` at the draws a and one z ~ ``qz`` for the classes y."""
        z = qz.rsample()
        a = a.expand(*z.shape[:-1], -1)
        return auxiliary_bound(x, self.observation(a, z, y), qz, self.log_py, self.prior_a(x, z, y).log_prob(a), qa.log_prob(a))

    def every_class_at(self, x: torch.Tensor, a: torch.Tensor) -> tuple[Independent, torch.Tensor]:
        """q(z|a,x,y) for all K classes at draws a (S, B, a_dim): batch shape (K, S, B), and
        the classes (K, S, B)."""
        qz = gaussian(self.qz.all_classes(x, more=(a,)))
        return qz, self.every_class(qz.batch_shape, x.device)

    def bound(self, x: torch.Tensor, y: torch.Tensor | None = None, qy_logits: torch.Tensor | None = None) -> Terms:
        """With labels, L(x,y) = E_q(a|x) q(z|a,x,y)[log p(x,y,a,z) - log q(a|x) - log q(z|a,x,y)];
        without, U(x) = E_q(a|x)[sum_y q(y|a,x) L(x,y,a) + H(q(y|a,x))], y summed out in one
        batched pass; each the mean over ``samples`` draws of a. ``qy_logits`` (the caller's
        q(y|x)) is not used: U weighs the classes by q(y|a,x) at its own draws of a."""
        qa = self.posterior_a(x)
        a = qa.rsample((self.samples,))  # (S, B, a_dim)
        if y is not None:
            y = y.expand(self.samples, -1)
            terms = Terms.from_dict(self._bound_terms(x, qa, a, y, gaussian(self.qz(x, y, more=(a,)))))
        else:
            qz, classes = self.every_class_at(x, a)
            terms = self.sum_classes(self._bound_terms(x, qa, a, classes, qz), self.classify_at(x, a))  # (S, B) each
        return Terms.from_dict({name: value.mean(0) for name, value in terms.as_dict().items()}, terms.name)

    def class_log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x, y, a_i, z_iy) - log p(y) - log q(a_i|x) - log q(z_iy|a_i,x,y) for k draws
        a_i ~ q(a|x) and z_iy ~ q(z|a_i,x,y) for every class, (k, K, B): summed over y they
        estimate p(x) = sum_y of the integral of p(x,y,a,z) over a and z."""
        qa = self.posterior_a(x)
        a = qa.rsample((k,))
        qz, classes = self.every_class_at(x, a)
        z = qz.rsample()
        a = a.expand(self.num_classes, -1, -1, -1)
        log_w = log_importance_weight(x, self.observation(a, z, classes), qz, z)
        log_w = log_w + self.prior_a(x, z, classes).log_prob(a) - qa.log_prob(a)
        return log_w.transpose(0, 1)

    @torch.no_grad()
    def sample(self, n: int, y: int | torch.Tensor | None = None) -> torch.Tensor:
        """Mean images of p(x|y,z) for z ~ p(z) and the given class(es), or y ~ p(y)."""
        z = torch.randn(n, self.z_dim, device=self.device)
        y = torch.randint(self.num_classes, (n,), device=self.device) if y is None else torch.as_tensor(y, device=self.device).expand(n)
        return self.decode(z, y).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x|.) at the means of q(a|x) and q(z|a,x,y), with y = argmax q(y|x) unless given."""
        a, y = self._mean_a_and_class(x, y)
        return self.observation(a, gaussian(self.qz(x, y, more=(a,))).mean, y).mean


class SDGM(ADGM):
    """The skip deep generative model: ``ADGM`` with p(a|y,z) p(x|a,y,z)."""

    skip = True
