"""ImageNet-C's corruptions (Hendrycks & Dietterich, ICLR 2019) for the domain shift of
Rethinking §5.1 (Table 4): contrast, gaussian noise and JPEG compression, severities 1–5.

The definitions and constants are ImageNet-C's (``make_imagenet_c.py``; the same in the
``imagecorruptions`` package, which is not a dependency: it pulls in OpenCV, scikit-image and
SciPy for these three formulas and refuses images under 32 px). On an image ``x`` with values in
[0, 1] (C × H × W), severity ``s`` picks a constant ``c``:

* ``contrast``: ``clip((x − m)·c + m, 0, 1)``, ``m`` the mean of each channel over the image's
  pixels; ``c`` = 0.4, 0.3, 0.2, 0.1, 0.05;
* ``gaussian_noise``: ``clip(x + c·z, 0, 1)``, ``z`` ~ N(0, 1) independently per value;
  ``c`` = 0.08, 0.12, 0.18, 0.26, 0.38;
* ``jpeg_compression``: the 8-bit image encoded by PIL's JPEG encoder at quality ``c`` and
  decoded; ``c`` = 25, 18, 15, 10, 7.

Severity 3 is the "medium severity" of the paper. A corrupted image is stored in 8 bits, as
ImageNet-C's are: ``floor(255·y)`` (numpy's ``uint8`` cast of ImageNet-C's ``y·255``), computed in
float64 as ImageNet-C computes it. Where ``255·y`` is an integer (contrast's values are rational,
so a few pixels in a thousand are), the truncation follows the last bit of the channel mean's
float sum, and may differ by one level from numpy's. ImageNet-C then wrote its files as JPEG at
quality 85; that storage step is not part of the corruption and is left out.

A corrupted dataset is a fixed set of images, as ImageNet-C's files are: the noise of an image is
drawn from a generator seeded by the dataset's seed, the split and the image's index in the split
(:class:`Corruption`), so every evaluation of a domain sees the same images, in any order, in any
subset. The loaders corrupt an image before any augmentation (``bnbench.data.loaders``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bnbench.data.loaders import derive_seed
from bnbench.errors import BnbenchError

#: ``dataset.corruption`` of clean images.
NONE = "none"
#: ImageNet-C's constant of each corruption at severities 1–5 (``make_imagenet_c.py``).
CONSTANTS: dict[str, tuple[float, ...]] = {
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "jpeg_compression": (25, 18, 15, 10, 7),
}
CORRUPTIONS = tuple(CONSTANTS)
SEVERITIES = (1, 2, 3, 4, 5)


def check_corruption(prefix: str, name: str | None, severity: int | None) -> None:
    """``<prefix>.corruption`` is ``none`` or one of :data:`CORRUPTIONS` and
    ``<prefix>.severity`` one of ImageNet-C's (``None``: not given); else one line naming the
    key."""
    if name is not None and name != NONE and name not in CONSTANTS:
        raise BnbenchError(f"{prefix}.corruption={name}: unknown; choose one of "
                           f"{', '.join((NONE, *CORRUPTIONS))} (ImageNet-C's)")
    if severity is not None and (isinstance(severity, bool) or severity not in SEVERITIES):
        raise BnbenchError(f"{prefix}.severity={severity}: must be one of ImageNet-C's "
                           f"severities {SEVERITIES[0]}–{SEVERITIES[-1]}")


def constant(name: str, severity: int) -> float:
    """ImageNet-C's constant ``c`` of ``name`` at ``severity``."""
    return CONSTANTS[name][severity - 1]


def contrast(x: Tensor, c: float) -> Tensor:
    """``clip((x − m)·c + m, 0, 1)`` with ``m`` each channel's mean over its pixels; ``x``
    [..., C, H, W] in [0, 1]."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return ((x - mean) * c + mean).clamp(0.0, 1.0)


def gaussian_noise(x: Tensor, c: float, z: Tensor) -> Tensor:
    """``clip(x + c·z, 0, 1)``; ``z`` standard normal draws shaped like ``x``."""
    return (x + c * z).clamp(0.0, 1.0)


def jpeg_compression(images: Tensor, quality: int) -> Tensor:
    """Each uint8 image of [B, 3, H, W] through PIL's JPEG encoder at ``quality`` and back."""
    out = torch.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=int(quality))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i] = torch.from_numpy(np.array(decoded.convert("RGB"))).permute(2, 0, 1)
    return out


def to_uint8(x: Tensor) -> Tensor:
    """Values in [0, 1] stored as ImageNet-C stores them: ``floor(255·x)``."""
    return (x * 255.0).floor_().to(torch.uint8)


@dataclass(frozen=True)
class Corruption:
    """ImageNet-C's ``name`` at ``severity`` on the images of one split of one dataset: the
    noise of the image with index ``i`` in ``split`` is drawn from a generator seeded by
    ``(seed, split, i)`` (``seed``: the dataset's), so the corrupted split is a fixed set of
    images."""

    name: str
    severity: int
    seed: int = 0
    split: str = "train"

    def __post_init__(self) -> None:
        # (the options that name one are checked with their keys: check_corruption)
        if self.name not in CONSTANTS or self.severity not in SEVERITIES:
            raise BnbenchError(f"corruption {self.name} at severity {self.severity}: ImageNet-C "
                               f"has {', '.join(CORRUPTIONS)} at severities 1–5")

    @property
    def constant(self) -> float:
        return constant(self.name, self.severity)

    def noise(self, shape: tuple[int, ...], ids: Tensor) -> Tensor:
        """Standard normal draws [B, *shape] (float64), image ``ids[b]``'s from its own
        generator."""
        out = torch.empty(len(ids), *shape, dtype=torch.float64)
        for b, index in enumerate(ids.tolist()):
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.split, index))
            out[b] = torch.randn(shape, generator=gen, dtype=torch.float64)
        return out

    def __call__(self, images: Tensor, ids: Tensor) -> Tensor:
        """The corrupted images: uint8 [B, 3, H, W] whose indices in the split are ``ids``
        [B] → uint8 [B, 3, H, W], on the images' device (computed on the CPU, in float64)."""
        device, images = images.device, images.cpu()
        if self.name == "jpeg_compression":
            return jpeg_compression(images, int(self.constant)).to(device)
        x = images.to(torch.float64) / 255.0
        if self.name == "contrast":
            y = contrast(x, self.constant)
        else:
            y = gaussian_noise(x, self.constant, self.noise(tuple(x.shape[1:]), ids.cpu()))
        return to_uint8(y).to(device)
