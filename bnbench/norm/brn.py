"""Batch Renormalization (Ioffe 2017), compared with CBN in the CBN paper (Yao et al. 2021, §5).

In training, with batch statistics μ_B, σ_B = sqrt(σ²_B + ε) and population statistics μ, σ:

    r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)   (both detached)
    y = γ · (r · (x − μ_B) / σ_B + d) + β

which is BatchNorm with affine ``(γ·r, γ·d + β)``: PyTorch's batch-norm kernel with that folded
affine gives BN's gradient through μ_B, σ_B with weight ``γ r``, and autograd through the fold
gives ``∂γ = Σ ∂y (r x̂ + d)``. ``r, d`` use the EMA before this batch's update, and the EMA is
used at inference. ``ema="std"`` (default) is the BRN paper's (Algorithm 1):
``μ ← μ + m(μ_B − μ)``, ``σ ← σ + m(σ_B − σ)``, kept as ``running_var = σ² − ε`` (so
``sqrt(running_var + ε) = σ`` everywhere BN reads it); ``ema="var"`` is PyTorch BN's EMA of the
unbiased batch variance.
``r_max = 1, d_max = 0`` is plain BN. Schedules (BRN paper defaults, in iterations
``t`` = ``num_batches_tracked``): plain BN (``r = 1, d = 0``) until ``warmup_iters`` (5k), then
r_max rises linearly to ``rmax`` (3) by ``rmax_iters`` (40k) and d_max to ``dmax`` (5) by
``dmax_iters`` (25k).
``schedule_scale`` multiplies the three iteration counts (the trainer sets it to fit the run).

Simulated devices (``nbs``, :func:`bnbench.norm.base.device_groups`): the per-process batch is
``G = N / nbs`` devices of ``nbs`` samples, each with its own ``μ_B, σ_B`` and so its own ``r, d``
against the one shared population statistics; then every device steps its own copy of the EMA by
the rule above and the buffers become the copies' mean (``update_population`` with ``groups=G``,
the mechanism of GhostBN's EMA). That is ``G`` processes with per-process BRN whose buffers are
averaged after every step. (The trainer averages the processes' buffers at validation only,
``dist.ema_sync``; between two averagings real processes compute ``r, d`` against their own EMAs.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from bnbench.errors import BnbenchError
from bnbench.norm.base import (
    BatchNorm2d,
    Ema,
    batch_moments,
    device_groups,
    from_groups,
    repeat_groups,
    run_eagerly,
    to_groups,
    update_population,
)

EMA = ("std", "var")


def ramp(t: Tensor, start: float, end: float, final: float, initial: float) -> Tensor:
    """``initial`` until ``start``, then linear to ``final`` at ``end``, constant after; ``t`` a
    tensor (the schedule follows ``num_batches_tracked`` on its device, no host read-back)."""
    if end <= start:  # a zero-length ramp: a step right after start
        return torch.where(t <= start, initial, final).to(t.dtype)
    frac = ((t - start) / (end - start)).clamp(0.0, 1.0)
    return frac * (final - initial) + initial


class BatchRenorm2d(BatchNorm2d):
    """Batch Renormalization over the per-process batch, or over ``N / nbs`` simulated devices
    of ``nbs`` samples each (see the module docstring)."""

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
        ema: str = "std",
        **kwargs,
    ) -> None:
        super().__init__(num_features, **kwargs)
        if self.process_group is not None:
            raise BnbenchError("brn: renormalizes the per-process (or per-device, nbs) batch; "
                               "sync is not supported")
        if rmax < 1 or dmax < 0:
            raise BnbenchError(f"brn: rmax={rmax} must be ≥ 1 and dmax={dmax} ≥ 0")
        if schedule_scale <= 0:
            raise BnbenchError(f"brn: schedule_scale={schedule_scale} must be positive")
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_iters, self.rmax_iters, self.dmax_iters = warmup_iters, rmax_iters, dmax_iters
        self.schedule_scale = float(schedule_scale)
        if ema not in EMA:
            raise BnbenchError(f"norm.ema={ema}: choose one of {', '.join(EMA)}")
        self.ema = ema

    @property
    def schedule(self) -> Schedule:
        return Schedule(float(self.warmup_iters), float(self.rmax_iters), float(self.dmax_iters),
                        self.rmax, self.dmax, self.schedule_scale)

    def limits(self) -> tuple[float, float]:
        """Current ``(r_max, d_max)`` as numbers (reads the iteration count back to the host)."""
        dtype = torch.float64 if self.running_var.dtype == torch.float64 else torch.float32
        return tuple(float(v) for v in self.schedule.limits(self.num_batches_tracked, dtype))

    # Not traced into a compiled model: the step reads the EMA that it then updates, and a traced
    # backward may recompute r, d from the updated buffers. The layer runs eagerly there.
    @run_eagerly
    def _train_forward(self, x: Tensor) -> Tensor:
        devices = device_groups(x.shape[0], self.nbs, "brn")
        if self.rmax == 1.0 and self.dmax == 0.0 and self.ema == "var":  # BN (GhostBN), always
            return super()._train_forward(x)
        # During the warmup the limits are (1, 0): r = 1, d = 0 exactly, i.e. BN. Not branched
        # on: the limits are tensors on the buffers' device, nothing is read back to the host.
        self._check_group_size(x, x.shape[0] // devices)
        grouped = to_groups(x, devices)  # channel g·C + c: channel c of device g
        mean, var = batch_moments(grouped.detach())  # (G·C,): each device's μ_B, σ²_B
        r, d = self.corrections(mean, var)
        update_population(self._ema(), mean, var, grouped.numel() // grouped.shape[1], self.eps,
                          devices)
        gamma, beta = repeat_groups(self.weight, devices), repeat_groups(self.bias, devices)
        weight = r if gamma is None else gamma * r
        bias = d if gamma is None else gamma * d
        if beta is not None:
            bias = bias + beta
        dtype = x.dtype if self.weight is None else self.weight.dtype
        y = F.batch_norm(grouped, None, None, weight.to(dtype), bias.to(dtype), True, 0.0,
                         self.eps)
        return from_groups(y, devices)

    @torch.no_grad()
    def corrections(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """BRN's ``r = clip(σ_B/σ, 1/r_max, r_max)``, ``d = clip((μ_B − μ)/σ, −d_max, d_max)``
        from the batch statistics ``(C,)`` (or ``(G·C,)``: ``G`` devices, each against the same
        EMA) and the EMA as it is (before this batch's update), with the schedule's limits at
        ``num_batches_tracked``."""
        dtype, shape = mean.dtype, (-1, self.num_features)
        inv_std = torch.rsqrt(self.running_var.to(dtype) + self.eps)
        rmax, dmax = self.schedule.limits(self.num_batches_tracked, dtype)
        r = torch.clamp(torch.sqrt(var.view(shape) + self.eps) * inv_std, 1.0 / rmax, rmax)
        d = torch.clamp((mean.view(shape) - self.running_mean.to(dtype)) * inv_std, -dmax, dmax)
        return r.view(mean.shape), d.view(mean.shape)

    def _ema(self) -> Ema:
        return super()._ema()._replace(rule=self.ema)  # "std": BRN Algorithm 1 on σ

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax:g}, dmax={self.dmax:g}, ema={self.ema}"


class Schedule(NamedTuple):
    """The r_max/d_max schedules (constants of a layer)."""

    warmup_iters: float
    rmax_iters: float
    dmax_iters: float
    rmax: float
    dmax: float
    scale: float

    def limits(self, iterations: Tensor,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` after ``iterations`` (tensor ops in ``dtype``, on its device)."""
        t = iterations.to(dtype) / self.scale  # float32 counts are exact up to 2²⁴
        return (ramp(t, self.warmup_iters, self.rmax_iters, self.rmax, 1.0),
                ramp(t, self.warmup_iters, self.dmax_iters, self.dmax, 0.0))
