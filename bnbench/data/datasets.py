"""``build_dataset(cfg)``: turn a dataset config into a ``DataSource`` that makes loaders.

Datasets (``cfg.name``):

* ``synthetic`` - the embedded shapes dataset (``bnbench.data.synthetic``), cached on disk;
  uses ``resolution``, ``num_train``, ``num_val``, ``num_classes``, ``seed`` and ``difficulty``
  (``standard`` or ``hard``; the only key no other dataset accepts at another value).
* ``cifar10`` / ``cifar100`` - torchvision's python-pickle layout under ``root`` (fetched when
  ``download``), held as uint8 tensors; pad-4 crop + flip, as in the papers.
* ``imagenet`` - ``root/train`` and ``root/val`` ImageFolder trees, decoded by DataLoader
  workers: RandomResizedCrop(``crop_size``) + flip for training, Resize(``resize_size``) +
  CenterCrop(``crop_size``) for evaluation.
* ``imagefolder`` - the same layout; with ``in_memory`` the whole tree is decoded once into
  uint8 tensors of ``crop_size`` (for small trees) and augmented like CIFAR, otherwise it is
  read like ``imagenet``.

``corruption`` and ``severity`` (every dataset): ImageNet-C's corruption of every image
(:mod:`bnbench.data.corruptions`; ``none``: clean), a fixed image per index of each split,
before augmentation and normalization.

``pad`` (crop padding of the tensor path) defaults per dataset: 2 for synthetic, 4 for CIFAR,
``crop_size // 8`` for in-memory folders. Dataset sizes other than the synthetic ones come from
the data, not from ``num_train``/``num_val``/``num_classes``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnbench.config import DatasetConfig
from bnbench.data import synthetic
from bnbench.data.corruptions import NONE as CLEAN
from bnbench.data.corruptions import Corruption, check_corruption
from bnbench.data.loaders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FolderLoader,
    Loader,
    TensorLoader,
    UnreadableImage,
    eval_transform,
    load_rgb,
)
from bnbench.data.patterns import ClassPairs
from bnbench.errors import BnbenchError

log = logging.getLogger("bnbench")

NAMES = ("synthetic", "cifar10", "cifar100", "imagenet", "imagefolder")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class TensorSplit:
    """A split held in memory: uint8 images [N,3,H,W] and int64 labels [N]; ``ids``: each
    image's index in the whole split (``None``: 0 … N−1; a subset keeps its images')."""

    images: Tensor
    labels: Tensor
    ids: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, indices: Tensor) -> TensorSplit:
        """The images at ``indices`` (int64, positions in this split), keeping their ids."""
        ids = torch.arange(len(self)) if self.ids is None else self.ids
        return TensorSplit(self.images[indices], self.labels[indices], ids[indices])


@dataclass(frozen=True)
class FolderSplit:
    """A split left on disk as (path, label) samples; ``ids`` as :class:`TensorSplit`'s."""

    samples: tuple[tuple[str, int], ...]
    ids: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Tensor) -> FolderSplit:
        """The samples at ``indices`` (positions in this split), keeping their ids."""
        ids = range(len(self)) if self.ids is None else self.ids
        return FolderSplit(tuple(self.samples[i] for i in indices.tolist()),
                           tuple(ids[i] for i in indices.tolist()))


Split = TensorSplit | FolderSplit


@dataclass(frozen=True, eq=False)
class DataSource:
    """A built dataset: its facts, and ``loader`` to iterate either split."""

    name: str
    num_classes: int
    image_size: int
    train: Split
    val: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0
    resize_size: int = 256
    workers: int = 4
    class_names: tuple[str, ...] = ()
    seed: int = 0  # the dataset's seed (of its images' corruption noise too)
    corruption: Corruption | None = None  # ImageNet-C's, of every image (None: clean)

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def val_size(self) -> int:
        return len(self.val)

    def labels(self, split: str) -> Tensor:
        """The labels of ``split`` ('train' or 'val'), int64 [N] on the CPU."""
        data = self.train if split == "train" else self.val
        if isinstance(data, TensorSplit):
            return data.labels.cpu()
        return torch.tensor([label for _, label in data.samples], dtype=torch.int64)

    def corrupted(self, name: str, severity: int) -> DataSource:
        """The same images under ImageNet-C's ``name`` at ``severity`` (``none``: clean)."""
        check_corruption("dataset", name, severity)
        corruption = None if name == CLEAN else Corruption(name, severity, self.seed)
        return replace(self, corruption=corruption)

    def subset(self, split: str, indices: Tensor) -> DataSource:
        """This dataset with ``split`` ('train' or 'val') reduced to the images at ``indices``
        (each corrupted as in the whole split)."""
        data = self.train if split == "train" else self.val
        return replace(self, **{split: data.subset(indices)})

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        augment: bool | None = None,
        shuffle: bool | None = None,
        drop_last: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        pattern: int | None = None,
    ) -> Loader:
        """A loader over ``split`` ('train' or 'val') for one rank of ``world_size``.

        ``augment``, ``shuffle`` and ``drop_last`` default to True for 'train' and False for
        'val'; ordering and sharding follow ``bnbench.data.loaders``. ``pattern``: batches in
        class-pairs groups of that many samples (:mod:`bnbench.data.patterns`), else in the
        order ``shuffle`` says.
        """
        if split not in ("train", "val"):
            raise BnbenchError(f"split={split!r}: must be 'train' or 'val'")
        train = split == "train"
        data = self.train if train else self.val
        common: dict[str, Any] = {
            "augment": train if augment is None else augment,
            "shuffle": train if shuffle is None else shuffle,
            "drop_last": train if drop_last is None else drop_last,
            "seed": seed,
            "rank": rank,
            "world_size": world_size,
            "device": device,
            "mean": self.mean,
            "std": self.std,
            "kind": "training" if train else "validation",
        }
        if pattern is not None:
            common["pattern"] = ClassPairs(self.labels(split), pattern, common["kind"])
        if self.corruption is not None:
            common["corrupt"] = replace(self.corruption, split=split)
            common["ids"] = data.ids
        if isinstance(data, TensorSplit):
            return TensorLoader(data.images, data.labels, batch_size, pad=self.pad, **common)
        return FolderLoader(
            data.samples,
            batch_size,
            crop=self.image_size,
            resize=self.resize_size,
            workers=self.workers,
            **common,
        )


# --- config ---------------------------------------------------------------------------------


def _read_config(cfg: object) -> DatasetConfig:
    """Copy the known keys out of a dataclass, DictConfig, mapping or namespace."""
    defaults = DatasetConfig()
    values: dict[str, Any] = {}
    for key in DatasetConfig.__dataclass_fields__:
        default = getattr(defaults, key)
        if isinstance(cfg, Mapping):
            values[key] = cfg.get(key, default)
        else:
            values[key] = getattr(cfg, key, default)
    return DatasetConfig(**values)


def _check_config(cfg: DatasetConfig) -> None:
    """Reject values no dataset can use, naming the key."""
    if cfg.name not in NAMES:
        raise BnbenchError(f"dataset.name={cfg.name!r}: unknown; choose one of {', '.join(NAMES)}")
    for key in ("resolution", "num_train", "num_val", "num_classes", "crop_size", "resize_size"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise BnbenchError(f"dataset.{key}={value!r}: must be a positive integer")
    if not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise BnbenchError(f"dataset.workers={cfg.workers!r}: must be a non-negative integer")
    if cfg.pad is not None and (not isinstance(cfg.pad, int) or cfg.pad < 0):
        raise BnbenchError(f"dataset.pad={cfg.pad!r}: must be a non-negative integer or null")
    if cfg.difficulty not in synthetic.DIFFICULTIES:
        raise BnbenchError(f"dataset.difficulty={cfg.difficulty!r}: choose one of "
                           f"{', '.join(synthetic.DIFFICULTIES)}")
    if cfg.name != "synthetic" and cfg.difficulty != synthetic.DEFAULT_DIFFICULTY:
        raise BnbenchError(f"dataset.difficulty={cfg.difficulty}: only the synthetic dataset has "
                           f"difficulties (dataset.name={cfg.name})")
    check_corruption("dataset", cfg.corruption, cfg.severity)


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.to(torch.float64).div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


# --- builders -------------------------------------------------------------------------------


def _build_synthetic(cfg: DatasetConfig) -> DataSource:
    data = synthetic.load_synthetic(
        cfg.num_train, cfg.num_val, cfg.resolution, cfg.num_classes, cfg.seed, cfg.difficulty
    )
    mean, std = _channel_stats(data.train_images)
    return DataSource(
        name="synthetic",
        num_classes=cfg.num_classes,
        image_size=cfg.resolution,
        train=TensorSplit(data.train_images, data.train_labels),
        val=TensorSplit(data.val_images, data.val_labels),
        mean=mean,
        std=std,
        pad=2 if cfg.pad is None else cfg.pad,
        class_names=data.class_names,
    )


def _require_root(cfg: DatasetConfig) -> Path:
    if not cfg.root:
        raise BnbenchError(f"dataset.root is not set: dataset.name={cfg.name} needs a folder")
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir() and not (cfg.download and cfg.name.startswith("cifar")):
        raise BnbenchError(f"dataset.root={cfg.root}: no such folder")
    return root


def _cifar_split(cls: type, cfg: DatasetConfig, root: Path, train: bool) -> TensorSplit:
    """One CIFAR split as uint8 [N,3,32,32] + int64 labels."""
    label = "CIFAR-10" if cls.__name__ == "CIFAR10" else "CIFAR-100"
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
        raise BnbenchError(
            f"dataset.root={cfg.root}: no intact {label} data ({cls.base_folder}/); "
            "set dataset.download=true to fetch it"
        ) from err
    except OSError as err:  # download failed
        raise BnbenchError(f"dataset.root={cfg.root}: could not download {label}: {err}") from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return TensorSplit(images, torch.tensor(ds.targets, dtype=torch.int64))


def _build_cifar(cfg: DatasetConfig) -> DataSource:
    # torchvision is imported where it is used: importing it costs about a second (it loads
    # torch._dynamo), which every process on the embedded dataset would pay for nothing.
    from torchvision.datasets import CIFAR10, CIFAR100

    root = _require_root(cfg)
    is10 = cfg.name == "cifar10"
    cls = CIFAR10 if is10 else CIFAR100
    train = _cifar_split(cls, cfg, root, True)
    val = _cifar_split(cls, cfg, root, False)
    return DataSource(
        name=cfg.name,
        num_classes=10 if is10 else 100,
        image_size=32,
        train=train,
        val=val,
        mean=CIFAR10_MEAN if is10 else CIFAR100_MEAN,
        std=CIFAR10_STD if is10 else CIFAR100_STD,
        pad=4 if cfg.pad is None else cfg.pad,
    )


def _class_folders(root: Path, split: str, shown: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise BnbenchError(f"dataset.root={shown}: no {split}/ folder")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise BnbenchError(f"dataset.root={shown}: {split}/ has no class folders")
    return classes


def _scan_tree(
    root: Path, shown: str
) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Class names and (path, label) samples of train/ and val/, with one class numbering."""
    classes = _class_folders(root, "train", shown)
    val_classes = _class_folders(root, "val", shown)
    if val_classes != classes:
        odd = sorted(set(classes) ^ set(val_classes))
        raise BnbenchError(
            f"dataset.root={shown}: train/ and val/ have different class folders: {odd[:5]}"
        )
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # (see _build_cifar)

    class_to_idx = {name: i for i, name in enumerate(classes)}
    splits = []
    for split in ("train", "val"):
        try:
            splits.append(make_dataset(str(root / split), class_to_idx, IMG_EXTENSIONS))
        except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
            raise BnbenchError(f"dataset.root={shown}: {split}/: {err}".splitlines()[0]) from err
    return classes, splits[0], splits[1]


def _decode_all(samples: list[tuple[str, int]], size: int, skip: bool) -> TensorSplit:
    """Decode every image to uint8 [3,size,size] (shorter side resized, centre crop)."""
    images, labels = [], []
    for path, label in _readable(samples, skip):
        images.append(eval_transform(load_rgb(path), size, size))
        labels.append(label)
    return TensorSplit(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def _readable(samples: list[tuple[str, int]], skip: bool) -> list[tuple[str, int]]:
    """``samples`` as they are (``skip`` off: an unreadable file fails where it is read, naming
    it), or, with ``dataset.skip_unreadable``, without the files PIL cannot decode (each is
    decoded once here), with one counted warning."""
    if not skip:
        return samples
    kept, bad = [], []
    for path, label in samples:
        try:
            load_rgb(path)
            kept.append((path, label))
        except UnreadableImage:
            bad.append(path)
    if bad:
        log.warning("dataset.skip_unreadable: skipped %d unreadable image(s) of %d (first: %s)",
                    len(bad), len(samples), bad[0])
    if not kept:
        raise BnbenchError(f"dataset: none of the {len(samples)} images can be decoded")
    return kept


def _build_folder(cfg: DatasetConfig) -> DataSource:
    root = _require_root(cfg)
    classes, train, val = _scan_tree(root, str(cfg.root))
    facts: dict[str, Any] = {
        "name": cfg.name,
        "num_classes": len(classes),
        "image_size": cfg.crop_size,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "resize_size": cfg.resize_size,
        "workers": cfg.workers,
        "class_names": tuple(classes),
    }
    if cfg.name == "imagefolder" and cfg.in_memory:
        pad = max(1, cfg.crop_size // 8) if cfg.pad is None else cfg.pad
        return DataSource(
            train=_decode_all(train, cfg.crop_size, cfg.skip_unreadable),
            val=_decode_all(val, cfg.crop_size, cfg.skip_unreadable),
            pad=pad,
            **facts,
        )
    train = _readable(train, cfg.skip_unreadable)
    val = _readable(val, cfg.skip_unreadable)
    return DataSource(train=FolderSplit(tuple(train)), val=FolderSplit(tuple(val)), **facts)


def build_dataset(cfg: object) -> DataSource:
    """Build the dataset named by ``cfg.name`` (see the module docstring for the keys)."""
    conf = _read_config(cfg)
    _check_config(conf)
    if conf.name == "synthetic":
        data = _build_synthetic(conf)
    elif conf.name in ("cifar10", "cifar100"):
        data = _build_cifar(conf)
    else:
        data = _build_folder(conf)
    return replace(data, seed=conf.seed).corrupted(conf.corruption, conf.severity)
