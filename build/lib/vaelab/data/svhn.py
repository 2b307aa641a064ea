"""SVHN from torchvision's ``.mat`` files: train (optionally + extra) / seeded validation / test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch

from vaelab.data.base import Batch, ImageDataModule

SPLITS = ("train", "test", "extra")


def read_svhn_mat(path: Path) -> Batch:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from an SVHN ``<split>_32x32.mat``
    (``X``: 32 x 32 x 3 x N, ``y``: N x 1 with 10 standing for the digit 0)."""
    fix = "Delete it and download it again (torchvision.datasets.SVHN, or http://ufldl.stanford.edu/housenumbers/)."
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as error:
        raise ValueError(f"{path} is not a readable .mat file ({type(error).__name__}: {error}). {fix}") from None
    missing = [name for name in ("X", "y") if name not in mat]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(repr(m) for m in missing)} variable: not an SVHN file. {fix}")
    images, labels = mat["X"], mat["y"].astype(np.int64).reshape(-1)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels):
        raise ValueError(
            f"{path} holds X of shape {images.shape} and {len(labels)} labels; expected X of shape "
            f"32 x 32 x 3 x N and N labels. {fix}"
        )
    if images.dtype != np.uint8 or labels.min(initial=1) < 1 or labels.max(initial=1) > 10:
        raise ValueError(f"{path} holds {images.dtype} pixels or labels outside 1-10: not an SVHN file. {fix}")
    labels[labels == 10] = 0
    return torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))), torch.from_numpy(labels)


class SVHNDataModule(ImageDataModule):
    """SVHN in memory as uint8 tensors, read from ``<data_dir>/SVHN/{train,test,extra}_32x32.mat``
    (torchvision's layout); ``use_extra`` adds the 531k extra images to the training split."""

    name = "svhn"
    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(self, data_dir: str, use_extra: bool = False, **kwargs) -> None:
        super().__init__(data_dir, **kwargs)
        self.use_extra = use_extra

    @property
    def root(self) -> Path:
        return Path(self.data_dir) / "SVHN"

    def _files(self) -> dict[str, Path]:
        splits = SPLITS if self.use_extra else SPLITS[:2]
        return {split: self.root / f"{split}_32x32.mat" for split in splits}

    def missing_files(self) -> list[str]:
        return [path.name for path in self._files().values() if not path.is_file()]

    def fetch(self) -> None:
        from torchvision.datasets import SVHN

        for split, path in self._files().items():
            if not path.is_file():
                SVHN(str(self.root), split=split, download=True)

    def missing_message(self, missing: list[str], reason: str) -> str:
        return (
            f"SVHN files missing in {self.root}: {', '.join(missing)} ({reason}). Put torchvision's "
            "SVHN files there (train_32x32.mat, test_32x32.mat and, with data.use_extra=true, "
            "extra_32x32.mat from http://ufldl.stanford.edu/housenumbers/), point "
            "paths.data_dir (or the VAELAB_DATA_DIR variable) at a directory holding SVHN/, "
            "or run once with network access to download them."
        )

    def load(self) -> dict[str, Batch]:
        self.prepare_data()
        data = {split: read_svhn_mat(path) for split, path in self._files().items()}
        if self.use_extra:
            extra = data.pop("extra")
            data["train"] = tuple(torch.cat(parts) for parts in zip(data["train"], extra))
        return data
