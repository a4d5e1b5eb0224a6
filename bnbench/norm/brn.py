"""Batch Renormalization (Ioffe 2017), compared with CBN in the CBN paper (Yao et al. 2021, §5).

In training, with batch statistics μ_B, σ_B = sqrt(σ²_B + ε) and population statistics μ, σ:

    r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)   (both detached)
    y = γ · (r · (x − μ_B) / σ_B + d) + β

which is BatchNorm with affine ``(γ·r, γ·d + β)``: the gradient through μ_B, σ_B is BN's with
weight ``γ r``, and ``∂γ = Σ ∂y (r x̂ + d)`` (GhostBN's kernel with one group and these hooks,
:class:`bnbench.norm.base.Normalization`). ``r, d`` use the EMA before this batch's update; the
EMA is BN's (unbiased variance) and is used at inference.
``r_max = 1, d_max = 0`` is plain BN. Schedules (BRN paper defaults, in iterations
``t`` = ``num_batches_tracked``): plain BN until ``warmup_iters`` (5k), then r_max rises linearly
to ``rmax`` (3) by ``rmax_iters`` (40k) and d_max to ``dmax`` (5) by ``dmax_iters`` (25k).
``schedule_scale`` multiplies the three iteration counts (the trainer sets it to fit the run).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnbench.errors import BnbenchError
from bnbench.norm.base import BatchNorm2d, grouped_batch_norm
from bnbench.norm.kernels import Normalization


def ramp(t: float, start: float, end: float, final: float, initial: float) -> float:
    """``initial`` until ``start``, then linear to ``final`` at ``end``, constant after."""
    if t <= start:
        return initial
    if t >= end or end <= start:
        return final
    return initial + (final - initial) * (t - start) / (end - start)


class BatchRenorm2d(BatchNorm2d):
    """Batch Renormalization over the per-process batch (see the module docstring)."""

    def __init__(
        self,
        num_features: int,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_iters: int = 5000,
        rmax_iters: int = 40000,
        dmax_iters: int = 25000,
        schedule_scale: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(num_features, **kwargs)
        if self.nbs is not None or self.process_group is not None:
            raise BnbenchError(
                "brn: renormalizes the per-process batch; nbs/sync are not supported"
            )
        if rmax < 1 or dmax < 0:
            raise BnbenchError(f"brn: rmax={rmax} must be ≥ 1 and dmax={dmax} ≥ 0")
        if schedule_scale <= 0:
            raise BnbenchError(f"brn: schedule_scale={schedule_scale} must be positive")
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_iters, self.rmax_iters, self.dmax_iters = warmup_iters, rmax_iters, dmax_iters
        self.schedule_scale = float(schedule_scale)

    def limits(self) -> tuple[float, float]:
        """Current ``(r_max, d_max)`` from the iteration count."""
        t = float(self.num_batches_tracked.item()) / self.schedule_scale
        r = ramp(t, self.warmup_iters, self.rmax_iters, self.rmax, 1.0)
        d = ramp(t, self.warmup_iters, self.dmax_iters, self.dmax, 0.0)
        return r, d

    def _train_forward(self, x: Tensor) -> Tensor:
        rmax, dmax = self.limits()
        if rmax == 1.0 and dmax == 0.0:
            return super()._train_forward(x)
        self._check_group_size(x, x.shape[0])
        limits = torch.tensor([rmax, dmax], dtype=torch.float64).to(self.running_var.device)
        # One group (the whole batch): r and d are constants for autograd in there.
        y, mean, var, counts = grouped_batch_norm(
            x, self.weight, self.bias, x.shape[0], self.eps, self._kernels(x), renorm,
            self.running_mean, self.running_var, limits)
        self._update_population(mean, var, counts)
        return y


def renorm(mean: Tensor, var: Tensor, eps: float, running_mean: Tensor, running_var: Tensor,
           limits: Tensor) -> Normalization:
    """BRN's ``r = clip(σ_B/σ, 1/r_max, r_max)``, ``d = clip((μ_B − μ)/σ, −d_max, d_max)`` from
    the batch statistics ``(1, 1, C, 1)`` and the EMA before this batch's update;
    ``limits = [r_max, d_max]`` (a tensor: the schedules change it every iteration)."""
    shape, cd = mean.shape, mean.dtype
    inv_std = torch.rsqrt(running_var.to(cd).view(shape) + eps)
    rmax, dmax = limits[0].to(cd), limits[1].to(cd)
    r = torch.clamp(torch.sqrt(var + eps) * inv_std, 1.0 / rmax, rmax)
    d = torch.clamp((mean - running_mean.to(cd).view(shape)) * inv_std, -dmax, dmax)
    return Normalization(mean, var, gain=r, offset=d)
