"""The config schema (dataclasses in Hydra's ConfigStore) and its semantic checks.

Hydra composes ``configs/train.yaml`` on top of :class:`TrainConfig`, so a typo'd key or a wrong
type fails at composition; :func:`validate` then checks values (positive sizes, norm options).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from bnbench.errors import BnbenchError
from bnbench.plan import BATCH_FREE, BATCH_PATTERNS, BatchPlan, batch_plan, expected_processes


@dataclass
class FpnConfig:
    """``model.head=fpn``: one head shared over feature levels (Rethinking §5.2, Table 5;
    :mod:`bnbench.models.fpn`). Its normalization is its own; the backbone keeps ``norm``."""

    # backbone stages (1 … 4: layer1 … layer4) whose outputs are the levels; each level is one
    # domain of the head's normalization
    levels: list[int] = field(default_factory=lambda: [2, 3, 4])
    width: int = 32  # channels of the 1x1 laterals and of the head
    convs: int = 4  # conv-norm-ReLU blocks of the head (as RetinaNet's)
    top_down: bool = False  # FPN's top-down sum: each level + the coarser one upsampled
    norm: str = "domain"  # domain (DomainBatchNorm2d: the three choices below) | gn | none
    train_stats: str = "domain"  # SGD statistics: per level (Fig. 7a) | shared: levels joined (7b)
    pop_stats: str = "domain"  # population statistics: one set per level | shared by all levels
    affine_mode: str = "shared"  # the affine transform: shared by the levels | one per level


@dataclass
class CropsConfig:
    """``model.head=crops``: R crops ("RoIs") of every image, each classified by a conv–norm head,
    R-CNN's head as a classifier (Rethinking §4.2, §6.1, Tables 3 and 6;
    :mod:`bnbench.models.crops`). Here ``norm`` is the head's (the run's batch plan and
    ``bnbench eval stats=…`` are about it); the backbone has its own, batch-free norm."""

    num: int = 8  # R: crops per image
    size: int = 3  # each crop resampled to size x size (RoIAlign, one sample per bin)
    # backbone stage (1 … 4: layer1 … layer4) cropped, later stages dropped (an 8x8 map for
    # 16-px images and the small-input stem; R-CNN crops stage 3 or an FPN level)
    stage: int = 2
    min_side: float = 0.25  # box sides: uniform in [min_side, max_side] × the feature map's side
    max_side: float = 0.75
    seed: int = 0  # the R boxes, the same on every image, are drawn once from this seed
    layers: int = 2  # conv-norm-ReLU blocks of the head (the paper's box head has 4)
    channels: Optional[int] = None  # the head's width; null: the cropped stage's
    normalize: bool = True  # false: no normalization in the head (its convs get a bias)
    shuffle: bool = False  # ShuffleBN (Fig. 9): crops permuted across devices for the head
    backbone_norm: str = "gn"  # gn | ln | in: batch-free, as the paper's FrozenBN backbone


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    width: float = 1.0
    small_input: bool = False
    zero_init_residual: bool = False
    # what follows the backbone: pool (global average pool + fc), fpn (a head shared over
    # feature levels, Rethinking Table 5), crops (a head over crops of each image, Table 6)
    head: str = "pool"
    fpn: FpnConfig = field(default_factory=FpnConfig)  # model.head=fpn's options
    crops: CropsConfig = field(default_factory=CropsConfig)  # model.head=crops's options


@dataclass
class DatasetConfig:
    """Every key ``bnbench.data.build_dataset`` reads (the one dataset schema; ``pad`` null: the
    dataset's default)."""

    name: str = "synthetic"
    root: Optional[str] = None
    download: bool = False
    resolution: int = 16
    num_train: int = 10000
    num_val: int = 2000
    num_classes: int = 15
    seed: int = 0
    difficulty: str = "standard"  # synthetic only: standard | hard (bnbench.data.synthetic)
    pad: Optional[int] = None
    crop_size: int = 224
    resize_size: int = 256
    in_memory: bool = False
    workers: int = 4
    skip_unreadable: bool = False  # ImageFolder: drop files PIL cannot decode (counted warning)
    # ImageNet-C's corruption of every image (bnbench.data.corruptions): none | contrast |
    # gaussian_noise | jpeg_compression, at severity 1 … 5 (3: the medium one of Rethinking §5.1)
    corruption: str = "none"
    severity: int = 3


@dataclass
class NormConfig:
    """``name`` picks the registry entry; the other keys are its options (``None`` = default).

    ``freeze_at_epoch`` (FrozenBN schedule, Rethinking Fig. 6: the statistics frozen are
    ``freeze_stats`` — ``precise`` (PreciseBN at the switch, the paper's) or ``ema`` — and the
    learning rate warms up linearly over ``freeze_warmup_epochs`` after the switch),
    ``burnin_epochs`` (CBN burn-in in epochs) and ``scale_schedule`` (BRN schedules fit to the
    run) are read by the trainer.
    """

    name: str = "bn"
    eps: Optional[float] = None
    momentum: Optional[float] = None
    nbs: Optional[int] = None
    eval_stats: Optional[str] = None
    eval_nbs: Optional[int] = None
    group_size: Optional[int] = None
    freeze_affine: Optional[bool] = None
    rmax: Optional[float] = None
    dmax: Optional[float] = None
    warmup_iters: Optional[int] = None
    rmax_iters: Optional[int] = None
    dmax_iters: Optional[int] = None
    schedule_scale: Optional[float] = None
    ema: Optional[str] = None
    groups: Optional[int] = None
    window: Optional[int] = None
    burnin: Optional[int] = None
    rho: Optional[float] = None
    neg_var: Optional[str] = None
    jacobian_dtype: Optional[str] = None
    num_domains: Optional[int] = None
    train_stats: Optional[str] = None
    pop_stats: Optional[str] = None
    affine_mode: Optional[str] = None
    freeze_at_epoch: Optional[int] = None
    freeze_stats: str = "precise"
    freeze_warmup_epochs: float = 1.0
    burnin_epochs: Optional[float] = None
    scale_schedule: bool = False


#: NormConfig keys that are not layer options.
RUN_KEYS = ("name", "freeze_at_epoch", "freeze_stats", "freeze_warmup_epochs", "burnin_epochs",
            "scale_schedule")


@dataclass
class OptimConfig:
    lr: float = 0.2  # per 256 images; scaled by the global batch (Goyal et al. 2017)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    no_wd_norm_bias: bool = True
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | step
    warmup_epochs: float = 1.0
    warmup_factor: float = 0.1
    steps: list[int] = field(default_factory=lambda: [30, 60, 90])
    gamma: float = 0.1
    label_smoothing: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 8
    batch_size: int = 64  # per process
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads; 0 = torch's default
    bf16: bool = False
    float64: bool = False  # model and data in float64 (exact equivalence checks)
    channels_last: bool = False
    resume: bool = False
    checkpoint: bool = True
    keep_checkpoints: bool = False  # also keep checkpoints/epoch{E}.pt after each epoch
    progress: Optional[bool] = None  # None: only on a TTY
    max_iters: int = 0  # stop after this many iterations (0 = all); for smoke tests
    compile: bool = False  # torch.compile the whole model (BRN/CBN steps run eagerly inside it)
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: traced, not fused)
    # How SGD batches are drawn (Rethinking Fig. 8): random, or class_pairs — every group of
    # pattern_group samples (null: the normalization batch) is pattern_group/2 classes × 2
    # images (bnbench.plan, bnbench.data.patterns)
    batch_pattern: str = "random"
    pattern_group: Optional[int] = None


@dataclass
class PreciseConfig:
    """PreciseBN (Rethinking §3): population statistics recomputed after training the weights."""

    enabled: bool = True
    num_samples: int = 10000
    batch_size: int = 256
    augment: bool = True
    estimator: str = "population"  # population (Eq. 2) | batch_mean (Eq. 3)
    layerwise: bool = False  # exact population statistics, layer by layer (appendix A.3)


@dataclass
class EvalConfig:
    every: int = 1  # epochs
    batch_size: int = 500


@dataclass
class DistConfig:
    nproc: int = 1  # >1: bnbench starts this many processes itself (torchrun)
    backend: str = "auto"  # auto | gloo | nccl
    ema_sync: str = "average"  # average | broadcast
    shuffle_bn: bool = False
    timeout_s: Optional[float] = None  # a stuck collective fails after this (null: env, else 240)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    precise: PreciseConfig = field(default_factory=PreciseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BnbenchError(f"{key}={value}: choose one of {', '.join(choices)}")


#: Every numeric key's valid interval; ``None`` values (a variant's default) are not checked here.
_POSITIVE, _NON_NEGATIVE = "(0, inf)", "[0, inf)"
RANGES: dict[str, str] = {
    "model.width": _POSITIVE, "model.fpn.width": _POSITIVE, "model.fpn.convs": _POSITIVE,
    "model.crops.num": _POSITIVE, "model.crops.size": _POSITIVE, "model.crops.stage": _POSITIVE,
    "model.crops.min_side": "(0, 1]", "model.crops.max_side": "(0, 1]",
    "model.crops.seed": _NON_NEGATIVE, "model.crops.layers": _POSITIVE,
    "model.crops.channels": _POSITIVE,
    "dataset.resolution": _POSITIVE, "dataset.num_train": _POSITIVE,
    "dataset.num_val": _POSITIVE, "dataset.num_classes": "[2, inf)",
    "dataset.pad": _NON_NEGATIVE, "dataset.crop_size": _POSITIVE,
    "dataset.resize_size": _POSITIVE, "dataset.workers": _NON_NEGATIVE,
    "dataset.seed": _NON_NEGATIVE,
    "norm.eps": _POSITIVE, "norm.momentum": "[0, 1]", "norm.nbs": _POSITIVE,
    "norm.eval_nbs": _POSITIVE, "norm.group_size": _NON_NEGATIVE, "norm.rmax": "[1, inf)",
    "norm.dmax": _NON_NEGATIVE, "norm.warmup_iters": _NON_NEGATIVE,
    "norm.rmax_iters": _NON_NEGATIVE, "norm.dmax_iters": _NON_NEGATIVE,
    "norm.schedule_scale": _POSITIVE, "norm.groups": _POSITIVE, "norm.window": _POSITIVE,
    "norm.burnin": _NON_NEGATIVE, "norm.num_domains": _POSITIVE,
    "norm.freeze_at_epoch": _NON_NEGATIVE, "norm.freeze_warmup_epochs": _NON_NEGATIVE,
    "norm.burnin_epochs": _NON_NEGATIVE,
    "optim.lr": _POSITIVE, "optim.momentum": "[0, 1]",
    "optim.weight_decay": _NON_NEGATIVE, "optim.warmup_epochs": _NON_NEGATIVE,
    "optim.warmup_factor": "(0, 1]", "optim.gamma": _POSITIVE,
    "optim.label_smoothing": "[0, 1)",
    "trainer.epochs": _POSITIVE, "trainer.batch_size": _POSITIVE, "trainer.seed": _NON_NEGATIVE,
    "trainer.threads": _NON_NEGATIVE, "trainer.max_iters": _NON_NEGATIVE,
    "trainer.pattern_group": _POSITIVE,
    "precise.num_samples": _POSITIVE, "precise.batch_size": _POSITIVE,
    "eval.every": _POSITIVE, "eval.batch_size": _POSITIVE,
    "dist.nproc": _POSITIVE, "dist.timeout_s": _POSITIVE,
}


def _check_range(key: str, value: Any, interval: str) -> None:
    """``value`` in ``interval`` (``"[0, 1)"``-style; ``inf`` for no upper bound), else one
    line naming the key."""
    if value is None:
        return
    low, high = (float(v) for v in interval[1:-1].split(","))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if interval[0] == "[" else value > low)
    ok = ok and (value <= high if interval[-1] == "]" else value < high)
    if not ok:
        what = "must be positive" if interval == _POSITIVE else f"must be in {interval}"
        raise BnbenchError(f"{key}={value}: {what}")


#: ``model.fpn.norm`` values, and the values of its three choices (Table 5).
FPN_NORMS = ("domain", "gn", "none")
FPN_MODES = ("domain", "shared")


def _check_fpn(cfg: DictConfig) -> None:
    """``model.fpn`` of a ``model.head=fpn`` run: its levels are distinct stages in order, its
    norm and choices known; a backbone without batch statistics under a BN head is refused (the
    evaluation kinds of a run, EMA/PreciseBN or none, follow the backbone's ``norm``)."""
    fpn = cfg.model.fpn
    levels = list(fpn.levels)
    if not levels or levels != sorted(set(levels)) or not all(1 <= s <= 4 for s in levels):
        raise BnbenchError(f"model.fpn.levels={levels}: distinct backbone stages in increasing "
                           "order, each 1 … 4 (layer1 … layer4), e.g. [2,3,4]")
    _choice("model.fpn.norm", fpn.norm, FPN_NORMS)
    for key in ("train_stats", "pop_stats", "affine_mode"):
        _choice(f"model.fpn.{key}", fpn[key], FPN_MODES)
    if fpn.norm == "domain" and cfg.norm.name in BATCH_FREE:
        raise BnbenchError(f"model.fpn.norm=domain under norm={cfg.norm.name}: a BatchNorm head "
                           "needs a backbone with batch statistics (norm=bn, frozen, …), since "
                           "a run's evaluations follow the backbone's norm")


def _check_crops(cfg: DictConfig) -> None:
    """``model.crops`` of a ``model.head=crops`` run: a backbone stage, ordered box sides, a
    batch-free backbone norm (the run's batch plan and evaluation kinds are the head's), and no
    ``norm`` or shuffle that the head would not use. (``norm.nbs`` dividing the batch: the plan.)"""
    crops = cfg.model.crops
    if crops.stage > 4:
        raise BnbenchError(f"model.crops.stage={crops.stage}: a backbone stage, 1 … 4 "
                           "(layer1 … layer4)")
    if crops.min_side > crops.max_side:
        raise BnbenchError(f"model.crops.min_side={crops.min_side} exceeds "
                           f"model.crops.max_side={crops.max_side}")
    if crops.backbone_norm not in BATCH_FREE:
        raise BnbenchError(f"model.crops.backbone_norm={crops.backbone_norm}: choose one of "
                           f"{', '.join(BATCH_FREE)}; the backbone is batch-free (as the paper's "
                           "FrozenBN one), the run's norm and its batches are the head's")
    if cfg.norm.name in ("cbn", "naive_cbn"):
        raise BnbenchError(f"norm={cfg.norm.name} with model.head=crops: not supported (the "
                           "head regroups each image's crops before its norm layers, and CBN's "
                           "window and Jacobians are kept per conv output); Table 6 compares "
                           "norm=bn, ghost, syncbn and gn, with or without model.crops.shuffle")
    batch_free = cfg.norm.name in BATCH_FREE
    if not crops.normalize and not batch_free:
        raise BnbenchError(f"model.crops.normalize=false: the head has no normalization, so "
                           f"norm={cfg.norm.name} (the head's) would normalize nothing; use "
                           "norm=gn with it (the run then has no batch statistics)")
    if crops.shuffle and (batch_free or not crops.normalize):
        raise BnbenchError("model.crops.shuffle=true: the head has no batch statistics "
                           f"(norm={cfg.norm.name}, model.crops.normalize="
                           f"{str(crops.normalize).lower()}); nothing to shuffle for")


def norm_options(norm: Any) -> dict[str, Any]:
    """The layer options of a norm config (``None`` and trainer-only keys dropped)."""
    items = OmegaConf.to_container(norm) if isinstance(norm, DictConfig) else dict(vars(norm))
    return {k: v for k, v in items.items() if k not in RUN_KEYS and v is not None}


def layer_options(cfg: Any, plan: BatchPlan, iters_per_epoch: int) -> dict[str, Any]:
    """The norm layers' options of a run: :func:`norm_options`, the plan's normalization batches
    (``nbs``, ``eval_nbs``) and the trainer's schedules in epochs turned into iterations (CBN
    burn-in, BRN schedules fit to the run)."""
    options = {**norm_options(cfg.norm), **plan.layer_options()}
    if cfg.norm.burnin_epochs is not None and "burnin" not in options:
        from bnbench import norm as norms

        if "burnin" not in norms.spec(cfg.norm.name).options:
            raise BnbenchError(f"norm.burnin_epochs: norm={cfg.norm.name} has no burn-in "
                               "(cbn, naive_cbn do)")
        options["burnin"] = round(cfg.norm.burnin_epochs * iters_per_epoch)
    if cfg.norm.name == "brn" and cfg.norm.scale_schedule and "schedule_scale" not in options:
        # Our choice: the r_max ramp ends at half of the run (BRN paper: 40k iterations).
        rmax_iters = options.get("rmax_iters", 40000)
        if rmax_iters <= 0:
            raise BnbenchError(f"norm.rmax_iters={rmax_iters}: must be positive with "
                               "norm.scale_schedule=true")
        options["schedule_scale"] = 0.5 * cfg.trainer.epochs * iters_per_epoch / rmax_iters
    return options


def validate(cfg: DictConfig) -> None:
    """Value checks that the schema's types cannot express; raises :class:`BnbenchError`."""
    groups = [f.name for f in fields(TrainConfig)]
    extra = [k for k in cfg if k not in groups and k != "hydra"]
    if extra:  # `+typo=…` adds a key that the schema's struct mode cannot refuse
        raise BnbenchError(f"unknown key {extra[0]}; valid keys here: {', '.join(groups)}")

    for key, interval in RANGES.items():
        _check_range(key, OmegaConf.select(cfg, key), interval)
    _choice("optim.schedule", cfg.optim.schedule, ("cosine", "step"))
    _choice("trainer.device", cfg.trainer.device, ("auto", "cpu", "cuda"))
    _choice("trainer.batch_pattern", cfg.trainer.batch_pattern, BATCH_PATTERNS)
    _choice("dataset.difficulty", cfg.dataset.difficulty, ("standard", "hard"))
    if cfg.model.head == "fpn":
        _check_fpn(cfg)
    if cfg.model.head == "crops":
        _check_crops(cfg)
    if cfg.trainer.bf16 and cfg.trainer.float64:
        raise BnbenchError("trainer.bf16 and trainer.float64 exclude each other")
    if cfg.trainer.keep_checkpoints and not cfg.trainer.checkpoint:
        raise BnbenchError("trainer.keep_checkpoints=true keeps copies of the checkpoints: it "
                           "needs trainer.checkpoint=true")
    if cfg.trainer.compile:
        import torch

        backends = torch.compiler.list_backends(exclude_tags=())
        _choice("trainer.compile_backend", cfg.trainer.compile_backend, tuple(backends))
    _choice("precise.estimator", cfg.precise.estimator, ("population", "batch_mean"))
    _choice("dist.backend", cfg.dist.backend, ("auto", "gloo", "nccl"))
    _choice("dist.ema_sync", cfg.dist.ema_sync, ("average", "broadcast"))
    freeze = cfg.norm.freeze_at_epoch
    if freeze is not None and not 0 <= freeze <= cfg.trainer.epochs:
        raise BnbenchError(f"norm.freeze_at_epoch={freeze}: must be in [0, trainer.epochs]")
    _choice("norm.freeze_stats", cfg.norm.freeze_stats, ("precise", "ema"))
    from bnbench import norm as norms  # torch: only for the layers' own checks, after the rest
    from bnbench.data.corruptions import check_corruption

    check_corruption("dataset", cfg.dataset.corruption, cfg.dataset.severity)

    plan = batch_plan(cfg, expected_processes(cfg.dist.nproc))
    options = norms.check_options(cfg.norm.name, layer_options(cfg, plan, iters_per_epoch=1))
    entry = norms.spec(cfg.norm.name)
    if entry.prepare is None:  # (SyncBN's needs the process group: checked when it is built)
        # The layers' own checks (momentum, window, GN groups vs the model's channels, CBN's
        # pairing, …) before any run directory exists: the model built on the meta device.
        import torch

        from bnbench.models import build_model

        with torch.device("meta"):
            build_model(cfg.model, cfg.norm.name, options, num_classes=10)
