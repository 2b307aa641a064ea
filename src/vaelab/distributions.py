"""The distributions of every model: q(z|.), p(z) and the observation models p(x|z).

Images reach the observation models as floats in [0, 1]: {0, 1} after binarization, k/255 for
8-bit pixels. Every log-probability is summed over an image's pixels, in nats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Distribution, Independent, Normal, Transform, constraints

LEVELS = 256  # values of an 8-bit pixel
MIN_LOG_SCALE = -8.0  # keeps learned scales above ~1/12 of a pixel level


def diag_gaussian(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    """q(z|.) = N(mu, diag(exp(logvar))), one event over the last dimension."""
    return Independent(Normal(mu, torch.exp(0.5 * logvar), validate_args=False), 1)


class PlanarTransform(Transform):
    """f(z) = z + u^ tanh(w^T z + b) (Rezende & Mohamed 2015, eq. 10), with
    log |det df/dz| = log |1 + u^T psi(z)|, psi(z) = (1 - tanh^2(w^T z + b)) w (eq. 11-12).
    u is replaced by u^ = u + (m(w^T u) - w^T u) w / |w|^2, m(a) = -1 + softplus(a), which makes
    w^T u^ >= -1 and the map invertible (their appendix A). Parameters u, w (..., D) and b
    (..., 1) may differ per example. There is no closed-form inverse: log-densities are known
    at the points the map produced last (``cache_size=1``)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(cache_size=1)
        wu = (w * u).sum(-1, keepdim=True)
        self.u = u + (F.softplus(wu) - 1 - wu) * w / w.square().sum(-1, keepdim=True).clamp_min(1e-12)
        self.w, self.b = w, b

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.u * torch.tanh((z * self.w).sum(-1, keepdim=True) + self.b)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "A planar flow has no closed-form inverse: its log-density is known only at the samples it just drew."
        )

    def log_abs_det_jacobian(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        slope = 1 - torch.tanh((z * self.w).sum(-1, keepdim=True) + self.b).square()
        return torch.log((1 + slope * (self.u * self.w).sum(-1, keepdim=True)).abs().clamp_min(1e-12).squeeze(-1))


def is_diag_gaussian(qz: Distribution) -> bool:
    """Whether ``qz`` is a diagonal Gaussian (``diag_gaussian``), not a flow."""
    return isinstance(qz, Independent) and isinstance(qz.base_dist, Normal)


def stopped(qz: Independent) -> Independent:
    """The same diagonal Gaussian with its parameters cut from the graph: log-densities of it
    pass gradient to the points they are evaluated at, not to the parameters."""
    if not is_diag_gaussian(qz):
        raise ValueError("The DReG estimator (lit.estimator=dreg) needs the Gaussian posterior (posterior=gaussian).")
    base = qz.base_dist
    return Independent(Normal(base.loc.detach(), base.scale.detach(), validate_args=False), qz.reinterpreted_batch_ndims)


def standard_normal(like: torch.Tensor) -> Independent:
    """p(z) = N(0, I) with the shape of ``like`` (batch x z_dim)."""
    zero = torch.zeros_like(like)
    return Independent(Normal(zero, torch.ones_like(like), validate_args=False), 1)


def bernoulli_image(logits: torch.Tensor) -> Independent:
    """p(x|z) = prod_pixels Bernoulli(sigmoid(logits)), one event over the last three
    dimensions (C, H, W); any leading dimensions are batch dimensions."""
    return Independent(Bernoulli(logits=logits, validate_args=False), 3)


def normal_values(loc: torch.Tensor, log_scale: torch.Tensor) -> Independent:
    """p(h|z) = prod_d N(h_d; loc_d, exp(log_scale_d)^2), a density on real values such as M1's
    features in M1+M2 (not on pixels); one event over the last three dimensions."""
    scale = torch.exp(log_scale.expand_as(loc).clamp(min=MIN_LOG_SCALE))
    return Independent(Normal(loc, scale, validate_args=False), 3)


class AutoregressiveBernoulli(Distribution):
    """p(x|z) = prod_i Bernoulli(x_i; sigmoid(l_i)), l_i = ``base``_i + ``previous(x)``_i: logits
    of z, (*batch_shape, C, H, W), plus logits of the pixels before i in raster order only (an
    autoregressive decoder, as in DARN, Gregor et al. 2014, and MADE, Germain et al. 2015): a
    normalised probability of the binary image with pixels that depend on each other given z.
    ``previous`` maps images (..., C, H, W) broadcasting against the batch shape to logits
    that broadcast against ``base``. One event over (C, H, W).

    ``log_prob`` costs one pass of the network; ``sample`` and ``mean`` draw pixel by pixel,
    one pass per pixel. The mean has no closed form: ``mean`` returns the probabilities
    p(x_i = 1 | x_<i, z) along one ancestral draw x ~ p(x|z), the image such a decoder shows."""

    support = constraints.independent(constraints.boolean, 3)

    def __init__(self, base: torch.Tensor, previous: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base, self.previous = base, previous
        super().__init__(base.shape[:-3], base.shape[-3:], validate_args=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """l(x), every pixel's logit given the pixels before it in ``x``."""
        return self.base + self.previous(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return bernoulli_image(self.logits(x)).log_prob(x)

    @torch.no_grad()
    def _ancestral(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw x of ``shape`` (sample dimensions first) and its pixels' probabilities."""
        x = self.base.new_zeros(shape)
        probs = torch.zeros_like(x)
        flat_x, flat_p = x.view(*shape[:-3], -1), probs.view(*shape[:-3], -1)
        for i in range(flat_x.shape[-1]):
            flat_p[..., i] = torch.sigmoid(self.logits(x).reshape(flat_x.shape)[..., i])
            flat_x[..., i] = torch.bernoulli(flat_p[..., i])
        return x, probs

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self._ancestral(self._extended_shape(sample_shape))[0]

    @property
    def mean(self) -> torch.Tensor:
        return self._ancestral(self._extended_shape())[1]


class DiscretizedImage(Distribution):
    """p(x|z) for 8-bit images: a logistic or Gaussian density with location ``loc`` and scale
    exp(``log_scale``) on [0, 1], integrated over each pixel's bin, the tails folded into the
    end bins (Salimans et al. 2017, PixelCNN++, eq. 2, with one mixture component):

        P(x) = F((x + h - loc) / s) - F((x - h - loc) / s),   h = 1 / (2 * 255),

    with F(-inf) = 0 for x = 0 and F(+inf) = 1 for x = 1. A true probability of the 8-bit
    data, so the ELBO bounds log P(x) and converts to bits per dimension. One event over the
    last three dimensions (C, H, W).
    """

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = constraints.unit_interval
    families = ("logistic", "gaussian")

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor, family: str) -> None:
        if family not in self.families:
            raise ValueError(f"Unknown family {family!r}; choose one of {self.families}.")
        self.loc, self.family = loc, family
        self.log_scale = log_scale.expand_as(loc).clamp(min=MIN_LOG_SCALE)
        super().__init__(loc.shape[:-3], loc.shape[-3:], validate_args=False)

    def _standardize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_scale = torch.exp(-self.log_scale)
        half = 0.5 / (LEVELS - 1)
        return (x - half - self.loc) * inv_scale, (x + half - self.loc) * inv_scale

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        lower, upper = self._standardize(x)
        if self.family == "logistic":
            log_cdf_upper = -F.softplus(-upper)
            log_sf_lower = -F.softplus(lower)
            # log(sigmoid(u) - sigmoid(l)) = u - softplus(u) - softplus(l) + log(1 - e^(l - u))
            log_bin = upper - F.softplus(upper) - F.softplus(lower) + torch.log(-torch.expm1(lower - upper))
        else:
            log_cdf_upper = torch.special.log_ndtr(upper)
            log_sf_lower = torch.special.log_ndtr(-lower)
            # Phi(u) - Phi(l), computed in the tail where both arguments are small (Phi(u) - Phi(l) =
            # Phi(-l) - Phi(-u)), so the difference of two tiny numbers keeps its precision.
            flip = upper + lower > 0
            a, b = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
            log_b = torch.special.log_ndtr(b)
            log_bin = log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))
        first, last = x < 0.5 / (LEVELS - 1), x > 1 - 0.5 / (LEVELS - 1)
        per_pixel = torch.where(first, log_cdf_upper, torch.where(last, log_sf_lower, log_bin))
        return per_pixel.sum((-3, -2, -1))

    def _cdf(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(t) if self.family == "logistic" else torch.special.ndtr(t)

    @property
    def mean(self) -> torch.Tensor:
        """E[x] = (1/255) sum_{k=1}^{255} P(x >= k/255), the tail-sum formula over the levels."""
        inv_scale = torch.exp(-self.log_scale)
        total = torch.zeros_like(self.loc)
        for k in range(1, LEVELS):
            total += 1 - self._cdf(((k - 0.5) / (LEVELS - 1) - self.loc) * inv_scale)
        return total / (LEVELS - 1)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Draw from the continuous density, then round to the nearest level (exact)."""
        shape = self._extended_shape(sample_shape)
        if self.family == "logistic":
            u = torch.rand(shape, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)
        else:
            noise = torch.randn(shape, device=self.loc.device)
        x = self.loc + torch.exp(self.log_scale) * noise
        return torch.round(x.clamp(0, 1) * (LEVELS - 1)) / (LEVELS - 1)


LIKELIHOODS = {
    "bernoulli": "Bernoulli on binary pixels",
    "logistic": "discretized logistic on 8-bit pixels",
    "gaussian": "discretized Gaussian on 8-bit pixels",
    "normal": "Gaussian density on real values",
}


class Likelihood:
    """An observation model p(x|z), chosen by ``type`` (see ``LIKELIHOODS``). The decoder emits
    ``params_per_channel * C`` channels per image; calling the likelihood on them returns the
    distribution. For the 8-bit types, ``scale=None`` learns a scale per pixel (the decoder's
    second half of channels, as log-scale) and a number fixes it (in units of the [0, 1] range).
    ``normal`` is a density on real-valued inputs (M1's features), with the same scale options.
    """

    def __init__(self, type: str = "bernoulli", scale: float | None = None) -> None:
        if type not in LIKELIHOODS:
            raise ValueError(f"Unknown likelihood {type!r}; choose one of {sorted(LIKELIHOODS)} (likelihood=...).")
        if type == "bernoulli" and scale is not None:
            raise ValueError("The Bernoulli likelihood has no scale; drop model.likelihood.scale.")
        if scale is not None and not scale > 0:
            raise ValueError(f"model.likelihood.scale must be positive or null (learned), got {scale}.")
        self.type, self.scale = type, scale
        self.binary, self.continuous = type == "bernoulli", type == "normal"
        self.params_per_channel = 2 if type != "bernoulli" and scale is None else 1

    @classmethod
    def from_spec(cls, spec: str | Mapping | None) -> Likelihood:
        """From a config entry: a type name, a mapping ``{type: ..., scale: ...}`` or None (Bernoulli)."""
        if spec is None or isinstance(spec, str):
            return cls(spec or "bernoulli")
        unknown = set(spec) - {"type", "scale"}
        if unknown:
            raise ValueError(f"model.likelihood has no option(s) {sorted(unknown)}; it takes type and scale.")
        return cls(**spec)

    def __call__(self, out: torch.Tensor) -> Distribution:
        """``out`` (..., params_per_channel * C, H, W) from the decoder -> p(x|z)."""
        if self.type == "bernoulli":
            return bernoulli_image(out)
        if self.scale is None:
            loc, log_scale = out.chunk(2, dim=-3)
        else:
            loc, log_scale = out, torch.full((), float(self.scale), device=out.device).log()
        if self.continuous:
            return normal_values(loc, log_scale)
        return DiscretizedImage(loc, log_scale, self.type)

    def __repr__(self) -> str:
        unit = "value" if self.continuous else "pixel"
        scale = "" if self.binary else (f", learned per-{unit} scale" if self.scale is None else f", scale {self.scale}")
        return f"{LIKELIHOODS[self.type]}{scale}"
