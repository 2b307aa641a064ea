"""Behaviour every model shares: the compiled loss, mixed precision, and the class sums of the
models with a classifier (``vaelab.models.summed.ClassSummed``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch._inductor import config as inductor_config
from torch.distributions import Normal

from vaelab.lit import LitModel
from vaelab.models import ADGM, M1M2, M2, SDGM, VAE
from vaelab.models.summed import ClassSummed
from vaelab.objectives import ELBO, DataFacts, SemiSupervised


def _model_and_batch(name: str):
    net = {"type": "mlp", "hidden": [32]}
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3))
    y = torch.arange(8) % 4
    if name == "vae":
        return LitModel(VAE((1, 6, 6), z_dim=3, net=net), objective=ELBO(), compile=True), (x, y)
    model = LitModel(
        M2((1, 6, 6), num_classes=4, z_dim=3, net=net), objective=SemiSupervised(alpha=1.0), compile=True,
        data=DataFacts(labeled=4, train_size=12),
    )
    return model, {"labeled": (x[:4], y[:4]), "unlabeled": (x[4:], torch.full((4,), -1))}


@pytest.mark.parametrize("name", ["vae", "ssvae"])
def test_compiled_loss_computes_the_same_loss_and_gradients(name):
    """lit.compile=true: configure_model() compiles the training loss; with the same random
    draws (inductor told to use eager's generator) it equals the eager loss, gradients included,
    and parameter names (so checkpoints) do not change."""
    model, batch = _model_and_batch(name)
    names = list(model.state_dict())

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(0)
        loss, _ = model.loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads()
    assert "loss" not in vars(model)
    model.configure_model()
    assert "loss" in vars(model)  # compiled
    with inductor_config.patch(fallback_random=True):
        compiled = loss_and_grads()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == names


@pytest.mark.parametrize("name", ["vae", "ssvae"])
def test_bf16_mixed_precision_keeps_the_bounds_in_single_precision(name):
    """trainer.precision=bf16-mixed runs the layers in bfloat16; the networks hand their outputs
    on in float32, so a bound summed over pixels and z stays float32 and within a fraction of a
    nat of the float32 bound (a bfloat16 sum of ~-500 nats is only resolved to 2 nats)."""
    torch.manual_seed(0)
    model = (VAE((1, 28, 28), z_dim=8) if name == "vae" else M2((1, 28, 28), num_classes=10, z_dim=8)).eval()
    x = torch.bernoulli(torch.full((16, 1, 28, 28), 0.3))
    torch.manual_seed(1)
    single = model.bound(x).elbo
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        mixed = model.bound(x).elbo
    assert mixed.dtype == torch.float32
    assert single.abs().min() > 100 and (mixed - single).abs().max() < 0.5


# -- models that sum the class out ---------------------------------------------------------

NET = {"type": "mlp", "hidden": [16]}
CLASSES = 3


def summed_model(name: str) -> ClassSummed:
    torch.manual_seed(0)
    if name == "m2":
        return M2((1, 4, 4), CLASSES, z_dim=2, net=NET)
    if name in ("adgm", "sdgm"):
        return (ADGM if name == "adgm" else SDGM)((1, 4, 4), CLASSES, z_dim=2, a_dim=2, net=NET, samples=2)
    model = M1M2((1, 4, 4), CLASSES, z_dim=4, net=NET, m2={"z_dim": 2, "net": {"type": "mlp", "hidden": [8]}}, features=3)
    model.kept.copy_(torch.tensor([0, 1, 3]))
    return model


SUMMED = ["m2", "adgm", "sdgm", "m1m2"]


@pytest.fixture
def mean_draws(monkeypatch):
    """Every reparameterized Gaussian draw is its mean (z, z2 and a): the bounds become deterministic
    given M1+M2's z1, which is drawn with ``sample`` and seeded."""
    monkeypatch.setattr(Normal, "rsample", lambda self, shape=torch.Size(): self.loc.expand(*shape, *self.loc.shape))


def images(n: int = 5) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 1, 4, 4), 0.4), generator=torch.Generator().manual_seed(1))


def q_y(model: ClassSummed, x: torch.Tensor) -> torch.Tensor:
    """q(y|.) as each model's U(x) weighs the classes (under ``mean_draws``): M2's q(y|x), the
    ADGM's q(y|a,x) at a = the mean of q(a|x), M1+M2's q(y|h) at the features of the z1 drawn
    after seed 7."""
    if isinstance(model, M1M2):
        torch.manual_seed(7)
        z1 = model.m1.encode(x).sample()
        return model.m2.classify(z1[:, model.kept].view(len(x), -1, 1, 1)).softmax(-1)
    if isinstance(model, ADGM):
        return model.classify_at(x, model.posterior_a(x).mean).softmax(-1)
    return model.classify(x).softmax(-1)


@pytest.mark.parametrize("name", SUMMED)
def test_every_model_that_sums_the_class_out_shares_class_summed(name):
    """M2, ADGM/SDGM and M1+M2 are one kind: a classifier, the uniform p(y), and every class
    decoded per importance sample; M2 and the ADGM take their importance weights from the
    shared sum, M1+M2 from its M2's (also a ClassSummed)."""
    model = summed_model(name)
    assert isinstance(model, ClassSummed) and model.has_classifier and model.bound_name == "elbo"
    assert model.rows_per_sample == CLASSES and model.log_py == pytest.approx(-math.log(CLASSES))
    assert not model.supports_dreg
    if isinstance(model, M1M2):
        assert isinstance(model.m2, ClassSummed)
    else:
        assert type(model).log_weights is ClassSummed.log_weights and type(model).sum_classes is ClassSummed.sum_classes
    classes = model.every_class(torch.Size([CLASSES, 2, 5]), torch.device("cpu"))
    assert classes.shape == (CLASSES, 2, 5) and all((classes[k] == k).all() for k in range(CLASSES))
    with pytest.raises(ValueError, match="DReG estimator is not defined"):
        model.log_weights(images(), None, 2, dreg=True)


@pytest.mark.parametrize("name", SUMMED)
def test_the_unlabeled_bound_equals_the_explicit_sum_over_classes(name, mean_draws):
    """U(x) = sum_y q(y|.) L(x,y) + H(q(y|.)), for every term, computed in one batched pass:
    the same as K labeled bounds weighed by the classifier."""
    model, x = summed_model(name).eval(), images()
    q = q_y(model, x)
    per_class = []
    for k in range(CLASSES):
        torch.manual_seed(7)  # M1+M2: the same z1 for every class
        per_class.append(model.bound(x, torch.full((len(x),), k)))
    torch.manual_seed(7)
    unlabeled = model.bound(x)
    entropy = -(q * q.log()).sum(-1)
    torch.testing.assert_close(unlabeled.elbo, sum(q[:, k] * per_class[k].elbo for k in range(CLASSES)) + entropy)
    torch.testing.assert_close(unlabeled.recon, sum(q[:, k] * per_class[k].recon for k in range(CLASSES)))
    torch.testing.assert_close(unlabeled.kl, sum(q[:, k] * per_class[k].kl for k in range(CLASSES)))
    torch.testing.assert_close(unlabeled.extras["entropy"], entropy)
    assert unlabeled.name == "elbo" and "entropy" not in per_class[0].extras


@pytest.mark.parametrize("name", ["m2", "adgm", "sdgm"])
def test_importance_weights_sum_the_class_weights_under_the_uniform_prior(name):
    """log w = log sum_y p(y) w_y over ``class_log_weights`` (k, K, B); with every class's
    weight the same, the sum is that weight (p(y) sums to one)."""
    model, x = summed_model(name), images()
    torch.manual_seed(3)
    per_class = model.class_log_weights(x, 4)
    torch.manual_seed(3)
    summed = model.log_weights(x, None, 4)
    assert per_class.shape == (4, CLASSES, len(x)) and summed.shape == (4, len(x))
    torch.testing.assert_close(summed, torch.logsumexp(per_class - math.log(CLASSES), dim=1))
    model.class_log_weights = lambda x, k: torch.full((k, CLASSES, len(x)), -2.5)
    torch.testing.assert_close(model.log_weights(x, None, 2), torch.full((2, len(x)), -2.5))

