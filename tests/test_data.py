"""Data module: synthetic generation and cache, batched augmentation, sharding, dataset builders."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from images import write_png_tree
from omegaconf import OmegaConf

from bnbench.data import TensorSplit, build_dataset, crop_flip, synthetic
from bnbench.data.loaders import FolderLoader, ShardPlan, TensorLoader
from bnbench.errors import BnbenchError


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches synthetic data in its own folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BNBENCH_CACHE", str(cache))
    return cache


def _cfg(**kw: object) -> SimpleNamespace:
    base = {"name": "synthetic", "num_train": 60, "num_val": 30, "resolution": 8, "workers": 0}
    return SimpleNamespace(**{**base, **kw})


# --- synthetic ------------------------------------------------------------------------------


def test_generate_is_deterministic_and_seeded() -> None:
    a = synthetic.generate(40, 20, 16, 15, seed=0)
    b = synthetic.generate(40, 20, 16, 15, seed=0)
    c = synthetic.generate(40, 20, 16, 15, seed=1)
    assert a.train_images.shape == (40, 3, 16, 16) and a.train_images.dtype == torch.uint8
    assert a.val_images.shape == (20, 3, 16, 16) and a.val_labels.dtype == torch.int64
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.val_labels, b.val_labels)
    assert not torch.equal(a.train_images, c.train_images)
    # the validation set does not depend on the training-set size
    d = synthetic.generate(80, 20, 16, 15, seed=0)
    assert torch.equal(a.val_images, d.val_images)


def test_generate_balanced_labels_in_range() -> None:
    data = synthetic.generate(150, 47, 12, 15, seed=3)
    train_counts = torch.bincount(data.train_labels, minlength=15)
    assert train_counts.tolist() == [10] * 15
    val_counts = torch.bincount(data.val_labels, minlength=15)
    assert val_counts.min() >= 3 and val_counts.max() <= 4 and val_counts.sum() == 47
    assert len(data.class_names) == 15
    # images are not trivially constant
    assert data.train_images.float().std() > 20


@pytest.mark.parametrize(
    ("kw", "key"),
    [({"num_classes": synthetic.MAX_CLASSES + 1}, "num_classes"), ({"num_train": 0}, "num_train")],
)
def test_generate_rejects_bad_params(kw: dict[str, int], key: str) -> None:
    args = {"num_train": 10, "num_val": 10, "resolution": 16, "num_classes": 15, "seed": 0}
    with pytest.raises(BnbenchError, match=key):
        synthetic.generate(**{**args, **kw})


def test_cache_round_trip_and_corrupt_file(_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = synthetic.load_synthetic(30, 10, 8, 10, seed=5)
    path = synthetic.cache_path(30, 10, 8, 10, 5)
    assert path.parent == _cache and path.is_file()
    assert [p.name for p in _cache.iterdir()] == [path.name]  # no temp files left

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated although cached")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "generate", boom)
        again = synthetic.load_synthetic(30, 10, 8, 10, seed=5)
    assert torch.equal(first.train_images, again.train_images)

    path.write_bytes(b"not a torch file")
    fixed = synthetic.load_synthetic(30, 10, 8, 10, seed=5)
    assert torch.equal(first.train_images, fixed.train_images)
    assert torch.load(path, weights_only=True)["version"] == synthetic.GENERATOR_VERSION


def test_cache_write_is_atomic(_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(obj: object, f: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.torch, "save", failing_save)
    with pytest.warns(UserWarning, match="not caching"):
        data = synthetic.load_synthetic(20, 10, 8, 10, seed=1)
    assert data.train_images.shape == (20, 3, 8, 8)
    assert list(_cache.iterdir()) == []  # neither a partial file nor a temp file


def test_standard_difficulty_is_the_original_dataset() -> None:
    """``difficulty="standard"`` (the default) renders what the generator rendered before
    difficulties existed: the same recipe digest and cache names, the same labels, and the same
    pixels (pinned as sums, with room for a last-bit rounding difference of another CPU)."""
    assert synthetic._recipe_digest("standard") == "eabb4def"
    assert synthetic.cache_path(30, 10, 8, 10, 5).name == (
        "synthetic-shapes-v1-eabb4def-train30-val10-res8-cls10-seed5.pt"
    )
    assert synthetic.cache_path(30, 10, 8, 10, 5, "standard") == synthetic.cache_path(
        30, 10, 8, 10, 5
    )
    data = synthetic.generate(40, 20, 16, 15, seed=0)
    same = synthetic.generate(40, 20, 16, 15, seed=0, difficulty="standard")
    assert torch.equal(data.train_images, same.train_images)
    assert data.train_labels[:8].tolist() == [12, 0, 6, 1, 9, 9, 10, 0]
    assert data.val_labels[:8].tolist() == [0, 2, 1, 9, 12, 5, 8, 2]
    assert abs(int(data.train_images.sum()) - 3836760) <= 16
    assert abs(int(data.val_images.sum()) - 2216917) <= 16
    assert data.class_names == synthetic.SHAPE_NAMES[:15]
    assert synthetic.max_classes() == synthetic.MAX_CLASSES == 18


def test_hard_difficulty_is_seeded_balanced_and_has_more_classes() -> None:
    top = synthetic.max_classes("hard")
    assert top > synthetic.MAX_CLASSES
    a = synthetic.generate(2 * top, top, 16, top, seed=0, difficulty="hard")
    b = synthetic.generate(2 * top, top, 16, top, seed=0, difficulty="hard")
    c = synthetic.generate(2 * top, top, 16, top, seed=1, difficulty="hard")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.val_images, b.val_images)
    assert torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(a.train_images, c.train_images)
    assert torch.bincount(a.train_labels, minlength=top).tolist() == [2] * top
    assert torch.bincount(a.val_labels, minlength=top).tolist() == [1] * top
    assert a.class_names == synthetic.shape_names("hard") and len(set(a.class_names)) == top
    assert a.class_names[: synthetic.MAX_CLASSES] == synthetic.SHAPE_NAMES
    assert a.train_images.float().std() > 20
    # the same seed and labels as the standard recipe, but other images
    std = synthetic.generate(2 * top, top, 16, 15, seed=0)
    hard = synthetic.generate(2 * top, top, 16, 15, seed=0, difficulty="hard")
    assert torch.equal(std.train_labels, hard.train_labels)
    assert not torch.equal(std.train_images, hard.train_images)


def test_cache_is_keyed_by_difficulty(_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    std = synthetic.load_synthetic(30, 10, 8, 10, seed=5)
    hard = synthetic.load_synthetic(30, 10, 8, 10, seed=5, difficulty="hard")
    paths = {synthetic.cache_path(30, 10, 8, 10, 5), synthetic.cache_path(30, 10, 8, 10, 5, "hard")}
    assert len(paths) == 2 and {p.name for p in _cache.iterdir()} == {p.name for p in paths}
    assert synthetic._recipe_digest("hard") != synthetic._recipe_digest("standard")
    assert not torch.equal(std.train_images, hard.train_images)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(synthetic, "generate", boom)
    again = synthetic.load_synthetic(30, 10, 8, 10, seed=5, difficulty="hard")
    assert torch.equal(again.train_images, hard.train_images)
    assert again.class_names == hard.class_names


def test_bad_difficulty_is_refused() -> None:
    with pytest.raises(BnbenchError, match="dataset.difficulty='extreme': choose one of standard"):
        synthetic.generate(10, 10, 16, 15, seed=0, difficulty="extreme")
    with pytest.raises(BnbenchError, match="dataset.difficulty"):
        synthetic.load_synthetic(10, 10, 16, 15, seed=0, difficulty="extreme")
    with pytest.raises(BnbenchError, match="dataset.difficulty"):
        build_dataset(_cfg(difficulty="extreme"))
    top = synthetic.max_classes("hard")
    with pytest.raises(BnbenchError, match=f"difficulty=hard\\) has {top} shape kinds"):
        synthetic.generate(10, 10, 16, top + 1, seed=0, difficulty="hard")
    with pytest.raises(BnbenchError, match="dataset.num_classes"):
        build_dataset(_cfg(num_classes=top))  # more than the standard recipe has


# --- batched augmentation -------------------------------------------------------------------


def _reference_crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int):
    """Per-sample loop: zero-pad, slice, flip."""
    h, w = x.shape[2:]
    out = []
    for img, (dy, dx), flip in zip(x, offsets.tolist(), flips.tolist()):
        crop = F.pad(img, (pad, pad, pad, pad))[:, dy : dy + h, dx : dx + w]
        out.append(torch.flip(crop, dims=[2]) if flip else crop)
    return torch.stack(out)


@pytest.mark.parametrize("pad", [0, 1, 3])
def test_crop_flip_matches_reference(pad: int) -> None:
    gen = torch.Generator().manual_seed(pad)
    x = torch.randint(0, 256, (9, 3, 7, 10), generator=gen, dtype=torch.uint8)
    offsets = torch.randint(0, 2 * pad + 1, (9, 2), generator=gen)
    flips = torch.rand(9, generator=gen) < 0.5
    assert torch.equal(
        crop_flip(x, offsets, flips, pad), _reference_crop_flip(x, offsets, flips, pad)
    )


def test_loader_normalizes_and_augments() -> None:
    images = torch.randint(0, 256, (20, 3, 6, 6), dtype=torch.uint8)
    plain = TensorLoader(images, torch.arange(20), 20, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, y = next(iter(plain))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.25)
    aug = TensorLoader(
        images, torch.arange(20), 20, mean=(0.5,) * 3, std=(0.25,) * 3, augment=True, pad=2
    )
    xa, _ = next(iter(aug))
    assert xa.shape == x.shape and not torch.equal(xa, x)
    # zero padding shows up as normalized black
    assert (xa == -2.0).any()


# --- ordering and sharding ------------------------------------------------------------------


def _loader(n: int, batch: int, rank: int = 0, world: int = 1, **kw: object) -> TensorLoader:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
    opts = {"augment": True, "pad": 2, "shuffle": True, "seed": 3, **kw}
    return TensorLoader(
        images,
        torch.arange(n),
        batch,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.3, 0.25),
        rank=rank,
        world_size=world,
        **opts,  # type: ignore[arg-type]
    )


def _epoch(loader: TensorLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_equal_one_process(drop_last: bool) -> None:
    single = _loader(50, 8, drop_last=drop_last)
    ranks = [_loader(50, 4, r, 2, drop_last=drop_last) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == (6 if drop_last else 7)
    for epoch in (0, 1):
        whole = _epoch(single, epoch)
        parts = [_epoch(loader, epoch) for loader in ranks]
        for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
            assert torch.equal(torch.cat([y0, y1]), y)
            assert torch.equal(torch.cat([x0, x1]), x)  # same augmentation per sample


def test_order_follows_the_documented_rule() -> None:
    loader = _loader(50, 8, drop_last=False)
    for epoch in (0, 1):
        labels = torch.cat([y for _, y in _epoch(loader, epoch)])
        gen = torch.Generator().manual_seed(3 * 1000003 + epoch)
        assert torch.equal(labels, torch.randperm(50, generator=gen))
    first, second = (torch.cat([y for _, y in _epoch(loader, e)]) for e in (0, 1))
    assert not torch.equal(first, second)
    unshuffled = _loader(50, 8, shuffle=False, augment=False)
    assert torch.equal(torch.cat([y for _, y in _epoch(unshuffled, 4)]), torch.arange(50))


def test_remainder_and_empty_rank_batch() -> None:
    # 50 = 6 * 8 + 2: the last global batch has 2 samples, all on rank 0
    ranks = [_loader(50, 4, r, 2, drop_last=False) for r in range(2)]
    last = [_epoch(loader, 0)[-1] for loader in ranks]
    assert last[0][0].shape == (2, 3, 8, 8) and last[0][1].shape == (2,)
    assert last[1][0].shape == (0, 3, 8, 8) and last[1][0].dtype == torch.float32
    assert last[1][1].shape == (0,) and last[1][1].dtype == torch.int64
    seen = torch.cat([y for loader in ranks for _, y in _epoch(loader, 0)])
    assert sorted(seen.tolist()) == list(range(50))


def test_batch_larger_than_dataset() -> None:
    with pytest.raises(
        BnbenchError, match="dataset has 50 training images, fewer than one global batch of 64"
    ):
        _loader(50, 32, 0, 2, drop_last=True)
    assert len(_loader(50, 64, drop_last=False)) == 1
    with pytest.raises(BnbenchError, match="rank"):
        ShardPlan(10, 2, rank=2, world_size=2)


# --- dataset builders -----------------------------------------------------------------------


def test_build_synthetic_from_dictconfig() -> None:
    cfg = OmegaConf.create(
        {
            "name": "synthetic",
            "num_train": 60,
            "num_val": 30,
            "resolution": 8,
            "num_classes": 12,
            "seed": 2,
            "pad": 1,
        }
    )
    data = build_dataset(cfg)
    assert (data.name, data.num_classes, data.image_size) == ("synthetic", 12, 8)
    assert (data.train_size, data.val_size, data.pad) == (60, 30, 1)
    train = data.loader("train", 16, augment=True, shuffle=True, drop_last=True, seed=0)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 8, 8) and y.max() < 12
    assert abs(float(x.mean())) < 0.5  # normalized with the data's own statistics
    val = data.loader("val", 16, augment=False, shuffle=False, drop_last=False, seed=0)
    assert [len(b[1]) for b in val] == [16, 14]


def test_build_synthetic_hard() -> None:
    top = synthetic.max_classes("hard")
    cfg = OmegaConf.create({"name": "synthetic", "num_train": 2 * top, "num_val": top,
                            "resolution": 8, "num_classes": top, "difficulty": "hard"})
    data = build_dataset(cfg)
    assert data.num_classes == top and data.class_names == synthetic.shape_names("hard")
    expected = synthetic.generate(2 * top, top, 8, top, seed=0, difficulty="hard")
    assert isinstance(data.train, TensorSplit)
    assert torch.equal(data.train.images, expected.train_images)


def test_difficulty_is_refused_for_other_datasets(tmp_path: Path) -> None:
    """``dataset.difficulty`` belongs to the synthetic dataset: any other one refuses a value
    but the default, in one line naming the key (before it looks at any file)."""
    for name in ("cifar10", "imagefolder"):
        with pytest.raises(BnbenchError) as err:
            build_dataset(_cfg(name=name, root=str(tmp_path), difficulty="hard"))
        assert "\n" not in str(err.value)
        assert str(err.value).startswith("dataset.difficulty=hard: only the synthetic dataset")


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"num_train": 0}, "dataset.num_train"),
        ({"resolution": -1}, "dataset.resolution"),
        ({"crop_size": 0}, "dataset.crop_size"),
        ({"name": "mnist"}, "dataset.name"),
        ({"num_classes": 99}, "dataset.num_classes"),
    ],
)
def test_build_rejects_bad_config(kw: dict[str, object], key: str) -> None:
    with pytest.raises(BnbenchError, match=key):
        build_dataset(_cfg(**kw))


def _check_labels(x: torch.Tensor, y: torch.Tensor) -> None:
    """The brightest channel of each normalized image is its class."""
    assert torch.equal(x.mean(dim=(2, 3)).argmax(1), y)


@pytest.mark.parametrize("in_memory", [True, False])
def test_imagefolder_loads(tmp_path: Path, in_memory: bool) -> None:
    write_png_tree(tmp_path / "tree")
    cfg = _cfg(
        name="imagefolder",
        root=str(tmp_path / "tree"),
        crop_size=16,
        resize_size=18,
        in_memory=in_memory,
        pad=None,
    )
    data = build_dataset(cfg)
    assert (data.num_classes, data.train_size, data.val_size, data.image_size) == (3, 12, 12, 16)
    assert data.class_names == ("class0", "class1", "class2")
    loader_type = TensorLoader if in_memory else FolderLoader
    for split in ("train", "val"):
        loader = data.loader(split, 5, seed=1)
        assert isinstance(loader, loader_type)
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == len(loader) == (2 if split == "train" else 3)
        for x, y in batches:
            assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
            _check_labels(x, y)


def test_folder_loader_shards_like_one_process(tmp_path: Path) -> None:
    write_png_tree(tmp_path / "tree", per_class=5)
    data = build_dataset(
        _cfg(name="imagenet", root=str(tmp_path / "tree"), crop_size=12, resize_size=14, workers=1)
    )
    opts = {"augment": True, "shuffle": True, "drop_last": False, "seed": 4}
    single = data.loader("train", 6, **opts)
    ranks = [data.loader("train", 3, rank=r, world_size=2, **opts) for r in range(2)]
    single.set_epoch(1)
    for loader in ranks:
        loader.set_epoch(1)
    whole, parts = list(single), [list(loader) for loader in ranks]
    assert len(whole) == 3 and parts[1][-1][0].shape == (0, 3, 12, 12)  # 15 = 2 * 6 + 3
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(BnbenchError, match="dataset.root is not set"):
        build_dataset(_cfg(name="imagefolder", root=None))
    with pytest.raises(BnbenchError, match="no such folder"):
        build_dataset(_cfg(name="imagenet", root=str(tmp_path / "missing")))
    tree = tmp_path / "tree"
    write_png_tree(tree)
    for png in (tree / "val").rglob("*.png"):
        png.unlink()
    with pytest.raises(BnbenchError, match="val/: Found no valid file"):
        build_dataset(_cfg(name="imagefolder", root=str(tree), in_memory=True))
    (tree / "val" / "class0").rmdir()
    with pytest.raises(BnbenchError, match="different class folders"):
        build_dataset(_cfg(name="imagefolder", root=str(tree)))
    for folder in (tree / "val").iterdir():
        folder.rmdir()
    (tree / "val").rmdir()
    with pytest.raises(BnbenchError, match=r"dataset.root=.*tree: no val/ folder"):
        build_dataset(_cfg(name="imagefolder", root=str(tree)))


def test_imagefolder_empty_class(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_png_tree(tree)
    for png in (tree / "train" / "class1").glob("*.png"):
        png.unlink()
    with pytest.raises(BnbenchError, match="train/.*class1"):
        build_dataset(_cfg(name="imagefolder", root=str(tree)))


def _write_fake_cifar10(root: Path, per_batch: int) -> np.ndarray:
    """torchvision's cifar-10-batches-py layout with random images; returns batch 1's data."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    first = None
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        first = data if first is None else first
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    assert first is not None
    return first


def test_cifar10_from_fake_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BnbenchError, match="download"):
        build_dataset(_cfg(name="cifar10", root=str(tmp_path), download=False))
    first = _write_fake_cifar10(tmp_path, per_batch=6)
    # the fake files cannot match torchvision's md5 sums
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    data = build_dataset(_cfg(name="cifar10", root=str(tmp_path), download=False, pad=None))
    assert (data.num_classes, data.image_size, data.pad) == (10, 32, 4)
    assert (data.train_size, data.val_size) == (30, 6)
    loader = data.loader("train", 6, augment=False, shuffle=False, drop_last=True)
    x, y = next(iter(loader))
    assert x.shape == (6, 3, 32, 32)
    expected = torch.from_numpy(first[0].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor(data.mean).view(3, 1, 1)
    std = torch.tensor(data.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], (expected - mean) / std)


@pytest.mark.parametrize("in_memory,workers", [(True, 0), (False, 0), (False, 1)])
def test_corrupt_image_is_one_line_naming_it_or_skipped(tmp_path: Path, in_memory: bool,
                                                        workers: int, caplog) -> None:
    """A file PIL cannot decode: by default one BnbenchError line naming the file (also from a
    DataLoader worker); with ``skip_unreadable`` the file is left out with a counted warning."""
    write_png_tree(tmp_path / "tree")
    bad = tmp_path / "tree" / "train" / "class1" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)  # a truncated PNG
    base = {"name": "imagefolder", "root": str(tmp_path / "tree"), "crop_size": 16,
            "resize_size": 18, "in_memory": in_memory, "pad": None, "workers": workers}
    with pytest.raises(BnbenchError) as err:
        data = build_dataset(_cfg(**base))
        loader = data.loader("train", 12, seed=1)
        loader.set_epoch(0)
        list(loader)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    with caplog.at_level("WARNING", logger="bnbench"):
        data = build_dataset(_cfg(**base, skip_unreadable=True))
    assert data.train_size == 11 and data.val_size == 12
    assert f"skipped 1 unreadable image(s) of 12 (first: {bad})" in caplog.text
    loader = data.loader("train", 11, seed=1)
    loader.set_epoch(0)
    (x, y), = list(loader)
    _check_labels(x, y)
