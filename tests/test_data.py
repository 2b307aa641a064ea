"""MNIST datamodule and idx reader on the real files; clear errors on missing or bad files."""

import shutil
import struct
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vaelab.data import MNISTDataModule
from vaelab.data.idx import read_idx
from vaelab.data.mnist import FILE_NAMES


@pytest.fixture(scope="module")
def mnist(mnist_dir) -> MNISTDataModule:
    dm = MNISTDataModule(str(mnist_dir), download=False, batch_size=64)
    dm.setup()
    return dm


def test_mnist_splits_have_the_documented_sizes(mnist):
    assert len(mnist.train_set) == 50_000 and len(mnist.val_set) == 10_000 and len(mnist.test_set) == 10_000
    assert mnist.train_set.images.dtype == torch.uint8
    assert mnist.train_set.images.shape[1:] == (1, 28, 28) == mnist.input_shape
    assert set(mnist.test_set.labels.unique().tolist()) == set(range(mnist.num_classes))


def test_validation_split_is_seeded_and_disjoint(mnist, mnist_dir):
    same = MNISTDataModule(str(mnist_dir), download=False, binarize=False)
    same.setup()
    other = MNISTDataModule(str(mnist_dir), download=False, binarize=False, split_seed=1)
    other.setup()
    assert torch.equal(same.train_set.labels, mnist.train_set.labels)
    assert not torch.equal(other.val_set.labels, same.val_set.labels)
    # every official training image lands in exactly one of train and validation
    pixels = lambda s: s.images.flatten(1).long().sum(1)  # noqa: E731
    all_train = read_idx(Path(mnist_dir) / "MNIST/raw/train-images-idx3-ubyte", 3).flatten(1).long().sum(1)
    split = torch.cat([pixels(same.train_set), pixels(same.val_set)])
    assert torch.equal(split.sort().values, all_train.sort().values)


def test_binarization_is_dynamic_for_training_and_fixed_for_evaluation(mnist):
    raw = mnist.train_set.__getitems__(range(256))
    first, _ = mnist.preprocess(raw, train=True)
    second, _ = mnist.preprocess(raw, train=True)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)
    # the draws follow the grey levels: mean of binarized pixels ~ mean intensity
    assert abs(first.mean() - raw[0].float().mean() / 255) < 0.01
    val_a, _ = mnist.example_batch(64, split="val")
    val_b, _ = mnist.example_batch(64, split="val")
    assert set(val_a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(val_a, val_b)


def test_train_inputs_are_every_training_image_binarized_once(mnist_dir):
    """What M1+M2's stage measures z1's spread on: the labeled and the unlabeled training images,
    as evaluation inputs (one fixed binarization, following the grey levels)."""
    dm = MNISTDataModule(str(mnist_dir), download=False, labeled=100)
    x = dm.train_inputs()
    assert x.shape == (50_000, 1, 28, 28) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(dm.train_inputs(), x)  # the same draws every time
    grey = dm.train_set.images.float() / 255
    assert abs(x.mean() - grey.mean()) < 0.002
    assert ((x == 1) <= (grey > 0)).all()  # a black pixel is never drawn white


def test_loader_yields_whole_batches_from_memory(mnist):
    x, y = next(iter(mnist.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (64,) and y.dtype == torch.int64
    batches = list(mnist.test_dataloader())
    assert sum(len(b[1]) for b in batches) == 10_000
    assert torch.equal(torch.cat([b[1] for b in batches]), mnist.test_set.labels)


def test_on_device_moves_every_split_to_the_trainers_device(mnist_dir):
    """With data.on_device=true setup() puts every split where the trainer puts the model (the
    meta device stands in for a GPU here) and the loaders gather batches there."""
    dm = MNISTDataModule(str(mnist_dir), download=False, labeled=100, on_device=True)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), global_rank=0)
    dm.setup("fit")
    for split in ("labeled_set", "unlabeled_set", "val_set", "test_set"):
        assert getattr(dm, split).images.is_meta and getattr(dm, split).labels.is_meta, split
    assert not dm.train_set.images.is_meta  # its two parts are what the loaders read
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert batch["labeled"][0].is_meta and batch["labeled"][0].shape == (100, 1, 28, 28)
    assert batch["unlabeled"][0].is_meta and batch["unlabeled"][0].shape == (128, 1, 28, 28)
    # fully labeled: the training set itself moves; without the option the data stay in host memory
    for on_device in (True, False):
        full = MNISTDataModule(str(mnist_dir), download=False, on_device=on_device)
        full.trainer = dm.trainer
        full.setup("fit")
        assert full.train_set.images.is_meta == full.test_set.images.is_meta == on_device


def test_on_device_refuses_loader_workers(mnist_dir):
    with pytest.raises(ValueError, match="data.on_device=true .* set data.num_workers=0 and data.pin_memory=false"):
        MNISTDataModule(str(mnist_dir), on_device=True, num_workers=2)


def test_configured_shape_must_match_the_data(mnist_dir):
    with pytest.raises(ValueError, match=r"shape \[1, 28, 28\], not input_shape=\[3, 32, 32\]"):
        MNISTDataModule(str(mnist_dir), input_shape=[3, 32, 32])


def test_missing_files_name_directory_and_files(tmp_path):
    dm = MNISTDataModule(str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert all(name in message for name in FILE_NAMES)
    assert "VAELAB_DATA_DIR" in message


def test_failed_download_gives_the_same_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(FileNotFoundError, match="downloading them failed .*name resolution"):
        MNISTDataModule(str(tmp_path), download=True).setup()


def _copy_mnist(mnist_dir: Path, tmp_path: Path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILE_NAMES:
        (raw / name).symlink_to(Path(mnist_dir) / "MNIST" / "raw" / name)
    return raw


def test_truncated_file_is_rejected_not_shortened(mnist_dir, tmp_path):
    raw = _copy_mnist(mnist_dir, tmp_path)
    target = raw / "t10k-images-idx3-ubyte"
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte is 3920008 bytes but its header declares shape .*truncated"):
        MNISTDataModule(str(tmp_path), download=False).setup()


def test_wrong_magic_is_rejected(mnist_dir, tmp_path):
    raw = _copy_mnist(mnist_dir, tmp_path)
    target = raw / "train-labels-idx1-ubyte"
    target.unlink()
    shutil.copy(Path(mnist_dir) / "MNIST/raw/t10k-images-idx3-ubyte", target)
    with pytest.raises(ValueError, match="magic number 0x00000803, expected 0x00000801"):
        MNISTDataModule(str(tmp_path), download=False).setup()


def test_idx_reader_round_trip(tmp_path):
    values = torch.arange(24, dtype=torch.uint8).view(2, 3, 4)
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + values.numpy().tobytes())
    assert torch.equal(read_idx(path, 3), values)
    with pytest.raises(ValueError, match="too short"):
        path.write_bytes(b"\x00\x00")
        read_idx(path, 3)
