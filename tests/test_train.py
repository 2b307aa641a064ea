"""End-to-end runs on real MNIST: fast_dev_run, a short run that learns, evaluation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from vaelab.evaluate import evaluate
from vaelab.metrics import metric_direction, metric_mode
from vaelab.utils import CONFIG_DIR
from vaelab.train import metric_value, train
from conftest import compose_config


def test_fast_dev_run_trains_validates_and_tests(quick_overrides):
    metrics = train(compose_config("train", [*quick_overrides, "debug=fdr"]))
    assert {"train/elbo", "train/recon", "train/kl", "val/elbo", "test/elbo", "test/kl"} <= set(metrics)
    assert -800 < metrics["test/elbo"] < 0
    assert "test/bpd" not in metrics  # nats only for binarized pixels


def test_m2_trains_with_the_dataset_on_the_models_device(quick_overrides, tmp_path):
    """data.on_device=true changes where the batches are gathered, not what is trained: the same
    seed gives the same losses and test metrics as the loaders in host memory."""
    runs = {}
    for on_device in (True, False):
        overrides = [o.replace(str(tmp_path), str(tmp_path / str(on_device))) for o in quick_overrides]
        cfg = compose_config("train", [*overrides, "debug=fdr", "model=ssvae", "data.labeled=100", f"data.on_device={on_device}"])
        runs[on_device] = train(cfg)
    assert {"train/loss", "train/ce", "train/elbo_labeled", "test/acc", "test/ce"} <= set(runs[True])
    measured = {run: {k: v for k, v in metrics.items() if not k.startswith("time/")} for run, metrics in runs.items()}
    assert measured[True] == pytest.approx(measured[False], rel=1e-5)


@pytest.mark.parametrize("model", ["vae", "cvae"])
def test_conv_nets_run_on_mnist(model, quick_overrides):
    cfg = compose_config("train", [*quick_overrides, "debug=fdr", f"model={model}", "net=conv"])
    assert cfg.model.net.type == "conv" and cfg.model.likelihood.type == "bernoulli"
    metrics = train(cfg)
    assert -800 < metrics["test/elbo" if model == "vae" else "test/elbo_given_y"] < 0


def test_grey_level_mnist_with_a_discretized_likelihood(quick_overrides):
    overrides = [*quick_overrides, "debug=fdr", "data.binarize=false", "likelihood=logistic"]
    metrics = train(compose_config("train", overrides))
    assert 0 < metrics["test/bpd"] < 16


def test_discretized_likelihood_on_binarized_mnist_fails_clearly(quick_overrides):
    cfg = compose_config("train", [*quick_overrides, "debug=fdr", "likelihood=gaussian"])
    with pytest.raises(ValueError, match="likelihood=gaussian models 8-bit pixels, but the data are binarized; set data.binarize=false"):
        train(cfg)


def test_continuous_likelihood_on_images_fails_clearly(quick_overrides):
    cfg = compose_config("train", [*quick_overrides, "debug=fdr", "likelihood=normal"])
    with pytest.raises(ValueError, match="likelihood=normal is a density on real values .* not a probability of pixels"):
        train(cfg)


@pytest.fixture(scope="module")
def short_run(mnist_dir, tmp_path_factory):
    """Two short epochs of the default VAE on an MNIST subset (60 batches of 64 per epoch)."""
    out = tmp_path_factory.mktemp("run")
    overrides = [
        f"paths.data_dir={mnist_dir}", f"paths.output_dir={out}", f"paths.log_dir={out}",
        "logger=csv", "trainer=cpu", "extras.print_config=false",
        "trainer.max_epochs=2", "trainer.limit_train_batches=60", "trainer.limit_val_batches=4",
        "trainer.limit_test_batches=4", "data.batch_size=64",
    ]
    return out, overrides, train(compose_config("train", overrides))


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as file:
        return list(csv.DictReader(file))


def test_short_run_raises_validation_elbo(short_run):
    out, _, metrics = short_run
    rows = read_metrics(out / "csv" / "metrics.csv")
    val = {int(r["epoch"]): float(r["val/elbo"]) for r in rows if r.get("val/elbo")}
    assert sorted(val) == [0, 1]
    assert val[1] > val[0], val
    assert float(next(r["val/kl"] for r in rows if r.get("val/kl"))) > 0
    # training metrics reach the loggers every log_every_n_steps=50 steps (60 steps an epoch)
    assert [int(r["step"]) for r in rows if r.get("train/elbo")] == [49, 99]
    assert metric_value(metrics, "val/elbo") == pytest.approx(val[1])


def test_short_run_writes_checkpoints_and_image_grids(short_run):
    out, _, _ = short_run
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert len(list((out / "checkpoints").glob("epoch_*.ckpt"))) == 1
    for epoch in (0, 1):
        samples = Image.open(out / "images" / f"samples_epoch{epoch:03d}.png")
        assert samples.size == (8 * 30 + 2, 8 * 30 + 2)  # 8 x 8 digits, 2-pixel borders
        recons = Image.open(out / "images" / f"reconstructions_epoch{epoch:03d}.png")
        assert recons.size == (16 * 30 + 2, 4 * 30 + 2)  # 32 (original, reconstruction) pairs, 8 a row


def test_evaluate_reproduces_the_test_elbo_of_the_best_checkpoint(short_run, quick_overrides):
    out, _, metrics = short_run
    best = next((out / "checkpoints").glob("epoch_*.ckpt"))
    overrides = [*quick_overrides, "trainer.limit_test_batches=4", f"ckpt_path={best}"]
    result = evaluate(compose_config("evaluate", overrides))
    assert result["test/elbo"] == pytest.approx(metrics["test/elbo"], abs=1.0)


def test_evaluate_rejects_a_missing_checkpoint(quick_overrides, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*nothing.ckpt does not exist"):
        evaluate(compose_config("evaluate", [*quick_overrides, f"ckpt_path={tmp_path}/nothing.ckpt"]))


def test_optimized_metric_must_have_been_logged():
    with pytest.raises(KeyError, match="optimized_metric='val/acc' was not logged; logged metrics: val/elbo"):
        metric_value({"val/elbo": -100.0}, "val/acc")


@pytest.mark.slow
def test_the_best_checkpoint_follows_the_metrics_direction_and_sweeps_get_its_value(quick_overrides, tmp_path):
    """val/ce falls as the classifier learns: the kept checkpoint is its lowest epoch, and that
    value (not the last epoch's) is what train() returns for optimized_metric."""
    overrides = [*quick_overrides, "model=ssvae", "data.labeled=100", "optimized_metric=val/ce", "trainer.max_epochs=3",
                 "trainer.limit_train_batches=5", "trainer.limit_val_batches=2", "test=false"]
    metrics = train(compose_config("train", overrides))
    rows = read_metrics(tmp_path / "csv" / "metrics.csv")
    ce = {int(r["epoch"]): float(r["val/ce"]) for r in rows if r.get("val/ce")}
    best = min(ce, key=ce.get)
    assert [p.name for p in (tmp_path / "checkpoints").glob("epoch_*.ckpt")] == [f"epoch_{best:03d}.ckpt"]
    assert metric_value(metrics, "val/ce") == pytest.approx(ce[best])


@pytest.mark.parametrize("metric, mode", [("val/elbo", "max"), ("val/acc", "max"), ("val/bpd", "min"),
                                          ("test/nll_iwae", "min"), (None, "max")])
def test_every_optimized_metric_has_one_direction_for_checkpoints_and_sweeps(metric, mode):
    assert metric_mode(metric) == mode and metric_direction(metric) == f"{mode}imize"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", [f"optimized_metric={metric or 'null'}", "hparams_search=ssvae_optuna"], return_hydra_config=True)
    assert cfg.callbacks.model_checkpoint.mode == mode
    assert cfg.hydra.sweeper.direction == f"{mode}imize"


def test_a_metric_without_a_direction_is_refused():
    with pytest.raises(ValueError, match="optimized_metric='val/entropy' has no declared direction; choose one of acc, bpd"):
        metric_mode("val/entropy")
