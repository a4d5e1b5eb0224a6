"""``bnbench eval run=<run dir> [options]``: evaluate a trained run's checkpoint with chosen
statistics, and record the result in the run.

A Hydra app (``configs/eval.yaml`` on :class:`EvalAppConfig`): ``-m`` sweeps, e.g. PreciseBN over
``N``, ``B`` and the subset seed in one command::

    bnbench eval run=outputs/x stats=precise precise.batch_size=2,10,100 precise.seed=0,1,2 -m

It rebuilds the run's model from the config saved in its checkpoint
(``<run>/checkpoints/last.pt``, or ``checkpoint=<file>``), loads the weights and evaluates them
with :func:`bnbench.evaluate.evaluate_stats` — the code of the trainer's own per-epoch
validation, so ``stats=ema`` and ``stats=precise`` with the run's options reproduce the last
validation row of its ``metrics.jsonl`` exactly. Options left ``null`` take the run's values.
One process evaluates (a run trained on several is evaluated in one; PreciseBN's ``B`` is then
that process's batch), on ``device`` (``auto``: a GPU if there is one).

* ``stats=ema`` — the checkpoint's population statistics as they are;
* ``stats=precise`` — PreciseBN with ``precise.num_samples`` (N), ``precise.batch_size`` (B ≤ N),
  ``precise.estimator`` (``population``: Eq. 2, ``batch_mean``: Eq. 3), ``precise.seed`` (the
  random subset of the training set; ``null``: the trainer's), ``precise.layerwise`` (appendix
  A.3), ``precise.augment`` (the training augmentation or none), and the data it estimates on
  (Rethinking §5.1, Table 4): ``precise.data`` (``train``: a random subset of the training
  split, the trainer's; ``heldout``: the images ``holdout`` keeps out of the evaluated split,
  all of them, un-augmented unless ``precise.augment=true``), ``precise.corruption`` and
  ``precise.severity`` (its domain: ImageNet-C's corruption or ``none``; ``null``: the
  evaluated data's, ``dataset.corruption``/``dataset.severity``);
* ``stats=batch`` — mini-batch statistics in normalization batches of ``batch.nbs`` (``null``:
  the run's evaluation NBS, else its training NBS), in random batches of ``batch_size``;
* ``stats=none`` — models without batch statistics (GN/LN/IN).

On ``split=val``, or ``split=train`` (no augmentation; ``train_subset=<n>``: a random subset of
n images), of the run's dataset or another one: ``dataset=<name>`` replaces it (that group's
config), ``dataset.<key>=…`` changes keys of the run's (``dataset.seed=1``;
``dataset.corruption=contrast``: the evaluated domain, ImageNet-C's corruption of every image at
``dataset.severity``). ``holdout=<n>``: the first n images of one fixed random order of the
split are held out — not evaluated (:func:`bnbench.evaluate.held_out_indices`; the same images
for every evaluation, so that the columns of a table compare on the same images). E.g.
Table 4's "contrast, statistics re-estimated on 1000 contrast images, error on the rest"::

    bnbench eval run=outputs/x dataset.corruption=contrast holdout=1000 stats=precise \
        precise.data=heldout

Each evaluation appends one JSON line to ``<run>/evals.jsonl`` (see :func:`record_of`): its
``tag`` (a canonical string of every option that affects the result), those options as fields
(keyed as the overrides), ``top1``/``top5``/``loss`` and the checkpoint's ``epoch``/``iter``. An
evaluation recorded already for the same checkpoint (tag and iteration) is not run again unless
``force=true``. Hydra's own files of each invocation go to ``<run>/evals/<time>_<options>/``.

Every bad input (no checkpoint, B > N, an unknown kind, a bad size, a dataset the model does not
fit) is one ``bnbench: error:`` line and exit status 2, checked for every job of a sweep before
anything is written.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, get_type_hints

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from bnbench.cli import split_overrides, valid_keys
from bnbench.config import DatasetConfig, PreciseConfig, TrainConfig, validate
from bnbench.errors import BnbenchError
from bnbench.plan import BATCH_FREE, batch_plan

if TYPE_CHECKING:  # (torch is imported once the options are checked)
    import torch

    from bnbench.evaluate import Reader, StatsSpec
    from bnbench.train import RunParts

SPLITS = ("val", "train")
DEVICES = ("auto", "cpu", "cuda")
#: Dataset keys that do not change the images evaluated (left out of the tag).
_DATASET_NOT_IN_TAG = ("workers", "download")
#: Hydra flags that print something and exit, running no job: nothing to validate.
_INFO_FLAGS = frozenset({"--help", "-h", "--hydra-help", "--info", "--shell-completion", "-sc"})


@dataclass
class PreciseOptions:
    """PreciseBN's options; ``null``: the run's ``precise.*`` (the seed: the trainer's subset)."""

    num_samples: Optional[int] = None
    batch_size: Optional[int] = None
    estimator: Optional[str] = None  # population (Eq. 2) | batch_mean (Eq. 3)
    seed: Optional[int] = None
    layerwise: Optional[bool] = None
    augment: Optional[bool] = None  # null: the run's (for precise.data=heldout: false)
    data: Optional[str] = None  # train | heldout (the evaluation's held-out images); null: train
    corruption: Optional[str] = None  # PreciseBN's domain: ImageNet-C's or none; null: evaluated
    severity: Optional[int] = None  # null: dataset.severity


@dataclass
class BatchOptions:
    """Mini-batch statistics at inference."""

    nbs: Optional[int] = None  # null: the run's evaluation NBS, else its training NBS


def _overrides_of(schema: type) -> type:
    """A dataclass with every field of ``schema``, optional and ``None`` (= not overridden)."""
    hints = get_type_hints(schema)
    return make_dataclass(f"{schema.__name__}Overrides",
                          [(f.name, Optional[hints[f.name]], None) for f in fields(schema)])


#: ``dataset.<key>`` overrides of the run's dataset: every key of the one dataset schema.
DatasetOverrides = _overrides_of(DatasetConfig)


@dataclass
class EvalAppConfig:
    """``bnbench eval``'s options (the module docstring says what each does)."""

    run: str = MISSING  # the run dir
    checkpoint: Optional[str] = None  # null: <run>/checkpoints/last.pt
    stats: str = "ema"  # ema | precise | batch | none
    precise: PreciseOptions = field(default_factory=PreciseOptions)
    batch: BatchOptions = field(default_factory=BatchOptions)
    split: str = "val"  # val | train
    train_subset: Optional[int] = None  # split=train: a random subset of this many images
    holdout: Optional[int] = None  # these many images of the split are held out, not evaluated
    batch_size: Optional[int] = None  # images per forward; null: the run's eval.batch_size
    dataset: DatasetOverrides = field(default_factory=DatasetOverrides)  # type: ignore
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # CPU threads; null: the run's trainer.threads
    progress: Optional[bool] = None  # null: a bar on a terminal only
    force: bool = False  # evaluate again what is recorded already


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="eval_schema", node=EvalAppConfig)


@dataclass(frozen=True)
class EvalJob:
    """One evaluation resolved against its run: what to build, what to evaluate, its record's
    identity. ``cfg`` is the run's config with the evaluation's dataset, PreciseBN options,
    forward batch and device; ``epoch``/``iteration`` are the checkpoint's."""

    run_dir: Path
    checkpoint: Path
    cfg: DictConfig
    spec: StatsSpec
    split: str
    subset: int | None
    options: dict[str, Any]
    tag: str
    epoch: int
    iteration: int
    force: bool
    holdout: int | None = None


# -- resolving a job -------------------------------------------------------------------------


def _positive(key: str, value: Any) -> None:
    if value is not None and value < 1:
        raise BnbenchError(f"{key}={value}: must be positive")


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise BnbenchError(f"{key}={value}: choose one of {', '.join(choices)}")


def _unknown_keys(cfg: DictConfig) -> None:
    """No key outside the schema (``+key=…`` adds one that struct mode cannot refuse)."""
    schema = OmegaConf.structured(EvalAppConfig)
    for group in ("", "precise", "batch", "dataset"):
        node, known = (cfg, schema) if not group else (cfg[group], schema[group])
        names = list(known.keys())  # (`in` is false for a missing value: run)
        extra = [k for k in node if k not in names and not (k == "hydra" and not group)]
        if extra:
            name = f"{group}.{extra[0]}" if group else extra[0]
            raise BnbenchError(f"unknown key {name}; valid keys here: {', '.join(names)}")


def check_options(cfg: DictConfig) -> None:
    """The values of the evaluation's own options (those that need no run)."""
    from bnbench.data.corruptions import check_corruption
    from bnbench.evaluate import PRECISE_DATA, STATS_KINDS
    from bnbench.population import ESTIMATORS

    _unknown_keys(cfg)
    _choice("stats", cfg.stats, STATS_KINDS)
    _choice("split", cfg.split, SPLITS)
    _choice("device", cfg.device, DEVICES)
    if cfg.precise.estimator is not None:
        _choice("precise.estimator", cfg.precise.estimator, ESTIMATORS)
    for key in ("precise.num_samples", "precise.batch_size", "batch.nbs", "batch_size",
                "train_subset", "holdout"):
        _positive(key, OmegaConf.select(cfg, key))
    check_corruption("precise", cfg.precise.corruption, cfg.precise.severity)
    if cfg.precise.data is not None:
        _choice("precise.data", cfg.precise.data, PRECISE_DATA)
    if cfg.precise.data == "heldout":
        if cfg.holdout is None:
            raise BnbenchError("precise.data=heldout: PreciseBN reads the images an evaluation "
                               "holds out; set holdout=<n>")
        n = cfg.precise.num_samples
        if n is not None and n != cfg.holdout:
            raise BnbenchError(f"precise.num_samples={n}: with precise.data=heldout PreciseBN "
                               f"reads the holdout={cfg.holdout} held-out images; leave it unset "
                               "or equal")
    if cfg.threads is not None and cfg.threads < 0:
        raise BnbenchError(f"threads={cfg.threads}: must be in [0, inf)")
    if cfg.train_subset is not None and cfg.split != "train":
        raise BnbenchError(f"train_subset={cfg.train_subset}: a subset of the training set "
                           "needs split=train")


def _run_config(saved: dict[str, Any], run_dir: Path, checkpoint: Path) -> DictConfig:
    """The config the checkpoint's weights were trained with (else the run dir's), on the
    schema (keys added since then take their defaults)."""
    if saved.get("config"):
        run_cfg = saved["config"]
    elif (run_dir / ".hydra" / "config.yaml").exists():
        run_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    else:
        raise BnbenchError(f"checkpoint {checkpoint} holds no config and {run_dir}/.hydra/"
                           "config.yaml does not exist")
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), run_cfg)
    except Exception as err:  # a config of another bnbench version
        raise BnbenchError(f"run={run_dir}: its config does not fit this bnbench's schema "
                           f"({str(err).splitlines()[0]})") from err


def effective_config(run: DictConfig, cfg: DictConfig, dataset_choice: str | None) -> DictConfig:
    """The run's config as this evaluation builds it: its dataset replaced (``dataset=<name>``)
    or changed (``dataset.<key>=…``), PreciseBN's options and the forward batch of the
    evaluation, one process on ``device``, eager."""
    eff = OmegaConf.merge(run)  # a copy
    given = {k: v for k, v in OmegaConf.to_container(cfg.dataset).items() if v is not None}
    base = OmegaConf.structured(DatasetConfig) if dataset_choice is not None else eff.dataset
    eff.dataset = OmegaConf.merge(base, given)
    for key, value in OmegaConf.to_container(cfg.precise).items():
        # (the seed and PreciseBN's data and domain are not training options)
        if value is not None and key in PreciseConfig.__dataclass_fields__:
            eff.precise[key] = value
    if cfg.precise.data == "heldout":  # N: every held-out image
        eff.precise.num_samples = cfg.holdout
    if cfg.batch_size is not None:
        eff.eval.batch_size = cfg.batch_size
    eff.trainer.device = cfg.device
    if cfg.threads is not None:
        eff.trainer.threads = cfg.threads
    eff.trainer.progress = cfg.progress
    eff.trainer.compile = False
    eff.dist.nproc = 1
    if eff.norm.name == "syncbn":  # SyncBN in one process is BN (its groups need processes)
        eff.norm.group_size = None
    return eff


def _dataset_changes(run: DictConfig, eff: DictConfig) -> dict[str, Any]:
    """``dataset.<key>: value`` for every key the evaluation's dataset changes (resolved)."""
    before = OmegaConf.to_container(run.dataset, resolve=True)
    after = OmegaConf.to_container(eff.dataset, resolve=True)
    return {f"dataset.{k}": v for k, v in sorted(after.items())
            if k not in _DATASET_NOT_IN_TAG and before.get(k) != v}


def _precise_domain(cfg: DictConfig, eff: DictConfig) -> tuple[str | None, int | None]:
    """PreciseBN's domain ``(corruption, severity)`` where it is not the evaluated data's
    (severity ``None`` for clean images), else ``(None, None)``: one spelling per domain, so
    that equal evaluations have equal tags."""
    from bnbench.data.corruptions import NONE

    def spelled(name: str, severity: int) -> tuple[str, int | None]:
        return name, None if name == NONE else severity

    ds, p = eff.dataset, cfg.precise
    evaluated = spelled(ds.corruption, ds.severity)
    domain = spelled(p.corruption or ds.corruption,
                     ds.severity if p.severity is None else p.severity)
    return (None, None) if domain == evaluated else domain


def _spec(cfg: DictConfig, eff: DictConfig) -> StatsSpec:
    """The statistics of the evaluation, the run's values filled in where ``cfg`` has none."""
    from bnbench.evaluate import PRECISE_SEED_OFFSET, StatsSpec

    kind, p = cfg.stats, eff.precise
    if kind == "precise":
        if p.batch_size > p.num_samples:
            raise BnbenchError(f"precise.batch_size={p.batch_size} exceeds "
                               f"precise.num_samples={p.num_samples}: B is at most N")
        seed = cfg.precise.seed
        seed = eff.trainer.seed + PRECISE_SEED_OFFSET if seed is None else seed
        data = cfg.precise.data or "train"
        # Held-out images are evaluation images: inference preprocessing unless asked.
        augment = p.augment if cfg.precise.augment is not None or data == "train" else False
        corruption, severity = _precise_domain(cfg, eff)
        return StatsSpec("precise", num_samples=p.num_samples, batch_size=p.batch_size,
                         estimator=p.estimator, seed=seed, layerwise=p.layerwise,
                         augment=augment, data=data, corruption=corruption, severity=severity)
    if kind == "batch":
        plan = batch_plan(eff, 1)
        nbs = cfg.batch.nbs or plan.evaluation or plan.normalization
        return StatsSpec("batch", nbs=nbs)
    return StatsSpec(kind)


def _check_kind(kind: str, norm: str) -> None:
    if norm in BATCH_FREE and kind != "none":
        raise BnbenchError(f"stats={kind}: norm={norm} has no batch statistics; use stats=none")
    if norm not in BATCH_FREE and kind == "none":
        raise BnbenchError(f"stats=none: norm={norm} has batch statistics; choose one of ema, "
                           "precise, batch")


def _check_dataset(eff: DictConfig, saved: dict[str, Any], split: str,
                   holdout: int | None) -> None:
    """Another dataset can be read and has as many classes as the model has outputs; the
    ``holdout`` images leave images of ``split`` to evaluate."""
    from bnbench.data import build_dataset
    from bnbench.evaluate import held_out_indices

    data = build_dataset(eff.dataset)
    head = saved.get("model", {}).get("fc.weight")  # bnbench's models: a ResNet's classifier
    if head is not None and head.shape[0] != data.num_classes:
        raise BnbenchError(f"dataset.name={eff.dataset.name}: {data.num_classes} classes, but the "
                           f"checkpoint's model has {head.shape[0]} outputs")
    if holdout is not None:
        held_out_indices(data.train_size if split == "train" else data.val_size, holdout)


def _options(cfg: DictConfig, eff: DictConfig, spec: StatsSpec,
             changes: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Every option that affects the result, keyed as overrides, and the tag: the kind's
    options, then the split, then the dataset's changes."""
    from bnbench.evaluate import canonical

    options, parts = spec.options(), [spec.tag()]
    if spec.kind == "batch":  # the forward batch bounds the normalization groups
        options["batch_size"] = eff.eval.batch_size
        parts.append(f"eval_batch={eff.eval.batch_size}")
    where = {"split": cfg.split}
    if cfg.split == "train" and cfg.train_subset is not None:
        where["train_subset"] = cfg.train_subset
    if cfg.holdout is not None:
        where["holdout"] = cfg.holdout
    for key, value in {**where, **changes}.items():
        options[key] = value
        parts.append(f"{key}={value if isinstance(value, str) else canonical(value)}")
    return options, ",".join(parts)


def prepare(cfg: DictConfig, dataset_choice: str | None, *, check_data: bool = True) -> EvalJob:
    """Resolve one evaluation against its run; raise :class:`BnbenchError` for a bad input.

    ``dataset_choice`` is the ``dataset=<name>`` group chosen on the command line, if any;
    ``check_data``: build a dataset other than the run's once, to refuse one that cannot be
    read or does not fit the model before anything is written.
    """
    if OmegaConf.is_missing(cfg, "run"):
        raise BnbenchError("run: missing; name the run to evaluate: bnbench eval run=<run dir>")
    run_dir = Path(cfg.run)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else run_dir / "checkpoints" / "last.pt"
    if not run_dir.is_dir():
        raise BnbenchError(f"run={run_dir}: no such directory")
    if not checkpoint.is_file():
        raise BnbenchError(f"run={run_dir}: no checkpoint {checkpoint} (a run with "
                           "trainer.checkpoint=false, or stopped before its first epoch ended)")
    if not os.access(run_dir, os.W_OK):
        raise BnbenchError(f"run={run_dir}: not writable (the records go to {run_dir})")
    check_options(cfg)
    import torch  # (after the checks that need no checkpoint: their errors come fast)

    from bnbench import checkpoint as ckpt

    saved = ckpt.load(checkpoint, torch.device("cpu"))
    run = _run_config(saved, run_dir, checkpoint)
    eff = effective_config(run, cfg, dataset_choice)
    validate(eff)
    _check_kind(cfg.stats, eff.norm.name)
    spec = _spec(cfg, eff)
    changes = _dataset_changes(run, eff)
    if check_data and (changes or dataset_choice is not None or cfg.holdout is not None):
        _check_dataset(eff, saved, cfg.split, cfg.holdout)
    options, tag = _options(cfg, eff, spec, changes)
    state = saved.get("state", {})
    return EvalJob(run_dir, checkpoint, eff, spec, cfg.split, cfg.train_subset, options, tag,
                   int(state.get("epoch", 0)), int(state.get("iteration", 0)), bool(cfg.force),
                   cfg.holdout)


# -- running it ------------------------------------------------------------------------------


def record_of(job: EvalJob, metrics: dict[str, float], seconds: float,
              precise_samples: int | None) -> dict[str, Any]:
    """The line of ``evals.jsonl``: ``tag``; the options (``stats``, ``precise.num_samples``,
    …, ``split``, ``dataset.<key>``); ``top1``, ``top5`` (%), ``loss``; the checkpoint's
    ``epoch`` (epochs trained) and ``iter``; ``checkpoint`` (relative to the run dir when
    inside it); ``precise.samples`` (PreciseBN's
    N in whole batches); ``time`` (s)."""
    where = job.checkpoint.resolve()
    if where.is_relative_to(job.run_dir.resolve()):  # the run's own: a path inside the run
        where = where.relative_to(job.run_dir.resolve())
    record = {"tag": job.tag, **job.options, "top1": metrics["top1"], "top5": metrics["top5"],
              "loss": metrics["loss"], "epoch": job.epoch, "iter": job.iteration,
              "checkpoint": str(where)}
    if precise_samples is not None:
        record["precise.samples"] = precise_samples
    return {**record, "time": round(seconds, 3)}


def checkpoint_config(run_dir: Path, checkpoint: Path,
                      device: str = "auto") -> tuple[DictConfig, dict[str, Any]]:
    """The config that rebuilds ``checkpoint``'s model in one process on ``device`` (the run's
    config through :func:`effective_config` with no evaluation overrides), validated, and the
    checkpoint as loaded (on the CPU). For other commands on a run (``bnbench analyze``)."""
    import torch

    from bnbench import checkpoint as ckpt

    saved = ckpt.load(checkpoint, torch.device("cpu"))
    options = OmegaConf.structured(EvalAppConfig)
    options.run, options.device = str(run_dir), device
    cfg = effective_config(_run_config(saved, run_dir, checkpoint), options, None)
    validate(cfg)
    return cfg, saved


@dataclass(frozen=True)
class LoadedRun:
    """A run rebuilt from its config with a checkpoint's weights: what evaluations and analyses
    work on. ``epoch``/``iteration``: the checkpoint's (epochs done, iterations done)."""

    cfg: DictConfig
    parts: RunParts
    reader: Reader
    device: torch.device
    epoch: int
    iteration: int


def load_weights(parts: RunParts, cfg: DictConfig, checkpoint: Path,
                 device: torch.device) -> tuple[int, int]:
    """Load ``checkpoint``'s weights into ``parts.model`` (FrozenBN layers marked as the run had
    them at that epoch); returns the checkpoint's ``(epoch, iteration)``."""
    from bnbench import checkpoint as ckpt
    from bnbench.train import restore_frozen

    saved = ckpt.load(checkpoint, device)
    try:
        parts.model.load_state_dict(saved["model"])
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[-1].strip()[:160]
        raise BnbenchError(f"checkpoint {checkpoint} does not fit the model built for "
                           f"dataset {cfg.dataset.name} ({parts.data.num_classes} classes): "
                           f"{first}") from err
    state = saved.get("state", {})
    epoch, iteration = int(state.get("epoch", 0)), int(state.get("iteration", 0))
    restore_frozen(parts.model, cfg, epoch)
    return epoch, iteration


def load_run(cfg: DictConfig, checkpoint: Path) -> LoadedRun:
    """Build the run of ``cfg`` (:func:`bnbench.train.build_run`) on ``cfg.trainer.device`` with
    ``checkpoint``'s weights, and a :class:`bnbench.evaluate.Reader` of its data as the trainer
    reads it (seed, precision, autocast, progress)."""
    import torch

    from bnbench import distributed as D
    from bnbench.evaluate import Reader
    from bnbench.train import build_run, progress

    device = D.device_for(cfg.trainer.device)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    parts = build_run(cfg, device=device)
    epoch, iteration = load_weights(parts, cfg, checkpoint, device)
    mode = cfg.trainer.progress
    reader = Reader(parts.data, seed=cfg.trainer.seed, device=device,
                    float64=cfg.trainer.float64, autocast=cfg.trainer.bf16,
                    progress=lambda batches, total, desc: progress(batches, total, desc, mode))
    return LoadedRun(cfg, parts, reader, device, epoch, iteration)


def run_eval(job: EvalJob) -> dict[str, Any]:
    """Evaluate the checkpoint of ``job``; returns its record (not yet written)."""
    from bnbench.evaluate import evaluate_stats

    run = load_run(job.cfg, job.checkpoint)
    start = time.perf_counter()
    # The trainer validates the model of epoch e (0-based) with PreciseBN's subset of epoch e;
    # a checkpoint holds the number of epochs done.
    metrics = evaluate_stats(run.parts.model, run.reader, job.spec, run.parts.plan,
                             epoch=max(job.epoch - 1, 0), split=job.split, subset=job.subset,
                             holdout=job.holdout or 0)
    samples = run.parts.plan.precise_samples if job.spec.kind == "precise" else None
    return record_of(job, metrics, time.perf_counter() - start, samples)


def recorded(job: EvalJob) -> dict[str, Any] | None:
    """The latest record of this evaluation (same tag, same checkpoint iteration), if any."""
    from bnbench.evaluate import read_records

    found = None
    for record in read_records(job.run_dir):
        if record.get("tag") == job.tag and record.get("iter") == job.iteration:
            found = record
    return found


def append_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """Append ``record`` to ``<run_dir>/evals.jsonl`` as one line, written in one call."""
    from bnbench.evaluate import EVALS_FILE

    path = run_dir / EVALS_FILE
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def _already(job: EvalJob, record: dict[str, Any]) -> str:
    return (f"{job.tag}: evaluated already at epoch {record['epoch']} (iteration "
            f"{record['iter']}): top-1 {record['top1']:.2f}% in {job.run_dir / 'evals.jsonl'}; "
            "force=true evaluates again")


def _done(job: EvalJob, record: dict[str, Any], path: Path) -> str:
    return (f"{job.tag}: top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%, loss "
            f"{record['loss']:.4f} (epoch {record['epoch']}, iteration {record['iter']}); "
            f"recorded in {path}")


@hydra.main(config_path="pkg://bnbench.configs", config_name="eval", version_base="1.3")
def app(cfg: DictConfig) -> float:
    """One evaluation (one job of a sweep): recorded unless it is already. Returns its top-1,
    for Hydra sweepers."""
    try:
        # (main() checked every job's data before Hydra started)
        job = prepare(cfg, HydraConfig.get().runtime.choices.get("dataset"), check_data=False)
        before = None if job.force else recorded(job)
        if before is not None:
            print(_already(job, before), flush=True)
            return before["top1"]
        record = run_eval(job)
        path = append_record(job.run_dir, record)
    except BnbenchError as err:
        print(f"bnbench: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(_done(job, record, path), flush=True)
    return record["top1"]


# -- the command line ------------------------------------------------------------------------


def _sweep(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The overrides of every job (:func:`bnbench.cli.expand_sweeps`; Hydra's own keys are left
    to Hydra). A sweep over runs needs its own sweep dir."""
    from bnbench.cli import expand_sweeps

    given = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    jobs = expand_sweeps(given, multirun)
    runs = {o for job in jobs for o in job if o.startswith("run=")}
    if len(runs) > 1 and not any(o.lstrip("+").startswith("hydra.sweep.dir=")
                                 for o in overrides):
        raise BnbenchError("run: a sweep over runs needs hydra.sweep.dir=<dir> for Hydra's files "
                           "(by default they go inside the one run)")
    return jobs


def describe(err: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error of ``bnbench eval``."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(err, MissingConfigException):
        path = err.missing_cfg_file or ""
        return (f"{path.split('/')[0]}={path.split('/')[-1]}: unknown option; choose one of "
                f"{', '.join(err.options or [])}")
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    key = getattr(cause, "full_key", None)
    override = re.match(r"Could not (?:override|append to) '([^']+)'", str(err))
    if isinstance(cause, ValidationError) and key:
        return f"{key}: {str(getattr(cause, 'msg', cause)).splitlines()[0]}"
    if override or (isinstance(cause, ConfigKeyError) and key):
        name = override.group(1) if override else key
        return f"unknown key {name}; valid keys here: {', '.join(valid_keys(EvalAppConfig, name))}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def validate_overrides(args: Sequence[str]) -> list[EvalJob]:
    """Compose and resolve every job of the command line; raise :class:`BnbenchError`."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    overrides, multirun = split_overrides(args)
    GlobalHydra.instance().clear()
    jobs = []
    try:
        with initialize_config_module("bnbench.configs", version_base="1.3"):
            try:
                sweep = _sweep(overrides, multirun)
            except BnbenchError:
                raise
            except Exception as err:
                raise BnbenchError(describe(err)) from err
            for job in sweep:
                try:
                    cfg = compose("eval", overrides=job, return_hydra_config=True)
                except Exception as err:  # Hydra/OmegaConf composition errors
                    raise BnbenchError(describe(err)) from err
                jobs.append(prepare(cfg, cfg.hydra.runtime.choices.get("dataset")))
    finally:
        GlobalHydra.instance().clear()
    return jobs


def main(argv: list[str]) -> int:
    """``bnbench eval [overrides] [Hydra flags]``; returns the exit status (0 done, 2 a
    ``bnbench: error:`` line said why). Every job is validated before Hydra starts, so a bad
    input writes nothing; a command whose every evaluation is recorded already only says so."""
    register()
    flags = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    if not flags & _INFO_FLAGS:
        try:
            jobs = validate_overrides(argv)
        except BnbenchError as err:
            print(f"bnbench: error: {err}", file=sys.stderr, flush=True)
            return 2
        before = [None if job.force else recorded(job) for job in jobs]
        if not flags & {"--cfg", "-c"} and jobs and all(r is not None for r in before):
            for job, record in zip(jobs, before):
                print(_already(job, record), flush=True)
            return 0
        # Flags first: argparse takes the overrides as one run of positionals (`a=1 -m b=2`
        # fails).
        overrides, _ = split_overrides(argv)
        argv = [arg for arg in argv if arg not in overrides] + overrides
    sys.argv = ["bnbench eval", *argv]
    try:
        app()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    return 0
