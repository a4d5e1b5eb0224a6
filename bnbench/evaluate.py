"""Evaluation: accuracy under a chosen kind of normalization statistics — the one path.

The trainer's per-epoch validation and ``bnbench eval`` (:mod:`bnbench.eval_app`) both call
:func:`evaluate_stats`; it reads on its own, as torchvision's references' ``evaluate(model,
loader)`` does. Kinds (``stats``, a :class:`StatsSpec`):

* ``ema`` — the population statistics as the model holds them (trained by EMA);
* ``precise`` — PreciseBN (Rethinking §3): statistics recomputed from ``N`` training samples in
  batches of ``B`` (:func:`bnbench.population.update_population_stats`), with estimator Eq. 2
  (``population``) or Eq. 3 (``batch_mean``), layer by layer or not (appendix A.3), with or
  without the training augmentation, on the random subset that ``seed`` picks — or
  (``data="heldout"``, Rethinking §5.1) on the images an evaluation holds out of the split it
  evaluates (:func:`held_out_indices`), and on the domain ``corruption`` (ImageNet-C's, or
  ``none``) where it is not the evaluated data's;
* ``batch`` — mini-batch statistics at inference (Rethinking §4.2), in normalization batches of
  ``nbs`` samples of random batches, or (``pattern``) of batches in class-pairs groups of
  ``pattern`` samples as a patterned run trains on (Rethinking §6.1, Fig. 8); its records are
  named ``batch_pattern`` then;
* ``none`` — layers without batch statistics (GN/LN/IN): one accuracy.

The model's own population statistics and evaluation settings are restored afterwards, so an
evaluation never changes training. Records of ``bnbench eval`` (``<run>/evals.jsonl``) are read
back with :func:`read_records` / :func:`find_record`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bnbench.data.loaders import derive_seed
from bnbench.errors import BnbenchError
from bnbench.norm import bn_layers, eval_stats_mode
from bnbench.plan import check_pattern_group
from bnbench.population import ESTIMATORS, Batches, preserved_population, update_population_stats

if TYPE_CHECKING:
    from bnbench.data import DataSource, Loader
    from bnbench.plan import BatchPlan

STATS_KINDS = ("ema", "precise", "batch", "none")
LABELS = {"ema": "EMA", "precise": "PreciseBN", "batch": "batch-stats", "none": "top-1",
          "batch_pattern": "batch-stats (class pairs)"}
#: The trainer's PreciseBN subsets are drawn by a loader seeded ``trainer.seed + 7919``: an order
#: of the training set unrelated to the SGD order (seeded ``trainer.seed``).
PRECISE_SEED_OFFSET = 7919
#: PreciseBN's images: a random subset of the training split (the trainer's), or the images an
#: evaluation holds out of the split it evaluates (``holdout``).
PRECISE_DATA = ("train", "heldout")
#: ``bnbench eval``'s records, one JSON object per line, in the run dir.
EVALS_FILE = "evals.jsonl"

Progress = Callable[[Iterable, int, str], Iterable]


def no_progress(batches: Iterable, total: int, desc: str) -> Iterable:
    """A :data:`Progress` that shows nothing."""
    return batches


@dataclass(frozen=True)
class StatsSpec:
    """The statistics an evaluation uses, with every option that changes its result.

    ``num_samples``/``batch_size`` are PreciseBN's requested ``N``/``B`` (the batch plan turns
    them into whole batches per process); ``seed`` picks PreciseBN's random subset of the
    training set; ``nbs`` is the normalization batch of ``batch`` (``None``: the layers' own
    ``eval_nbs``) and ``pattern`` the class-pairs group of its batches (``None``: random
    batches). ``data`` is where PreciseBN's images come from (:data:`PRECISE_DATA`), and
    ``corruption``/``severity`` their domain where it is not the evaluated data's (``"none"``:
    clean images; ``None``: the evaluated data's). Options of another kind are ignored.
    """

    kind: str
    num_samples: int = 0
    batch_size: int = 0
    estimator: str = "population"
    seed: int = 0
    layerwise: bool = False
    augment: bool = True
    nbs: int | None = None
    pattern: int | None = None
    data: str = "train"
    corruption: str | None = None
    severity: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in STATS_KINDS:
            raise BnbenchError(f"stats={self.kind}: choose one of {', '.join(STATS_KINDS)}")
        if self.kind == "precise" and self.estimator not in ESTIMATORS:
            raise BnbenchError(f"precise.estimator={self.estimator}: choose one of "
                               f"{', '.join(ESTIMATORS)}")
        if self.kind == "batch" and self.nbs is not None and self.nbs < 1:
            raise BnbenchError(f"batch.nbs={self.nbs}: must be positive")
        if self.kind == "precise" and self.data not in PRECISE_DATA:
            raise BnbenchError(f"precise.data={self.data}: choose one of "
                               f"{', '.join(PRECISE_DATA)}")
        if self.kind == "batch" and self.pattern is not None:
            check_pattern_group(self.pattern, "batch.pattern")
            if self.nbs is None:
                raise BnbenchError("batch.pattern: patterned batches need their nbs")

    @property
    def name(self) -> str:
        """The kind as records name it: ``batch_pattern`` for patterned batches."""
        return "batch_pattern" if self.kind == "batch" and self.pattern else self.kind

    def options(self) -> dict[str, Any]:
        """The options of this kind, keyed as ``bnbench eval`` overrides."""
        if self.kind == "precise":
            return {"stats": "precise", "precise.num_samples": self.num_samples,
                    "precise.batch_size": self.batch_size, "precise.estimator": self.estimator,
                    "precise.seed": self.seed, "precise.layerwise": self.layerwise,
                    "precise.augment": self.augment, **self._domain_options()}
        if self.kind == "batch":
            return {"stats": "batch", "batch.nbs": self.nbs,
                    **({"batch.pattern": self.pattern} if self.pattern else {})}
        return {"stats": self.kind}

    def tag(self) -> str:
        """A canonical string of the options (``stats=precise,N=…,B=…,…``)."""
        if self.kind == "precise":
            parts = [f"N={self.num_samples}", f"B={self.batch_size}",
                     f"estimator={self.estimator}", f"seed={self.seed}",
                     f"layerwise={canonical(self.layerwise)}",
                     f"augment={canonical(self.augment)}",
                     *(f"{k.split('.')[1]}={v}" for k, v in self._domain_options().items())]
        elif self.kind == "batch":
            parts = [f"nbs={canonical(self.nbs)}"] + (
                [f"pattern=class_pairs({self.pattern})"] if self.pattern else [])
        else:
            parts = []
        return ",".join([f"stats={self.kind}", *parts])

    def _domain_options(self) -> dict[str, Any]:
        """PreciseBN's data and domain where they are not the default (the training split of
        the evaluated data): ``precise.data``, ``precise.corruption``, ``precise.severity``."""
        out: dict[str, Any] = {}
        if self.data != "train":
            out["precise.data"] = self.data
        if self.corruption is not None:
            out["precise.corruption"] = self.corruption
        if self.severity is not None:
            out["precise.severity"] = self.severity
        return out


def precise_spec(cfg: Any) -> StatsSpec:
    """The trainer's PreciseBN: ``precise.*`` of the run's config, on the trainer's subset."""
    p = cfg.precise
    return StatsSpec("precise", num_samples=p.num_samples, batch_size=p.batch_size,
                     estimator=p.estimator, seed=cfg.trainer.seed + PRECISE_SEED_OFFSET,
                     layerwise=p.layerwise, augment=p.augment)


def run_specs(model: nn.Module, cfg: Any, plan: BatchPlan) -> list[StatsSpec]:
    """What the trainer validates with after an epoch: EMA, PreciseBN (``precise.enabled``) and,
    for layers that evaluate with mini-batch statistics, those (at the plan's evaluation batch);
    ``none`` alone for a model without batch-norm layers. A run trained on patterned batches
    (``plan.pattern``) is also validated with mini-batch statistics of random batches and of
    batches of its own pattern, in its training normalization batches (Rethinking Fig. 8)."""
    layers = bn_layers(model)
    if not layers:
        return [StatsSpec("none")]
    specs = [StatsSpec("ema")] + ([precise_spec(cfg)] if cfg.precise.enabled else [])
    if any(m.eval_stats == "batch" for m in layers) or plan.pattern:
        specs.append(StatsSpec("batch", nbs=plan.evaluation or plan.normalization))
    if plan.pattern:
        specs.append(StatsSpec("batch", nbs=plan.normalization, pattern=plan.pattern))
    return specs


@dataclass(frozen=True)
class Reader:
    """How this process reads a dataset for evaluation: its shard (``rank`` of ``world``), the
    device, the seed of shuffled evaluation orders (mini-batch statistics, training subsets), the
    model's input precision (``float64``) and autocast, and a progress display."""

    data: DataSource
    seed: int = 0
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    float64: bool = False
    autocast: bool = False
    progress: Progress = no_progress

    def loader(self, split: str, batch_size: int, *, augment: bool, shuffle: bool,
               drop_last: bool, seed: int | None = None, pattern: int | None = None) -> Loader:
        """A loader over ``split`` for this process (``seed``: default :attr:`seed`;
        ``pattern``: in class-pairs groups of that many samples)."""
        return self.data.loader(split, batch_size, augment=augment, shuffle=shuffle,
                                drop_last=drop_last, seed=self.seed if seed is None else seed,
                                rank=self.rank, world_size=self.world, device=self.device,
                                pattern=pattern)

    def cast(self, batches: Iterable[tuple[Tensor, Tensor]]) -> Iterable[tuple[Tensor, Tensor]]:
        """Inputs in the model's precision (float64 for exact equivalence checks)."""
        if not self.float64:
            return batches
        return ((x.double(), y) for x, y in batches)


def precise_batches(reader: Reader, spec: StatsSpec, plan: BatchPlan, epoch: int, *,
                    split: str = "train") -> Batches:
    """PreciseBN's input batches on this process: the first ``plan.precise_steps`` batches of
    ``plan.precise_batch`` images of ``split`` (the training images, or a reader's held-out
    images: :func:`held_out`) of a loader seeded ``spec.seed`` at ``epoch`` (augmented as in
    training with ``spec.augment``), in the domain ``spec.corruption`` where it is given. The
    subset depends on the epoch, so that each epoch's validation draws its own; every call of
    the factory yields the same batches."""
    if spec.corruption is not None:  # statistics of another domain than the evaluated one
        reader = replace(reader, data=reader.data.corrupted(spec.corruption, spec.severity))
    loader = reader.loader(split, plan.precise_batch, augment=spec.augment, shuffle=True,
                           drop_last=True, seed=spec.seed)
    loader.set_epoch(epoch)
    steps = min(len(loader), plan.precise_steps)

    def batches() -> Iterator[Tensor]:
        shown = reader.progress(loader, steps, "PreciseBN")
        for i, (x, _) in enumerate(reader.cast(shown)):
            yield x
            if i + 1 >= steps:
                break

    return batches


def held_out_indices(size: int, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` images of a split of ``size`` that an evaluation holds out (for PreciseBN on
    the evaluated domain, Rethinking §5.1) and the ``size − n`` it evaluates, each as sorted
    indices: the first ``n`` and the rest of one fixed random order of the split. The order is
    the same for every run and evaluation (so every column of a table evaluates the same
    images); random, because a class-sorted folder's first images hold a few classes."""
    if not 0 < n < size:
        raise BnbenchError(f"holdout={n}: must be less than the split's {size} images, to leave "
                           "images to evaluate")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed("holdout")))
    return order[:n].sort().values, order[n:].sort().values


def held_out(reader: Reader, split: str, n: int) -> tuple[Reader, Reader]:
    """Readers of ``split`` reduced to its ``n`` held-out images and to the rest
    (:func:`held_out_indices`); each image is corrupted as in the whole split."""
    size = reader.data.train_size if split == "train" else reader.data.val_size
    held, rest = held_out_indices(size, n)
    return (replace(reader, data=reader.data.subset(split, held)),
            replace(reader, data=reader.data.subset(split, rest)))


def eval_batches(reader: Reader, plan: BatchPlan, *, split: str = "val", shuffle: bool = False,
                 subset: int | None = None, pattern: int | None = None, nbs: int | None = None
                 ) -> tuple[Iterable[tuple[Tensor, Tensor]], int]:
    """The batches of ``plan.eval_batch`` images of ``split`` that this process evaluates, and
    their count: the whole split in order, or shuffled (seed ``reader.seed``); with ``subset``,
    the first ``subset`` images of the shuffled order across all processes (a random subset).
    With ``pattern`` (normalized in groups of ``nbs``): the split's class-pairs order (the
    images of its whole groups), in forward batches of whole groups and whole normalization
    batches, ``plan.eval_batch`` rounded down to a multiple of both (at least one of each)."""
    batch = plan.eval_batch
    if pattern is not None:
        if subset is not None:
            raise BnbenchError("a random subset of patterned batches would cut their groups")
        whole = math.lcm(pattern, nbs or pattern)
        batch = max(whole, batch // whole * whole)
    loader = reader.loader(split, batch, augment=False,
                           shuffle=shuffle or subset is not None, drop_last=False,
                           pattern=pattern)
    if subset is None:
        return loader, len(loader)
    per_step = plan.eval_batch * reader.world
    steps = min(len(loader), math.ceil(subset / per_step))

    def first() -> Iterator[tuple[Tensor, Tensor]]:
        for step, (x, y) in enumerate(loader):
            if step >= steps:
                break
            start = step * per_step + reader.rank * plan.eval_batch  # this share's first position
            keep = max(0, min(y.shape[0], subset - start))
            yield x[:keep], y[:keep]

    return first(), steps


def evaluate_stats(model: nn.Module, reader: Reader, spec: StatsSpec, plan: BatchPlan, *,
                   epoch: int, split: str = "val", subset: int | None = None,
                   holdout: int = 0) -> dict[str, float]:
    """Top-1, top-5 (%) and mean cross-entropy of ``model`` on ``split`` (the first ``subset``
    images of a random order, or all) with the statistics of ``spec``.

    ``plan`` is the batch plan of the run's config with ``spec``'s PreciseBN ``N`` and ``B``
    (:func:`bnbench.plan.batch_plan`): it gives the evaluation batch and PreciseBN's batches per
    process; ``epoch`` is the index of the epoch the model has just trained (PreciseBN's
    subset). ``holdout``: ``split``'s held-out images (:func:`held_out_indices`) are not
    evaluated; PreciseBN with ``spec.data == "heldout"`` estimates on exactly them. The model's
    population statistics and evaluation settings are left as they were.
    """
    precise_reader, precise_split = reader, "train"
    if holdout:
        held, reader = held_out(reader, split, holdout)
        if spec.data == "heldout":
            precise_reader, precise_split = held, split
    elif spec.kind == "precise" and spec.data == "heldout":
        raise BnbenchError("precise.data=heldout: PreciseBN reads the images an evaluation holds "
                           "out; set holdout=<n>")
    mode = "batch" if spec.kind == "batch" else "population"
    # Mini-batch statistics need random batches (a class-sorted folder would leak labels), or
    # the batches of a pattern.
    pattern = spec.pattern if spec.kind == "batch" else None
    batches, steps = eval_batches(reader, plan, split=split, shuffle=spec.kind == "batch",
                                  subset=subset, pattern=pattern, nbs=spec.nbs)
    with preserved_population(model), eval_stats_mode(
            model, mode, spec.nbs if spec.kind == "batch" else None):
        if spec.kind == "precise":
            update_population_stats(model, precise_batches(precise_reader, spec, plan, epoch,
                                                           split=precise_split),
                                    estimator=spec.estimator, layerwise=spec.layerwise)
        name = "validation" if split == "val" else split
        shown = reader.progress(batches, steps, f"{name} ({LABELS[spec.name]})")
        return evaluate(model, reader.cast(shown), reader.autocast)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], autocast: bool = False
) -> dict[str, float]:
    """Top-1, top-5 (%) and mean cross-entropy over ``batches``, summed over all processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss
    for x, y in batches:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            logits = model(x).float()
        if y.numel() == 0:
            continue
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == y[:, None]
        totals += torch.stack(
            [
                torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
                hits[:, 0].sum().double(),
                hits.any(1).sum().double(),
                F.cross_entropy(logits, y, reduction="sum").double(),
            ]
        )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    n = max(totals[0].item(), 1.0)
    return {
        "top1": 100 * totals[1].item() / n,
        "top5": 100 * totals[2].item() / n,
        "loss": totals[3].item() / n,
    }


@torch.no_grad()
def sync_population_stats(model: nn.Module, mode: str = "average") -> None:
    """Make the EMA statistics of all processes equal: average them, or take rank 0's."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [b for layer in bn_layers(model) for b in (layer.running_mean, layer.running_var)]
    if not buffers:
        return
    flat = torch.cat([b.flatten().double() for b in buffers])
    if mode == "average":
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
    else:
        dist.broadcast(flat, src=0)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


# -- records of `bnbench eval` ------------------------------------------------------------------


def canonical(value: Any) -> str:
    """A value as an override spells it (``true``, ``null``, ``128``, ``population``); a string
    is read as an override value first, so ``"128"`` and ``128`` are the same."""
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            return value
        if isinstance(value, str):
            return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluation records of ``run_dir`` in the order written (a torn line is skipped)."""
    path = Path(run_dir) / EVALS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "tag" in row:
            records.append(row)
    return records


#: Options whose default does not depend on the run: a record with another value matches only
#: when asked for (a train-split or other-dataset record is never taken for the validation one).
_FIXED_DEFAULTS = {"split": "val", "train_subset": None, "holdout": None, "precise.data": None,
                   "precise.corruption": None, "precise.severity": None}


def _matches(record: Mapping[str, Any], options: Mapping[str, Any]) -> bool:
    wanted = {**_FIXED_DEFAULTS, **options}
    if any(canonical(record.get(key)) != canonical(value) for key, value in wanted.items()):
        return False
    return all(key in wanted for key in record if key.startswith("dataset."))


def find_record(run_dir: Path, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The latest evaluation record of ``run_dir`` whose options include ``options``
    (``bnbench eval`` overrides as ``key: value``, e.g. ``{"stats": "precise",
    "precise.batch_size": "10"}``), on the validation split of the run's dataset unless
    ``options`` say otherwise; ``None`` if there is none."""
    found = None
    for record in read_records(run_dir):
        if _matches(record, options):
            found = record
    return found
