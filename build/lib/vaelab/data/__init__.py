"""LightningDataModules for image datasets."""

from vaelab.data.base import ImageDataModule, TensorBatches
from vaelab.data.mnist import MNISTDataModule
from vaelab.data.svhn import SVHNDataModule

__all__ = ["ImageDataModule", "MNISTDataModule", "SVHNDataModule", "TensorBatches"]
