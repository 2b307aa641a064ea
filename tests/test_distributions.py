"""Observation models: the discretized likelihoods are proper distributions over 8-bit pixels."""

from __future__ import annotations

import math

import pytest
import torch

from vaelab.distributions import LEVELS, DiscretizedImage, Likelihood
from vaelab.elbo import bits_per_dim

FAMILIES = ["logistic", "gaussian"]
LEVEL_VALUES = torch.arange(LEVELS, dtype=torch.float64) / (LEVELS - 1)


def level_log_probs(loc: float, log_scale: float, family: str, dtype=torch.float32) -> torch.Tensor:
    """log P(x = k/255) for every level k, for a one-pixel image."""
    dist = DiscretizedImage(torch.tensor(loc, dtype=dtype).view(1, 1, 1), torch.tensor(log_scale, dtype=dtype), family)
    return dist.log_prob(LEVEL_VALUES.to(dtype).view(LEVELS, 1, 1, 1))


def reference_log_probs(loc: float, log_scale: float, family: str) -> torch.Tensor:
    """The same from the textbook formula F(upper) - F(lower), in float64."""
    cdf = torch.sigmoid if family == "logistic" else torch.special.ndtr
    scale, half = math.exp(log_scale), 0.5 / (LEVELS - 1)
    upper = cdf((LEVEL_VALUES + half - loc) / scale)
    lower = cdf((LEVEL_VALUES - half - loc) / scale)
    upper[-1], lower[0] = 1.0, 0.0
    return torch.log(upper - lower)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loc, log_scale", [(0.5, -3.0), (0.0, -6.0), (1.0, -1.0), (0.3, -8.0), (-2.0, -4.0), (0.7, 2.0)])
def test_levels_sum_to_one_and_match_the_cdf_formula(family, loc, log_scale):
    log_p = level_log_probs(loc, log_scale, family)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.double().exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)
    reference = reference_log_probs(loc, log_scale, family)
    likely = reference > -20  # where float64's difference of CDFs is itself accurate
    torch.testing.assert_close(log_p.double()[likely], reference[likely], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_far_tails_stay_finite_with_finite_gradients(family):
    loc = torch.tensor([[[[-3.0, 0.5, 4.0]]]], requires_grad=True)
    log_scale = torch.full_like(loc, -8.0, requires_grad=True)
    x = torch.tensor([[[[1.0, 0.0, 0.5]]]])  # each level far from its location
    log_p = DiscretizedImage(loc, log_scale, family).log_prob(x)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and log_p.item() < -1000
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_and_samples_follow_the_level_probabilities(family):
    loc, log_scale = 0.2, -2.5
    probs = level_log_probs(loc, log_scale, family, torch.float64).exp()
    dist = DiscretizedImage(torch.full((1, 1, 1), loc), torch.tensor(log_scale), family)
    assert dist.mean.item() == pytest.approx((probs * LEVEL_VALUES).sum().item(), abs=1e-5)
    torch.manual_seed(0)
    draws = dist.sample((40_000,)).flatten()
    counts = torch.bincount(torch.round(draws * (LEVELS - 1)).long(), minlength=LEVELS).double()
    expected = probs * len(draws)
    # per-level counts within 5 binomial standard deviations (+1 for the rounding of tiny cells)
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs)).sqrt() + 1).all()
    assert draws.min() >= 0 and draws.max() <= 1


def test_likelihood_specs_set_decoder_outputs_and_reject_bad_values():
    assert Likelihood.from_spec(None).params_per_channel == 1 and Likelihood.from_spec(None).binary
    assert Likelihood.from_spec({"type": "logistic", "scale": None}).params_per_channel == 2
    fixed = Likelihood.from_spec({"type": "gaussian", "scale": 0.1})
    assert fixed.params_per_channel == 1
    out = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(fixed(out).log_scale, torch.tensor(math.log(0.1)))
    assert Likelihood("logistic")(torch.zeros(2, 6, 4, 4)).loc.shape == (2, 3, 4, 4)
    assert "discretized logistic" in repr(Likelihood("logistic"))
    with pytest.raises(ValueError, match=r"Unknown likelihood 'poisson'; choose one of \['bernoulli', 'gaussian', 'logistic', 'normal'\]"):
        Likelihood.from_spec({"type": "poisson"})
    with pytest.raises(ValueError, match="Bernoulli likelihood has no scale"):
        Likelihood("bernoulli", scale=0.1)
    with pytest.raises(ValueError, match="scale must be positive or null"):
        Likelihood("logistic", scale=0.0)
    with pytest.raises(ValueError, match=r"has no option\(s\) \['sigma'\]"):
        Likelihood.from_spec({"type": "gaussian", "sigma": 1.0})


def test_normal_likelihood_is_the_gaussian_density_of_real_values():
    """likelihood=normal: the decoder's first half of channels is the mean, the second the log
    scale; log p(h|z) sums the per-value Gaussian log densities."""
    loc, log_scale = torch.randn(2, 5, 1, 1), torch.randn(2, 5, 1, 1)
    h = torch.randn(2, 5, 1, 1) * 3
    learned = Likelihood("normal")
    assert learned.params_per_channel == 2 and learned.continuous and not learned.binary
    expected = torch.distributions.Normal(loc, log_scale.exp()).log_prob(h).sum((-3, -2, -1))
    torch.testing.assert_close(learned(torch.cat([loc, log_scale], dim=-3)).log_prob(h), expected)
    fixed = Likelihood.from_spec({"type": "normal", "scale": 0.5})
    torch.testing.assert_close(fixed(loc).log_prob(h), torch.distributions.Normal(loc, 0.5).log_prob(h).sum((-3, -2, -1)))
    torch.testing.assert_close(fixed(loc).mean, loc)


def test_bits_per_dim_converts_nats_per_image():
    nats = torch.tensor([-3072 * math.log(2) * 4.5])
    torch.testing.assert_close(bits_per_dim(nats, 3072), torch.tensor([4.5]))
