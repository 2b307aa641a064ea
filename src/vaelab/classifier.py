"""An independent classifier of real images that scores class-conditional samples: the share of
``sample(n, y=c)`` it assigns to class c. Trained once per dataset on the real training images
(grey levels or colour, never binarized, since samples are the mean images of p(x|z,y)) and cached
as ``<classifier_dir>/<dataset>.pt``. (Re)build it with

    python -m vaelab.classifier data=mnist          # or data=svhn; epochs=..., paths.data_dir=...
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.classification import MulticlassAccuracy

from vaelab.nets import Encoder
from vaelab.utils import checkpoints
from vaelab.utils.run import atomic_write
from vaelab.utils import CONFIG_DIR

log = logging.getLogger(__name__)

NET = {"type": "conv", "channels": [32, 64], "hidden": [128], "activation": "relu"}


class ImageClassifier(pl.LightningModule):
    """A small CNN p(y|x) (``NET``) trained by cross-entropy with Adam."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = Encoder(NET, input_shape, num_classes)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("classifier/loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("classifier/test_acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def real_image_data(data_cfg: DictConfig) -> pl.LightningDataModule:
    """The datamodule of ``data_cfg`` with every label and, for MNIST, grey levels."""
    overrides = {"labeled": None}
    if "binarize" in data_cfg:
        overrides["binarize"] = False
    return hydra.utils.instantiate(data_cfg, **overrides)


def build_classifier(
    datamodule: pl.LightningDataModule, path: Path, epochs: int = 3, limit_train_batches: int | float | None = None
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
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "test_acc": accuracy}, file)
    log.info("Classifier test accuracy on real %s images: %.2f %%", datamodule.name, 100 * accuracy)
    return model.eval(), accuracy


def load_classifier(path: Path, datamodule: pl.LightningDataModule, epochs: int = 3) -> tuple[ImageClassifier, float]:
    """The classifier cached at ``path`` and its test accuracy on real images; built first from
    ``datamodule`` when the file is missing."""
    if not path.is_file():
        return build_classifier(datamodule, path, epochs)
    saved = checkpoints.read(path, "the cached classifier")
    model = ImageClassifier(**saved["hyper_parameters"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), float(saved["test_acc"])


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
    return build_classifier(datamodule, Path(cfg.classifier_dir) / f"{datamodule.name}.pt", cfg.epochs)[1]


if __name__ == "__main__":
    main()
