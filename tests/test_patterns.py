"""Patterned batches (Rethinking §6.1, Fig. 8): the class-pairs order, its loaders, its plan, the
trainer's validation specs and its bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import compose_train as _cfg

from bnbench.config import validate
from bnbench.data import DataSource, TensorSplit
from bnbench.data.loaders import TensorLoader
from bnbench.data.patterns import ClassPairs
from bnbench.errors import BnbenchError
from bnbench.evaluate import Reader, StatsSpec, eval_batches, run_specs
from bnbench.plan import batch_plan


def _labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    """Labels with ``counts[c]`` samples of class ``c``, in a random order."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def _most_groups(counts: list[int], k: int) -> int:
    """The most groups of ``k`` distinct classes with one pair of a class each, by trying every
    ``m`` (the reference for :func:`bnbench.data.patterns.groups_per_epoch`)."""
    pairs = [c // 2 for c in counts]
    return max(m for m in range(sum(pairs) + 1) if sum(min(p, m) for p in pairs) >= m * k)


def _assert_class_pairs(labels: list[int], group: int) -> None:
    """Every group of ``group`` consecutive labels: ``group/2`` distinct classes, then the same
    classes in the same order (each class's two images ``group/2`` apart)."""
    assert len(labels) % group == 0
    k = group // 2
    for start in range(0, len(labels), group):
        first, second = labels[start:start + k], labels[start + k:start + group]
        assert len(set(first)) == k and second == first, labels[start:start + group]


def _index_images(n: int) -> torch.Tensor:
    """uint8 images whose every pixel is the sample's index (``n`` ≤ 256), so that a batch names
    its samples."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()


def _indices(x: torch.Tensor) -> list[int]:
    """The indices of :func:`_index_images` (mean 0, std 1: a pixel is index / 255), after a
    pad-1 crop of a 2×2 image, which keeps at least one of its pixels (the padding is 0)."""
    return (x.amax(dim=(1, 2, 3)) * 255).round().long().tolist()


@pytest.mark.parametrize("counts,group", [
    ([10] * 12, 8),  # balanced, 4 of 12 classes per group
    ([7, 9, 10, 11, 6, 8], 6),  # odd counts (one image of a class left over)
    ([60] + [6] * 9, 8),  # one large class: capped at m pairs, one per group
    ([4] * 16, 32),  # the paper's 16 classes × 2, every class in every group
])
def test_class_pairs_order_has_the_stated_composition(counts, group):
    labels = _labels(counts)
    pattern = ClassPairs(labels, group)
    assert pattern.groups == _most_groups(counts, group // 2)
    orders = []
    for epoch in range(4):
        order = pattern.order(torch.Generator().manual_seed(epoch))
        assert order.numel() == len(pattern) == pattern.groups * group  # every epoch alike
        assert order.unique().numel() == order.numel()  # no image twice in an epoch
        _assert_class_pairs(labels[order].tolist(), group)
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # a new draw each epoch
    again = pattern.order(torch.Generator().manual_seed(2))
    assert torch.equal(again, orders[2])  # a function of the generator's seed (resume)


def test_which_classes_share_a_group_changes_within_an_epoch():
    """The groups' class sets are drawn afresh, not a fixed pairing of the classes for a whole
    epoch (which the model could learn as one more pattern): 12 balanced classes in groups of
    2 classes show most of the 66 possible pairs in one epoch (a fixed pairing: 6)."""
    labels = _labels([40] * 12, seed=3)
    pattern = ClassPairs(labels, 4)
    order = pattern.order(torch.Generator().manual_seed(0))
    pairs = {tuple(sorted(g[:2])) for g in labels[order].view(-1, 4).tolist()}
    assert len(pairs) > 40


@pytest.mark.parametrize("nbs,world", [(4, 1), (8, 1), (8, 2), (16, 2)])
def test_loader_normalization_groups_are_class_pairs_on_every_rank(nbs, world):
    """``trainer.batch_pattern=class_pairs`` with GhostBN groups of ``nbs``: the training batch
    of every rank, at every step of several epochs, splits into contiguous groups of ``nbs``
    samples, ``nbs/2`` classes × 2; ``world`` ranks of ``b`` read the samples of one process of
    ``world · b`` in the same order (the sharding rule), augmented identically."""
    n, classes, batch = 240, 12, 16
    labels = _labels([n // classes] * classes, seed=1)
    images = _index_images(n)
    cfg = _cfg("norm=ghost", f"norm.nbs={nbs}", f"trainer.batch_size={batch}",
               "trainer.batch_pattern=class_pairs")
    plan = batch_plan(cfg, world, n)
    assert plan.pattern == nbs and plan.normalization == nbs

    def loader(rank: int, size: int, processes: int) -> TensorLoader:
        return TensorLoader(images, labels, size, mean=(0.0,) * 3, std=(1.0,) * 3,
                            augment=True, pad=1, shuffle=True, drop_last=True, seed=3,
                            rank=rank, world_size=processes,
                            pattern=ClassPairs(labels, plan.pattern))

    ranks = [loader(r, batch, world) for r in range(world)]
    whole = loader(0, batch * world, 1)
    for epoch in range(3):
        for one in [*ranks, whole]:
            one.set_epoch(epoch)
        steps = list(zip(*ranks, whole))
        assert len(steps) == len(ClassPairs(labels, nbs)) // (batch * world)
        for *shares, (x_all, y_all) in steps:
            for x, y in shares:
                assert y.numel() == batch
                _assert_class_pairs(y.tolist(), nbs)
                assert [labels[i].item() for i in _indices(x)] == y.tolist()
            assert torch.equal(torch.cat([y for _, y in shares]), y_all)
            assert torch.equal(torch.cat([x for x, _ in shares]), x_all)


def test_the_fix_normalizes_groups_of_distinct_classes():
    """The paper's remedy: the same patterned batches (class-pairs groups of 32) normalized by
    GhostBN in groups of 16: every normalization group holds 16 distinct classes; the layers get
    ``nbs=16``."""
    n, classes = 400, 20
    labels = _labels([n // classes] * classes, seed=2)
    cfg = _cfg("norm=ghost", "norm.nbs=16", "trainer.batch_size=64",
               "trainer.batch_pattern=class_pairs", "trainer.pattern_group=32")
    validate(cfg)
    plan = batch_plan(cfg, 1, n)
    assert (plan.pattern, plan.normalization, plan.layer_options()["nbs"]) == (32, 16, 16)
    data = DataSource("toy", classes, 2, TensorSplit(_index_images(n), labels),
                      TensorSplit(_index_images(n), labels), (0.0,) * 3, (1.0,) * 3)
    loader = data.loader("train", plan.per_process, seed=0, pattern=plan.pattern)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for _, y in loader:
            for group in y.view(-1, plan.normalization).tolist():
                assert len(set(group)) == plan.normalization
            _assert_class_pairs(y.tolist(), 32)  # (the batches are the patterned ones)


def test_patterned_evaluation_batches_hold_whole_groups():
    """Validation with mini-batch statistics of the training pattern: forward batches of whole
    class-pairs groups and normalization batches (the forward batch rounded down), over the
    images of whole groups of the validation split."""
    n, classes = 150, 10
    labels = _labels([15] * classes, seed=4)
    data = DataSource("toy", classes, 2, TensorSplit(_index_images(n), labels),
                      TensorSplit(_index_images(n), labels), (0.0,) * 3, (1.0,) * 3)
    cfg = _cfg("norm=ghost", "norm.nbs=8", "trainer.batch_size=16", "eval.batch_size=50",
               "trainer.batch_pattern=class_pairs")
    plan = batch_plan(cfg, 1, n)
    batches, steps = eval_batches(Reader(data, seed=5), plan, shuffle=True, pattern=8, nbs=8)
    ys = [y for _, y in batches]
    assert len(ys) == steps and {y.numel() for y in ys[:-1]} == {48}  # 50 → 6 groups of 8
    seen = torch.cat(ys).tolist()
    assert len(seen) == len(ClassPairs(labels, 8))
    _assert_class_pairs(seen, 8)


def test_a_patterned_run_validates_with_random_and_patterned_batch_statistics():
    from bnbench.norm import convert

    model = convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)), "bn")
    cfg = _cfg("norm=ghost", "norm.nbs=8", "trainer.batch_size=32",
               "trainer.batch_pattern=class_pairs")
    names = {s.name: s for s in run_specs(model, cfg, batch_plan(cfg, 1))}
    assert set(names) == {"ema", "precise", "batch", "batch_pattern"}
    assert (names["batch"].nbs, names["batch"].pattern) == (8, None)
    assert (names["batch_pattern"].nbs, names["batch_pattern"].pattern) == (8, 8)
    assert "pattern=class_pairs(8)" in names["batch_pattern"].tag()
    plain = _cfg("norm=ghost", "norm.nbs=8", "trainer.batch_size=32")
    assert {s.name for s in run_specs(model, plain, batch_plan(plain, 1))} == {"ema", "precise"}
    assert StatsSpec("batch", nbs=8).tag() == "stats=batch,nbs=8"  # (old records still match)


@pytest.mark.parametrize("overrides,message", [
    (["norm=ghost", "norm.nbs=7", "trainer.batch_size=14"], "norm.nbs=7: "),
    (["trainer.batch_size=15"], "trainer.batch_size=15: "),
    (["trainer.pattern_group=9"], "trainer.pattern_group=9: "),
    (["norm=ghost", "norm.nbs=6", "trainer.batch_size=16"], "must divide the per-process"),
    (["trainer.batch_size=32", "trainer.pattern_group=24"], "must divide the per-process"),
    (["norm=ghost", "norm.nbs=12", "trainer.batch_size=48", "trainer.pattern_group=8"],
     "must nest"),
])
def test_a_pattern_that_does_not_fit_the_batches_is_refused(overrides, message):
    with pytest.raises(BnbenchError, match=message):
        validate(_cfg(*overrides, "trainer.batch_pattern=class_pairs"))


def test_too_few_classes_for_the_pattern_is_refused():
    with pytest.raises(BnbenchError, match="needs 4 classes with two images each, but the "
                                           "training images have 3"):
        ClassPairs(_labels([10, 10, 10, 1]), 8)


def _bnbench(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BNBENCH_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "bnbench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides,message", [
    (["norm=ghost", "norm.nbs=7", "trainer.batch_size=14", "trainer.batch_pattern=class_pairs"],
     "bnbench: error: norm.nbs=7: trainer.batch_pattern=class_pairs builds each group of 7 "
     "samples from 7/2 classes × 2 images"),
    (["trainer.batch_pattern=pairs"], "bnbench: error: trainer.batch_pattern=pairs: choose one "
                                      "of random, class_pairs"),
    (["trainer.pattern_group=8"], "bnbench: error: trainer.pattern_group=8: it sizes the groups"),
])
def test_bad_pattern_options_are_one_line_and_write_nothing(tmp_path, overrides, message):
    proc = _bnbench(tmp_path, "train", *overrides, "hydra.run.dir=run")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not (tmp_path / "run").exists()


def test_more_classes_than_the_dataset_has_is_one_line(tmp_path):
    """The class count is the data's (known once it is built, after Hydra made the run dir):
    one line, exit status 2, and no run dir left behind."""
    proc = _bnbench(tmp_path, "train", "dataset.num_classes=3", "dataset.num_train=60",
                    "dataset.num_val=30", "dataset.resolution=8", "trainer.batch_size=16",
                    "norm=ghost", "norm.nbs=8", "trainer.batch_pattern=class_pairs",
                    "hydra.run.dir=run")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bnbench: error: trainer.batch_pattern=class_pairs: a group of 8 "
                               "samples needs 4 classes with two images each, but the training "
                               "images have 3")
    assert not (tmp_path / "run").exists()
