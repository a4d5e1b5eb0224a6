"""Tiny ImageFolder trees of PNGs for tests (train/ and val/, one folder per class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_png_tree(root: Path, per_class: int = 4, classes: int = 3, size: int = 20) -> None:
    """``classes`` folders of ``size``×``size`` PNGs per split; class k is bright in channel k."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[..., k] = 220
                Image.fromarray(pixels).save(folder / f"{i}.png")
