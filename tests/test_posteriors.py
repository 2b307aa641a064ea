"""Flow posteriors: their log-densities against the change-of-variables formula computed with
autograd Jacobians, inversion where a flow claims it, and which models and objectives take them."""

from __future__ import annotations

import hydra
import pytest
import torch
from torch.distributions import Normal

from vaelab.lit import LitModel
from vaelab.models import M2, VAE
from vaelab.objectives import IWAE
from vaelab.posteriors import Posterior
from vaelab.report import latent_codes, model_figures
from conftest import compose_config

D = 3
SPECS = {"planar": {"type": "planar", "length": 3}, "iaf": {"type": "iaf", "length": 2, "hidden": [16], "context": 4}}


def flow(kind: str) -> tuple[Posterior, torch.Tensor]:
    torch.manual_seed(0)
    posterior = Posterior.from_spec(SPECS[kind], D)
    return posterior, torch.randn(2, posterior.num_params)  # two examples' encoder outputs


@pytest.mark.parametrize("kind", SPECS)
def test_flow_log_density_is_the_change_of_variables(kind):
    """log q(z) = log N(z_0) - log |det dz/dz_0|, the Jacobian by autograd, per example."""
    posterior, params = flow(kind)
    qz = posterior(params)
    base = Normal(params[:, :D], torch.exp(0.5 * params[:, D : 2 * D]))
    z0 = base.sample()
    log_q = qz.log_prob(push(qz, z0))  # at the flow's own output: its maps remember their input
    for i in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda v: push(qz, z0.index_copy(0, torch.tensor([i]), v[None]))[i], z0[i])
        expected = base.log_prob(z0).sum(-1)[i] - torch.linalg.slogdet(jacobian)[1]
        assert log_q[i].item() == pytest.approx(expected.item(), abs=1e-4)


def push(qz, z0: torch.Tensor) -> torch.Tensor:
    """z_0 through the flow's maps."""
    for transform in qz.transforms:
        z0 = transform(z0)
    return z0


def test_iaf_inverts_points_it_did_not_draw():
    posterior, params = flow("iaf")
    qz = posterior(params)
    drawn = qz.rsample((5,))
    remembered = qz.log_prob(drawn)
    inverted = posterior(params).log_prob(drawn)  # new maps, nothing remembered: inverted pass by pass
    assert torch.allclose(inverted, remembered, atol=1e-4)
    one_map = posterior.maps[0](params[:, 2 * D :])
    x = torch.randn(2, D)
    assert torch.allclose(one_map.inv(one_map(x)), x, atol=1e-5)


def test_planar_says_it_has_no_inverse():
    posterior, params = flow("planar")
    with pytest.raises(NotImplementedError, match="no closed-form inverse"):
        posterior(params).log_prob(torch.zeros(2, D))


@pytest.mark.parametrize("kind", SPECS)
def test_vae_with_a_flow_estimates_its_kl_at_the_sample(kind):
    torch.manual_seed(0)
    model = VAE((1, 6, 6), z_dim=D, net={"type": "mlp", "hidden": [16]}, posterior=SPECS[kind])
    x = torch.bernoulli(torch.full((4, 1, 6, 6), 0.3))
    terms = model.bound(x)
    assert torch.isfinite(terms.elbo).all() and torch.allclose(terms.elbo, terms.recon - terms.kl)
    assert model.log_weights(x, None, 6).shape == (6, 4)
    assert model.reconstruct(x).shape == x.shape
    assert latent_codes(model, x, None).shape == (4, D)  # the figures of evaluate.py
    assert set(model_figures(model, x, torch.zeros(4, dtype=torch.long), n_samples=4)) == {"reconstructions", "samples"}
    assert not model.supports_dreg
    with pytest.raises(ValueError, match="objective.estimator=dreg needs the Gaussian posterior"):
        LitModel(model, objective=IWAE(k=2, estimator="dreg"))
    LitModel(model, objective=IWAE(k=2))  # the standard estimator takes any posterior


def test_flow_options_are_checked_and_m2_keeps_the_gaussian():
    with pytest.raises(ValueError, match="posterior type 'maf' is not one of gaussian, planar, iaf"):
        Posterior.from_spec("maf", D)
    with pytest.raises(ValueError, match="model.posterior.length must be a positive integer"):
        Posterior.from_spec({"type": "planar", "length": 0}, D)
    with pytest.raises(ValueError, match="M2 takes the Gaussian"):
        M2((1, 6, 6), num_classes=3, posterior=SPECS["iaf"])


@pytest.mark.parametrize(("model", "posterior"), [("vae", "planar"), ("cvae", "iaf"), ("vae", "gaussian")])
def test_posterior_configs_build_their_models(model, posterior, quick_overrides):
    """posterior= reaches the model: a flow's q(z|x) is no longer the Gaussian of its base
    parameters, and only the Gaussian takes the DReG estimator."""
    cfg = compose_config("train", [*quick_overrides, f"model={model}", f"posterior={posterior}"])
    torch.manual_seed(0)
    built = hydra.utils.instantiate(cfg.model)
    assert built.supports_dreg == (posterior == "gaussian")
    x, y = torch.bernoulli(torch.full((3, 1, 28, 28), 0.3)), torch.arange(3)
    y = y if model == "cvae" else None
    qz = built.encode(x, y)
    params = built.encoder(x, y)
    base = Normal(params[:, :built.z_dim], torch.exp(0.5 * params[:, built.z_dim : 2 * built.z_dim]))
    z = qz.rsample()
    is_base = torch.allclose(qz.log_prob(z), base.log_prob(z).sum(-1), atol=1e-5)
    assert is_base == (posterior == "gaussian")
    with torch.no_grad():
        assert torch.isfinite(built.bound(x, y).elbo).all()
