"""The maths, once: closed-form KL, the evidence lower bounds and their units
(the distributions they take are in ``vaelab.distributions``).

Conventions: every quantity is returned *per example*, summed over pixels and latent
dimensions, in nats, so numbers compare with papers (ELBO ~ -100 nats on binarized MNIST,
not a per-pixel mean).
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Categorical, Distribution, Independent

from vaelab.distributions import is_diag_gaussian, standard_normal, stopped


def kl_to_prior(qz: Independent) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) in closed form, summed over z:
    0.5 * sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)."""
    mu, sigma = qz.base_dist.loc, qz.base_dist.scale
    return (0.5 * (mu.square() + sigma.square() - 1) - sigma.log()).sum(-1)


def kl_term(qz: Distribution, z: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q(z|x) || p(z)) per example: in closed form for a diagonal Gaussian (``kl_to_prior``);
    for any other posterior (a flow) the single-sample estimate log q(z|x) - log p(z) at the
    z ~ q(z|x) that the bound decodes."""
    if is_diag_gaussian(qz):
        return kl_to_prior(qz)
    if z is None:
        raise ValueError(f"The KL of a {type(qz).__name__} posterior is estimated at a sample: pass z.")
    return qz.log_prob(z) - standard_normal(z).log_prob(z)


def elbo_terms(x: torch.Tensor, px: Distribution, qz: Distribution, z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Single-sample ELBO  L(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))  per example.

    ``px`` is the decoder's distribution at a reparameterized z ~ q(z|x) (``z``: needed for
    posteriors without a closed-form KL, see ``kl_term``); returns ``recon`` = log p(x|z),
    ``kl`` and ``elbo`` = recon - kl, each of shape (batch,).
    """
    recon = px.log_prob(x)
    kl = kl_term(qz, z)
    return {"elbo": recon - kl, "recon": recon, "kl": kl}


def labeled_bound(x: torch.Tensor, px: Distribution, qz: Independent, log_py: float | torch.Tensor) -> dict[str, torch.Tensor]:
    """M2's labeled bound  L(x,y) = E_q(z|x,y)[log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)]
    = log p(x|y,z) - KL(q(z|x,y) || p(z)) + log p(y), per example."""
    terms = elbo_terms(x, px, qz)
    terms["elbo"] = terms["elbo"] + log_py
    return terms


def auxiliary_bound(
    x: torch.Tensor, px: Distribution, qz: Independent, log_py: float | torch.Tensor, log_pa: torch.Tensor, log_qa: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The labeled bound of the auxiliary deep generative models (ADGM, SDGM; Maaloe et al. 2016)
    at one draw a ~ q(a|x), z ~ q(z|a,x,y):

        L(x,y) = log p(x|.) + log p(y) - KL(q(z|a,x,y) || p(z)) + log p(a|.) - log q(a|x),

    M2's ``labeled_bound`` and the auxiliary variable's term, returned as ``kl_a`` =
    log q(a|x) - log p(a|.) (a single-sample estimate of a's KL); ``log_pa`` and ``log_qa`` are
    the two densities at that a."""
    terms = labeled_bound(x, px, qz, log_py)
    terms["kl_a"] = log_qa - log_pa
    terms["elbo"] = terms["elbo"] - terms["kl_a"]
    return terms


def unlabeled_bound(per_class: dict[str, torch.Tensor], qy_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """M2's unlabeled bound  U(x) = sum_y q(y|x) L(x,y) + H(q(y|x)), per example.

    ``per_class`` holds the labeled-bound terms for every class, each of shape (K, ...);
    ``qy_logits`` (..., K) parameterise q(y|x). Every term is returned as its expectation under
    q(y|x), with ``elbo`` = U(x) and ``entropy`` = H(q(y|x)).
    """
    qy = Categorical(logits=qy_logits, validate_args=False)
    weights = qy.probs.movedim(-1, 0)
    terms = {name: (weights * value).sum(0) for name, value in per_class.items()}
    terms["entropy"] = qy.entropy()
    terms["elbo"] = terms["elbo"] + terms["entropy"]
    return terms


def stacked_bound(x: torch.Tensor, px: Distribution, qz1: Distribution, z1: torch.Tensor, kept: torch.Tensor, top: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bound on log p(x) of Kingma et al. 2014's stacked model M1+M2, at one z1 ~ q(z1|x):

        log p(x|z1) + B(z1[kept]) + log N(z1[rest]; 0, I) - log q(z1|x),

    ``top`` = B being M2's bound on the kept features (L(h,y) with the label, U(h) without) and
    the rest of z1 keeping M1's prior. ``recon`` = log p(x|z1); ``kl`` = recon - elbo, the
    single-sample estimate of the whole latent hierarchy's KL."""
    rest = torch.ones(z1.shape[-1], dtype=torch.bool, device=z1.device)
    rest[kept] = False
    recon = px.log_prob(x)
    elbo = recon + top + standard_normal(z1[..., rest]).log_prob(z1[..., rest]) - qz1.log_prob(z1)
    return {"elbo": elbo, "recon": recon, "kl": recon - elbo}


def marginal_kl(qy_logits: torch.Tensor, log_py: float) -> torch.Tensor:
    """KL(q(y) || p(y)) for the uniform prior p(y) = exp(log_py), where q(y) = mean_x q(y|x) is the
    classifier's marginal over the batch ``qy_logits`` (B, K): 0 when the batch's predictions are
    spread like the prior, larger when some classes take more than their share. A scalar."""
    marginal = qy_logits.softmax(-1).mean(0)
    return (marginal * (marginal.clamp_min(torch.finfo(marginal.dtype).tiny).log() - log_py)).sum()


def log_importance_weight(
    x: torch.Tensor, px: Distribution, qz: Independent, z: torch.Tensor, dreg: bool = False
) -> torch.Tensor:
    """log w = log p(x|z) + log p(z) - log q(z|x) for samples z ~ q(z|x) of any leading shape
    (the first is the sample dimension).

    ``dreg``: the doubly reparameterized estimator (Tucker et al. 2019, eq. 5) of the gradient of
    L_k = log (1/k) sum_i w_i. q(z|x)'s parameters are stopped in log q, so they receive gradient
    only through z_i, and that gradient is scaled by the normalised weight w~_i: trained with
    ``dreg_surrogate``, the encoder gets sum_i w~_i^2 d log w_i/d z_i dz_i/dphi and the decoder
    the IWAE gradient sum_i w~_i grad log w_i."""
    log_w = px.log_prob(x) + standard_normal(z).log_prob(z) - (stopped(qz) if dreg else qz).log_prob(z)
    if dreg and z.requires_grad:
        normalised = torch.softmax(log_w.detach(), dim=0)
        z.register_hook(lambda grad: grad * normalised.reshape(*normalised.shape, *[1] * (grad.dim() - normalised.dim())))
    return log_w


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """Importance-weighted bound (Burda et al. 2016, eq. 8), per example:
    L_k(x) = log (1/k) sum_i w_i, from log_weights (k, B) of k samples z_i ~ q(z|x), via
    logsumexp. E[L_1] is the ELBO, E[L_k] grows with k and tends to log p(x)."""
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])


def dreg_surrogate(log_weights: torch.Tensor) -> torch.Tensor:
    """sum_i w~_i log w_i, per example, with the normalised weights w~ = softmax(log w) held
    fixed: with log weights from ``log_importance_weight(..., dreg=True)`` its gradient is the
    doubly reparameterized estimate of the gradient of L_k (Tucker et al. 2019). Its value is not
    a bound; ``iwae_bound`` of the same log weights is."""
    return (torch.softmax(log_weights.detach(), dim=0) * log_weights).sum(0)


def bits_per_dim(log_likelihood: torch.Tensor, dims: int) -> torch.Tensor:
    """-log p(x) / (D ln 2): a per-example bound or log-likelihood in nats as bits per dimension."""
    return -log_likelihood / (dims * math.log(2))


def class_information(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """How much q(y|x) says about the class, per example: ``kl_y`` = KL(q(y|x) || p(y)) =
    log K - H(q(y|x)) for the uniform p(y) (the y part of the KL, beside z's ``kl``), and ``mi``,
    the mutual information I(x; y) = H(E_x q(y|x)) - E_x H(q(y|x)) under q, estimated on the
    batch (the same value for each of its examples). mi near 0: the classifier's answers do not
    depend on the image; near log K: confident and spread evenly over the classes."""
    log_q = logits.log_softmax(-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    marginal = log_q.exp().mean(0)
    mi = -(marginal * marginal.clamp_min(1e-12).log()).sum() - entropy.mean()
    return {"kl_y": math.log(logits.shape[-1]) - entropy, "mi": mi.expand(len(logits))}
