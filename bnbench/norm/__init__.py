"""The normalization registry: one name ↔ one layer family ↔ ``configs/norm/<name>.yaml``.

``convert(model, name, **options)`` swaps every ``nn.BatchNorm2d`` (and every layer a previous
``convert`` made) of a torchvision-style CNN in place, keeping affine parameters and population
statistics where the new layer has them, and returns the model. Every variant is a 2-D layer, so
``BatchNorm1d``/``BatchNorm3d`` (and ``SyncBatchNorm``, whose input may have any rank) are left as
they are; PreciseBN (:mod:`bnbench.population`) still covers them. ``make(name, **options)``
returns a ``norm_layer(num_features)`` factory for model constructors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnbench.errors import BnbenchError
from bnbench.norm.base import BatchNorm2d
from bnbench.norm.brn import BatchRenorm2d
from bnbench.norm.group import group_norm, instance_norm, layer_norm

BN_OPTIONS = frozenset({"eps", "momentum", "eval_stats", "eval_nbs"})


@dataclass(frozen=True)
class NormSpec:
    """One registry entry: how to build the layer and what it is."""

    build: Callable[..., nn.Module]
    options: frozenset[str]
    summary: str
    section: str
    #: Called after the layers are swapped (CBN pairs each layer with its conv).
    attach: Callable[[nn.Module], None] | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    #: Turns config options into constructor arguments once per ``convert`` (SyncBN's group).
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def _bn(num_features: int, **options: Any) -> BatchNorm2d:
    return BatchNorm2d(num_features, **options)


def _sync_group(options: dict[str, Any]) -> dict[str, Any]:
    from bnbench.distributed import sync_process_group

    options = dict(options)
    group_size = options.pop("group_size", 0)  # popped before the rest is passed on
    return {**options, "process_group": sync_process_group(group_size)}


def _frozen(num_features: int, *, freeze_affine: bool = False, **options: Any) -> BatchNorm2d:
    layer = BatchNorm2d(num_features, frozen=True, **options)
    if freeze_affine:
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
    return layer


def _registry() -> dict[str, NormSpec]:
    from bnbench.norm.cbn import CBN_OPTIONS, CrossIterationBatchNorm2d, pair_convs
    from bnbench.norm.domain import DOMAIN_OPTIONS, DomainBatchNorm2d

    return {
        "bn": NormSpec(_bn, BN_OPTIONS, "BatchNorm, EMA population statistics", "Rethinking §2–3"),
        "ghost": NormSpec(
            _bn,
            BN_OPTIONS | {"nbs"},
            "GhostBN: statistics per group of nbs samples of the per-process batch",
            "Rethinking §4.1",
        ),
        "syncbn": NormSpec(
            _bn,
            BN_OPTIONS | {"group_size"},
            "SyncBN: statistics over all processes (or groups of group_size)",
            "Rethinking §4.1, §6",
            prepare=_sync_group,
        ),
        "frozen": NormSpec(
            _frozen,
            BN_OPTIONS | {"freeze_affine"},
            "FrozenBN: population statistics in training too",
            "Rethinking §4.3",
        ),
        "batch_eval": NormSpec(
            _bn,
            BN_OPTIONS | {"nbs"},
            "BN evaluated with mini-batch statistics (eval_nbs per group)",
            "Rethinking §4.2",
            fixed={"eval_stats": "batch"},
        ),
        "brn": NormSpec(
            BatchRenorm2d,
            BN_OPTIONS
            | {"nbs", "rmax", "dmax", "warmup_iters", "rmax_iters", "dmax_iters",
               "schedule_scale", "ema"},
            "Batch Renormalization (r/d corrections, r_max/d_max schedules; nbs: per device)",
            "CBN paper §5 (Ioffe 2017)",
        ),
        "gn": NormSpec(group_norm, frozenset({"groups", "eps"}), "GroupNorm", "CBN §5, GN paper"),
        "ln": NormSpec(
            layer_norm, frozenset({"eps"}), "LayerNorm (GroupNorm with 1 group)", "reference row"
        ),
        "in": NormSpec(
            instance_norm,
            frozenset({"eps"}),
            "InstanceNorm (GroupNorm, C groups)",
            "Rethinking §4.1 (NBS 1 analogue)",
        ),
        "cbn": NormSpec(
            CrossIterationBatchNorm2d,
            CBN_OPTIONS,
            "Cross-Iteration BN: window of k iterations, Taylor-compensated (nbs: per device)",
            "CBN paper §3–4",
            attach=pair_convs,
        ),
        "naive_cbn": NormSpec(
            CrossIterationBatchNorm2d,
            CBN_OPTIONS - {"rho", "jacobian_dtype"},
            "naive CBN: the same window average without compensation (nbs: per device)",
            "CBN paper §4 (ablation)",
            attach=pair_convs,
            fixed={"rho": 0.0},
        ),
        "domain": NormSpec(
            DomainBatchNorm2d,
            DOMAIN_OPTIONS,
            "domain-specific statistics (and optionally affine)",
            "Rethinking §5.2, Table 5",
        ),
    }


NORMS: Mapping[str, NormSpec] = _registry()


def spec(name: str) -> NormSpec:
    if name not in NORMS:
        raise BnbenchError(f"norm={name}: unknown normalization; choose one of {', '.join(NORMS)}")
    return NORMS[name]


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Options with ``None`` dropped; an option the variant does not take is an error."""
    entry = spec(name)
    given = {k: v for k, v in options.items() if v is not None}
    clash = sorted(k for k in given if k in entry.fixed and given[k] != entry.fixed[k])
    if clash:
        raise BnbenchError(
            f"norm={name}: {clash[0]} is fixed to {entry.fixed[clash[0]]!r} for this variant"
        )
    unknown = sorted(set(given) - entry.options - set(entry.fixed))  # idempotent
    if unknown:
        raise BnbenchError(
            f"norm={name}: unknown option {unknown[0]}; valid options: "
            f"{', '.join(sorted(entry.options)) or 'none'}"
        )
    return {**given, **entry.fixed}


def make(name: str, **options: Any) -> Callable[[int], nn.Module]:
    """A ``norm_layer(num_features)`` factory (validates the options once, up front)."""
    entry, opts = spec(name), check_options(name, options)
    if entry.prepare is not None:
        opts = entry.prepare(opts)
    return lambda num_features: entry.build(num_features, **opts)


#: Every normalization layer of torch (weight decay treats their parameters alike).
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
              nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (torch's or one of ours)."""
    return isinstance(module, NORM_TYPES)


def is_convertible(module: nn.Module) -> bool:
    """What :func:`convert` replaces: 2-D batch norms (ours included) and group norms (what
    ``gn``/``ln``/``in`` make). ``nn.SyncBatchNorm`` is not a ``BatchNorm2d`` and stays."""
    return isinstance(module, (nn.BatchNorm2d, nn.GroupNorm))


def convert(model: nn.Module, name: str, **options: Any) -> nn.Module:
    """Replace every normalization layer of ``model`` by ``name``'s layer, in place.

    Affine parameters, population statistics and, unless given in ``options``, ``eps`` and the
    EMA ``momentum`` are copied where both layers have them, so converting a trained BN model to
    ``frozen`` keeps its function. ``num_batches_tracked`` is copied too: BRN's schedules and
    CBN's burn-in count from it, so a converted trained model starts past them (a fresh model
    at 0). Returns ``model``.
    """
    factory, entry = make(name, **options), spec(name)
    swaps = []  # every new layer is built before the model changes (a bad option: untouched)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if is_convertible(child) and child_name != "":
                new = factory(
                    child.num_features if hasattr(child, "num_features") else child.num_channels
                )
                _copy_state(child, new)
                for key in ("eps", "momentum"):
                    value = getattr(child, key, None)
                    if key not in options and isinstance(value, float) and hasattr(new, key):
                        setattr(new, key, value)
                swaps.append((parent, child_name, child, new))
    for parent, child_name, _, new in swaps:
        setattr(parent, child_name, new)
    try:
        if entry.attach is not None:
            entry.attach(model)  # e.g. CBN's conv pairing, which can fail
    except BaseException:
        for parent, child_name, old, _ in swaps:
            setattr(parent, child_name, old)
        raise
    return model


@torch.no_grad()
def _copy_state(old: nn.Module, new: nn.Module) -> None:
    ref = next((t for t in [*old.parameters(), *old.buffers()]), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        src, dst = getattr(old, key, None), getattr(new, key, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
            if src.shape == dst.shape:
                dst.copy_(src)
            elif dst.dim() == src.dim() + 1 and dst.shape[1:] == src.shape:
                dst.copy_(src.expand_as(dst))  # per-domain copies of shared state


@contextmanager
def eval_stats_mode(model: nn.Module, mode: str, nbs: int | None = None) -> Iterator[None]:
    """Evaluate every BN-family layer with ``mode`` ("population" or "batch"; with ``nbs``, in
    groups of that many samples instead of the layers' own ``eval_nbs``), then restore."""
    layers = bn_layers(model)
    saved = [(layer.eval_stats, layer.eval_nbs) for layer in layers]
    for layer in layers:
        layer.eval_stats = mode
        if nbs is not None:
            layer.eval_nbs = nbs
    try:
        yield
    finally:
        for layer, (stats, old_nbs) in zip(layers, saved):
            layer.eval_stats, layer.eval_nbs = stats, old_nbs


def bn_layers(model: nn.Module) -> list[BatchNorm2d]:
    """The BN-family layers (those with population statistics), in registration order."""
    return [m for m in model.modules() if isinstance(m, BatchNorm2d)]


__all__ = [
    "NORMS",
    "NormSpec",
    "BatchNorm2d",
    "bn_layers",
    "check_options",
    "convert",
    "is_convertible",
    "is_norm",
    "make",
    "spec",
]
