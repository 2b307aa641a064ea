"""An independent classifier of real images that scores class-conditional samples: the share of
``sample(n, y=c)`` it assigns to class c. Trained once per dataset on the real training images
(grey levels or colour, never binarized, since samples are the mean images of p(x|z,y); each
training image shifted by up to ``SHIFT`` pixels, the learning rate annealed to 0) and cached
as ``<classifier_dir>/<dataset>-<key>.pt``, the key naming everything that built it; a cached one
whose test accuracy is under a floor is built again. (Re)build it with

    python -m vaelab.classifier data=mnist          # or data=svhn; epochs=..., paths.data_dir=...
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.classification import MulticlassAccuracy

from vaelab.nets import Encoder
from vaelab.objectives import random_shift
from vaelab.utils import CONFIG_DIR, checkpoints
from vaelab.utils.run import atomic_write

log = logging.getLogger(__name__)

NET = {"type": "conv", "channels": [32, 64], "hidden": [128], "activation": "relu"}
LR = 1e-3  # Adam's first learning rate, annealed to 0 by a cosine over the training steps
SHIFT = 2  # training images are translated by up to this many pixels (a fresh offset each time)


class ImageClassifier(pl.LightningModule):
    """A small CNN p(y|x) (``NET``) trained by cross-entropy with Adam on randomly shifted images."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, lr: float = LR) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = Encoder(NET, input_shape, num_classes)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(random_shift(x, SHIFT)), y)
        self.log("classifier/loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("classifier/test_acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def real_image_data(data_cfg: DictConfig) -> pl.LightningDataModule:
    """The datamodule of ``data_cfg`` with every label and, for MNIST, grey levels."""
    overrides = {"labeled": None}
    if "binarize" in data_cfg:
        overrides["binarize"] = False
    return hydra.utils.instantiate(data_cfg, **overrides)


def build_classifier(
    datamodule: pl.LightningDataModule, path: Path, epochs: int = 10, limit_train_batches: int | float | None = None
) -> tuple[ImageClassifier, float]:
    """Train the classifier on ``datamodule``'s training split, test it, save it to ``path``;
    return it with its test accuracy on real images."""
    datamodule.setup()
    model = ImageClassifier(datamodule.input_shape, datamodule.num_classes)
    trainer = pl.Trainer(
        max_epochs=epochs, limit_train_batches=limit_train_batches, logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    log.info("Training the sample-quality classifier for %s (%d epochs) -> %s", datamodule.name, epochs, path)
    trainer.fit(model, datamodule=datamodule)
    accuracy = trainer.test(model, datamodule=datamodule, verbose=False)[0]["classifier/test_acc"]
    with atomic_write(path, "wb") as file:
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "test_acc": accuracy,
                    "recipe": recipe(datamodule, epochs)}, file)
    log.info("Classifier test accuracy on real %s images: %.2f %%", datamodule.name, 100 * accuracy)
    return model.eval(), accuracy


def recipe(datamodule: pl.LightningDataModule, epochs: int) -> dict:
    """Everything that builds the classifier: the data and its split, the network, the training."""
    return {"data": datamodule.name, "input_shape": list(datamodule.input_shape), "num_classes": datamodule.num_classes,
            "val_size": getattr(datamodule, "val_size", None), "split_seed": getattr(datamodule, "split_seed", None),
            "net": NET, "lr": LR, "shift": SHIFT, "schedule": "cosine", "epochs": epochs}


def classifier_file(directory: str | Path, datamodule: pl.LightningDataModule, epochs: int) -> Path:
    """Where the classifier of this ``recipe`` is cached in ``directory``: ``<dataset>-<key>.pt``."""
    key = hashlib.sha256(json.dumps(recipe(datamodule, epochs), sort_keys=True).encode()).hexdigest()[:12]
    return Path(directory) / f"{datamodule.name}-{key}.pt"


def load_classifier(path: Path, datamodule: pl.LightningDataModule, epochs: int = 10, min_acc: float = 0.0) -> tuple[ImageClassifier, float]:
    """The classifier cached at ``path`` and its test accuracy on real images; built (again)
    from ``datamodule`` when the file is missing or its accuracy is under ``min_acc``. A judge
    that stays under ``min_acc`` is refused: its scores would say nothing about the samples."""
    saved = checkpoints.read(path, "the cached classifier") if path.is_file() else None
    if saved is not None and float(saved["test_acc"]) >= min_acc:
        model = ImageClassifier(**saved["hyper_parameters"])
        model.load_state_dict(saved["state_dict"])
        return model.eval(), float(saved["test_acc"])
    if saved is not None:
        log.warning("The cached classifier %s reaches %.2f %% < %.2f %% on real test images: building it again.",
                    path, 100 * float(saved["test_acc"]), 100 * min_acc)
    model, accuracy = build_classifier(datamodule, path, epochs)
    if accuracy < min_acc:
        raise ValueError(
            f"The sample-quality classifier ({path}) reaches {100 * accuracy:.2f} % on real test images, under "
            f"eval.classifier_min_acc={min_acc:g}: its scores would say nothing. Train it longer (eval.classifier_epochs, now {epochs})."
        )
    return model, accuracy


@torch.no_grad()
def sample_accuracy(generator, classifier: ImageClassifier, per_class: int, batch: int = 500) -> torch.Tensor:
    """Per class c, the share of ``generator.sample(n, y=c)`` that ``classifier`` assigns to c."""
    classifier = classifier.to(generator.device)
    shares = []
    for c in range(generator.num_classes):
        hits = 0
        for start in range(0, per_class, batch):
            n = min(batch, per_class - start)
            hits += int((classifier(generator.sample(n, y=c)).argmax(-1) == c).sum())
        shares.append(hits / per_class)
    return torch.tensor(shares)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="classifier")
def main(cfg: DictConfig) -> float:
    datamodule = real_image_data(cfg.data)
    return build_classifier(datamodule, classifier_file(cfg.classifier_dir, datamodule, cfg.epochs), cfg.epochs)[1]


if __name__ == "__main__":
    main()
