"""Patterned batches (Rethinking §6.1, Fig. 8): every group of ``P`` epoch positions holds
``P/2`` distinct classes × 2 images.

"Rethinking 'Batch' in BatchNorm" trains a classifier whose every normalization batch of 32 is
hand-crafted from 16 classes and 2 images per class: a sample's label is leaked by the other
sample of its class through the batch statistics, the model learns to use it, and it fails
where the statistics no longer carry it (random batches, population statistics). Its remedy
keeps the batches and normalizes each half, 16 images of 16 different classes, on its own
(GhostBN).

:class:`ClassPairs` is the epoch order of such batches; the loaders
(:mod:`bnbench.data.loaders`) read it in place of a random permutation, so sharding, the
augmentation draws and the seeding per epoch are those of every other order. With ``k = P/2``
and ``m`` groups per epoch, each epoch:

1. the samples are shuffled, then sorted by class (stable: random within a class); consecutive
   samples of a class form its pairs, ``⌊n_c / 2⌋`` of them, of which at most ``m`` are used;
2. the groups are filled one after another, each with one unused pair of each of the ``k``
   classes that have the most unused pairs left, ties broken at random. With balanced classes
   every ``C/k`` groups are a random partition of the ``C`` classes, so which classes share a
   group changes from group to group (a fixed co-occurrence within an epoch would be one more
   pattern to learn), and taking the fullest classes first always completes the ``m`` groups;
3. a group is laid out as the first images of its ``k`` classes, then the second images in the
   same class order, and the groups are put in random order.

The layout of step 3 decides what a normalization group sees: a group of all ``P`` positions
(BN) holds the pairs; a contiguous group of at most ``k`` positions (GhostBN with
``nbs ≤ P/2``, the paper's remedy) holds distinct classes, since two images of one class lie
exactly ``k`` positions apart. ``m`` is the largest number of groups that the class counts can
fill (the fixed point of ``m ← ⌊Σ_c min(⌊n_c/2⌋, m) / k⌋``), a function of the counts alone:
every epoch has the same ``m · P`` positions (the images left over are a different random set
each epoch), so the steps per epoch do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bnbench.errors import BnbenchError
from bnbench.plan import check_pattern_group


def groups_per_epoch(pairs_per_class: Tensor, classes_per_group: int) -> int:
    """``m``: the most groups of ``classes_per_group`` distinct classes that classes with
    ``pairs_per_class`` pairs can fill, one pair of a class per group — the largest ``m`` with
    ``Σ_c min(pairs_c, m) ≥ m · k``, reached from above by ``m ← ⌊Σ_c min(pairs_c, m) / k⌋``
    (monotone, so the iteration stops at the largest fixed point)."""
    m = int(pairs_per_class.sum()) // classes_per_group
    while True:
        fits = int(pairs_per_class.clamp(max=m).sum()) // classes_per_group
        if fits == m:
            return m
        m = fits


@dataclass(frozen=True, eq=False)
class ClassPairs:
    """The epoch order of class-pairs groups of ``group`` positions (see the module docstring).

    ``labels``: the split's labels (int64 [N]); ``group``: ``P``, even; ``split`` names the
    images in errors. ``len()`` is the positions per epoch, ``m · P``.
    """

    labels: Tensor
    group: int
    split: str = "training"
    pairs: Tensor = field(init=False, repr=False)  # pairs used per class, [C]
    groups: int = field(init=False)  # m

    def __post_init__(self) -> None:
        check_pattern_group(self.group, "pattern group")
        labels = self.labels.detach().to("cpu", torch.int64).reshape(-1)
        object.__setattr__(self, "labels", labels)
        k = self.group // 2
        counts = torch.bincount(labels) if labels.numel() else torch.zeros(0, dtype=torch.int64)
        paired = int((counts >= 2).sum())
        if paired < k:
            raise BnbenchError(
                f"trainer.batch_pattern=class_pairs: a group of {self.group} samples needs "
                f"{k} classes with two images each, but the {self.split} images have "
                f"{paired}; lower the normalization batch (norm.nbs or trainer.pattern_group)")
        m = groups_per_epoch(counts // 2, k)
        object.__setattr__(self, "groups", m)
        object.__setattr__(self, "pairs", (counts // 2).clamp(max=m))

    def __len__(self) -> int:
        return self.groups * self.group

    def order(self, generator: torch.Generator) -> Tensor:
        """The sample index at each epoch position (int64 [m·P], CPU), drawn from
        ``generator`` (seeded per epoch by the loader)."""
        n, k, m = self.labels.numel(), self.group // 2, self.groups
        num_classes = self.pairs.numel()
        shuffled = torch.randperm(n, generator=generator)
        # Sorted by class, stable: each class's run keeps the shuffled (random) order.
        by_class = shuffled[torch.sort(self.labels[shuffled], stable=True).indices]
        counts = torch.bincount(self.labels, minlength=num_classes)
        starts = counts.cumsum(0) - counts  # where each class's run begins in ``by_class``
        left = self.pairs.to(torch.float64)  # unused pairs per class
        classes = torch.empty(m, k, dtype=torch.int64)
        nth = torch.empty(m, k, dtype=torch.int64)  # which pair of its class each slot takes
        for g in range(m):
            # The k fullest classes: a uniform draw in [0, 1) breaks only ties of the counts.
            chosen = (left + torch.rand(num_classes, generator=generator)).topk(k).indices
            classes[g] = chosen
            nth[g] = self.pairs[chosen] - left[chosen].long()
            left[chosen] -= 1
        first = starts[classes] + 2 * nth  # a pair: by_class[first], by_class[first + 1]
        grouped = torch.cat([by_class[first], by_class[first + 1]], dim=1)  # [m, P]
        return grouped[torch.randperm(m, generator=generator)].reshape(-1)


__all__ = ["ClassPairs", "groups_per_epoch"]
