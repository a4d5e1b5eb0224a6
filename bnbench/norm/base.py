"""Where "the batch" of BatchNorm is decided.

Every BN-family layer in bnbench is a :class:`BatchNorm2d` (a subclass of ``torch.nn.BatchNorm2d``,
so state dicts and ``isinstance`` checks are those of PyTorch). For an input ``x`` of shape
``(N, C, H, W)`` and a *normalization batch* ``S`` (a set of samples), per channel:

    μ_S = mean_{n∈S, h, w} x,   σ²_S = mean_{n∈S, h, w} (x − μ_S)²      (biased, as in BN)
    y   = γ · (x − μ_S) / sqrt(σ²_S + ε) + β.

What ``S`` is, is the subject of "Rethinking 'Batch' in BatchNorm" (Wu & Johnson 2021), and it is
decided in :meth:`BatchNorm2d._batch_forward` and nowhere else:

* ``nbs=None``: ``S`` is the whole per-process batch (standard BN, §3);
* ``nbs=k``: ``S`` is each contiguous group of ``k`` samples (GhostBN, §4.1); when ``k`` does not
  divide ``N`` the last ``N mod k`` samples form one smaller group;
* ``process_group``: ``S`` is the union of the batches of all processes of the group (SyncBN, §4.1),
  statistics from a differentiable all-reduce of count-weighted sums and sums of squares;
* at inference, ``eval_stats="population"`` uses the population statistics (``running_mean``,
  ``running_var``); ``eval_stats="batch"`` uses mini-batch statistics with groups of ``eval_nbs``
  samples of the process's own batch (§4.2, "use mini-batch statistics in inference"; also for
  SyncBN layers: a prediction never depends on another process's images);
* ``frozen=True`` uses the population statistics in training too (FrozenBN, §4.3), and PreciseBN
  does not recompute them: they are constants of the model;
* while a PreciseBN observer is attached (:mod:`bnbench.population`), ``S`` is the whole
  per-process batch and the statistics are reported instead of being averaged into the EMA.

Population statistics are an exponential moving average (EMA) during training:
``running ← (1 − m) · running + m · batch`` with PyTorch's ``momentum`` ``m``; the paper writes the
same update as ``λ · running + (1 − λ) · batch``, so ``λ = 1 − m`` (default ``m = 0.1``, λ = 0.9).
As in PyTorch, the variance averaged into the EMA is the unbiased one, ``σ²_S · M / (M − 1)`` with
``M = |S|·H·W``. With several groups the EMA takes their count-weighted average.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnbench.errors import BnbenchError
from bnbench.norm.kernels import EAGER, Ema, Kernels, Transform, check_kernel, ema_step, select

#: ``observer(layer, slot, mean, var, count)``: PreciseBN's hook, called with the biased batch
#: mean and variance (shape ``(C,)``) of ``count`` elements per channel.
StatsObserver = Callable[["BatchNorm2d", int, Tensor, Tensor, int], None]

EVAL_STATS = ("population", "batch")


def check_momentum(momentum: float) -> float:
    """PyTorch's EMA momentum ``m`` in [0, 1] (the paper's λ = 1 − m); warns above 0.5."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise BnbenchError(f"norm.momentum={momentum}: must be a number in [0, 1]")
    if not 0.0 <= float(momentum) <= 1.0:
        raise BnbenchError(
            f"norm.momentum={momentum}: must be in [0, 1] (PyTorch convention, λ = 1 − m)"
        )
    if momentum > 0.5:
        warnings.warn(
            f"norm.momentum={momentum} is PyTorch's m (weight of the new batch); the "
            f"paper's λ = 0.9 is m = 0.1",
            stacklevel=3,
        )
    return float(momentum)


def check_positive(name: str, value: int | None, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BnbenchError(f"{name}={value}: must be a positive integer")
    return value


def batch_moments(x: Tensor, kernels: Kernels = EAGER) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over ``(N, H, W)`` in fp32 at least (two-pass; no
    autograd intended: EMA, PreciseBN and BRN's corrections)."""
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    mean, var = kernels.moments(xs.reshape(1, x.shape[0], x.shape[1], math.prod(x.shape[2:])))
    return mean.view(-1), var.view(-1)


class _BatchStatsNorm(torch.autograd.Function):
    """BN over contiguous groups of samples (GhostBN), with the hooks of BRN and CBN.

    ``x`` is viewed as ``(G, n, C, L)``; batch statistics are per ``(g, c)`` over ``(n, L)``,
    ``M = n·L``, and ``transform`` (default: BN) turns them into a
    :class:`~bnbench.norm.kernels.Normalization`. Forward ``y = γ (r x̂ + d) + β``,
    ``x̂ = (x − μ)·s``, ``s = 1/sqrt(σ² + ε)``; backward (BN's gradient per group with weight
    ``γ r`` and ``M`` replaced by ``count·M``):

        ∂x = γ r s (∂y − (Σ∂y + x̂ Σ(∂y x̂)) / (count·M))
        ∂γ = Σ_g (r Σ(∂y x̂) + d Σ∂y),   ∂β = Σ_g Σ∂y.

    The passes over the data are :mod:`bnbench.norm.kernels` (eager or fused). Returns ``y``
    (shape of ``x``) and the biased batch statistics ``(mean, var)`` ``(G, C)`` (no gradient).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                eps: float, kernels: Kernels, ema: Ema | None, transform: Transform | None,
                *args: Tensor):
        xv = x.view(groups, x.shape[0] // groups, x.shape[1], -1)
        # Plain tensors, not Parameters: torch.compile keeps Parameter shapes static.
        w, b = (None if t is None else t.detach() for t in (weight, bias))
        y, mean, var, *saved = kernels.forward(xv, w, b, eps, ema, transform, *args)
        ctx.save_for_backward(x, w, *saved)
        ctx.kernels, ctx.groups, ctx.n_args = kernels, groups, len(args)
        mean, var = mean.view(groups, -1), var.view(groups, -1)
        ctx.mark_non_differentiable(mean, var)  # the returned tensors themselves
        ctx.set_materialize_grads(False)
        # y in x's shape and not a view (detach drops the view relation; nothing else holds
        # its storage): an inplace ReLU after BN may modify it. A view (made in here or
        # outside) would be refused or cost autograd a zero-filled copy of the gradient.
        return y.view(x.shape).detach(), mean, var

    @staticmethod
    @once_differentiable  # the backward uses forward constants: no double backward
    def backward(ctx, grad_y: Tensor | None, _gm: Tensor | None, _gv: Tensor | None):
        nones = (None,) * (5 + ctx.n_args)  # groups, eps, kernels, ema, transform, *args
        if grad_y is None:
            return None, None, None, *nones
        x, weight, *saved = ctx.saved_tensors
        xv = x.view(ctx.groups, x.shape[0] // ctx.groups, x.shape[1], -1)
        grad_x, grad_w, grad_b = ctx.kernels.backward(grad_y.reshape(xv.shape), xv, weight, *saved)
        grad_x = grad_x.view(x.shape) if ctx.needs_input_grad[0] else None
        return (grad_x, grad_w if ctx.needs_input_grad[1] else None,
                grad_b if ctx.needs_input_grad[2] else None, *nones)


def grouped_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    nbs: int,
    eps: float,
    kernels: Kernels = EAGER,
    transform: Transform | None = None,
    *args: Tensor,
    ema: Ema | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Normalize each contiguous group of ``nbs`` samples with its own statistics.

    Returns ``(y, mean, var, counts)``: group statistics ``(G, C)`` (biased, no gradient) and the
    number of elements per channel of each group. A remainder of ``N mod nbs`` samples is its
    own, smaller group. ``transform(mean, var, eps, *args)`` (BRN, CBN) maps the statistics to
    the normalization (:class:`~bnbench.norm.kernels.Normalization`); ``ema`` is the training
    step's population update (:func:`update_population`; fused into the pass when the groups
    are equal). Statistics and normalization are fp32 for fp16/bf16 inputs.
    """
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):  # statistics and normalization in fp32
        x = x.float()
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    n, length = x.shape[0], math.prod(x.shape[2:])
    groups, rest = divmod(n, nbs)
    def apply(part: Tensor, groups: int, ema: Ema | None) -> tuple[Tensor, Tensor, Tensor]:
        return _BatchStatsNorm.apply(part, weight, bias, groups, eps, kernels, ema, transform,
                                     *args)

    x = x.contiguous()
    if rest == 0:
        y, mean, var = apply(x, groups, ema)
        return y.to(dtype), mean, var, [nbs * length] * groups
    parts = [(x[: n - rest], groups)] if groups else []
    parts.append((x[n - rest :], 1))
    outs = [apply(part, g, None) for part, g in parts]
    y = torch.cat([out[0] for out in outs])
    counts = [nbs * length] * groups + [rest * length]
    mean, var = torch.cat([o[1] for o in outs]), torch.cat([o[2] for o in outs])
    if ema is not None:
        update_population(ema, mean, var, counts, eps)
    return y.to(dtype), mean, var, counts


@torch.no_grad()
def update_population(ema: Ema, mean: Tensor, var: Tensor, counts: Sequence[int],
                      eps: float) -> None:
    """The :class:`~bnbench.norm.kernels.Ema` step from group statistics ``(G, C)`` (biased) of
    ``counts[g]`` elements per channel: count-weighted means of the group means, of the biased
    variances and of the unbiased ones ``σ²_g · c_g/(c_g − 1)``."""
    counts = [int(c) for c in counts]
    if len(set(counts)) == 1:  # equal groups (the usual case): plain means, fewer ops
        c = counts[0]
        batch_mean, batch_var = mean.mean(0), var.mean(0)
        ema_step(ema, batch_mean, batch_var, batch_var * (c / max(c - 1, 1)), eps)
        return
    total = sum(counts)
    w = torch.tensor([c / total for c in counts], dtype=mean.dtype, device=mean.device)
    bessel = torch.tensor([c / max(c - 1, 1) for c in counts], dtype=mean.dtype,
                          device=mean.device)
    ema_step(ema, w @ mean, w @ var, (w * bessel) @ var, eps)


class _SumOverRanks(torch.autograd.Function):
    """``Σ_r t_r`` on every rank of ``group``; backward: each rank's output is the global sum,
    so the gradient of ``t_r`` is the sum of every rank's output gradient (again an
    all-reduce)."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sync_moments(x: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, Tensor, int]:
    """Mean and biased variance over the batches of all processes in ``group`` (SyncBN).

    Each process contributes its count-weighted sums ``n_r μ_r`` and ``n_r (σ²_r + μ_r²)`` (from
    its centered moments, so nothing cancels in low precision) and its count ``n_r``, in
    float64; one differentiable all-reduce sums them, so gradients reach every process's input
    (as in ``torch.nn.SyncBatchNorm``) and unequal or empty batches are weighted by count.
    """
    n, c = x.shape[0], x.shape[1]
    length = math.prod(x.shape[2:])  # not -1: an empty batch (n = 0) must reshape too
    xv = (x if x.dtype in (torch.float32, torch.float64) else x.float()).reshape(1, n, c, length)
    count = float(n * length)
    if count > 0:
        mean_r, var_r = EAGER.moments(xv)  # eager: differentiable
        mean_r, var_r = mean_r.view(c).double(), var_r.view(c).double()
        s1 = count * mean_r
        s2 = count * (var_r + mean_r**2)
    else:  # an empty rank still joins the all-reduce (and keeps the graph connected)
        s1 = s2 = xv.sum(dim=(0, 1, 3), dtype=torch.float64)
    packed = _SumOverRanks.apply(torch.cat([s1, s2, s1.new_full((1,), count)]), group)
    total = int(packed[-1].item())
    if total == 0:
        raise BnbenchError("syncbn: every process in the group has an empty batch")
    mean = packed[:c] / total
    var = (packed[c : 2 * c] / total - mean * mean).clamp_min(0)
    dtype = torch.float32 if x.dtype != torch.float64 else x.dtype
    return mean.to(dtype), var.to(dtype), total


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``γ (x − μ) / sqrt(σ² + ε) + β`` with per-channel ``mean``/``var`` (differentiable)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose normalization batch is an explicit choice (see the module docstring).

    Args:
        num_features: channels ``C``.
        eps: ε added to the variance.
        momentum: EMA momentum ``m`` in PyTorch's convention (paper's λ = 1 − m), in [0, 1].
        nbs: normalization batch size (GhostBN); ``None`` = the whole per-process batch.
        process_group: SyncBN over the processes of this group; ``None`` = per process.
        eval_stats: ``"population"`` (EMA / PreciseBN statistics) or ``"batch"`` at inference.
        eval_nbs: group size for ``eval_stats="batch"``; ``None`` = the whole inference batch.
        frozen: normalize with the population statistics in training too (FrozenBN).
        kernel: ``"auto"``, ``"compiled"`` or ``"eager"``: how the per-group passes of GhostBN,
            BRN and CBN run (:mod:`bnbench.norm.kernels`; whole-batch BN is PyTorch's kernel).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        *,
        nbs: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        eval_stats: str = "population",
        eval_nbs: int | None = None,
        frozen: bool = False,
        kernel: str = "auto",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, check_momentum(momentum), affine, True, device, dtype)
        if eval_stats not in EVAL_STATS:
            raise BnbenchError(
                f"norm.eval_stats={eval_stats}: choose one of {', '.join(EVAL_STATS)}"
            )
        if nbs is not None and process_group is not None:
            raise BnbenchError(
                "norm: nbs (GhostBN) and sync (SyncBN) exclude each other: "
                "NBS below the per-process batch is ghost, above it is syncbn"
            )
        self.nbs = check_positive("norm.nbs", nbs)
        self.process_group = process_group
        self.eval_stats = eval_stats
        self.eval_nbs = check_positive("norm.eval_nbs", eval_nbs)
        self.frozen = bool(frozen)
        self.kernel = check_kernel(kernel)
        self._observer: StatsObserver | None = None

    def extra_repr(self) -> str:
        extra = [f"nbs={self.nbs}"] if self.nbs else []
        extra += ["sync"] if self.process_group is not None else []
        extra += ["frozen"] if self.frozen else []
        extra += [f"eval_stats=batch(nbs={self.eval_nbs})"] if self.eval_stats == "batch" else []
        return ", ".join([super().extra_repr(), *extra])

    # -- parameters of one statistics slot (DomainBatchNorm2d has several) ---------------------
    def _slot(self) -> int:
        return 0

    def _population(self) -> tuple[Tensor, Tensor]:
        return self.running_mean, self.running_var

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        return self.weight, self.bias

    def slot_population(self, slot: int) -> tuple[Tensor, Tensor]:
        """``(running_mean, running_var)`` of statistics slot ``slot`` (writable; PreciseBN
        writes through it). One slot here: 0."""
        if slot != 0:
            raise BnbenchError(f"{type(self).__name__}: slot {slot} out of range (1 slot)")
        return self._population()

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.frozen:  # constant statistics: PreciseBN leaves them alone too
            return self._population_forward(x)
        if self._observer is not None:
            return self._observed_forward(x)
        if not self.training and self.eval_stats == "population":
            return self._population_forward(x)
        if not self.training:
            return self._batch_forward(x, self.eval_nbs, update=False)
        return self._train_forward(x)

    def _train_forward(self, x: Tensor) -> Tensor:
        """Training step normalization; BRN and CBN override this."""
        return self._batch_forward(x, self.nbs, update=True)

    def _population_forward(self, x: Tensor) -> Tensor:
        mean, var = self._population()
        weight, bias = self._affine()
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)

    def _batch_forward(self, x: Tensor, nbs: int | None, *, update: bool) -> Tensor:
        """Normalize with mini-batch statistics: the one place where the batch is decided."""
        weight, bias = self._affine()
        group = self.process_group
        if group is not None and self.training and dist.get_world_size(group) > 1:
            return self._sync_forward(x, group, weight, bias, update)
        running_mean, running_var = self._population()
        if nbs is None or nbs >= x.shape[0]:
            self._check_group_size(x, x.shape[0])
            if not update:
                return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
            self.num_batches_tracked.add_(1)
            return F.batch_norm(
                x, running_mean, running_var, weight, bias, True, self.momentum, self.eps
            )
        self._check_group_size(x, min(nbs, x.shape[0] % nbs or nbs))
        y, *_ = grouped_batch_norm(x, weight, bias, nbs, self.eps, self._kernels(x),
                                   ema=self._ema() if update else None)
        return y

    def _sync_forward(
        self,
        x: Tensor,
        group: dist.ProcessGroup,
        weight: Tensor | None,
        bias: Tensor | None,
        update: bool,
    ) -> Tensor:
        if x.is_cuda and dist.get_backend(group) == "nccl" and self.training:
            return self._native_sync_forward(x, group, weight, bias, update)
        mean, var, total = sync_moments(x, group)
        if total <= 1:
            raise BnbenchError(self._one_value_message(total))
        if update:
            self._update_population(mean[None].detach(), var[None].detach(), [total])
        return normalize(x, mean, var, weight, bias, self.eps)

    def _native_sync_forward(
        self,
        x: Tensor,
        group: dist.ProcessGroup,
        weight: Tensor | None,
        bias: Tensor | None,
        update: bool,
    ) -> Tensor:
        """CUDA/NCCL: PyTorch's fused SyncBN kernels (same statistics, same EMA rule)."""
        from torch.nn.modules._functions import SyncBatchNorm as SyncFn

        running_mean, running_var = self._population() if update else (None, None)
        if update:
            self.num_batches_tracked.add_(1)
        return SyncFn.apply(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            self.eps,
            self.momentum,
            group,
            dist.get_world_size(group),
        )

    def _kernels(self, x: Tensor) -> Kernels:
        return select(self.kernel, x.device)

    def _observed_forward(self, x: Tensor) -> Tensor:
        """PreciseBN: normalize with the whole per-process batch and report its statistics."""
        self._check_group_size(x, x.shape[0])
        mean, var = batch_moments(x.detach(), self._kernels(x))
        count = x.numel() // x.shape[1]
        self._observer(self, self._slot(), mean, var, count)
        weight, bias = self._affine()
        return F.batch_norm(
            x, mean.to(x.dtype), var.to(x.dtype), weight, bias, False, 0.0, self.eps
        )

    def _ema(self) -> Ema:
        """This layer's population update in a training step (BN's rule)."""
        running_mean, running_var = self._population()
        return Ema(running_mean, running_var, self.num_batches_tracked, self.momentum)

    def _update_population(self, mean: Tensor, var: Tensor, counts: Sequence[int]) -> None:
        """EMA update from group statistics ``(G, C)`` of ``counts[g]`` elements per channel
        (:func:`update_population`)."""
        update_population(self._ema(), mean, var, counts, self.eps)

    def _check_group_size(self, x: Tensor, samples: int) -> None:
        count = samples * math.prod(x.shape[2:]) if x.shape[0] else 0
        if count <= 1 and x.shape[0] > 0:
            raise BnbenchError(self._one_value_message(count))

    def _one_value_message(self, count: int) -> str:
        return (
            f"{type(self).__name__}({self.num_features}): batch statistics over {count} value "
            "per channel; increase the batch (or nbs), or use population statistics"
        )
