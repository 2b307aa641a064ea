"""LightningDataModules for image datasets."""

from vaelab.data.base import ImageDataModule, TensorBatches
from vaelab.data.mnist import MNISTDataModule

__all__ = ["ImageDataModule", "MNISTDataModule", "TensorBatches"]
