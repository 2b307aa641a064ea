"""SVHN datamodule on small .mat files written in the real SVHN layout."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pytest
import pytorch_lightning as pl
import scipy.io
import torch
from omegaconf import OmegaConf

from vaelab.data import SVHNDataModule
from vaelab.data.svhn import read_svhn_mat
from vaelab.nets.conv import ConvFeatures
from vaelab.train import build, train
from conftest import compose_config, run_script


def write_svhn(path: Path, n: int, seed: int) -> np.ndarray:
    """An SVHN-layout file: X 32x32x3xN uint8, y Nx1 with labels 1..10 (10 = digit 0)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)
    scipy.io.savemat(path, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": labels})
    return labels


@pytest.fixture(scope="module")
def svhn_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "SVHN").mkdir()
    write_svhn(root / "SVHN" / "train_32x32.mat", 400, seed=0)
    write_svhn(root / "SVHN" / "test_32x32.mat", 100, seed=1)
    write_svhn(root / "SVHN" / "extra_32x32.mat", 50, seed=2)
    return root


def test_reader_maps_label_10_to_digit_0_and_transposes_images(svhn_dir):
    path = svhn_dir / "SVHN" / "test_32x32.mat"
    images, labels = read_svhn_mat(path)
    raw = scipy.io.loadmat(path)
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[7, 2], torch.from_numpy(raw["X"][:, :, 2, 7]))
    assert labels[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_splits_labeled_subset_and_extra(svhn_dir):
    dm = SVHNDataModule(str(svhn_dir), download=False, val_size=50, labeled=100)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (350, 50, 100)
    assert torch.equal(torch.bincount(dm.labeled_set.labels), torch.full((10,), 10))
    assert (dm.unlabeled_set.labels == -1).all() and len(dm.unlabeled_set) == 250
    with_extra = SVHNDataModule(str(svhn_dir), download=False, val_size=50, use_extra=True)
    with_extra.setup()
    assert len(with_extra.train_set) == 400
    x, _ = with_extra.example_batch(4)
    assert x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_train_inputs_are_the_8_bit_training_images_in_the_unit_interval(svhn_dir):
    dm = SVHNDataModule(str(svhn_dir), download=False, val_size=50, labeled=100)
    x = dm.train_inputs()
    assert x.shape == (350, 3, 32, 32)
    torch.testing.assert_close(x, dm.train_set.images.float() / 255)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SVHN files missing in .*SVHN: train_32x32.mat, test_32x32.mat .*VAELAB_DATA_DIR"):
        SVHNDataModule(str(tmp_path), download=False).setup()


def test_mat_file_without_x_or_y_is_rejected(tmp_path):
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"images": np.zeros((32, 32, 3, 2), dtype=np.uint8)})
    with pytest.raises(ValueError, match="has no 'X' or 'y' variable: not an SVHN file"):
        read_svhn_mat(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a readable .mat file"):
        read_svhn_mat(path)


def svhn_overrides(svhn_dir: Path, tmp_path: Path) -> list[str]:
    return [
        f"paths.data_dir={svhn_dir}", f"paths.output_dir={tmp_path}", "logger=csv", "trainer=cpu",
        "extras.print_config=false", "data=svhn", "data.val_size=50", "debug=fdr",
    ]


@pytest.mark.parametrize(
    "model, extra",
    [
        ("vae", []), ("cvae", []), ("ssvae", ["data.labeled=100"]), ("vae", ["likelihood=gaussian"]), ("m1m2", ["data.labeled=100"]),
        ("sdgm", ["data.labeled=100"]),
    ],
)
def test_fast_dev_run_on_svhn_with_conv_nets(model, extra, svhn_dir, tmp_path):
    cfg = compose_config("train", [*svhn_overrides(svhn_dir, tmp_path), f"model={model}", *extra])
    assert cfg.model.net.type == "conv"
    assert cfg.model.likelihood.type == ("gaussian" if extra == ["likelihood=gaussian"] else "logistic")
    metrics = train(cfg)
    suffix = "_given_y" if model == "cvae" else ""  # the CVAE bounds log p(x|y)
    # a random-noise image under a freshly initialised model: a few bits per colour value
    assert 1 < metrics[f"test/bpd{suffix}"] < 16
    assert float(metrics[f"test/bpd{suffix}"]) == pytest.approx(-float(metrics[f"test/elbo{suffix}"]) / (3072 * np.log(2)), rel=1e-5)


@pytest.mark.slow
def test_command_line_svhn_run_picks_conv_and_logistic(svhn_dir, tmp_path):
    result = run_script(
        "train.py", "data=svhn", "model=ssvae", "data.labeled=100", "trainer.fast_dev_run=true",
        f"paths.data_dir={svhn_dir}", "data.val_size=50", f"paths.log_dir={tmp_path}", "logger=csv", timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = OmegaConf.load(next(tmp_path.glob("train/runs/*/config.yaml")))
    model = hydra.utils.instantiate(saved.model)  # the model the run trained: convolutions, an 8-bit likelihood
    assert isinstance(model.classifier.features, ConvFeatures) and isinstance(model.vae.encoder.features, ConvFeatures)
    assert model.likelihood.type == "logistic" and not model.likelihood.binary


def test_svhn_with_a_bernoulli_likelihood_fails_clearly(svhn_dir, tmp_path):
    cfg = compose_config("train", [*svhn_overrides(svhn_dir, tmp_path), "likelihood=bernoulli"])
    with pytest.raises(ValueError, match="likelihood=bernoulli models binary pixels, but the data give 8-bit ones"):
        train(cfg)


def test_importance_weighted_bound_is_also_reported_in_bits_per_dimension(svhn_dir, tmp_path):
    cfg = compose_config("train", [*svhn_overrides(svhn_dir, tmp_path), "model.z_dim=4"])
    datamodule = hydra.utils.instantiate(cfg.data)
    model = build(cfg, datamodule, iwae_k=3)
    trainer = pl.Trainer(logger=False, limit_test_batches=1, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    assert metrics["test/bpd_iwae"] == pytest.approx(metrics["test/nll_iwae"] / (3072 * np.log(2)), rel=1e-5)
    assert metrics["test/bpd"] == pytest.approx(-metrics["test/elbo"] / (3072 * np.log(2)), rel=1e-5)
