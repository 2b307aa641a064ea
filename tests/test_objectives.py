"""Training objectives: importance-weighted training (standard and doubly reparameterized
gradients) and the KL warm-up; which models take which, and the errors for the rest."""

from __future__ import annotations

import pytest
import torch

from vaelab.elbo import dreg_surrogate, iwae_bound
from vaelab.lit import LitModel
from vaelab.models import M2, VAE
from vaelab.train import train
from conftest import compose_config
from test_lit import fit

NET = {"type": "mlp", "hidden": [16]}


def tiny_vae(num_classes=None) -> VAE:
    torch.manual_seed(0)
    return VAE((1, 6, 6), z_dim=3, num_classes=num_classes, net=NET)


def images(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.bernoulli(torch.full((n, 1, 6, 6), 0.4)), torch.arange(n) % 3


def test_iwae_objective_with_one_sample_is_the_elbo_of_that_sample():
    model = tiny_vae()
    x, y = images()
    module = LitModel(model, objective="iwae", k=1)
    torch.manual_seed(5)
    loss, metrics = module.objective((x, y))
    torch.manual_seed(5)
    qz = model.encode(x)
    z = qz.rsample()
    elbo = model.decode(z).log_prob(x) + torch.distributions.Normal(0, 1).log_prob(z).sum(-1) - qz.log_prob(z)
    assert torch.allclose(loss, -elbo.mean())
    assert torch.allclose(metrics["iwae"], metrics["elbo"])
    # and on average the closed-form ELBO that objective=elbo trains
    torch.manual_seed(6)
    with torch.no_grad():
        draws = torch.stack([module.objective((x, y))[1]["elbo"] for _ in range(3000)])
        assert float(draws.mean()) == pytest.approx(float(closed_form_elbo(model, x)), abs=0.1)


def closed_form_elbo(model: VAE, x: torch.Tensor, draws: int = 3000) -> torch.Tensor:
    """E_q[log p(x|z)] by many draws, minus the closed-form KL."""
    qz = model.encode(x)
    recon = model.decode(qz.rsample((draws,))).log_prob(x).mean(0)
    return (recon - model.bound(x).kl).mean()


def test_iwae_objective_logs_a_bound_above_its_elbo_and_trains_the_cvae_given_y():
    x, y = images()
    _, metrics = LitModel(tiny_vae(num_classes=3), objective="iwae", k=20).objective((x, y))
    assert set(metrics) == {"iwae_given_y", "elbo_given_y"}
    assert metrics["iwae_given_y"] > metrics["elbo_given_y"]
    module = LitModel(tiny_vae(), optimizer=torch.optim.Adam, objective="iwae", k=5, estimator="dreg")
    assert fit(module, 3).global_step == 3


def test_an_importance_weighted_run_validates_and_keeps_its_best_checkpoint_by_the_bound_it_trains(quick_overrides, tmp_path):
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=5", "trainer.limit_val_batches=4", "test=false"]
    cfg = compose_config("train", [*quick_overrides, *short, "lit.objective=iwae", "lit.k=4"])
    metrics = train(cfg)
    assert cfg.optimized_metric == "val/iwae"
    assert metrics["val/iwae"] > metrics["val/elbo"]  # L_4 above the ELBO on the same images
    plain = [o for o in quick_overrides if not o.startswith("paths.output_dir")] + [f"paths.output_dir={tmp_path / 'elbo'}"]
    cfg = compose_config("train", [*plain, *short])
    assert "val/iwae" not in train(cfg) and cfg.optimized_metric == "val/elbo"


def parameter_grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, retain_graph=True))


def test_dreg_gradients_match_their_definition():
    """Tucker et al. 2019: decoder grad sum_i w~_i grad_theta log w_i (as IWAE's); encoder grad
    sum_i w~_i^2 (d log w_i / d z_i) (d z_i / d phi), with q's parameters stopped in log q."""
    model, (x, _), k = tiny_vae(), images(), 7
    encoder, decoder = list(model.encoder.parameters()), list(model.decoder.parameters())

    torch.manual_seed(3)
    log_w = model.log_weights(x, None, k, dreg=True)
    dreg_loss = -dreg_surrogate(log_w).sum()
    dreg_encoder = parameter_grads(dreg_loss, encoder)
    dreg_decoder = parameter_grads(dreg_loss, decoder)

    torch.manual_seed(3)  # the same z: the standard IWAE gradient, for the decoder
    iwae_decoder = parameter_grads(-iwae_bound(model.log_weights(x, None, k)).sum(), decoder)
    for ours, reference in zip(dreg_decoder, iwae_decoder):
        assert torch.allclose(ours, reference, atol=1e-6)

    torch.manual_seed(3)  # the definition, term by term, for the encoder
    qz = model.encode(x)
    z = qz.rsample((k,))
    stopped = torch.distributions.Independent(torch.distributions.Normal(qz.base_dist.loc.detach(), qz.base_dist.scale.detach()), 1)
    prior = torch.distributions.Normal(0, 1)
    log_w_def = model.decode(z).log_prob(x) + prior.log_prob(z).sum(-1) - stopped.log_prob(z)
    dlogw_dz = torch.autograd.grad(log_w_def.sum(), z, retain_graph=True)[0]  # each log w_i depends on z_i only
    w = torch.softmax(log_w_def.detach(), 0)
    definition = torch.autograd.grad(z, encoder, grad_outputs=-(w**2).unsqueeze(-1) * dlogw_dz)
    for ours, reference in zip(dreg_encoder, definition):
        assert torch.allclose(ours, reference, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in definition)


def test_kl_warm_up_weighs_the_kl_from_zero_to_one():
    model, (x, y) = tiny_vae(), images()
    module = LitModel(model, optimizer=torch.optim.Adam, kl_warmup_steps=4)
    torch.manual_seed(2)
    loss, metrics = module.objective((x, y))  # step 0: beta = 0, the loss is the reconstruction alone
    assert metrics["kl_weight"] == 0 and torch.allclose(loss, -metrics["recon"])
    trainer = fit(module, 2)
    assert module.kl_weight() == pytest.approx(0.5) and trainer.global_step == 2
    fit(module, 4)
    assert module.kl_weight() == 1.0
    assert LitModel(model).kl_weight() == 1.0  # off by default


def test_kl_warm_up_reaches_both_of_m2s_bounds():
    """At beta = 0 the labeled and unlabeled bounds lose their KL terms: the loss falls by both."""
    m2 = M2((1, 6, 6), num_classes=3, z_dim=2, net=NET)
    (x, y), unlabeled = images(), (images()[0], torch.full((6,), -1))
    losses, metrics = [], None
    for warmup in (0, 4):
        torch.manual_seed(4)
        loss, metrics = LitModel(m2, alpha=1.0, kl_warmup_steps=warmup).semi_supervised_objective((x, y), unlabeled)
        losses.append(loss)
    torch.manual_seed(4)
    lab, unlab = m2.bound(x, y), m2.bound(unlabeled[0])
    assert metrics["kl_weight"] == 0
    assert torch.allclose(losses[0] - losses[1], lab.kl.mean() + unlab.kl.mean(), atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"objective": "iwea"}, "lit.objective='iwea' must be one of elbo, iwae"),
        ({"objective": "iwae", "k": 0}, "lit.k must be a positive integer"),
        ({"objective": "iwae", "estimator": "drg"}, "lit.estimator='drg' must be one of standard, dreg"),
        ({"k": 5}, "apply to lit.objective=iwae"),
        ({"estimator": "dreg"}, "apply to lit.objective=iwae"),
        ({"kl_warmup_steps": -1}, "lit.kl_warmup_steps must be a non-negative integer"),
    ],
)
def test_objective_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        LitModel(tiny_vae(), **options)


def test_m2_refuses_importance_weighted_training():
    m2 = M2((1, 6, 6), num_classes=3, z_dim=2, net=NET)
    with pytest.raises(ValueError, match="lit.objective=iwae trains the VAE and CVAE"):
        LitModel(m2, objective="iwae", k=5)
    with pytest.raises(ValueError, match="DReG estimator is not defined"):
        m2.log_weights(images()[0], None, 3, dreg=True)
