"""Shared machinery of the image datamodules: in-memory uint8 tensors (optionally resident on
the model's device), a seeded validation split and loaders that fetch whole batches by index
(no per-item Python work)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader, rank_zero_only
from torch.utils.data import DataLoader, Dataset

from vaelab.data.split import balanced_split, parse_labeled

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorBatches(Dataset):
    """Images and labels held as tensors. ``__getitems__`` lets the DataLoader fetch a
    whole batch with one indexing operation instead of one call per example."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Batch:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        index, device = torch.as_tensor(indices), self.labels.device
        if device.type == "cuda":  # from pinned memory the copy is queued: the host never waits for the GPU
            index = index.pin_memory().to(device, non_blocking=True)
        elif index.device != device:
            index = index.to(device)
        return self.images.index_select(0, index), self.labels.index_select(0, index)

    def to(self, device: torch.device) -> None:
        """Move the images and labels to ``device`` (no copy when they are there already)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)


def _keep_batch(batch: Batch) -> Batch:
    """Collate function for batches that ``__getitems__`` has already assembled."""
    return batch


class ImageDataModule(pl.LightningDataModule):
    """Base class: subclasses set ``num_classes`` and ``input_shape`` and implement
    ``load()`` (and ``prepare_data()`` where the data can be fetched).

    With ``labeled=N`` the training split is divided into N labeled examples (balanced over
    the classes, drawn by ``split_seed``) and unlabeled ones whose labels are replaced by -1;
    training batches are then ``{"labeled": (x, y), "unlabeled": (x, -1)}``: an epoch is one
    pass over the unlabeled set while the labeled set cycles, so every step sees labels.

    With ``on_device=True`` every split is copied once to the device the trainer puts the
    model on (each process's own GPU under DDP), so batches are gathered there and nothing
    crosses the bus per step; preprocessing (binarization) always runs where the batch is.
    """

    name: str  # the dataset's short name (file names of what is cached for it)
    num_classes: int
    input_shape: tuple[int, ...]
    binary = False  # pixels reach the model as {0, 1} (else as 8-bit levels k / 255)

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_size: int = 10_000,
        split_seed: int = 0,
        labeled: int | str | None = None,
        labeled_batch_size: int = 100,
        download: bool = True,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(f"{name} has {self.num_classes} classes, not num_classes={num_classes}.")
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise ValueError(
                f"{name} images have shape {list(self.input_shape)}, not input_shape={list(input_shape)}."
            )
        if min(batch_size, eval_batch_size, labeled_batch_size) <= 0:
            raise ValueError(
                f"Batch sizes must be positive, got batch_size={batch_size}, "
                f"eval_batch_size={eval_batch_size}, labeled_batch_size={labeled_batch_size}."
            )
        if on_device and (num_workers > 0 or pin_memory):
            raise ValueError(
                f"data.on_device=true keeps the dataset on the model's device, where loader workers and "
                f"pinned memory cannot reach it (got num_workers={num_workers}, pin_memory={pin_memory}); "
                "set data.num_workers=0 and data.pin_memory=false, or data.on_device=false."
            )
        self.on_device = on_device
        self.labeled = parse_labeled(labeled, self.num_classes)
        self.labeled_batch_size = labeled_batch_size
        if self.labeled is not None and labeled_batch_size > self.labeled:
            log.info("data.labeled_batch_size=%d is more than the %d labeled examples: every labeled batch holds all %d.",
                     labeled_batch_size, self.labeled, self.labeled)
        self.data_dir = data_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.val_size, self.split_seed = val_size, split_seed
        self.download = download
        self.train_set: TensorBatches | None = None
        self.labeled_set: TensorBatches | None = None
        self.unlabeled_set: TensorBatches | None = None
        self.val_set: TensorBatches | None = None
        self.test_set: TensorBatches | None = None

    # -- what each dataset defines -------------------------------------------------------
    def missing_files(self) -> list[str]:
        """Names of the dataset's files that are not on disk."""
        raise NotImplementedError

    def fetch(self) -> None:
        """Download the dataset's files (torchvision's downloaders)."""
        raise NotImplementedError

    def missing_message(self, missing: list[str], reason: str) -> str:
        """The error for files still missing: where they belong and how to get them."""
        raise NotImplementedError

    def load(self) -> dict[str, Batch]:
        """Return ``{"train": (images, labels), "test": (images, labels)}``: uint8 images of
        shape (N, *input_shape) and int64 labels in [0, num_classes)."""
        raise NotImplementedError

    def preprocess(self, batch: Batch, train: bool) -> Batch:
        """Turn a uint8 batch into the model's input; ``train`` selects training-time noise."""
        images, labels = batch
        return images.float().div_(255), labels

    def prepare_eval_images(self, images: torch.Tensor) -> torch.Tensor:
        """Fix any randomness of evaluation inputs once (e.g. a fixed binarization)."""
        return images

    # -- Lightning hooks -------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download missing files when allowed; one clear error when they stay missing."""
        if not self.missing_files():
            return
        reason = "downloading is switched off (data.download=false)"
        if self.download:
            try:
                self.fetch()
            except Exception as error:  # offline: URLError, OSError, RuntimeError
                reason = f"downloading them failed ({type(error).__name__}: {error})"
        missing = self.missing_files()
        if missing:
            raise FileNotFoundError(self.missing_message(missing, reason))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._split(self.load())
        if self.on_device and self.trainer is not None:
            for dataset in self._datasets():
                dataset.to(self.trainer.strategy.root_device)

    @property
    def train_size(self) -> int:
        """N, the number of training examples (labeled and unlabeled), loading the data if needed."""
        self.setup()
        return len(self.train_set)

    def _datasets(self) -> list[TensorBatches]:
        """The splits the loaders read (with labels split off, their two parts replace the training set)."""
        parts = ("labeled_set", "unlabeled_set") if self.labeled is not None else ("train_set",)
        return [getattr(self, name) for name in (*parts, "val_set", "test_set")]

    def _split(self, data: dict[str, Batch]) -> None:
        """Validation split, labeled split and the evaluation sets from the loaded data."""
        images, labels = data["train"]
        if not 0 <= self.val_size < len(labels):
            raise ValueError(
                f"val_size={self.val_size} must lie in [0, {len(labels)}) for {len(labels)} "
                "training examples."
            )
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        val, train = order[: self.val_size], order[self.val_size :]
        self.train_set = TensorBatches(images[train], labels[train])
        if self.labeled is not None:
            lab, unlab = balanced_split(self.train_set.labels, self.labeled, self.num_classes, self.split_seed)
            # before the trainer exists (train.py reads N from the data), the launcher's environment tells the rank
            rank = self.trainer.global_rank if self.trainer is not None else rank_zero_only.rank
            fingerprint = hashlib.sha1(lab.numpy().tobytes()).hexdigest()[:12]
            log.info("Rank %d: %d labeled examples (data.split_seed=%d), indices %s", rank, len(lab), self.split_seed, fingerprint)
            self.labeled_set = TensorBatches(*self.train_set.__getitems__(lab))
            self.unlabeled_set = TensorBatches(self.train_set.images[unlab], torch.full((len(unlab),), -1))
        self.val_set = TensorBatches(self.prepare_eval_images(images[val]), labels[val])
        self.test_set = TensorBatches(self.prepare_eval_images(data["test"][0]), data["test"][1])

    def on_after_batch_transfer(self, batch: Batch | dict[str, Batch], dataloader_idx: int):
        return self.preprocess_batch(batch, train=self.trainer is not None and self.trainer.training)

    def preprocess_batch(self, batch: Batch | dict[str, Batch], train: bool) -> Batch | dict[str, Batch]:
        """``preprocess`` a loader's batch: a plain one, or each part of a labeled/unlabeled one."""
        if isinstance(batch, dict):
            return {part: self.preprocess(value, train=train) for part, value in batch.items()}
        return self.preprocess(batch, train=train)

    def _loader(self, dataset: TensorBatches | None, batch_size: int, shuffle: bool, drop_last: bool | None = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"Call {type(self).__name__}.setup() before asking for data loaders.")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle if drop_last is None else drop_last,
            collate_fn=_keep_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        if self.labeled is None:
            return self._loader(self.train_set, self.batch_size, shuffle=True)
        # the labeled set keeps its last, smaller batch: under DDP each process holds only its
        # share of the labels, which may be fewer than labeled_batch_size
        loaders = {
            "labeled": self._loader(self.labeled_set, min(self.labeled_batch_size, self.labeled), shuffle=True, drop_last=False),
            "unlabeled": self._loader(self.unlabeled_set, self.batch_size, shuffle=True),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def train_inputs(self) -> torch.Tensor:
        """Every training image (labeled and unlabeled) as a model input, prepared as evaluation
        inputs are (no training-time noise)."""
        self.prepare_data()
        self.setup("fit")
        images, labels = self.train_set.images, self.train_set.labels
        return self.preprocess((self.prepare_eval_images(images), labels), train=False)[0]

    def example_batch(self, n: int, split: str = "test") -> Batch:
        """The first ``n`` examples of a split, preprocessed as for evaluation (used for
        reconstruction grids, so the same images are shown every epoch)."""
        self.setup()
        dataset: TensorBatches = getattr(self, f"{split}_set")
        return self.preprocess(dataset.__getitems__(range(min(n, len(dataset)))), train=False)
