"""The embedded default dataset: procedurally rendered "shapes in clutter".

What it is
    Small RGB images (default 16x16), each showing one foreground shape from a fixed set of
    kinds (disc, ring, square, frame, triangle, plus, horizontal stripes, vertical stripes,
    checker, bowtie, star, ellipse, crescent, bullseye, tee, and more beyond the default 15:
    see Difficulties); the label is the kind. Every image draws its own pose (position,
    scale, rotation, mild anisotropic stretch), foreground and background colours, a linear
    lighting gradient, a few small distractor blobs behind the shape, and per-pixel Gaussian
    noise.

Why it is built this way
    The project must run its experiments without a download and on CPUs, so the default data
    has to be generated, deterministic from a seed, and fast to make. The task has to be hard
    enough that a short run of a small ResNet does not saturate (so that normalization
    choices - e.g. BatchNorm with tiny normalization batches - show up in validation
    accuracy) yet easy enough to learn in a few epochs. Random colours and lighting make the
    per-channel statistics vary a lot from image to image, which is exactly what makes
    BatchNorm's batch statistics noisy for small batches. All classes are mapped onto
    themselves by a horizontal flip, so flip augmentation is label-preserving; the two
    stripe classes keep their orientation (only a small rotation jitter) to stay distinct.

How it is rendered
    Each kind is a signed distance function (SDF) in the shape's local frame. Pixel centres
    are mapped into every image's local frame with batched tensor maths, the SDF is evaluated
    for all images of one kind at once, and a clamped linear ramp of the distance (about one
    pixel wide) gives an anti-aliased coverage mask. The only Python loops run over kinds and
    fixed-size chunks of images, never over single images.

Difficulties (``dataset.difficulty``)
    ``standard`` (the default) is the recipe above with the first 18 kinds; its output is
    unchanged since difficulties were added. ``hard`` adds 7 near-duplicate kinds (pentagon,
    octagon, thin ring, rounded square, semicircle, chevron, three dots: 25 in all, told apart
    from hexagon, disc, ring, square, crescent, ... by a few pixels), a stronger lighting
    gradient, a per-image colour cast, a little more noise, and a fourth distractor blob, some
    of the blobs in front of the shape. ``standard`` saturates in a short run; ``hard`` does not.

Calibration (defaults: 10k train / 2k val, 16 px, 15 classes; 2 CPU threads)
    The standard difficulty was tuned with a standalone training loop (not part of the
    package) so that a short run is learnable but not saturated and a normalization batch of 2
    visibly hurts. What ``bnbench train`` itself measures on it is in ``results/main_job.md``
    (8 epochs: 94%) and ``results/nbs2_vs_bn.md`` (6 epochs: BN 87% vs GhostBN NBS 2: 75%);
    given more epochs, NBS 2 catches up as the model saturates. The hard difficulty (22
    classes, 8 epochs: BN ~70%, GhostBN NBS 2 ~50%) was calibrated with ``bnbench train``,
    see ``results/scale_cpu_dataset.md``.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from bnbench.errors import BnbenchError

# Bump whenever rendering changes, so that stale caches are never reused.
GENERATOR_VERSION = "shapes-v1"

DEFAULT_NUM_TRAIN = 10000
DEFAULT_NUM_VAL = 2000
DEFAULT_RESOLUTION = 16
DEFAULT_NUM_CLASSES = 15

# Images rendered per chunk; each chunk has its own generator, so results do not depend on
# anything but the parameters and the seed.
_CHUNK = 2048


@dataclass(frozen=True)
class SyntheticData:
    """Rendered images (uint8 [N,3,R,R]) and labels (int64 [N]) for both splits."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class _Recipe:
    """Difficulty knobs, tuned so a short small-ResNet run lands well below 100% accuracy.

    The knobs after ``clutter_radius`` came with the ``hard`` difficulty; they are left out of
    the dataclass ``repr`` (and, at their defaults, out of the cache digest), so the
    ``standard`` recipe's digest and cache files are what they were before them.
    """

    scale: tuple[float, float] = (0.6, 0.85)  # shape radius, fraction of the half-image
    stretch: float = 0.12  # max anisotropic stretch (+/-)
    shift: float = 0.32  # max centre offset, fraction of the half-image
    stripe_jitter: float = 0.35  # rotation jitter (rad) of the orientation-bound kinds
    min_contrast: float = 0.45  # min RGB distance between foreground and background
    gradient: float = 0.3  # max lighting-gradient amplitude
    noise: tuple[float, float] = (0.02, 0.06)  # per-image Gaussian noise std range
    clutter: int = 3  # max distractor blobs per image
    clutter_radius: tuple[float, float] = (0.08, 0.2)
    # probability that a distractor blob lies in front of the shape (occluding it)
    occlusion: float = field(default=0.0, repr=False)
    # per-image, per-channel colour gain drawn from [1 - tint, 1 + tint] (a colour cast)
    tint: float = field(default=0.0, repr=False)
    # extra kinds (after the first 18) that this difficulty offers as classes
    extra_kinds: int = field(default=0, repr=False)


#: ``dataset.difficulty`` -> recipe. ``standard`` is the original recipe (byte-identical output);
#: ``hard`` offers more classes (near-duplicate kinds: pentagon/hexagon/octagon, ring/thin ring,
#: square/rounded square, ...), smaller and more variable shapes, lower contrast, more and larger
#: clutter (some of it occluding the shape), stronger noise, lighting and colour casts.
_RECIPES: dict[str, _Recipe] = {
    "standard": _Recipe(),
    "hard": _Recipe(
        scale=(0.6, 0.85),
        stretch=0.12,
        shift=0.32,
        stripe_jitter=0.35,
        min_contrast=0.45,
        gradient=0.45,  # standard: 0.3
        noise=(0.02, 0.07),  # standard: (0.02, 0.06)
        clutter=4,  # standard: 3
        clutter_radius=(0.08, 0.2),
        occlusion=0.1,  # standard: 0
        tint=0.2,  # standard: 0
        extra_kinds=7,  # standard: 0
    ),
}
DIFFICULTIES: tuple[str, ...] = tuple(_RECIPES)
DEFAULT_DIFFICULTY = "standard"

SdfFn = Callable[[Tensor, Tensor], Tensor]


# --- signed distance functions, local frame, shape radius ~1 -----------------------------


def _length(x: Tensor, y: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y)


def _box(u: Tensor, v: Tensor, bu: float, bv: float) -> Tensor:
    """Exact SDF of an axis-aligned box with half-sizes (bu, bv)."""
    qu, qv = u.abs() - bu, v.abs() - bv
    outside = _length(qu.clamp(min=0), qv.clamp(min=0))
    return outside + torch.maximum(qu, qv).clamp(max=0)


def _tri_wave(t: Tensor) -> Tensor:
    """Period-1 wave in [-0.25, 0.25], negative on half of each period."""
    return (torch.remainder(t, 1.0) - 0.5).abs() - 0.25


def _disc(u: Tensor, v: Tensor) -> Tensor:
    return _length(u, v) - 0.85


def _ring(u: Tensor, v: Tensor) -> Tensor:
    return (_length(u, v) - 0.72).abs() - 0.24


def _square(u: Tensor, v: Tensor) -> Tensor:
    return _box(u, v, 0.8, 0.8)


def _frame(u: Tensor, v: Tensor) -> Tensor:
    return _box(u, v, 0.78, 0.78).abs() - 0.2


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    """Equilateral triangle (circumradius ~1), after Inigo Quilez's exact SDF."""
    r, k = 0.85, math.sqrt(3.0)
    x, y = u.abs() - r, v + r / k
    fold = x + k * y > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - x.clamp(-2 * r, 0)
    return -_length(x, y) * torch.sign(y)


def _plus(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u, v, 0.95, 0.28), _box(u, v, 0.28, 0.95))


def _hstripes(u: Tensor, v: Tensor) -> Tensor:
    period = 0.75
    return torch.maximum(_box(u, v, 0.95, 0.95), _tri_wave(v / period) * period)


def _vstripes(u: Tensor, v: Tensor) -> Tensor:
    return _hstripes(v, u)


def _checker(u: Tensor, v: Tensor) -> Tensor:
    period = 0.95
    a, b = _tri_wave(u / period), _tri_wave(v / period)
    pattern = torch.sign(a * b) * torch.minimum(a.abs(), b.abs()) * period
    return torch.maximum(_box(u, v, 0.95, 0.95), pattern)


def _bowtie(u: Tensor, v: Tensor) -> Tensor:
    """Two triangles meeting tip to tip (an approximate distance, exact on the slanted sides)."""
    slope = 0.85
    wedge = (v.abs() - slope * u.abs()) / math.sqrt(1 + slope * slope)
    return torch.maximum(wedge, u.abs() - 0.95)


def _star(u: Tensor, v: Tensor) -> Tensor:
    """Five-lobed star; the radial offset is scaled down to stay roughly a distance."""
    r, phi = _length(u, v), torch.atan2(v, u)
    return (r - (0.62 + 0.36 * torch.cos(5 * phi))) * 0.6


def _ellipse(u: Tensor, v: Tensor) -> Tensor:
    a, b = 1.0, 0.36
    return (_length(u / a, v / b) - 1.0) * b


def _crescent(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(_length(u, v) - 0.92, -(_length(u - 0.5, v) - 0.72))


def _bullseye(u: Tensor, v: Tensor) -> Tensor:
    r = _length(u, v)
    return torch.minimum(r - 0.28, (r - 0.78).abs() - 0.16)


def _tee(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u, v - 0.62, 0.95, 0.26), _box(u, v + 0.2, 0.26, 0.75))


def _hexagon(u: Tensor, v: Tensor) -> Tensor:
    """Regular hexagon, after Inigo Quilez's exact SDF."""
    r, kx, ky, kz = 0.8, -0.866025404, 0.5, 0.577350269
    x, y = u.abs(), v.abs()
    d = 2 * torch.clamp(kx * x + ky * y, max=0)
    x, y = x - d * kx, y - d * ky
    x = x - x.clamp(-kz * r, kz * r)
    return _length(x, y - r) * torch.sign(y - r)


def _corner(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u + 0.35, v, 0.26, 0.9), _box(u, v + 0.64, 0.9, 0.26))


def _dots(u: Tensor, v: Tensor) -> Tensor:
    """Four dots on a 2x2 grid."""
    return _length(u.abs() - 0.5, v.abs() - 0.5) - 0.3


def _segment(u: Tensor, v: Tensor, a: tuple[float, float], b: tuple[float, float]) -> Tensor:
    """Distance to the segment a-b."""
    bx, by = b[0] - a[0], b[1] - a[1]
    pu, pv = u - a[0], v - a[1]
    h = ((pu * bx + pv * by) / (bx * bx + by * by)).clamp(0.0, 1.0)
    return _length(pu - bx * h, pv - by * h)


def _fold(u: Tensor, v: Tensor, nx: float, ny: float) -> tuple[Tensor, Tensor]:
    """Reflect the points on the negative side of the line through 0 with normal (nx, ny)."""
    d = 2 * torch.clamp(nx * u + ny * v, max=0)
    return u - d * nx, v - d * ny


def _pentagon(u: Tensor, v: Tensor) -> Tensor:
    """Regular pentagon, after Inigo Quilez's exact SDF."""
    r, kx, ky, kz = 0.72, 0.809016994, 0.587785252, 0.726542528
    x, y = _fold(u.abs(), v, -kx, ky)
    x, y = _fold(x, y, kx, ky)
    x = x - x.clamp(-r * kz, r * kz)
    return _length(x, y - r) * torch.sign(y - r)


def _octagon(u: Tensor, v: Tensor) -> Tensor:
    """Regular octagon, after Inigo Quilez's exact SDF."""
    r, kx, ky, kz = 0.8, -0.9238795325, 0.3826834323, 0.4142135623
    x, y = _fold(u.abs(), v.abs(), kx, ky)
    x, y = _fold(x, y, -kx, ky)
    x = x - x.clamp(-kz * r, kz * r)
    return _length(x, y - r) * torch.sign(y - r)


def _thin_ring(u: Tensor, v: Tensor) -> Tensor:
    return (_length(u, v) - 0.8).abs() - 0.11


def _rounded_square(u: Tensor, v: Tensor) -> Tensor:
    return _box(u, v, 0.5, 0.5) - 0.32


def _semicircle(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(_length(u, v + 0.3) - 0.92, -(v + 0.3))


def _chevron(u: Tensor, v: Tensor) -> Tensor:
    return _segment(u.abs(), v, (0.0, -0.4), (0.8, 0.45)) - 0.22


def _tri_dots(u: Tensor, v: Tensor) -> Tensor:
    """Three dots on a circle, 120 degrees apart."""
    c, s = 0.55 * math.cos(math.pi / 6), 0.55 * math.sin(math.pi / 6)
    d = torch.minimum(_length(u, v - 0.55), _length(u.abs() - c, v + s))
    return d - 0.3


# (name, sdf, free rotation). Order fixes the labels; the first 15 are the default classes.
_KINDS: tuple[tuple[str, SdfFn, bool], ...] = (
    ("disc", _disc, True),
    ("ring", _ring, True),
    ("square", _square, True),
    ("frame", _frame, True),
    ("triangle", _triangle, True),
    ("plus", _plus, True),
    ("hstripes", _hstripes, False),
    ("vstripes", _vstripes, False),
    ("checker", _checker, True),
    ("bowtie", _bowtie, True),
    ("star", _star, True),
    ("ellipse", _ellipse, True),
    ("crescent", _crescent, True),
    ("bullseye", _bullseye, True),
    ("tee", _tee, True),
    ("hexagon", _hexagon, True),
    ("corner", _corner, True),
    ("dots", _dots, True),
    # only in recipes with extra_kinds (the hard difficulty): near-duplicates of the above
    ("pentagon", _pentagon, True),
    ("octagon", _octagon, True),
    ("thin_ring", _thin_ring, True),
    ("rounded_square", _rounded_square, True),
    ("semicircle", _semicircle, True),
    ("chevron", _chevron, True),
    ("tri_dots", _tri_dots, True),
)
_BASE_KINDS = 18


def shape_names(difficulty: str = DEFAULT_DIFFICULTY) -> tuple[str, ...]:
    """The kinds (class names, in label order) that ``difficulty`` offers."""
    return tuple(name for name, _, _ in _KINDS[: _BASE_KINDS + _recipe(difficulty).extra_kinds])


def max_classes(difficulty: str = DEFAULT_DIFFICULTY) -> int:
    """How many classes ``difficulty`` offers (``dataset.num_classes`` at most)."""
    return _BASE_KINDS + _recipe(difficulty).extra_kinds


def _recipe(difficulty: str) -> _Recipe:
    if difficulty not in _RECIPES:
        raise BnbenchError(
            f"dataset.difficulty={difficulty!r}: choose one of {', '.join(DIFFICULTIES)}"
        )
    return _RECIPES[difficulty]


SHAPE_NAMES: tuple[str, ...] = shape_names()  # the standard difficulty's kinds
MAX_CLASSES = len(SHAPE_NAMES)


# --- rendering ------------------------------------------------------------------------------


def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _coverage(sdf: Tensor, radius: Tensor, resolution: int) -> Tensor:
    """Anti-aliased coverage from a local-frame SDF: a one-pixel linear ramp at the edge."""
    pixels = sdf * radius.view(-1, 1, 1) * (resolution / 2)
    return (0.5 - pixels).clamp(0.0, 1.0)


def _pixel_grid(resolution: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [-1, 1] (x to the right, y up), each [R, R]."""
    t = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    y, x = torch.meshgrid(-t, t, indexing="ij")
    return x, y


def _local_frame(
    x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, angle: Tensor, radius: Tensor, stretch: Tensor
) -> tuple[Tensor, Tensor]:
    """Map the pixel grid into each image's shape frame: translate, rotate, scale. [N, R, R]."""
    dx, dy = x - cx.view(-1, 1, 1), y - cy.view(-1, 1, 1)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    u = (cos * dx + sin * dy) / (radius * stretch).view(-1, 1, 1)
    v = (-sin * dx + cos * dy) / (radius / stretch).view(-1, 1, 1)
    return u, v


def _contrasting_colours(gen: torch.Generator, n: int, min_dist: float) -> tuple[Tensor, Tensor]:
    """Background and foreground RGB in [0,1], at least ``min_dist`` apart (rejection)."""
    bg, fg = torch.rand(n, 3, generator=gen), torch.rand(n, 3, generator=gen)
    for _ in range(16):  # a vectorised redraw of the too-similar pairs; converges fast
        bad = (fg - bg).norm(dim=1) < min_dist
        fg = torch.where(bad[:, None], torch.rand(n, 3, generator=gen), fg)
    bad = (fg - bg).norm(dim=1) < min_dist
    return bg, torch.where(bad[:, None], 1.0 - bg, fg)


def _shape_mask(gen: torch.Generator, labels: Tensor, resolution: int, recipe: _Recipe) -> Tensor:
    """Coverage [N, R, R] of each image's labelled shape under a random pose."""
    n = labels.numel()
    x, y = _pixel_grid(resolution)
    cx = _uniform(gen, (n,), -recipe.shift, recipe.shift)
    cy = _uniform(gen, (n,), -recipe.shift, recipe.shift)
    radius = _uniform(gen, (n,), *recipe.scale)
    stretch = torch.exp(_uniform(gen, (n,), -recipe.stretch, recipe.stretch))
    free = torch.tensor([rot for _, _, rot in _KINDS])[labels]
    jitter = _uniform(gen, (n,), -recipe.stripe_jitter, recipe.stripe_jitter)
    flip = torch.randint(0, 2, (n,), generator=gen) * math.pi  # bound kinds: 0 or 180 deg
    angle = torch.where(free, _uniform(gen, (n,), 0.0, 2 * math.pi), jitter + flip)
    u, v = _local_frame(x, y, cx, cy, angle, radius, stretch)
    sdf = torch.empty(n, resolution, resolution)
    for kind, (_, fn, _) in enumerate(_KINDS):
        idx = (labels == kind).nonzero().squeeze(1)
        if idx.numel():
            sdf[idx] = fn(u[idx], v[idx])
    return _coverage(sdf, radius, resolution)


def _clutter(gen: torch.Generator, n: int, resolution: int, recipe: _Recipe) -> Tensor:
    """Coverage [N, K, R, R] of up to K small distractor discs per image (each present 50%)."""
    k = recipe.clutter
    x, y = _pixel_grid(resolution)
    cx, cy = _uniform(gen, (n * k,), -0.9, 0.9), _uniform(gen, (n * k,), -0.9, 0.9)
    radius = _uniform(gen, (n * k,), *recipe.clutter_radius)
    present = torch.rand(n * k, generator=gen) < 0.5
    dist = _length(x - cx.view(-1, 1, 1), y - cy.view(-1, 1, 1)) / radius.view(-1, 1, 1) - 1.0
    alpha = _coverage(dist, radius, resolution) * present.view(-1, 1, 1)
    return alpha.view(n, k, resolution, resolution)


def _render_chunk(gen: torch.Generator, labels: Tensor, resolution: int, recipe: _Recipe) -> Tensor:
    """Render one chunk of labelled images as uint8 [N, 3, R, R].

    The knobs at 0 (``occlusion``, ``tint``) draw no random numbers, so that the standard
    recipe's stream - and its bytes - are those of the renderer before they existed.
    """
    n = labels.numel()
    bg, fg = _contrasting_colours(gen, n, recipe.min_contrast)
    img = bg.view(n, 3, 1, 1).expand(n, 3, resolution, resolution).clone()
    blobs = _clutter(gen, n, resolution, recipe)
    blob_rgb = torch.rand(n, recipe.clutter, 3, generator=gen)
    front = torch.zeros(n, recipe.clutter, dtype=torch.bool)
    if recipe.occlusion > 0:
        front = torch.rand(n, recipe.clutter, generator=gen) < recipe.occlusion
    for j in range(recipe.clutter):  # behind the shape
        a = blobs[:, j : j + 1] * (~front[:, j]).view(n, 1, 1, 1)
        img = img * (1 - a) + blob_rgb[:, j].view(n, 3, 1, 1) * a
    alpha = _shape_mask(gen, labels, resolution, recipe).unsqueeze(1)
    img = img * (1 - alpha) + fg.view(n, 3, 1, 1) * alpha
    if recipe.occlusion > 0:
        for j in range(recipe.clutter):  # in front of it
            a = blobs[:, j : j + 1] * front[:, j].view(n, 1, 1, 1)
            img = img * (1 - a) + blob_rgb[:, j].view(n, 3, 1, 1) * a
    x, y = _pixel_grid(resolution)
    theta = _uniform(gen, (n, 1, 1), 0.0, 2 * math.pi)
    amp = _uniform(gen, (n, 1, 1), 0.0, recipe.gradient)
    light = 1.0 + amp * (torch.cos(theta) * x + torch.sin(theta) * y)
    img = img * light.unsqueeze(1)
    if recipe.tint > 0:
        img = img * _uniform(gen, (n, 3, 1, 1), 1.0 - recipe.tint, 1.0 + recipe.tint)
    sigma = _uniform(gen, (n, 1, 1, 1), *recipe.noise)
    img = img + sigma * torch.randn(img.shape, generator=gen)
    return (img.clamp(0.0, 1.0) * 255).round().to(torch.uint8)


def _split_seed(seed: int, split: str, chunk: int) -> int:
    """A 63-bit generator seed for one chunk of one split, stable across Python runs."""
    digest = hashlib.sha256(f"{GENERATOR_VERSION}/{seed}/{split}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _balanced_labels(n: int, num_classes: int, seed: int, split: str) -> Tensor:
    """Labels with every class appearing n // C or n // C + 1 times, in a seeded order."""
    gen = torch.Generator().manual_seed(_split_seed(seed, split, -1))
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]


def _render_split(
    n: int, resolution: int, num_classes: int, seed: int, split: str, recipe: _Recipe
) -> tuple[Tensor, Tensor]:
    labels = _balanced_labels(n, num_classes, seed, split)
    chunks = []
    for c, start in enumerate(range(0, n, _CHUNK)):
        gen = torch.Generator().manual_seed(_split_seed(seed, split, c))
        chunks.append(_render_chunk(gen, labels[start : start + _CHUNK], resolution, recipe))
    return torch.cat(chunks), labels


def _check_params(
    num_train: int, num_val: int, resolution: int, num_classes: int, difficulty: str
) -> None:
    top = max_classes(difficulty)  # (refuses an unknown difficulty first)
    if num_train <= 0:
        raise BnbenchError(f"dataset.num_train={num_train}: must be positive")
    if num_val <= 0:
        raise BnbenchError(f"dataset.num_val={num_val}: must be positive")
    if resolution < 8:
        raise BnbenchError(f"dataset.resolution={resolution}: must be at least 8 pixels")
    if not 2 <= num_classes <= top:
        raise BnbenchError(
            f"dataset.num_classes={num_classes}: the synthetic dataset (difficulty={difficulty}) "
            f"has {top} shape kinds, so it must be between 2 and {top}"
        )


def generate(
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    resolution: int = DEFAULT_RESOLUTION,
    num_classes: int = DEFAULT_NUM_CLASSES,
    seed: int = 0,
    difficulty: str = DEFAULT_DIFFICULTY,
) -> SyntheticData:
    """Render the dataset; the same arguments always give the same bytes.

    Train and val come from the same distribution with independent random streams, so the
    validation set does not change when ``num_train`` does. ``difficulty`` picks the recipe
    (``DIFFICULTIES``); ``standard`` is the original dataset.
    """
    _check_params(num_train, num_val, resolution, num_classes, difficulty)
    recipe = _recipe(difficulty)
    train = _render_split(num_train, resolution, num_classes, seed, "train", recipe)
    val = _render_split(num_val, resolution, num_classes, seed, "val", recipe)
    names = shape_names(difficulty)[:num_classes]
    return SyntheticData(train[0], train[1], val[0], val[1], names)


# --- cache ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where generated data is cached: ``$BNBENCH_CACHE`` or ``~/.cache/bnbench``."""
    env = os.environ.get("BNBENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bnbench"


def _recipe_digest(difficulty: str = DEFAULT_DIFFICULTY) -> str:
    """Short digest of the difficulty's knobs and kinds, so retuning them never reuses a cache.

    The knobs left out of the recipe's ``repr`` join the text only where they differ from
    their defaults: the standard recipe keeps the digest it had before they existed.
    """
    recipe = _recipe(difficulty)
    extra = [
        f"{f.name}={getattr(recipe, f.name)!r}"
        for f in fields(recipe)
        if not f.repr and getattr(recipe, f.name) != f.default
    ]
    text = repr(recipe) + "".join(f",{e}" for e in extra) + ",".join(shape_names(difficulty))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def cache_path(
    num_train: int,
    num_val: int,
    resolution: int,
    num_classes: int,
    seed: int,
    difficulty: str = DEFAULT_DIFFICULTY,
) -> Path:
    """The cache file for one parameter set; the name carries every parameter and the recipe
    (its digest, and a difficulty other than ``standard`` by name)."""
    tag = "" if difficulty == DEFAULT_DIFFICULTY else f"-{difficulty}"
    name = (
        f"synthetic-{GENERATOR_VERSION}-{_recipe_digest(difficulty)}{tag}-train{num_train}"
        f"-val{num_val}-res{resolution}-cls{num_classes}-seed{seed}.pt"
    )
    return cache_dir() / name


def _read_cache(path: Path, num_classes: int, difficulty: str) -> SyntheticData | None:
    """The cached data, or None when the file is missing, unreadable or inconsistent."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        data = SyntheticData(
            blob["train_images"],
            blob["train_labels"],
            blob["val_images"],
            blob["val_labels"],
            shape_names(difficulty)[:num_classes],
        )
    except Exception:  # noqa: BLE001 - any failure to read means "regenerate"
        return None
    if blob.get("version") != GENERATOR_VERSION:
        return None
    return data


def _write_cache(path: Path, data: SyntheticData) -> None:
    """Write atomically: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "version": GENERATOR_VERSION,
        "train_images": data.train_images,
        "train_labels": data.train_labels,
        "val_images": data.val_images,
        "val_labels": data.val_labels,
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _matches(data: SyntheticData, num_train: int, num_val: int, resolution: int) -> bool:
    """Shape check so that a truncated or foreign file is not trusted."""
    return (
        tuple(data.train_images.shape) == (num_train, 3, resolution, resolution)
        and tuple(data.val_images.shape) == (num_val, 3, resolution, resolution)
        and data.train_images.dtype == torch.uint8
        and data.val_images.dtype == torch.uint8
        and tuple(data.train_labels.shape) == (num_train,)
        and tuple(data.val_labels.shape) == (num_val,)
    )


def load_synthetic(
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    resolution: int = DEFAULT_RESOLUTION,
    num_classes: int = DEFAULT_NUM_CLASSES,
    seed: int = 0,
    difficulty: str = DEFAULT_DIFFICULTY,
    *,
    use_cache: bool = True,
) -> SyntheticData:
    """``generate`` with an on-disk cache; a missing or corrupt cache file is regenerated.

    A cache folder that cannot be written only costs the cache, never the run.
    """
    _check_params(num_train, num_val, resolution, num_classes, difficulty)
    args = (num_train, num_val, resolution, num_classes, seed, difficulty)
    if not use_cache:
        return generate(*args)
    path = cache_path(*args)
    data = _read_cache(path, num_classes, difficulty) if path.is_file() else None
    if data is not None and _matches(data, num_train, num_val, resolution):
        return data
    data = generate(*args)
    try:
        _write_cache(path, data)
    except OSError as err:  # read-only or full disk: run uncached
        warnings.warn(f"bnbench: not caching synthetic data at {path}: {err}", stacklevel=2)
    return data
