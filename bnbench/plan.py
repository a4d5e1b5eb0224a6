"""The batch plan: every "batch" of a run, decided once, from the config.

"Rethinking 'Batch' in BatchNorm" separates batches that a training script usually conflates.
:func:`batch_plan` turns the config into all of them, and nothing else in bnbench derives a batch
size from a variant's name: the trainer logs the plan at start and writes it to
``summary.json``, the loaders get its SGD and evaluation batches, the layers get its
normalization batches (:meth:`BatchPlan.layer_options`), PreciseBN gets its batch and steps. The
layers keep the mechanism (how a group of samples is normalized); the plan is the policy.

=====================  ============================================================================
``per_process``        SGD batch of one process (``trainer.batch_size``), what both papers vary
``global_batch``       SGD batch: ``per_process × processes``; the learning rate scales with it
``normalization``      samples one training normalization batch holds: ``norm.nbs`` (GhostBN;
                       the simulated devices' batch of BRN, CBN, naive CBN), ``per_process ×
                       sync_processes`` (SyncBN), ``per_process`` (BN, BRN, CBN, ...), ``None``
                       for batch-independent layers (GN, LN, IN)
``remainder``          samples of a smaller last group when ``nbs`` does not divide the batch
                       (GhostBN; the per-device variants refuse it: devices have equal batches)
``sync_processes``     processes one normalization batch spans (SyncBN's ``norm.group_size``)
``evaluation``         samples per normalization batch at inference with mini-batch statistics
                       (``norm.eval_nbs``, default the training one); ``None``: population
                       statistics
``eval_batch``         images per evaluation forward (``eval.batch_size``)
``precise_batch``      PreciseBN's ``B`` per process (``precise.batch_size``, at most its share)
``precise_steps``      PreciseBN's batches per process: ``N = precise_batch × precise_steps ×
                       processes`` samples in all (``precise.num_samples``, rounded down to whole
                       batches, at least one)
``pattern``            ``trainer.batch_pattern=class_pairs`` (Rethinking §6.1, Fig. 8): the
                       samples of one patterned group, ``P/2`` classes × 2 images
                       (:mod:`bnbench.data.patterns`): ``trainer.pattern_group``, default the
                       normalization batch (the per-process batch for batch-free layers);
                       ``None``: random batches. Groups and normalization batches nest (one
                       divides the other), so a normalization batch of ``P`` holds the pairs and
                       GhostBN groups of at most ``P/2`` hold distinct classes (the paper's
                       remedy)
``crops``              ``model.head=crops`` (Rethinking Tables 3, 6): crops per image ``R`` of
                       the crop head, whose norm is the run's: every batch above counts images, a
                       sample of the head's BN is an image's ``R`` crops
                       (:mod:`bnbench.models.crops`), so a normalization batch holds the crops
                       of ``normalization`` images — a simulated device's own (contiguous), so
                       ``nbs`` must divide the batch; every process's with SyncBN; ``0``: no crop
                       head
``shuffle_crops``      ``model.crops.shuffle``: ShuffleBN over the crops (Fig. 9), a normalization
                       batch holds ``normalization × R`` crops drawn at random from all devices
                       and processes
=====================  ============================================================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bnbench.errors import BnbenchError

#: Variants whose normalization does not depend on the batch.
BATCH_FREE = ("gn", "ln", "in")
#: ``trainer.batch_pattern``: random batches, or class-pairs groups (:mod:`bnbench.data.patterns`).
BATCH_PATTERNS = ("random", "class_pairs")
#: Variants that read ``nbs`` as simulated devices of ``nbs`` samples each (equal batches: CBN
#: keeps a fixed-shape window per device).
PER_DEVICE = ("brn", "cbn", "naive_cbn")


@dataclass(frozen=True)
class BatchPlan:
    """Every batch size of a run (see the module docstring)."""

    processes: int
    per_process: int
    global_batch: int
    normalization: int | None
    remainder: int
    sync_processes: int
    shuffle_bn: bool
    evaluation: int | None
    eval_batch: int
    precise_batch: int
    precise_steps: int
    pattern: int | None = None
    crops: int = 0
    shuffle_crops: bool = False

    @property
    def precise_samples(self) -> int:
        return self.precise_batch * self.precise_steps * self.processes

    def layer_options(self) -> dict[str, int]:
        """The normalization batches as layer options (``nbs``, ``eval_nbs``) where they differ
        from the layer's default (the whole per-process batch)."""
        options = {}
        if self.normalization is not None and self.normalization < self.per_process:
            options["nbs"] = self.normalization
        if self.evaluation is not None:
            options["eval_nbs"] = self.evaluation
        return options

    def describe(self) -> str:
        """One log line."""
        norm = "independent of the batch" if self.normalization is None else (
            f"{self.normalization} samples" + (f" (last group {self.remainder})"
                                               if self.remainder else ""))
        if self.sync_processes > 1:
            norm += f" over {self.sync_processes} processes"
        if self.shuffle_bn:
            norm += " (ShuffleBN)"
        evaluation = ("population statistics" if self.evaluation is None
                      else f"mini-batch statistics of {self.evaluation} samples")
        if self.pattern is not None:
            norm += (f", in class-pairs groups of {self.pattern} ({self.pattern // 2} classes × "
                     "2 images)")
        if self.crops:
            norm += (f" (crop head, ShuffleBN: a sample is {self.crops} crops drawn at random "
                     "across the devices)" if self.shuffle_crops else
                     f" (crop head: a sample is an image's {self.crops} crops)")
        return (f"batch plan: SGD {self.global_batch} ({self.per_process} × {self.processes} "
                f"processes), normalization {norm}, evaluation {evaluation} (forward "
                f"{self.eval_batch}), PreciseBN {self.precise_samples} samples in batches of "
                f"{self.precise_batch} per process")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precise_samples": self.precise_samples}


def batch_plan(cfg: Any, processes: int, train_size: int | None = None) -> BatchPlan:
    """The plan of a run with config ``cfg`` on ``processes`` processes (``train_size``: the
    training images, when known, to check that the batches fit)."""
    name, norm = cfg.norm.name, cfg.norm
    per_process = cfg.trainer.batch_size
    global_batch = per_process * processes
    if train_size is not None and global_batch > train_size:
        raise BnbenchError(f"trainer.batch_size={per_process}: the global batch {global_batch} "
                           f"exceeds the {train_size} training images")
    nbs = norm.get("nbs")
    if nbs is not None and nbs > per_process:
        raise BnbenchError(
            f"norm.nbs={nbs} exceeds the per-process batch trainer.batch_size={per_process}: "
            "a normalization batch above it is SyncBN (+norm=syncbn)")
    if nbs is not None and name in PER_DEVICE and per_process % nbs:
        raise BnbenchError(
            f"norm.nbs={nbs}: norm={name} simulates devices of nbs samples each, so nbs must "
            f"divide the per-process batch trainer.batch_size={per_process}")
    sync = _sync_processes(name, norm.get("group_size"), processes)
    if name in BATCH_FREE:
        normalization, remainder = None, 0
    elif nbs is not None:
        normalization, remainder = nbs, per_process % nbs
    else:
        normalization, remainder = per_process * sync, 0
    eval_stats = norm.get("eval_stats") or ("batch" if name == "batch_eval" else "population")
    batch_eval = eval_stats == "batch"
    evaluation = None
    if batch_eval:  # mini-batch statistics at inference: by default the training NBS
        evaluation = norm.get("eval_nbs") or nbs or per_process
    shuffle = bool(cfg.dist.shuffle_bn) and processes > 1
    p = cfg.precise
    share = math.ceil(p.num_samples / processes)
    precise_batch = min(p.batch_size, share)
    steps = max(1, share // precise_batch)
    if train_size is not None:
        steps = min(steps, max(1, (train_size // processes) // precise_batch))
    pattern = _pattern_group(cfg.trainer, per_process, global_batch, normalization, remainder)
    crops, shuffle_crops = _crop_head(cfg.model, per_process, nbs)
    return BatchPlan(processes, per_process, global_batch, normalization, remainder, sync,
                     shuffle, evaluation, cfg.eval.batch_size, precise_batch, steps, pattern,
                     crops, shuffle_crops)


def _crop_head(model: Any, per_process: int, nbs: int | None) -> tuple[int, bool]:
    """``(crops, shuffle_crops)`` of the crop head (see the module docstring), ``(0, False)``
    for other heads. Its simulated devices hold ``nbs`` images each and their crops, all of
    them: ``nbs`` must divide the per-process batch (an R-CNN's GPUs have equal batches)."""
    if model.get("head", "pool") != "crops":
        return 0, False
    if nbs is not None and per_process % nbs:
        raise BnbenchError(
            f"norm.nbs={nbs}: the crop head (model.head=crops) simulates devices of nbs images "
            f"each, with their crops, so nbs must divide the per-process batch "
            f"trainer.batch_size={per_process}")
    return model.crops.num, bool(model.crops.shuffle)


def check_pattern_group(group: int, key: str) -> None:
    """A class-pairs group of ``group`` samples (named by ``key``, the config key it comes
    from) is ``group/2`` classes × 2 images: ``group`` must be even and positive."""
    if group < 2 or group % 2:
        raise BnbenchError(
            f"{key}={group}: trainer.batch_pattern=class_pairs builds each group of {group} "
            f"samples from {group}/2 classes × 2 images, so it must be even (and at least 2)")


def _pattern_group(trainer: Any, per_process: int, global_batch: int,
                   normalization: int | None, remainder: int) -> int | None:
    """Samples per class-pairs group (see ``pattern`` in the module docstring), or ``None``
    for random batches. The loaders lay the groups out over the epoch positions from 0, so a
    group that divides the SGD batch and nests with the normalization batch is aligned with
    every normalization batch of every process."""
    kind, group = trainer.get("batch_pattern", "random"), trainer.get("pattern_group")
    if kind != "class_pairs":
        if group is not None:
            raise BnbenchError(f"trainer.pattern_group={group}: it sizes the groups of "
                               "trainer.batch_pattern=class_pairs, and the batches are random")
        return None
    if group is not None:
        key = "trainer.pattern_group"
    else:  # the normalization batch, named by the key it comes from
        group = normalization or per_process
        key = ("trainer.batch_size" if group == per_process else "norm.nbs"
               if group < per_process else "the SyncBN batch (trainer.batch_size × processes)")
    check_pattern_group(group, key)
    if remainder:
        raise BnbenchError(f"trainer.batch_pattern=class_pairs: norm.nbs={normalization} must "
                           f"divide the per-process batch trainer.batch_size={per_process}, so "
                           "that every normalization batch holds whole groups")
    if global_batch % group or (per_process % group and group % per_process):
        raise BnbenchError(f"trainer.pattern_group={group}: a class-pairs group must divide the "
                           f"per-process batch {per_process} or be a multiple of it that divides "
                           f"the SGD batch {global_batch}")
    if normalization is not None and normalization % group and group % normalization:
        raise BnbenchError(f"trainer.pattern_group={group}: groups and normalization batches "
                           f"of {normalization} samples must nest (one divides the other)")
    return group


def _sync_processes(name: str, group_size: int | None, processes: int) -> int:
    """Processes per SyncBN group: ``group_size`` (0/None: all); 1 for every other variant."""
    if name != "syncbn":
        return 1
    size = group_size or processes
    if size > processes or processes % size:
        raise BnbenchError(
            f"norm.group_size={group_size}: SyncBN groups must divide the {processes} "
            f"process{'es' if processes > 1 else ''} of this run (start more with dist.nproc or "
            "torchrun)")
    return size


def expected_processes(nproc: int, environ: Mapping[str, str] | None = None) -> int:
    """The processes of a run about to start (before any process group exists): ``dist.nproc``
    when bnbench starts them itself, else torchrun's ``WORLD_SIZE``, else the task count of a
    SLURM task, else 1."""
    environ = os.environ if environ is None else environ
    if nproc > 1:
        return nproc
    if "WORLD_SIZE" in environ:
        return int(environ["WORLD_SIZE"])
    if "SLURM_PROCID" in environ:
        for key in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
            if key in environ:
                return int(environ[key])
    return 1
