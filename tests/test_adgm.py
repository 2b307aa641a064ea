"""ADGM and SDGM: their bounds against their definitions and the exact log-likelihood, the
classifier's draws of a, and the command that trains and evaluates them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from torch.distributions import Bernoulli, Normal, kl_divergence

from vaelab.elbo import iwae_bound
from vaelab.models import ADGM, SDGM
from vaelab.models.adgm import MIN_LOG_VAR, gaussian
from vaelab.nets.conv import ConvFeatures
from vaelab.objectives import ELBO, DataFacts, SemiSupervised
from vaelab.train import train
from conftest import compose_config, run_script

MODELS = [ADGM, SDGM]


def tiny(model_class, shape=(1, 6, 6), classes: int = 4, z_dim: int = 3, a_dim: int = 2, **options):
    torch.manual_seed(0)
    net = {"type": "mlp", "hidden": [16, 8]}
    return model_class(shape, classes, z_dim=z_dim, a_dim=a_dim, net=net, **options)


def images(n: int = 5) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 1, 6, 6), 0.4), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def mean_draws(monkeypatch):
    """Every reparameterized draw of a Gaussian is its mean: bounds become deterministic."""
    monkeypatch.setattr(Normal, "rsample", lambda self, shape=torch.Size(): self.loc.expand(*shape, *self.loc.shape))


def normal(params: torch.Tensor) -> Normal:
    mu, logvar = params.chunk(2, -1)
    return Normal(mu, (0.5 * logvar).exp())


@pytest.mark.parametrize("model_class", MODELS)
def test_the_labeled_bound_is_its_definition(model_class, mean_draws):
    """L(x,y) = log p(x|.) + log p(y) - KL(q(z|a,x,y) || p(z)) + log p(a|.) - log q(a|x), with
    ADGM's p(x|y,z) p(a|x,y,z) and SDGM's p(a|y,z) p(x|a,y,z)."""
    model = tiny(model_class, samples=3)
    x, y = images(), torch.tensor([0, 1, 2, 3, 0])
    qa = normal(model.qa(x))
    a = qa.loc
    qz = normal(model.qz(x, y, more=(a,)))
    z = qz.loc
    if model_class is SDGM:
        pa, logits = normal(model.pa(z, y=y)), model.px(torch.cat([a, z], -1), y)
    else:
        pa, logits = normal(model.pa(x, y, more=(z,))), model.px(z, y)
    log_px = Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    kl_z = kl_divergence(qz, Normal(0.0, 1.0)).sum(-1)
    kl_a = (qa.log_prob(a) - pa.log_prob(a)).sum(-1)
    terms = model.bound(x, y)
    torch.testing.assert_close(terms.elbo, log_px - math.log(4) - kl_z - kl_a)
    torch.testing.assert_close(terms.recon, log_px)
    torch.testing.assert_close(terms.kl, kl_z)
    torch.testing.assert_close(terms.extras["kl_a"], kl_a)


@pytest.mark.parametrize("model_class", MODELS)
def test_the_unlabeled_bound_equals_the_loop_over_classes(model_class, mean_draws):
    """U(x) = sum_y q(y|a,x) L(x,y) + H(q(y|a,x)), every class enumerated in one pass."""
    model = tiny(model_class, samples=2)
    x = images()
    q = model.classify_at(x, model.posterior_a(x).mean).softmax(-1)
    per_class = [model.bound(x, torch.full((5,), k)) for k in range(4)]
    explicit = sum(q[:, k] * per_class[k].elbo for k in range(4)) - (q * q.log()).sum(-1)
    unlabeled = model.bound(x)
    torch.testing.assert_close(unlabeled.elbo, explicit)
    torch.testing.assert_close(unlabeled.extras["kl_a"], sum(q[:, k] * per_class[k].extras["kl_a"] for k in range(4)))
    torch.testing.assert_close(unlabeled.extras["entropy"], -(q * q.log()).sum(-1))


@torch.no_grad()
def exact_log_px(model, x: torch.Tensor, y: int) -> torch.Tensor:
    """log p(x, y) of a model with one-dimensional a and z, by quadrature: ADGM's a integrates
    out of p(a|x,y,z); SDGM's a is integrated on a grid with z."""
    grid = torch.linspace(-8, 8, 401)
    step = float(grid[1] - grid[0])
    if model.skip:
        a, z = (g.reshape(-1, 1, 1) for g in torch.meshgrid(grid, grid, indexing="ij"))
        a, z = a.expand(-1, len(x), 1), z.expand(-1, len(x), 1)
        cell = step**2
    else:
        a, z, cell = None, grid.reshape(-1, 1, 1).expand(-1, len(x), 1), step
    classes = torch.full(z.shape[:-1], y)
    log_joint = model.observation(a, z, classes).log_prob(x) + Normal(0.0, 1.0).log_prob(z).squeeze(-1)
    if model.skip:
        log_joint = log_joint + model.prior_a(None, z, classes).log_prob(a)
    return torch.logsumexp(log_joint, 0) + math.log(cell) + model.log_py


@pytest.mark.parametrize("model_class", MODELS)
def test_the_bounds_are_below_the_exact_log_likelihood_and_importance_weights_close_the_gap(model_class):
    """On every image of three binary pixels: E[L(x,y)] <= log p(x,y), E[U(x)] <= log p(x), and
    the importance-weighted bound of ``log_weights`` reaches log p(x) as k grows."""
    model = tiny(model_class, shape=(1, 1, 3), classes=2, z_dim=1, a_dim=1, samples=4000)
    x = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float32).view(8, 1, 1, 3)
    log_pxy = torch.stack([exact_log_px(model, x, y) for y in range(2)])
    log_px = torch.logsumexp(log_pxy, 0)
    with torch.no_grad():
        torch.manual_seed(2)
        for y in range(2):
            assert (model.bound(x, torch.full((8,), y)).elbo < log_pxy[y] + 0.02).all()
        unlabeled = model.bound(x).elbo
        iwae = iwae_bound(model.log_weights(x, None, 20_000))
    assert (unlabeled < log_px + 0.02).all() and (unlabeled < iwae).all()
    torch.testing.assert_close(iwae, log_px, atol=0.015, rtol=0)


@pytest.mark.parametrize("model_class", MODELS)
def test_the_classifier_averages_q_y_given_a_over_its_draws(model_class, monkeypatch):
    """q(y|x) = mean_s q(y|a_s,x): ``samples`` draws of a in training, ``classify_samples`` outside."""
    model = tiny(model_class, samples=3, classify_samples=7)
    x = images()
    drawn = []
    rsample = Normal.rsample
    monkeypatch.setattr(Normal, "rsample", lambda self, shape=torch.Size(): drawn.append(tuple(shape)) or rsample(self, shape))
    torch.manual_seed(0)
    logits = model.classify(x)
    torch.manual_seed(0)
    a = model.posterior_a(x).rsample((3,))
    torch.testing.assert_close(logits.exp(), model.classify_at(x, a).softmax(-1).mean(0))
    model.eval()
    model.classify(x)
    assert drawn == [(3,), (3,), (7,)]


@pytest.mark.parametrize("model_class", MODELS)
def test_encoding_and_reconstructing_read_q_a_given_x_once(model_class, monkeypatch):
    """encode and reconstruct classify with the q(a|x) they take the mean of, without a second pass."""
    model = tiny(model_class).eval()
    x = images()
    calls = []
    forward = type(model.qa).forward
    monkeypatch.setattr(type(model.qa), "forward", lambda self, *args, **kw: calls.append(self) or forward(self, *args, **kw))
    model.encode(x)
    model.reconstruct(x)
    assert [c for c in calls if c is model.qa] == [model.qa, model.qa]
    labels = torch.arange(5) % 4
    torch.manual_seed(0)
    given = model.encode(x, labels).mean
    torch.testing.assert_close(given, gaussian(model.qz(x, labels, more=(model.posterior_a(x).mean,))).mean)


@pytest.mark.parametrize("model_class", MODELS)
def test_a_convolutional_classifier_reads_each_image_once_for_all_draws_of_a(model_class, monkeypatch):
    """classifier_net builds q(y|a,x) alone (the other networks stay net's): its convolutions
    run once per image, a joins the dense layer at every draw, and the bounds train them."""
    model = tiny(model_class, classify_samples=7, classifier_net={"type": "conv", "channels": [4, 8], "hidden": [16]})
    assert isinstance(model.qy.features, ConvFeatures) and not isinstance(model.qa.features, ConvFeatures)
    x = images()
    seen = []
    forward = ConvFeatures.forward
    monkeypatch.setattr(ConvFeatures, "forward", lambda self, h: seen.append(h.shape[0]) or forward(self, h))
    assert model.eval().classify(x).shape == (5, 4) and seen == [5]
    model.train().bound(x).elbo.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.qy.features.parameters())


def test_log_variances_have_a_floor_that_keeps_gradients_finite():
    """A learned p(a|.) whose variance collapses (an SDGM run reached log-variances of -43 and
    overflowing gradients) is held at MIN_LOG_VAR."""
    params = torch.tensor([[0.0, -100.0]], requires_grad=True)
    q = gaussian(params)
    assert q.base_dist.scale.item() == pytest.approx(math.exp(MIN_LOG_VAR / 2))
    q.log_prob(torch.tensor([[1.0]])).sum().backward()
    assert torch.isfinite(params.grad).all()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="model.samples must be a positive integer, got 0"):
        tiny(ADGM, samples=0)
    with pytest.raises(ValueError, match=r"The SDGM takes the Gaussian q\(z\|a,x,y\) \(posterior=gaussian\); posterior=planar"):
        tiny(SDGM, posterior={"type": "planar", "length": 2})
    with pytest.raises(ValueError, match="DReG estimator is not defined"):
        tiny(ADGM).log_weights(images(), None, 2, dreg=True)
    with pytest.raises(ValueError, match="SDGM learns from a few labels .* set data.labeled=N"):
        SemiSupervised().check(tiny(SDGM), DataFacts())
    with pytest.raises(ValueError, match="objective=elbo trains models without a classifier; ADGM learns from a few labels"):
        ELBO().check(tiny(ADGM), DataFacts(labeled=100, train_size=1000))
    objective = SemiSupervised()
    objective.check(tiny(ADGM), DataFacts(labeled=100, train_size=1000))
    assert objective.alpha == pytest.approx(1.0)  # the paper's 0.1 * N / N_lab


def test_every_class_at_enumerates_the_classes_at_each_draw_of_a():
    """q(z|a,x,y) for all K classes at S draws of a: batch shape (K, S, B), row k with y = k,
    each the q(z|a,x,y) of the class given alone."""
    model, x = tiny(ADGM), images()
    a = model.posterior_a(x).rsample((2,))
    qz, classes = model.every_class_at(x, a)
    assert qz.batch_shape == classes.shape == (4, 2, 5)
    for k in range(4):
        assert (classes[k] == k).all()
        one = gaussian(model.qz(x, torch.full((2, 5), k), more=(a,)))
        torch.testing.assert_close(qz.mean[k], one.mean)
        torch.testing.assert_close(qz.variance[k], one.variance)


@pytest.mark.parametrize("name, classifier", [("adgm", []), ("sdgm", ["model.classifier_net={type:conv,channels:[8,16],hidden:[32]}"])])
def test_the_command_trains_and_evaluates(name, classifier, quick_overrides, tmp_path):
    """model=adgm|sdgm data.labeled=100 (the SDGM with a convolutional q(y|a,x)):
    batch-normalised networks, the classifier's accuracy and the auxiliary term logged;
    evaluate.py reloads the checkpoint and measures the importance-weighted bound and the figures."""
    cfg = compose_config("train", [
        *quick_overrides, f"model={name}", "data.labeled=100", "model.net.hidden=[64]", "trainer.max_epochs=1",
        "trainer.limit_train_batches=5", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", *classifier,
    ])
    assert cfg.model.net.batch_norm and cfg.model.z_dim == cfg.model.a_dim == 100
    metrics = train(cfg)
    assert {"val/acc", "val/kl_a", "test/acc"} <= set(metrics) and metrics["val/elbo"] < 0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(key.endswith("running_mean") for key in state)  # batch normalisation's statistics
    assert any(key.startswith("model.qy.features.") for key in state) == bool(classifier)  # q(y|a,x)'s convolutions
    result = run_script(
        "evaluate.py", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", quick_overrides[0],  # paths.data_dir
        f"model={name}", "model.net.hidden=[64]", *classifier, "data.labeled=100", f"paths.output_dir={tmp_path / 'eval'}",
        "eval.iwae_k=2", "data.eval_batch_size=200", "trainer.limit_test_batches=1", "eval.sample_quality=false",
        "eval.n_latent=200",
    )  # the model is named: train() ran without Hydra, so the run has no .hydra/config.yaml to restore
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics, confusion = report["metrics"], torch.tensor(report["confusion_matrix"])
    assert report["model"] == name.upper() and metrics["test/nll_iwae"] > 0
    # the accuracy is the confusion matrix's diagonal share, over the one test batch of 200
    assert confusion.shape == (10, 10) and confusion.sum() == 200
    assert metrics["test/acc"] == pytest.approx(float(confusion.trace() / 200))
    figures = tmp_path / "eval" / "figures"
    assert Image.open(figures / "classes.png").size == (8 * 30 + 2, 10 * 30 + 2)  # a row per class, 8 styles
    assert Image.open(figures / "analogies.png").size == (11 * 30 + 2, 8 * 30 + 2)  # an image, then every class
