"""Batch-independent reference rows: GroupNorm (Wu & He 2018), LayerNorm and InstanceNorm.

All three are ``torch.nn.GroupNorm`` with ``G`` groups: statistics per sample and per group of
``C/G`` channels over ``(C/G, H, W)``; LN is ``G = 1``, IN is ``G = C``. They have no population
statistics, so EMA and PreciseBN coincide and runs report a single accuracy.
"""

from __future__ import annotations

from torch import nn

from bnbench.errors import BnbenchError


def default_groups(channels: int, preferred: int = 32) -> int:
    """The GN paper's 32 groups, or the largest divisor of ``channels`` below it when C is small."""
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def group_norm(
    num_features: int, *, groups: int | None = None, eps: float = 1e-5, affine: bool = True
) -> nn.GroupNorm:
    if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int)
                               or groups < 1):
        raise BnbenchError(f"norm.groups={groups}: must be a positive integer")
    g = default_groups(num_features) if groups is None else groups
    if num_features % g:
        raise BnbenchError(
            f"norm.groups={groups}: must divide the {num_features} channels of every "
            "normalized layer"
        )
    return nn.GroupNorm(g, num_features, eps=eps, affine=affine)


def layer_norm(num_features: int, *, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(1, num_features, eps=eps, affine=affine)


def instance_norm(num_features: int, *, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(num_features, num_features, eps=eps, affine=affine)
