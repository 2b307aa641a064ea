"""evaluate.py: the importance-weighted bound on trained models, sample quality, figures, and
the command that restores a run and writes metrics.json and the figures."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from pytorch_lightning.utilities.exceptions import SIGTERMException

import vaelab.evaluate as evaluate_module
import vaelab.classifier as classifier_module
from vaelab.classifier import ImageClassifier, build_classifier, classifier_file, load_classifier, real_image_data, sample_accuracy
from vaelab.data import MNISTDataModule
from vaelab.evaluate import classifier_path
from vaelab.iwae import Interrupted, importance_weighted, passes
from vaelab.lit import LitModel
from vaelab.models import M2, VAE
from vaelab.objectives import ELBO
from vaelab.report import model_figures
from vaelab.train import train
from vaelab.utils.checkpoints import restore_run_config
from vaelab.viz import analogy_grid, confusion_plot, latent_scatter, normal_quantile_grid, project_2d
from conftest import compose_config, run_script


@pytest.fixture(scope="module")
def mnist(mnist_dir) -> MNISTDataModule:
    datamodule = MNISTDataModule(str(mnist_dir), download=False, batch_size=100)
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="module")
def trained_vae(mnist) -> LitModel:
    """A small VAE after 300 steps on binarized MNIST."""
    torch.manual_seed(0)
    model = LitModel(VAE(input_shape=(1, 28, 28), z_dim=8, net={"type": "mlp", "hidden": [128]}), objective=ELBO())
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step, batch in zip(range(300), mnist.train_dataloader()):
        loss, _ = model.loss(mnist.preprocess(batch, train=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def paired_t(a: torch.Tensor, b: torch.Tensor) -> float:
    """t statistic of mean(a - b) over paired per-example values."""
    diff = a - b
    return float(diff.mean() / (diff.std() / math.sqrt(len(diff))))


def test_iwae_exceeds_elbo_and_grows_with_k_on_a_trained_model(trained_vae, mnist):
    torch.manual_seed(0)
    x, y = mnist.example_batch(500)
    with torch.no_grad():
        elbo = torch.stack([trained_vae.model.bound(x).elbo for _ in range(20)]).mean(0)
    bounds = {k: importance_weighted(trained_vae.model, x, y, k) for k in (1, 10, 100)}
    # L_1 is an unbiased estimate of the ELBO; L_10 and L_100 lie above it, in that order
    assert abs(paired_t(bounds[1], elbo)) < 4
    assert paired_t(bounds[10], elbo) > 5 and paired_t(bounds[100], bounds[10]) > 5
    assert 0.5 < float((bounds[100] - elbo).mean()) < 30  # a gap of some nats, not an artefact


def test_iwae_in_passes_equals_one_pass(trained_vae, mnist):
    x, y = mnist.example_batch(20)
    torch.manual_seed(3)
    whole = importance_weighted(trained_vae.model, x, y, 50)
    torch.manual_seed(3)  # passes of 7 samples: 7 + 7 + ... + 1
    torch.testing.assert_close(importance_weighted(trained_vae.model, x, y, 50, rows=20 * 7), whole)


def test_passes_bound_the_decoder_rows_of_each():
    assert passes(20, 50, 1, 20 * 7) == [7] * 7 + [1]
    assert passes(20, 50, 10, 20 * 7 * 10) == [7] * 7 + [1]  # a model that decodes every class: ten rows a sample
    assert passes(500, 3, 10, 100) == [1, 1, 1]  # at least one sample a pass, however large the batch
    assert sum(passes(37, 1000, 4, 5000)) == 1000


def test_a_sigterm_stops_the_importance_weighted_bound_between_passes():
    class Stopping:  # what the trainer reports once SIGTERM arrived
        received_sigterm = True

    module = LitModel(VAE((1, 6, 6), z_dim=2, net={"type": "mlp", "hidden": [8]}), iwae_k=10, iwae_rows=4)
    drawn = []
    log_weights = module.model.log_weights
    module.model.log_weights = lambda x, y, k: drawn.append(k) or log_weights(x, y, k)
    assert module.test_iwae(torch.zeros(2, 1, 6, 6), None).shape == (2,)
    assert drawn == [2] * 5
    module.trainer = Stopping()
    with pytest.raises(SIGTERMException):
        module.test_iwae(torch.zeros(2, 1, 6, 6), None)
    assert len(drawn) == 5  # not one more pass
    with pytest.raises(Interrupted):
        importance_weighted(module.model, torch.zeros(2, 1, 6, 6), None, 10, rows=4, should_stop=lambda: len(drawn) >= 7)
    assert len(drawn) == 7


def test_m2_importance_weights_sum_out_the_class():
    torch.manual_seed(0)
    model = M2(input_shape=(1, 6, 6), num_classes=4, z_dim=3, net={"type": "mlp", "hidden": [16]})
    x = torch.bernoulli(torch.full((300, 1, 6, 6), 0.4))
    with torch.no_grad():
        u = torch.stack([model.bound(x).elbo for _ in range(10)]).mean(0)
        bound = importance_weighted(model, x, None, 1)
    assert bound.shape == (300,)
    # log sum_y p(y) w_y >= sum_y q(y|x) log(p(y) w_y / q(y|x)) = U(x): above U on average
    assert paired_t(bound, u) > 3


def test_figures_have_the_class_layout(trained_vae):
    torch.manual_seed(0)
    grid = analogy_grid(torch.rand(3, 1, 28, 28), torch.rand(3, 10, 1, 28, 28))
    assert grid.shape == (3, 3 * 30 + 2, 11 * 30 + 2)
    z = normal_quantile_grid(5)
    assert z.shape == (25, 2) and z[12].abs().max() < 1e-6  # the centre of the grid is z = 0
    assert (z[:5, 0].diff() > 0).all() and (z[::5, 1].diff() < 0).all()  # z_1 grows rightwards, z_2 downwards
    points, label = project_2d(torch.randn(400, 5) * torch.tensor([5.0, 0.1, 0.1, 0.1, 2.0]))
    assert points.shape == (400, 2) and "principal components" in label and points[:, 0].std() > 4
    scatter = latent_scatter(torch.randn(200, 5), torch.arange(200) % 10, 10, size=4)
    assert scatter.shape == (3, 400, 400) and scatter.min() < 0.2  # dark marks on white
    assert confusion_plot(torch.eye(10, dtype=torch.long) * 9).shape == (3, 500, 500)


def test_vae_figures_include_the_manifold_when_z_is_2d():
    model = VAE(input_shape=(1, 28, 28), z_dim=2, net={"type": "mlp", "hidden": [16]})
    figures = model_figures(model, torch.rand(8, 1, 28, 28), torch.arange(8), manifold=6)
    assert set(figures) == {"reconstructions", "samples", "manifold"}
    assert figures["manifold"].shape == (3, 6 * 30 + 2, 6 * 30 + 2)


class ClassImages:
    """Generates real test images: of the asked class, or (``shift``) of the next one."""

    def __init__(self, datamodule: MNISTDataModule, shift: int = 0) -> None:
        self.x, self.y = datamodule.example_batch(2000)
        self.num_classes, self.device, self.shift = 10, torch.device("cpu"), shift

    def sample(self, n: int, y: int) -> torch.Tensor:
        return self.x[self.y == (y + self.shift) % 10][:n]


def test_sample_accuracy_scores_class_conditional_images(mnist_dir, tmp_path):
    grey = real_image_data(compose_config("evaluate", [f"paths.data_dir={mnist_dir}", "ckpt_path=x"]).data)
    assert grey.binary is False and grey.labeled is None
    torch.manual_seed(0)
    path = classifier_file(tmp_path, grey, epochs=1)
    classifier, accuracy = build_classifier(grey, path, epochs=1, limit_train_batches=300)
    assert isinstance(classifier, ImageClassifier) and path.is_file()
    cached, cached_accuracy = load_classifier(path, grey, epochs=1, min_acc=0.9)  # read back, not trained again
    assert cached_accuracy == pytest.approx(accuracy) and accuracy > 0.9
    torch.testing.assert_close(cached.state_dict(), classifier.state_dict())
    grey.setup()
    right = sample_accuracy(ClassImages(grey), classifier, per_class=100)
    wrong = sample_accuracy(ClassImages(grey, shift=1), classifier, per_class=100)
    assert right.shape == (10,) and right.mean() > 0.9 and wrong.mean() < 0.1


def test_the_judge_trains_on_shifted_images_with_a_rate_annealed_to_zero():
    torch.manual_seed(0)
    judge = ImageClassifier((1, 28, 28), 10)
    seen = []
    judge.net.register_forward_pre_hook(lambda net, inputs: seen.append(inputs[0].clone()))
    dots = torch.zeros(64, 1, 28, 28)
    dots[:, :, 13:15, 13:15] = 1  # a centred 2x2 dot: any shift keeps it whole inside the frame
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(judge, DataLoader(TensorDataset(dots, torch.zeros(64, dtype=torch.long)), batch_size=16))
    seen = torch.cat(seen)
    rows, cols = seen.sum(-1).argmax(-1).squeeze(1), seen.sum(-2).argmax(-1).squeeze(1)  # the dot's top-left corner
    assert torch.equal(seen.sum((1, 2, 3)), dots.sum((1, 2, 3)).repeat(2))  # moved, not cut
    assert (rows - 13).abs().max() == classifier_module.SHIFT and (cols - 13).abs().max() == classifier_module.SHIFT
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 10  # a fresh offset per image
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # annealed over all 8 steps


def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    return run_script(script, *overrides, "logger=csv", "extras.print_config=false")


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, figures",
    [
        (["model.z_dim=2"], {"reconstructions", "samples", "manifold", "latent"}),
        (["model=ssvae", "data.labeled=100"], {"reconstructions", "classes", "styles", "analogies", "latent", "confusion"}),
        (["experiment=vae_mnist_ar", "model.autoregressive=[32]"], {"reconstructions", "samples", "latent"}),
    ],
    ids=["vae_z2", "ssvae", "autoregressive"],
)
def test_evaluate_restores_the_run_and_writes_metrics_and_figures(model, figures, mnist_dir, tmp_path):
    data = f"paths.data_dir={mnist_dir}"
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=30", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
    trained = run("train.py", data, *model, *limits, f"hydra.run.dir={tmp_path}/run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run(
        "evaluate.py", data, f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt", "trainer.limit_test_batches=2",
        "eval.iwae_k=20", "eval.samples_per_class=50", "eval.classifier_epochs=1", f"eval.classifier_dir={tmp_path}/clf",
        f"hydra.run.dir={tmp_path}/eval",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics = report["metrics"]
    assert metrics["test/nll_iwae"] <= -metrics["test/elbo"] + 1.0  # the tighter bound, within noise
    assert report["iwae_k"] == 20 and "Bernoulli" in report["likelihood"]
    assert ("autoregressive over the pixels (masked hidden layers [32])" in report["likelihood"]) == ("experiment=vae_mnist_ar" in model)
    assert {path.stem for path in (tmp_path / "eval" / "figures").glob("*.png")} == figures
    if "model=ssvae" in model:
        confusion = torch.tensor(report["confusion_matrix"])
        assert confusion.sum() == 2 * 500  # 2 test batches of 500
        assert (confusion.sum(1) > 0).all()  # every class among the test images
        assert metrics["test/acc"] == pytest.approx(float(confusion.trace()) / 1000)  # its diagonal share
        shares = report["sample_acc_per_class"]
        assert len(shares) == 10 and metrics["test/sample_acc"] == pytest.approx(sum(shares) / 10)
        assert metrics["test/sample_classifier_acc"] == report["classifier"]["test_acc_on_real_images"] >= 0.8
        assert report["classifier"]["path"].startswith(f"{tmp_path}/clf/mnist-")
        assert all(share * 50 == pytest.approx(round(share * 50)) for share in shares)  # of 50 samples a class
    elif "model.z_dim=2" in model:
        assert Image.open(tmp_path / "eval" / "figures" / "manifold.png").size == (20 * 30 + 2, 20 * 30 + 2)


def test_run_config_is_restored_and_the_command_line_still_wins(quick_overrides, tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    trained = compose_config("train", [*quick_overrides, "model.z_dim=2", "data.batch_size=32"])
    OmegaConf.save(trained, run / ".hydra" / "config.yaml")  # unresolved, as Hydra writes it
    ckpt = f"ckpt_path={run}/checkpoints/last.ckpt"
    value = ["data.eval_batch_size=7"]
    cfg = restore_run_config(compose_config("evaluate", [*quick_overrides, ckpt, *value]), value)
    assert (cfg.model.z_dim, cfg.data.batch_size, cfg.data.eval_batch_size) == (2, 32, 7)
    assert cfg.data.data_dir == compose_config("evaluate", [*quick_overrides, ckpt]).data.data_dir
    choice = ["model=cvae"]
    cfg = restore_run_config(compose_config("evaluate", [*quick_overrides, ckpt, *choice]), choice)
    assert cfg.model.num_classes == 10 and cfg.model.z_dim == 50 and cfg.data.batch_size == 32
    elsewhere = compose_config("evaluate", [*quick_overrides, f"ckpt_path={tmp_path}/loose.ckpt"])
    assert restore_run_config(elsewhere, []) == elsewhere  # no run directory: the configured model


@pytest.mark.slow
def test_classifier_command_builds_the_cache(mnist_dir, tmp_path):
    result = run_script("-m", "vaelab.classifier", f"paths.data_dir={mnist_dir}", f"classifier_dir={tmp_path}", "epochs=1",
                        f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 0, result.stderr[-3000:]
    datamodule = real_image_data(compose_config("classifier", [f"paths.data_dir={mnist_dir}"]).data)
    path = classifier_file(tmp_path, datamodule, epochs=1)
    assert [p.name for p in tmp_path.glob("*.pt")] == [path.name]
    _, accuracy = load_classifier(path, None, min_acc=0.9)  # read back, not built again
    assert accuracy > 0.9


def test_an_unwritable_classifier_cache_falls_back_to_the_run_directory(quick_overrides, tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    cfg = compose_config("evaluate", [*quick_overrides, f"eval.classifier_dir={tmp_path}/a_file/classifiers"])
    datamodule = MNISTDataModule(data_dir=cfg.paths.data_dir)
    name = classifier_file(tmp_path, datamodule, cfg.eval.classifier_epochs).name
    assert name.startswith("mnist-") and name.endswith(".pt")
    with caplog.at_level("WARNING"):
        path = classifier_path(cfg, datamodule)
    assert path == tmp_path / "classifiers" / name
    assert "cannot be written; caching the classifier at" in caplog.text
    cfg = compose_config("evaluate", [*quick_overrides, f"eval.classifier_dir={tmp_path}/cache"])
    assert classifier_path(cfg, datamodule) == tmp_path / "cache" / name


def test_metrics_are_written_before_the_optional_extras(quick_overrides, tmp_path, monkeypatch):
    """A failure while scoring samples (or drawing figures) keeps the test metrics."""
    run = [o for o in quick_overrides if not o.startswith("paths.output_dir")]
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    train(compose_config("train", [*run, "model=cvae", *limits, f"paths.output_dir={tmp_path}/run"]))

    def fails(*args, **kwargs):
        raise RuntimeError("the classifier could not be built")

    monkeypatch.setattr(evaluate_module, "load_classifier", fails)
    cfg = compose_config("evaluate", [*run, "model=cvae", f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt",
                                      "trainer.limit_test_batches=1", "eval.iwae_k=0", f"paths.output_dir={tmp_path}/eval"])
    with pytest.raises(RuntimeError, match="could not be built"):
        evaluate_module.evaluate(cfg)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert math.isfinite(report["metrics"]["test/elbo_given_y"])


# -- the sample-quality classifier's cache ------------------------------------------------------

def saved_classifier(path, accuracy: float) -> ImageClassifier:
    """A classifier cached at ``path`` as ``build_classifier`` writes it, claiming ``accuracy``."""
    model = ImageClassifier((1, 28, 28), 10)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "test_acc": accuracy}, path)
    return model


class Builds(list):
    """The calls (path, epochs) of a stand-in ``build_classifier``; the i-th writes a classifier
    whose accuracy is ``accuracies[i]``."""

    accuracies: list[float] = []


@pytest.fixture
def builds(monkeypatch) -> Builds:
    calls = Builds()

    def build(datamodule, path, epochs=3, limit_train_batches=None):
        accuracy = calls.accuracies[len(calls)]
        calls.append((path, epochs))
        return saved_classifier(path, accuracy).eval(), accuracy

    monkeypatch.setattr(classifier_module, "build_classifier", build)
    return calls


@pytest.mark.parametrize("cached, min_acc", [(0.3, 0.8), (0.97, 0.98), (None, 0.8)], ids=["weak", "just_under", "missing"])
def test_a_cached_classifier_under_the_floor_is_built_again(cached, min_acc, builds, tmp_path):
    path = tmp_path / "mnist-key.pt"
    if cached is not None:
        saved_classifier(path, cached)
    builds.accuracies = [0.99]
    model, accuracy = load_classifier(path, "datamodule", epochs=2, min_acc=min_acc)
    assert isinstance(model, ImageClassifier) and accuracy == 0.99
    assert builds == [(path, 2)]
    assert load_classifier(path, "datamodule", epochs=2, min_acc=min_acc)[1] == 0.99
    assert len(builds) == 1  # now good enough: read back


@pytest.mark.parametrize("cached, min_acc", [(0.8, 0.8), (0.95, 0.5)])
def test_a_cached_classifier_at_or_over_the_floor_is_used(cached, min_acc, builds, tmp_path):
    path = tmp_path / "mnist-key.pt"
    saved = saved_classifier(path, cached)
    model, accuracy = load_classifier(path, "datamodule", epochs=2, min_acc=min_acc)
    assert accuracy == cached and builds == []
    torch.testing.assert_close(model.state_dict(), saved.state_dict())


@pytest.mark.parametrize("cached", [0.3, None], ids=["weak", "missing"])
@pytest.mark.parametrize("min_acc, rebuilt", [(0.8, 0.6), (0.99, 0.985)])
def test_a_classifier_still_under_the_floor_is_refused(cached, min_acc, rebuilt, builds, tmp_path):
    path = tmp_path / "mnist-key.pt"
    if cached is not None:
        saved_classifier(path, cached)
    builds.accuracies = [rebuilt]
    with pytest.raises(ValueError, match=rf"reaches {100 * rebuilt:.2f} % on real test images, under "
                                         rf"eval.classifier_min_acc={min_acc:g}: .*eval.classifier_epochs, now 4"):
        load_classifier(path, "datamodule", epochs=4, min_acc=min_acc)
    assert len(builds) == 1


def test_the_classifier_cache_key_covers_what_built_it(mnist_dir, tmp_path, monkeypatch):
    def mnist(**options):
        return MNISTDataModule(data_dir=str(mnist_dir), **options)

    path = classifier_file(tmp_path, mnist(), 5)
    assert path.parent == tmp_path and path.name.startswith("mnist-") and path.suffix == ".pt"
    assert classifier_file(tmp_path, mnist(batch_size=7), 5) == path  # the same recipe, the same file
    others = [classifier_file(tmp_path, mnist(), 1), classifier_file(tmp_path, mnist(), 6),
              classifier_file(tmp_path, mnist(val_size=5000), 5), classifier_file(tmp_path, mnist(split_seed=1), 5)]
    svhn = real_image_data(compose_config("evaluate", [f"paths.data_dir={tmp_path}", "ckpt_path=x", "data=svhn"]).data)
    others.append(classifier_file(tmp_path, svhn, 5))
    assert others[-1].name.startswith("svhn-")
    monkeypatch.setattr(classifier_module, "SHIFT", 0)  # a judge trained on unshifted images
    others.append(classifier_file(tmp_path, mnist(), 5))
    assert len({path, *others}) == 1 + len(others)


def train_cvae(quick_overrides, tmp_path):
    run = [o for o in quick_overrides if not o.startswith("paths.output_dir")]
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    train(compose_config("train", [*run, "model=cvae", *limits, f"paths.output_dir={tmp_path}/run"]))
    return [*run, "model=cvae", f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt", "trainer.limit_test_batches=1",
            "eval.iwae_k=0", "eval.samples_per_class=20", "eval.n_latent=100", "eval.n_examples=8",
            f"eval.classifier_dir={tmp_path}/clf", "eval.classifier_epochs=2", f"paths.output_dir={tmp_path}/eval"]


def test_metrics_hold_the_classifier_accuracy_beside_the_sample_accuracy(quick_overrides, tmp_path, builds):
    overrides = train_cvae(quick_overrides, tmp_path)
    builds.accuracies = [0.5, 0.91]
    saved_classifier(tmp_path / "clf" / "mnist-old.pt", 0.99)  # another recipe's: not this one
    metrics = evaluate_module.evaluate(compose_config("evaluate", [*overrides, "eval.classifier_min_acc=0.4"]))
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    path = builds[0][0]
    assert builds == [(path, 2)] and path.parent == tmp_path / "clf" and path.name != "mnist-old.pt"
    assert metrics["test/sample_classifier_acc"] == report["metrics"]["test/sample_classifier_acc"] == 0.5
    assert 0 <= report["metrics"]["test/sample_acc"] <= 1 and len(report["sample_acc_per_class"]) == 10
    assert report["classifier"] == {"path": str(path), "test_acc_on_real_images": 0.5}
    # a higher floor: the cached one is built again
    (tmp_path / "eval").rename(tmp_path / "eval-1")
    metrics = evaluate_module.evaluate(compose_config("evaluate", [*overrides, "eval.classifier_min_acc=0.9"]))
    assert builds == [(path, 2)] * 2 and metrics["test/sample_classifier_acc"] == 0.91


def test_evaluation_with_a_weak_classifier_is_refused_after_the_test_metrics(quick_overrides, tmp_path, builds):
    overrides = train_cvae(quick_overrides, tmp_path)
    builds.accuracies = [0.5]
    with pytest.raises(ValueError, match=r"under eval.classifier_min_acc=0.8: its scores would say nothing"):
        evaluate_module.evaluate(compose_config("evaluate", overrides))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert math.isfinite(metrics["test/elbo_given_y"]) and "test/sample_acc" not in metrics
