"""MNIST from the original idx files: 50k train / 10k validation / 10k test."""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.data.base import Batch, ImageDataModule
from vaelab.data.idx import read_idx

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES = tuple(name for pair in FILES.values() for name in pair)


class MNISTDataModule(ImageDataModule):
    """MNIST in memory as uint8 tensors, read from ``<data_dir>/MNIST/raw`` (torchvision's layout).

    With ``binarize`` (default) pixels become Bernoulli draws with the grey level as
    probability, for the Bernoulli likelihood: resampled every training batch (dynamic
    binarization) and drawn once, seeded by ``split_seed``, for validation and test.
    """

    name = "mnist"
    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(self, data_dir: str, binarize: bool = True, **kwargs) -> None:
        super().__init__(data_dir, **kwargs)
        self.binarize = binarize

    @property
    def binary(self) -> bool:
        return self.binarize

    @property
    def raw_dir(self) -> Path:
        return Path(self.data_dir) / "MNIST" / "raw"

    def missing_files(self) -> list[str]:
        return [name for name in FILE_NAMES if not (self.raw_dir / name).is_file()]

    def fetch(self) -> None:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(self.data_dir, train=train, download=True)

    def missing_message(self, missing: list[str], reason: str) -> str:
        return (
            f"MNIST files missing in {self.raw_dir}: {', '.join(missing)} ({reason}). "
            "Put the four uncompressed files train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
            "there, point paths.data_dir (or the VAELAB_DATA_DIR variable) at a directory "
            "holding MNIST/raw/, or run once with network access to download them."
        )

    def load(self) -> dict[str, Batch]:
        self.prepare_data()
        data = {}
        for split, (image_file, label_file) in FILES.items():
            images = read_idx(self.raw_dir / image_file, ndim=3)
            labels = read_idx(self.raw_dir / label_file, ndim=1).long()
            if len(images) != len(labels) or images.shape[1:] != self.input_shape[1:]:
                raise ValueError(
                    f"{self.raw_dir}: {image_file} holds {tuple(images.shape)} images but "
                    f"{label_file} {len(labels)} labels; expected N x 28 x 28 images with N "
                    "labels. Replace the files with intact copies."
                )
            if labels.max() >= self.num_classes:
                raise ValueError(f"{self.raw_dir / label_file} holds labels outside 0-9: corrupt file.")
            data[split] = (images.unsqueeze(1), labels)
        return data

    def prepare_eval_images(self, images: torch.Tensor) -> torch.Tensor:
        if not self.binarize:
            return images
        generator = torch.Generator().manual_seed(self.split_seed)
        draws = torch.rand(images.shape, generator=generator) * 255 < images
        return draws.to(torch.uint8) * 255

    def preprocess(self, batch: Batch, train: bool) -> Batch:
        images, labels = super().preprocess(batch, train)
        if self.binarize and train:
            # pixel ~ Bernoulli(grey level) as u < grey level, u ~ U(0, 1): faster than torch.bernoulli on CPU
            # (benchmarks/data_path.py)
            images = (torch.rand_like(images) < images).to(images.dtype)
        return images, labels
