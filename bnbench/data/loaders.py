"""Batch loaders with one ordering and sharding rule, for in-memory tensors and image folders.

Ordering and sharding (shared by every loader, so that distributed runs are reproducible):

* at epoch ``e`` the sample order is ``torch.randperm(N, generator=g)`` with ``g`` seeded by
  ``seed * 1000003 + e`` (the identity when not shuffling); with a ``pattern``
  (:class:`bnbench.data.patterns.ClassPairs`, ``trainer.batch_pattern=class_pairs``) it is that
  pattern's order, drawn from the same ``g``, and ``N`` is its positions per epoch (whole
  groups);
* the global batch is ``G = batch_size * world_size``; step ``s`` of rank ``r`` takes epoch
  positions ``[s*G + r*b, s*G + (r+1)*b)`` (clipped to ``N``);
* augmentation parameters are drawn for every epoch position at once, from a generator seeded
  by ``(seed, epoch, "aug")``, and looked up by position.

Hence ``world_size`` ranks of ``b`` samples see exactly the samples of one process with
``world_size * b``, in the same order (rank 0's share first), augmented identically. With
``drop_last=False`` the last global batch may be short, so some ranks' shares may be short or
even empty; an empty batch is still yielded so that collective operations stay in step.

Loaders are re-iterable; call ``set_epoch`` before each epoch (as with DistributedSampler).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from bnbench.data.patterns import ClassPairs
from bnbench.errors import BnbenchError

Batch = tuple[Tensor, Tensor]
#: Changes uint8 images [B,3,H,W] given their indices in their split [B] (a domain shift:
#: :class:`bnbench.data.corruptions.Corruption`), before normalization.
Corrupt = Callable[[Tensor, Tensor], Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Loader(Protocol):
    """What training and evaluation loops need from any loader."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, stable across processes and Python runs."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class ShardPlan:
    """Which epoch positions each rank reads at each step (see the module docstring).

    ``num_samples`` is the epoch's positions: the split's size, or ``len(pattern)``.
    """

    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    shuffle: bool = False
    drop_last: bool = False
    seed: int = 0
    kind: str = "training"  # names the images in the too-small error
    pattern: ClassPairs | None = None  # the epoch order of patterned batches (always drawn)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise BnbenchError(f"batch_size={self.batch_size}: must be positive")
        if self.world_size <= 0:
            raise BnbenchError(f"world_size={self.world_size}: must be positive")
        if not 0 <= self.rank < self.world_size:
            raise BnbenchError(f"rank={self.rank}: must be in [0, world_size={self.world_size})")
        if self.drop_last and self.global_batch > self.num_samples:
            raise BnbenchError(
                f"dataset has {self.num_samples} {self.kind} images, fewer than one global batch "
                f"of {self.global_batch} (batch_size={self.batch_size} x "
                f"world_size={self.world_size})"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        if self.drop_last:
            return self.num_samples // self.global_batch
        return math.ceil(self.num_samples / self.global_batch)

    def permutation(self, epoch: int) -> Tensor:
        """Sample index at each epoch position (int64 [N], CPU)."""
        if not self.shuffle and self.pattern is None:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        if self.pattern is not None:
            return self.pattern.order(gen)
        return torch.randperm(self.num_samples, generator=gen)

    def positions(self, step: int) -> range:
        """Epoch positions read by this rank at ``step``; possibly empty on the last step."""
        start = step * self.global_batch + self.rank * self.batch_size
        stop = min(start + self.batch_size, self.num_samples)
        start = min(start, self.num_samples)
        return range(start, stop)

    def aug_generator(self, epoch: int) -> torch.Generator:
        """The generator of this epoch's augmentation draws; identical on every rank."""
        return torch.Generator().manual_seed(derive_seed(self.seed, epoch, "aug"))


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [B,3,H,W] -> float32 ((x / 255) - mean) / std; mean/std shaped [1,3,1,1]."""
    return images.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, pad: int) -> Tensor:
    """Batched random crop with zero padding, then horizontal flip, in one gather.

    ``offsets`` [B,2] (row, col) index the top-left corner of each crop in the padded image
    (values in ``[0, 2*pad]``); ``flips`` [B] bool flips the cropped sample left-right.
    Equals, per sample, ``flip?(F.pad(x, (pad,)*4)[:, dy:dy+H, dx:dx+W])``.
    """
    b, c, h, w = images.shape
    if b == 0:
        return images
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    hp, wp = h + 2 * pad, w + 2 * pad
    dev = images.device
    rows = offsets[:, 0:1] + torch.arange(h, device=dev)  # [B,H]
    cols_fwd = torch.arange(w, device=dev).expand(b, w)
    cols = offsets[:, 1:2] + torch.where(flips[:, None], cols_fwd.flip(1), cols_fwd)  # [B,W]
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    out = padded.reshape(b, c, hp * wp).gather(2, flat)
    return out.view(b, c, h, w)


def _stats(values: Sequence[float], device: torch.device) -> Tensor:
    return torch.tensor(list(values), dtype=torch.float32, device=device).view(1, -1, 1, 1)


class TensorLoader:
    """Batches from uint8 tensors held on ``device``, augmented and normalized there.

    Augmentation (when ``augment``): zero-pad ``pad`` px and random-crop back to the input
    size, then random horizontal flip; all batched, no per-sample Python. ``corrupt`` changes
    each image first, given its index in the split (``ids``: the indices of ``images``, default
    0 … N−1, so that a subset of a split is corrupted as the whole split is).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        pad: int = 0,
        flip: bool = True,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        kind: str = "training",
        pattern: ClassPairs | None = None,
        corrupt: Corrupt | None = None,
        ids: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {images.shape}")
        if pad < 0:
            raise BnbenchError(f"dataset.pad={pad}: must be non-negative")
        positions = images.shape[0] if pattern is None else len(pattern)
        self.plan = ShardPlan(
            positions, batch_size, rank, world_size, shuffle, drop_last, seed, kind, pattern
        )
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.mean, self.std = _stats(mean, self.device), _stats(std, self.device)
        self.augment, self.pad, self.flip = augment, pad, flip
        self.corrupt = corrupt
        self.ids = (torch.arange(images.shape[0]) if ids is None else ids).to(self.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.plan)

    def _aug_params(self) -> tuple[Tensor, Tensor]:
        """Crop offsets [N,2] and flips [N] for every epoch position, on the device."""
        gen = self.plan.aug_generator(self.epoch)
        n = self.plan.num_samples
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        if not self.flip:
            flips = torch.zeros_like(flips)
        return offsets.to(self.device), flips.to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        perm = self.plan.permutation(self.epoch).to(self.device)
        offsets, flips = self._aug_params() if self.augment else (None, None)
        for step in range(len(self.plan)):
            pos = self.plan.positions(step)
            sl = slice(pos.start, pos.stop)
            idx = perm[sl]
            x = self.images.index_select(0, idx)
            if self.corrupt is not None:
                x = self.corrupt(x, self.ids.index_select(0, idx))
            if offsets is not None and flips is not None:
                x = crop_flip(x, offsets[sl], flips[sl], self.pad)
            yield normalize(x, self.mean, self.std), self.labels.index_select(0, idx)


# --- image folders through torch.utils.data.DataLoader ------------------------------------


def random_resized_crop_params(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) with torchvision's RandomResizedCrop distribution, from ``rng``.

    torchvision draws from the global torch RNG; a local generator keeps each sample's crop a
    function of its epoch position, as the sharding rule needs.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback: the central crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class UnreadableImage(BnbenchError):
    """An image file that PIL cannot decode (``dataset.skip_unreadable=true`` drops them)."""


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB (decoding it fully, so the file can be closed)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"image {path} cannot be decoded ({type(err).__name__}); "
                              "dataset.skip_unreadable=true skips unreadable files") from None


def eval_transform(img: Image.Image, resize: int, crop: int) -> Tensor:
    """Resize the shorter side to ``resize``, centre-crop ``crop``: uint8 [3,crop,crop]."""
    import torchvision.transforms.functional as TF  # (ImageFolder only: see datasets.py)

    img = TF.center_crop(TF.resize(img, [resize], antialias=True), [crop, crop])
    return TF.pil_to_tensor(img)


def train_transform(img: Image.Image, crop: int, aug_seed: int) -> Tensor:
    """RandomResizedCrop(crop) + RandomHorizontalFlip, seeded per sample: uint8 [3,crop,crop]."""
    import torchvision.transforms.functional as TF  # (ImageFolder only: see datasets.py)

    rng = random.Random(aug_seed)
    top, left, h, w = random_resized_crop_params(img.width, img.height, rng)
    img = TF.resized_crop(img, top, left, h, w, [crop, crop], antialias=True)
    if rng.random() < 0.5:
        img = TF.hflip(img)
    return TF.pil_to_tensor(img)


class FolderDataset(Dataset[tuple[Tensor, int]]):
    """(path, label) samples decoded to uint8; items are addressed by (index, aug_seed).
    ``corrupt`` changes each decoded image (after its crop: ImageNet-C corrupts the centre
    crop), given its index in the split (``ids``: the samples' indices, default 0 … N−1)."""

    def __init__(
        self, samples: Sequence[tuple[str, int]], *, augment: bool, crop: int, resize: int,
        corrupt: Corrupt | None = None, ids: Sequence[int] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.augment, self.crop, self.resize = augment, crop, resize
        self.corrupt = corrupt
        self.ids = list(range(len(self.samples)) if ids is None else ids)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int]:  # type: ignore[override]
        index, aug_seed = item
        path, label = self.samples[index]
        img = load_rgb(path)
        if self.augment:
            image = train_transform(img, self.crop, aug_seed)
        else:
            image = eval_transform(img, self.resize, self.crop)
        if self.corrupt is not None:
            image = self.corrupt(image[None], torch.tensor([self.ids[index]]))[0]
        return image, label


class ShardBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's ``(index, aug_seed)`` lists per step, following ``ShardPlan``."""

    def __init__(self, plan: ShardPlan) -> None:
        self.plan = plan
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.plan.permutation(self.epoch).tolist()
        gen = self.plan.aug_generator(self.epoch)
        seeds = torch.randint(0, 2**62, (self.plan.num_samples,), generator=gen).tolist()
        for step in range(len(self.plan)):
            yield [(perm[p], seeds[p]) for p in self.plan.positions(step)]


@dataclass(frozen=True)
class StackCollate:
    """Stacks (uint8 image, label) pairs; an empty share becomes an empty batch."""

    crop: int

    def __call__(self, items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        if not items:
            empty = torch.empty(0, 3, self.crop, self.crop, dtype=torch.uint8)
            return empty, torch.empty(0, dtype=torch.int64)
        images = torch.stack([img for img, _ in items])
        return images, torch.tensor([label for _, label in items], dtype=torch.int64)


class FolderLoader:
    """Batches decoded from image files by DataLoader workers, normalized on ``device``.

    For datasets too big for memory (ImageNet). Augmentation: RandomResizedCrop(crop) +
    horizontal flip; otherwise Resize(resize) + CenterCrop(crop). Same ordering, sharding and
    interface as ``TensorLoader``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        batch_size: int,
        *,
        crop: int = 224,
        resize: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        workers: int = 4,
        kind: str = "training",
        pattern: ClassPairs | None = None,
        corrupt: Corrupt | None = None,
        ids: Sequence[int] | None = None,
    ) -> None:
        if workers < 0:
            raise BnbenchError(f"dataset.workers={workers}: must be non-negative")
        positions = len(samples) if pattern is None else len(pattern)
        self.plan = ShardPlan(
            positions, batch_size, rank, world_size, shuffle, drop_last, seed, kind, pattern
        )
        self.device = torch.device(device)
        self.mean, self.std = _stats(mean, self.device), _stats(std, self.device)
        self.sampler = ShardBatchSampler(self.plan)
        dataset = FolderDataset(samples, augment=augment, crop=crop, resize=resize,
                                corrupt=corrupt, ids=ids)
        self._loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=StackCollate(crop),
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[Batch]:
        try:
            for images, labels in self._loader:
                x = images.to(self.device, non_blocking=True)
                yield normalize(x, self.mean, self.std), labels.to(self.device, non_blocking=True)
        except UnreadableImage as err:
            # From a worker, DataLoader re-raises it with the worker's traceback in the
            # message: keep its own last line (one line names the file).
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise UnreadableImage(lines[-1].split("UnreadableImage: ", 1)[-1]) from None
