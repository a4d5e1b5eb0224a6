"""Datasets and batch loaders: the embedded synthetic shapes, CIFAR, ImageNet/ImageFolder.

``build_dataset(cfg)`` returns a ``DataSource``; ``DataSource.loader(split, batch_size, ...)``
returns a loader yielding normalized float32 images and int64 labels on a device, ordered and
sharded so that N ranks of batch b reproduce one process of batch N*b exactly.
"""

from bnbench.data.datasets import DatasetConfig, DataSource, FolderSplit, TensorSplit, build_dataset
from bnbench.data.loaders import FolderLoader, Loader, ShardPlan, TensorLoader, crop_flip
from bnbench.data.synthetic import SyntheticData, generate, load_synthetic

__all__ = [
    "DataSource",
    "DatasetConfig",
    "FolderLoader",
    "FolderSplit",
    "Loader",
    "ShardPlan",
    "SyntheticData",
    "TensorLoader",
    "TensorSplit",
    "build_dataset",
    "crop_flip",
    "generate",
    "load_synthetic",
]
