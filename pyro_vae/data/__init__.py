"""Datasets held as one tensor per split on the training device."""
from pyro_vae.data.images import ImageDataset, ImageSplit

__all__ = ["ImageDataset", "ImageSplit"]
