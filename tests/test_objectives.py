"""Training objectives (vaelab.objectives): importance-weighted training (standard and doubly
reparameterized gradients) and the KL warm-up; which models and data each objective takes, and
the errors, naming the objective, for the rest."""

from __future__ import annotations

import math

import pytest
import torch

from vaelab.elbo import dreg_surrogate, iwae_bound
from vaelab.lit import LitModel
from vaelab.models import M2, VAE
from vaelab.objectives import ELBO, IWAE, DataFacts, SemiSupervised, random_rotation, random_shift
from vaelab.train import train
from conftest import compose_config
from test_lit import batches, fit

NET = {"type": "mlp", "hidden": [16]}


def tiny_vae(num_classes=None, **options) -> VAE:
    torch.manual_seed(0)
    return VAE((1, 6, 6), z_dim=3, num_classes=num_classes, net=NET, **options)


def tiny_m2() -> M2:
    torch.manual_seed(0)
    return M2((1, 6, 6), num_classes=3, z_dim=2, net=NET)


def images(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.bernoulli(torch.full((n, 1, 6, 6), 0.4)), torch.arange(n) % 3


def test_iwae_objective_with_one_sample_is_the_elbo_of_that_sample():
    model = tiny_vae()
    x, y = images()
    objective = IWAE(k=1)
    torch.manual_seed(5)
    loss, metrics = objective(model, (x, y), 0)
    torch.manual_seed(5)
    qz = model.encode(x)
    z = qz.rsample()
    elbo = model.decode(z).log_prob(x) + torch.distributions.Normal(0, 1).log_prob(z).sum(-1) - qz.log_prob(z)
    assert torch.allclose(loss, -elbo.mean())
    assert torch.allclose(metrics["iwae"], metrics["elbo"])
    # and on average the closed-form ELBO that objective=elbo trains
    torch.manual_seed(6)
    with torch.no_grad():
        draws = torch.stack([objective(model, (x, y), 0)[1]["elbo"] for _ in range(3000)])
        assert float(draws.mean()) == pytest.approx(float(closed_form_elbo(model, x)), abs=0.1)


def closed_form_elbo(model: VAE, x: torch.Tensor, draws: int = 3000) -> torch.Tensor:
    """E_q[log p(x|z)] by many draws, minus the closed-form KL."""
    qz = model.encode(x)
    recon = model.decode(qz.rsample((draws,))).log_prob(x).mean(0)
    return (recon - model.bound(x).kl).mean()


def test_iwae_objective_logs_a_bound_above_its_elbo_and_trains_the_cvae_given_y():
    x, y = images()
    cvae, objective = tiny_vae(num_classes=3), IWAE(k=20)
    _, metrics = objective(cvae, (x, y), 0)
    assert set(metrics) == {"iwae_given_y", "elbo_given_y"}
    assert metrics["iwae_given_y"] > metrics["elbo_given_y"]
    assert objective.trained_bound(cvae) == "iwae_given_y" and objective.trained_bound(tiny_vae()) == "iwae"
    # the CVAE's weights are those of p(x|y) with the true y: other labels give other weights
    torch.manual_seed(0)
    given = cvae.log_weights(x, y, 4)
    torch.manual_seed(0)
    assert not torch.allclose(given, cvae.log_weights(x, (y + 1) % 3, 4))
    torch.manual_seed(0)
    assert torch.allclose(IWAE(k=4)(cvae, (x, y), 0)[0], -iwae_bound(given).mean())
    module = LitModel(tiny_vae(), optimizer=torch.optim.Adam, objective=IWAE(k=5, estimator="dreg"))
    before = [p.detach().clone() for p in module.parameters()]
    assert fit(module, 3).global_step == 3
    assert all(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_an_importance_weighted_run_validates_and_keeps_its_best_checkpoint_by_the_bound_it_trains(quick_overrides, tmp_path):
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=5", "trainer.limit_val_batches=4", "test=false"]
    cfg = compose_config("train", [*quick_overrides, *short, "objective=iwae", "objective.k=4"])
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

    torch.manual_seed(3)  # objective=iwae objective.estimator=dreg trains by that gradient (of the batch mean)
    loss, metrics = IWAE(k=k, estimator="dreg")(model, (x, None), 0)
    for ours, reference in zip(parameter_grads(loss, encoder + decoder), dreg_encoder + dreg_decoder):
        assert torch.allclose(ours * len(x), reference, atol=1e-5)
    torch.testing.assert_close(metrics["iwae"], iwae_bound(log_w).mean())


def test_kl_warm_up_weighs_the_kl_from_zero_to_one():
    model, (x, y) = tiny_vae(), images()
    objective = ELBO(kl_warmup_steps=4)
    torch.manual_seed(2)
    loss, metrics = objective(model, (x, y), 0)  # step 0: beta = 0, the loss is the reconstruction alone
    assert metrics["kl_weight"] == 0 and torch.allclose(loss, -metrics["recon"])
    torch.manual_seed(2)
    loss, metrics = objective(model, (x, y), 2)  # half-way: half the KL
    assert metrics["kl_weight"] == 0.5 and torch.allclose(loss, -(metrics["recon"] - 0.5 * metrics["kl"]))
    assert [objective.kl_weight(step) for step in (1, 4, 100)] == [0.25, 1.0, 1.0]
    torch.manual_seed(2)
    loss, metrics = ELBO()(model, (x, y), 0)  # off by default: the ELBO itself from the first step
    assert ELBO().kl_weight(0) == 1.0 and "kl_weight" not in metrics and torch.allclose(loss, -metrics["elbo"])
    # LitModel hands the objective its optimizer step
    module = LitModel(model, optimizer=torch.optim.Adam, objective=objective)
    trainer = fit(module, 2)
    assert trainer.global_step == 2 and module.loss(next(iter(batches(1))))[1]["kl_weight"] == 0.5
    fit(module, 4)
    assert module.loss(next(iter(batches(1))))[1]["kl_weight"] == 1.0


def test_kl_warm_up_reaches_both_of_m2s_bounds():
    """At beta = 0 the labeled and unlabeled bounds lose their KL terms: the loss falls by both."""
    m2 = tiny_m2()
    (x, y), unlabeled = images(), (images()[0], torch.full((6,), -1))
    losses, metrics = [], None
    for warmup in (0, 4):
        torch.manual_seed(4)
        loss, metrics = SemiSupervised(alpha=1.0, kl_warmup_steps=warmup)(m2, {"labeled": (x, y), "unlabeled": unlabeled}, 0)
        losses.append(loss)
    torch.manual_seed(4)
    lab, unlab = m2.bound(x, y), m2.bound(unlabeled[0])
    assert metrics["kl_weight"] == 0
    assert torch.allclose(losses[0] - losses[1], lab.kl.mean() + unlab.kl.mean(), atol=1e-5)


def test_random_shift_moves_each_image_by_its_own_offset_within_the_bound():
    """Each image is its own translation by some (dy, dx) in [-2, 2]^2, edges repeated; the offsets vary."""
    torch.manual_seed(0)
    images = torch.rand(200, 3, 9, 9)
    shifted = random_shift(images, 2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    offsets = []
    for original, moved in zip(padded, shifted):
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(original[:, dy:dy + 9, dx:dx + 9], moved)]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) == 25  # every offset of the 5 x 5 drawn among 200 images
    assert random_shift(images, 0) is images
    with pytest.raises(ValueError, match="moves 9x9 images off their own frame"):
        random_shift(images, 9)
    with pytest.raises(ValueError, match=r"image batches of shape \(N, C, H, W\)"):
        random_shift(images.flatten(1), 1)


def test_random_rotation_turns_each_image_about_its_centre_by_its_own_angle_within_the_bound():
    """A 3 x 3 dot 12 pixels right of the centre of a 41 x 41 image stays about 12 pixels from the
    centre, at an angle within +-20 degrees that differs between images; pixel values are kept."""
    torch.manual_seed(0)
    images = torch.zeros(300, 1, 41, 41)
    images[:, :, 19:22, 31:34] = 1.0
    turned = random_rotation(images, 20.0)
    assert set(turned.unique().tolist()) == {0.0, 1.0}  # nearest pixels: binary images stay binary
    angles = []
    for image in turned[:, 0]:
        rows, cols = image.nonzero(as_tuple=True)
        dy, dx = rows.float().mean() - 20, cols.float().mean() - 20
        assert abs(math.hypot(dx, dy) - 12) < 1.0
        angles.append(math.degrees(math.atan2(dy, dx)))
    assert max(map(abs, angles)) < 20 + 5  # within the bound, give or take one pixel at radius 12
    assert min(angles) < -12 and max(angles) > 12  # turned both ways, by different angles
    assert random_rotation(images, 0.0) is images
    with pytest.raises(ValueError, match=r"image batches of shape \(N, C, H, W\)"):
        random_rotation(images.flatten(1), 10.0)


@pytest.mark.parametrize("unlabeled_weight", [1.0, 0.0])
def test_labeled_rotation_trains_on_turned_labeled_images_after_the_shift(unlabeled_weight):
    """The loss with labeled_shift and labeled_rotation equals the loss without them on labeled
    images shifted, then turned, by the same draws."""
    m2 = tiny_m2()
    (x, y), unlabeled = images(), (images()[0].flip(0), torch.full((6,), -1))
    torch.manual_seed(3)
    augmented_loss, _ = SemiSupervised(alpha=1.0, unlabeled_weight=unlabeled_weight, labeled_shift=1, labeled_rotation=30.0)(
        m2, {"labeled": (x, y), "unlabeled": unlabeled}, 0
    )
    torch.manual_seed(3)
    moved = random_rotation(random_shift(x, 1), 30.0)
    loss, _ = SemiSupervised(alpha=1.0, unlabeled_weight=unlabeled_weight)(m2, {"labeled": (moved, y), "unlabeled": unlabeled}, 0)
    torch.manual_seed(3)
    shifted = random_shift(x, 1)
    shifted_loss, _ = SemiSupervised(alpha=1.0, unlabeled_weight=unlabeled_weight)(m2, {"labeled": (shifted, y), "unlabeled": unlabeled}, 0)
    assert not torch.equal(moved, shifted)
    assert torch.allclose(augmented_loss, loss) and not torch.allclose(augmented_loss, shifted_loss)


@pytest.mark.parametrize("unlabeled_weight", [1.0, 0.0])
def test_labeled_shift_trains_on_shifted_labeled_images_and_leaves_the_unlabeled_alone(unlabeled_weight):
    """The loss with labeled_shift equals the loss without it on labeled images shifted by the same
    draws, in the semi-supervised objective and in its labels-alone baseline."""
    m2 = tiny_m2()
    (x, y), unlabeled = images(), (images()[0].flip(0), torch.full((6,), -1))
    torch.manual_seed(7)
    shifted_loss, _ = SemiSupervised(alpha=1.0, unlabeled_weight=unlabeled_weight, labeled_shift=1)(m2, {"labeled": (x, y), "unlabeled": unlabeled}, 0)
    torch.manual_seed(7)
    moved = random_shift(x, 1)
    loss, _ = SemiSupervised(alpha=1.0, unlabeled_weight=unlabeled_weight)(m2, {"labeled": (moved, y), "unlabeled": unlabeled}, 0)
    torch.manual_seed(7)
    unshifted_loss, _ = SemiSupervised(alpha=1.0, unlabeled_weight=unlabeled_weight)(m2, {"labeled": (x, y), "unlabeled": unlabeled}, 0)
    assert not torch.equal(moved, x)
    assert torch.allclose(shifted_loss, loss) and not torch.allclose(shifted_loss, unshifted_loss)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: IWAE(k=0), "objective.k must be a positive integer"),
        (lambda: IWAE(k=2.5), "objective.k must be a positive integer"),
        (lambda: IWAE(estimator="drg"), "objective.estimator='drg' must be one of standard, dreg"),
        (lambda: ELBO(kl_warmup_steps=-1), "objective.kl_warmup_steps must be a non-negative integer"),
        (lambda: SemiSupervised(kl_warmup_steps=-1), "objective.kl_warmup_steps must be a non-negative integer"),
        (lambda: SemiSupervised(alpha=-1.0), "objective.alpha must be >= 0"),
        (lambda: SemiSupervised(class_balance=-1.0), "objective.class_balance must be >= 0"),
        (lambda: SemiSupervised(weighting="example"), "objective.weighting='example' must be 'batch' or 'data'"),
        (lambda: SemiSupervised(unlabeled_weight=-0.5), "objective.unlabeled_weight must be >= 0"),
        (lambda: SemiSupervised(labeled_shift=-1), "objective.labeled_shift must be a whole number of pixels >= 0"),
        (lambda: SemiSupervised(labeled_shift=1.5), "objective.labeled_shift must be a whole number of pixels >= 0"),
        (lambda: SemiSupervised(labeled_rotation=-5.0), r"objective.labeled_rotation must be an angle in degrees in \[0, 180\]"),
        (lambda: SemiSupervised(labeled_rotation=270.0), r"objective.labeled_rotation must be an angle in degrees in \[0, 180\]"),
    ],
)
def test_objective_options_are_checked(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_only_the_chosen_objectives_options_are_accepted(quick_overrides):
    """An option of another objective is refused, not ignored; an unknown objective lists the known ones."""
    with pytest.raises(Exception, match="Could not override 'objective.k'"):
        compose_config("train", [*quick_overrides, "objective.k=5"])
    with pytest.raises(TypeError, match="estimator"):
        ELBO(estimator="dreg")
    with pytest.raises(Exception, match="Could not find 'objective/iwea'") as error:
        compose_config("train", [*quick_overrides, "objective=iwea"])
    assert all(name in str(error.value) for name in ("elbo", "iwae", "semisupervised"))


@pytest.mark.parametrize(
    ("objective", "model", "message"),
    [
        (ELBO, tiny_m2, r"objective=elbo trains models without a classifier; M2 learns from a few labels"),
        (lambda: IWAE(k=5), tiny_m2, r"objective=iwae trains the VAE and CVAE; a semi-supervised model"),
        (SemiSupervised, tiny_vae, r"objective=semisupervised trains models with a classifier q\(y\|x\) .*; VAE has none"),
        (SemiSupervised, lambda: tiny_vae(num_classes=3), r"objective=semisupervised .*; VAE \(conditional\) has none"),
    ],
)
def test_each_objective_refuses_a_model_it_cannot_train_naming_itself(objective, model, message):
    data = DataFacts(binary=True, labeled=None if objective is not SemiSupervised else 30, train_size=300)
    with pytest.raises(ValueError, match=message):
        objective().check(model(), data)
    with pytest.raises(ValueError, match=message):  # and LitModel asks it before anything trains
        LitModel(model(), objective=objective(), data=data)


@pytest.mark.parametrize(
    ("objective", "model", "labeled", "message"),
    [
        (ELBO, tiny_vae, 30, r"VAE trains on plain batches, but data.labeled=30 split the training set"),
        (lambda: IWAE(k=5), lambda: tiny_vae(num_classes=3), 30, r"VAE \(conditional\) trains on plain batches, but data.labeled=30"),
        (SemiSupervised, tiny_m2, None, r"M2 learns from a few labels and many unlabeled examples: set data.labeled=N"),
    ],
)
def test_each_objective_refuses_data_it_cannot_train_on(objective, model, labeled, message):
    with pytest.raises(ValueError, match=message):
        LitModel(model(), objective=objective(), data=DataFacts(binary=True, labeled=labeled, train_size=300))


def test_the_objectives_take_the_models_and_data_they_train():
    plain, labeled = DataFacts(binary=True), DataFacts(binary=True, labeled=30, train_size=300)
    for objective, model, data in [(ELBO(), tiny_vae(), plain), (ELBO(), tiny_vae(num_classes=3), plain),
                                   (IWAE(k=3, estimator="dreg"), tiny_vae(), plain), (IWAE(k=3), tiny_vae(num_classes=3), plain),
                                   (SemiSupervised(alpha=1.0), tiny_m2(), labeled)]:
        objective.check(model, data)  # no error


def test_dreg_needs_the_gaussian_posterior():
    flow = tiny_vae(posterior={"type": "planar", "length": 2})
    with pytest.raises(ValueError, match="objective.estimator=dreg needs the Gaussian posterior"):
        IWAE(k=3, estimator="dreg").check(flow, DataFacts())
    IWAE(k=3).check(flow, DataFacts())  # the standard estimator takes it


def test_m2_refuses_importance_weighted_training():
    m2 = tiny_m2()
    with pytest.raises(ValueError, match="objective=iwae trains the VAE and CVAE"):
        LitModel(m2, objective=IWAE(k=5))
    with pytest.raises(ValueError, match="DReG estimator is not defined"):
        m2.log_weights(images()[0], None, 3, dreg=True)
