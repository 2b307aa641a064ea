"""The maths module: closed-form KL, ELBO decomposition and bound, gradient paths."""

import math

import torch
from torch.distributions import Independent, Normal

from vaelab.distributions import bernoulli_image, diag_gaussian, standard_normal
from vaelab.elbo import elbo_terms, iwae_bound, kl_to_prior, log_importance_weight
from vaelab.models import VAE


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    qz = diag_gaussian(mu, logvar)
    z = qz.sample((200_000,))
    samples = qz.log_prob(z) - standard_normal(mu).log_prob(z)
    monte_carlo, stderr = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    closed = kl_to_prior(qz)
    expected = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)
    torch.testing.assert_close(closed, expected)
    assert closed.shape == (4,)
    assert ((closed - monte_carlo).abs() < 5 * stderr).all()


def test_elbo_is_recon_minus_kl_summed_per_example():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.3))
    logits = torch.randn(3, 1, 4, 4)
    qz = diag_gaussian(torch.randn(3, 2), torch.randn(3, 2))
    terms = elbo_terms(x, bernoulli_image(logits), qz)
    p = torch.sigmoid(logits)
    recon = (x * p.log() + (1 - x) * (1 - p).log()).sum(dim=(1, 2, 3))
    torch.testing.assert_close(terms["recon"], recon)
    torch.testing.assert_close(terms["elbo"], terms["recon"] - terms["kl"])
    assert all(value.shape == (3,) for value in terms.values())


def test_elbo_bounds_exact_log_likelihood():
    """Linear-Gaussian model p(z)=N(0,1), p(x|z)=N(wz+b, s^2): log p(x) = log N(x; b, w^2+s^2).
    The ELBO's expectation equals log p(x) for the exact posterior and is below it otherwise."""
    torch.manual_seed(0)
    w, b, s = 2.0, 0.5, 0.7
    x = torch.tensor([[1.3], [-0.4]])
    log_px = Normal(b, math.sqrt(w**2 + s**2)).log_prob(x).squeeze(-1)
    post_var = 1 / (1 + w**2 / s**2)
    post_mu = post_var * w * (x - b) / s**2

    def mean_elbo(mu, var, n=100_000):
        qz = diag_gaussian(mu.expand(n, -1, -1), torch.tensor(var).log().expand(n, 2, 1))
        z = qz.rsample()
        px = Independent(Normal(w * z + b, s), 1)
        return elbo_terms(x.expand(n, -1, -1), px, qz)["elbo"].mean(0)

    torch.testing.assert_close(mean_elbo(post_mu, post_var), log_px, atol=0.01, rtol=0)
    assert (mean_elbo(post_mu + 0.5, post_var) < log_px - 0.05).all()


def test_iwae_bound_rises_with_k_towards_exact_log_likelihood():
    """Same linear-Gaussian model with a shifted q(z|x): E[L_k] grows with k, stays below
    log p(x) (up to Monte Carlo noise) and reaches it within 0.01 nats at k = 2000."""
    torch.manual_seed(0)
    w, b, s = 2.0, 0.5, 0.7
    x = torch.tensor([[1.3], [-0.4]])
    log_px = Normal(b, math.sqrt(w**2 + s**2)).log_prob(x).squeeze(-1)
    post_var = 1 / (1 + w**2 / s**2)
    qz = diag_gaussian(post_var * w * (x - b) / s**2 + 0.3, torch.full((2, 1), post_var).log())

    def mean_bound(k, repeats):
        z = qz.sample((repeats, k))
        log_w = log_importance_weight(x, Independent(Normal(w * z + b, s), 1), qz, z)  # (repeats, k, 2)
        return iwae_bound(log_w.transpose(0, 1)).mean(0)

    bounds = [mean_bound(k, max(400, 80_000 // k)) for k in (1, 5, 25, 2000)]
    assert all((lo < hi).all() for lo, hi in zip(bounds, bounds[1:]))
    assert (bounds[-1] <= log_px + 0.01).all()
    torch.testing.assert_close(bounds[-1], log_px, atol=0.01, rtol=0)
    torch.testing.assert_close(iwae_bound(torch.full((7, 3), -2.5)), torch.full((3,), -2.5))


def test_reconstruction_gradient_reaches_encoder_through_z():
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), z_dim=3, net={"type": "mlp", "hidden": [8]})
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.5))
    qz = model.encode(x)
    recon = model.decode(qz.rsample()).log_prob(x).sum()  # no KL: only the path through z
    recon.backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
