"""The autoregressive decoder (``model.autoregressive``): each pixel's logit reads only the pixels
before it, p(x|z) sums to one over every binary image, ancestral draws follow it, and the VAE,
CVAE and their importance weights use it."""

from __future__ import annotations

import itertools

import hydra
import pytest
import torch

from vaelab.models import VAE
from vaelab.nets import MADE
from conftest import compose_config

SHAPE = (1, 2, 2)  # 4 pixels: 16 binary images, few enough to enumerate
IMAGES = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).view(16, *SHAPE)


def tiny(hidden: list[int], **options) -> VAE:
    torch.manual_seed(0)
    return VAE(SHAPE, z_dim=3, net={"type": "mlp", "hidden": [8]}, autoregressive=hidden, **options)


@pytest.mark.parametrize("hidden", [[], [5], [6, 7]])
def test_each_output_reads_only_the_inputs_before_it(hidden):
    """d out_i / d u_j = 0 for j >= i, and != 0 for some j < i (the Jacobian by autograd)."""
    torch.manual_seed(0)
    made = MADE(6, hidden, context=2, activation="tanh")  # no unit is switched off at the point
    jacobian = torch.autograd.functional.jacobian(lambda u: made(u, torch.randn(2)), torch.randn(6))
    assert torch.equal(jacobian.triu(), torch.zeros(6, 6))
    assert (jacobian.tril(-1).abs().sum(1)[1:] > 0).all()  # every output but the first reads earlier inputs


@pytest.mark.parametrize("hidden", [[], [6]])
def test_probabilities_of_all_binary_images_sum_to_one(hidden):
    model = tiny(hidden)
    px = model.decode(torch.randn(5, 3))
    log_p = px.log_prob(IMAGES.unsqueeze(1))  # every image against every one of the 5 codes
    assert log_p.shape == (16, 5)
    torch.testing.assert_close(log_p.logsumexp(0), torch.zeros(5), atol=1e-5, rtol=0)


def test_ancestral_draws_follow_the_distribution():
    model = tiny([6])
    px = model.decode(torch.randn(2, 3))
    torch.manual_seed(1)
    draws = px.sample((20000,))
    assert draws.shape == (20000, 2, *SHAPE) and set(draws.unique().tolist()) <= {0.0, 1.0}
    frequency = torch.stack([(draws == image).flatten(-3).all(-1).float().mean(0) for image in IMAGES])
    torch.testing.assert_close(frequency, px.log_prob(IMAGES.unsqueeze(1)).exp().detach(), atol=0.015, rtol=0)


def test_mean_is_the_pixel_probabilities_along_a_draw():
    """The first pixel reads no other pixel: its probability is the same on every draw."""
    model = tiny([6])
    px = model.decode(torch.randn(3, 3))
    first, second = px.mean, px.mean
    assert first.shape == (3, *SHAPE) and ((first > 0) & (first < 1)).all()
    torch.testing.assert_close(first[..., 0, 0], second[..., 0, 0])
    logits = px.logits(torch.zeros(3, *SHAPE))
    torch.testing.assert_close(first[..., 0, 0], torch.sigmoid(logits[..., 0, 0]))


def test_importance_weights_use_the_autoregressive_density():
    model = tiny([6])
    x = IMAGES[[3, 12]]
    torch.manual_seed(2)
    log_w = model.log_weights(x, None, k=4)
    torch.manual_seed(2)
    qz = model.encode(x)
    z = qz.rsample((4,))
    expected = torch.stack([model.decode(z_i).log_prob(x) for z_i in z]) + (
        torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) - qz.log_prob(z)
    )
    torch.testing.assert_close(log_w, expected)


def test_conditional_vae_trains_with_an_autoregressive_decoder():
    model = tiny([6], num_classes=3)
    x, y = IMAGES[torch.randint(16, (32,))], torch.randint(3, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = -model.bound(x, y).elbo.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < first
    assert model.sample(4, y=2).shape == (4, *SHAPE)


def test_other_likelihoods_are_refused():
    with pytest.raises(ValueError, match="model.autoregressive needs binary pixels"):
        tiny([6], likelihood="logistic")
    with pytest.raises(ValueError, match="must be positive"):
        tiny([0])


def test_the_experiment_builds_the_autoregressive_vae(quick_overrides):
    cfg = compose_config("train", [*quick_overrides, "experiment=vae_mnist_ar"])
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model.made, MADE) and model.made.dim == 784
    assert hydra.utils.instantiate(compose_config("train", quick_overrides).model).made is None
