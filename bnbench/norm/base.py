"""Where "the batch" of BatchNorm is decided.

Every BN-family layer in bnbench is a :class:`BatchNorm2d` (a subclass of ``torch.nn.BatchNorm2d``,
so state dicts and ``isinstance`` checks are those of PyTorch). For an input ``x`` of shape
``(N, C, H, W)`` and a *normalization batch* ``S`` (a set of samples), per channel:

    μ_S = mean_{n∈S, h, w} x,   σ²_S = mean_{n∈S, h, w} (x − μ_S)²      (biased, as in BN)
    y   = γ · (x − μ_S) / sqrt(σ²_S + ε) + β.

What ``S`` is, is the subject of "Rethinking 'Batch' in BatchNorm" (Wu & Johnson 2021). The run's
sizes are planned in :mod:`bnbench.plan`; the layer mechanism that applies them is
:meth:`BatchNorm2d._batch_forward`, and nowhere else:

* ``nbs=None``: ``S`` is the whole per-process batch (standard BN, §3);
* ``nbs=k``: ``S`` is each contiguous group of ``k`` samples (GhostBN, §4.1); when ``k`` does not
  divide ``N`` the last ``N mod k`` samples form one smaller group (:func:`ghost_batch_norm`);
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

Per-device variants (BRN, CBN, naive CBN) read ``nbs`` as *simulated devices*: the per-process
batch of ``N`` samples is ``G = N / nbs`` devices of ``nbs`` samples (:func:`device_groups`; ``nbs``
must divide ``N``), each normalized as its own process would normalize its own batch. Their
statistics are ``(G·C,)`` vectors over the rearranged input (:func:`to_groups`: channel
``g·C + c`` is channel ``c`` of device ``g``), and the EMA is :func:`update_population` with
``groups=G``: the mechanism of GhostBN's EMA (:func:`average_copies`).

Every normalization runs PyTorch's own batch-norm kernel (``F.batch_norm``: cuDNN/oneDNN), except
SyncBN over several processes and the variants whose statistics are not one batch's (CBN's window),
which normalize with explicit tensor ops.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bnbench.errors import BnbenchError, check_positive

#: ``observer(layer, slot, mean, var, count)``: PreciseBN's hook, called with the biased batch
#: mean and variance (shape ``(C,)``) of ``count`` elements per channel.
StatsObserver = Callable[["BatchNorm2d", int, Tensor, Tensor, int], None]

EVAL_STATS = ("population", "batch")


def run_eagerly(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``@torch.compiler.disable``, applied on the first call that a compile can see rather than
    at import: ``fn`` runs eagerly, outside the graph, under ``torch.compile``. Decorating at
    import would import ``torch._dynamo`` (about a second), which building the layers (config
    validation builds the model on the meta device) does not need. Without ``torch._dynamo``
    imported nothing can be compiling (``torch.compile`` imports it), and ``fn`` runs as is.
    (When the first such call is inside a trace, the disabled ``fn`` is made there: one more
    graph break and a recompile of the wrapper, on the first compiled step only.)"""
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if not torch.compiler.is_compiling() and "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper


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


def statistics_dtype(x: Tensor) -> torch.dtype:
    """BN statistics are fp32 at least (fp64 for fp64 inputs), also for fp16/bf16 activations."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance ``(C,)`` of ``x`` ``(N, C, …)`` over every dim but
    1, in :func:`statistics_dtype`; differentiable (:class:`_Moments`)."""
    return _Moments.apply(x.to(statistics_dtype(x)))


class _Moments(torch.autograd.Function):
    """``μ = mean(x)``, ``σ² = mean((x − μ)²)`` per channel (centred two-pass: nothing cancels
    when ``|μ| ≫ σ``), with BN's closed-form backward ``∂x = (∂μ + 2 ∂σ² (x − μ)) / M``, ``M``
    the values per channel. (``torch.var_mean`` computes the same several times slower on CPU.)"""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square_().mean(dims)
        ctx.save_for_backward(x, mean)
        return mean.view(-1), var

    @staticmethod
    def backward(ctx, grad_mean: Tensor | None, grad_var: Tensor | None) -> Tensor:
        x, mean = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        shape = mean.shape
        grad = torch.zeros_like(mean) if grad_mean is None else grad_mean.view(shape) / count
        if grad_var is None:
            return grad.expand_as(x).clone()
        return torch.addcmul(grad, x - mean, grad_var.view(shape), value=2.0 / count)


def batch_norm_with_moments(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` normalized with its own batch statistics, and those statistics (biased mean and
    variance ``(C,)`` in :func:`statistics_dtype`), from one native ``F.batch_norm`` call: with
    momentum 1 its running buffers become the batch mean and the unbiased variance
    ``σ²·M/(M − 1)``. What PreciseBN observes (no gradient intended)."""
    c, count = x.shape[1], x.numel() // x.shape[1]
    mean = torch.zeros(c, dtype=statistics_dtype(x), device=x.device)
    var = torch.ones_like(mean)
    y = F.batch_norm(x, mean, var, weight, bias, True, 1.0, eps)
    return y, mean, var.mul_((count - 1) / count) if count > 1 else var.zero_()


class Ema(NamedTuple):
    """A training step's update of the population statistics (buffers, updated in place):

    * ``rule="var"`` (BN): ``μ ← (1 − m) μ + m μ_B``, ``σ² ← (1 − m) σ² + m σ²_B·M/(M − 1)``
      (PyTorch's EMA of the unbiased variance; ``m`` = ``momentum``, the paper's λ = 1 − m);
    * ``rule="std"`` (Batch Renormalization, Algorithm 1): the same on ``μ`` and on
      ``σ = sqrt(σ² + ε)``, stored as ``σ² − ε``;

    and ``tracked`` (``num_batches_tracked``) += 1.
    """

    running_mean: Tensor
    running_var: Tensor
    tracked: Tensor
    momentum: float
    rule: str = "var"


@torch.no_grad()
def update_population(ema: Ema, mean: Tensor, var: Tensor, count: int, eps: float,
                      groups: int = 1) -> None:
    """One :class:`Ema` step from the biased batch statistics ``(C,)`` of ``count`` elements per
    channel.

    With ``groups = G`` the statistics are ``(G·C,)``, one ``(C,)`` block per simulated device
    (:func:`to_groups`): every device steps its own copy of the buffers by the rule, and the
    buffers become the copies' mean (:func:`average_copies`) — what ``G`` processes hold whose
    buffers are averaged after the step (``dist.ema_sync=average``). ``tracked`` += 1 once.
    """
    rm, rv, m = ema.running_mean, ema.running_var, ema.momentum
    if groups > 1:  # the devices' copies, all equal to the buffers before the step
        rm, rv = rm.repeat(groups), rv.repeat(groups)
    rm.lerp_(mean.to(rm.dtype), m)
    if ema.rule == "var":
        rv.lerp_((var * (count / max(count - 1, 1))).to(rv.dtype), m)
    else:
        sigma = torch.lerp((rv.to(var.dtype) + eps).sqrt(), (var + eps).sqrt(), m)
        rv.copy_((sigma * sigma - eps).clamp_min(0))
    if groups > 1:
        average_copies(ema.running_mean, ema.running_var, [(1.0, rm, rv)])
    ema.tracked.add_(1)


@torch.no_grad()
def average_copies(running_mean: Tensor, running_var: Tensor,
                   copies: list[tuple[float, Tensor, Tensor]]) -> None:
    """The buffers ``(C,)`` become the weighted mean of per-group copies: ``copies`` holds
    ``(share, mean copies, var copies)`` with ``(g·C,)`` copies of ``g`` equal groups that
    together hold ``share`` of the samples (shares sum to 1), so each group weighs its share.
    The EMA step is affine in the batch statistics, so for BN's rule this is the EMA of the
    groups' count-weighted mean statistics."""
    c = running_mean.shape[0]
    running_mean.copy_(sum(w * rm.view(-1, c).mean(0) for w, rm, _ in copies))
    running_var.copy_(sum(w * rv.view(-1, c).mean(0) for w, _, rv in copies))


def device_groups(samples: int, nbs: int | None, who: str) -> int:
    """``G``, the simulated devices of a per-device variant's training batch of ``samples``:
    ``samples / nbs`` devices of ``nbs`` samples each, 1 without ``nbs`` (or for an empty
    batch). Devices have equal batches: ``nbs`` must divide ``samples``."""
    if nbs is None or samples == 0:
        return 1
    if samples % nbs:
        raise BnbenchError(
            f"{who}: nbs={nbs} simulates devices of {nbs} samples each, but the batch has "
            f"{samples} samples (not a multiple of {nbs})")
    return samples // nbs


def to_groups(x: Tensor, groups: int) -> Tensor:
    """``(G·n, C, …)`` → ``(n, G·C, …)``: channel ``g·C + c`` is channel ``c`` of the ``g``-th
    contiguous group of ``n`` samples, so per-channel statistics are per group (``x`` itself for
    ``G = 1``)."""
    if groups == 1:
        return x
    size, c, rest = x.shape[0] // groups, x.shape[1], x.shape[2:]
    return x.view(groups, size, c, *rest).transpose(0, 1).reshape(size, groups * c, *rest)


def from_groups(y: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`to_groups`: ``(n, G·C, …)`` → ``(G·n, C, …)``."""
    if groups == 1:
        return y
    size, c, rest = y.shape[0], y.shape[1] // groups, y.shape[2:]
    return y.view(size, groups, c, *rest).transpose(0, 1).reshape(groups * size, c, *rest)


def ghost_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None, bias: Tensor | None, nbs: int, momentum: float,
                     eps: float) -> Tensor:
    """GhostBN (Rethinking §4.1): each contiguous group of ``nbs`` samples normalized with its own
    statistics; a remainder of ``N mod nbs`` samples is one smaller group.

    The ``G`` equal groups run as one ``F.batch_norm`` call: ``(G·nbs, C, …)`` is rearranged to
    ``(nbs, G·C, …)``, so that channel ``g·C + c`` is channel ``c`` of group ``g``, with γ, β
    repeated ``G`` times (their gradients sum over the groups). The EMA (``running_*`` given):
    every group updates its own copy of the buffers natively, and the buffers become the
    copies' count-weighted average — the EMA of the count-weighted mean of the group statistics,
    since the update is affine in them (the unbiased variance is per group, ``M_g/(M_g − 1)``).
    """
    n = x.shape[0]
    groups, remainder = divmod(n, nbs)
    parts = [(x[: groups * nbs], groups)] if groups else []
    if remainder:
        parts.append((x[groups * nbs :], 1))
    outputs, copies = [], []
    for part, g in parts:
        y, rm, rv = _grouped_batch_norm(part, g, running_mean, running_var, weight, bias,
                                        momentum, eps)
        outputs.append(y)
        copies.append((part.shape[0] / n, rm, rv))
    if running_mean is not None:  # each group weighs its share of the samples
        average_copies(running_mean, running_var, copies)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _grouped_batch_norm(x: Tensor, groups: int, running_mean: Tensor | None,
                        running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                        momentum: float, eps: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``groups`` equal contiguous groups of ``x`` in one ``F.batch_norm`` call over the
    ``(n, G·C, …)`` rearrangement; returns the output and the ``(G·C,)`` buffer copies it
    updated (``None`` without running statistics)."""
    rm = None if running_mean is None else running_mean.repeat(groups)
    rv = None if running_var is None else running_var.repeat(groups)
    y = F.batch_norm(to_groups(x, groups), rm, rv, repeat_groups(weight, groups),
                     repeat_groups(bias, groups), True, momentum, eps)
    return from_groups(y, groups), rm, rv


def repeat_groups(t: Tensor | None, groups: int) -> Tensor | None:
    """A per-channel parameter ``(C,)`` for :func:`to_groups`' ``(G·C,)`` channels (shared by the
    groups: autograd sums its gradient over them)."""
    return t if t is None or groups == 1 else t.repeat(groups)


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
    Works on any backend (gloo on CPU, NCCL on GPUs).
    """
    c = x.shape[1]
    count = float(x.numel() // c) if c else 0.0
    if count > 0:
        mean_r, var_r = batch_moments(x)
        mean_r, var_r = mean_r.double(), var_r.double()
        s1 = count * mean_r
        s2 = count * (var_r + mean_r**2)
    else:  # an empty rank still joins the all-reduce (and keeps the graph connected)
        s1 = s2 = x.sum(dim=[0, *range(2, x.dim())], dtype=torch.float64)
    packed = _SumOverRanks.apply(torch.cat([s1, s2, s1.new_full((1,), count)]), group)
    total = int(packed[-1].item())
    if total == 0:
        raise BnbenchError("syncbn: every process in the group has an empty batch")
    mean = packed[:c] / total
    var = (packed[c : 2 * c] / total - mean * mean).clamp_min(0)
    dtype = statistics_dtype(x)
    return mean.to(dtype), var.to(dtype), total


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``γ (x − μ) / sqrt(σ² + ε) + β`` with per-channel statistics that carry gradient (SyncBN,
    CBN's window); centred first, so nothing cancels when ``|μ| ≫ σ``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(x.dtype)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose normalization batch is an explicit choice (see the module docstring).

    Args:
        num_features: channels ``C``.
        eps: ε added to the variance.
        momentum: EMA momentum ``m`` in PyTorch's convention (paper's λ = 1 − m), in [0, 1].
        nbs: normalization batch size (GhostBN; simulated devices of BRN and CBN); ``None`` =
            the whole per-process batch.
        process_group: SyncBN over the processes of this group; ``None`` = per process.
        eval_stats: ``"population"`` (EMA / PreciseBN statistics) or ``"batch"`` at inference.
        eval_nbs: group size for ``eval_stats="batch"``; ``None`` = the whole inference batch.
        frozen: normalize with the population statistics in training too (FrozenBN).
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
        self.nbs = check_positive("norm.nbs", nbs, integer=True, allow_none=True)
        self.process_group = process_group
        self.eval_stats = eval_stats
        self.eval_nbs = check_positive("norm.eval_nbs", eval_nbs, integer=True, allow_none=True)
        self.frozen = bool(frozen)
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
        whole = nbs is None or nbs >= x.shape[0]
        self._check_group_size(x, x.shape[0] if whole else min(nbs, x.shape[0] % nbs or nbs))
        running_mean, running_var = self._population() if update else (None, None)
        if update:
            self.num_batches_tracked.add_(1)
        if whole:
            return F.batch_norm(x, running_mean, running_var, weight, bias, True, self.momentum,
                                self.eps)
        return ghost_batch_norm(x, running_mean, running_var, weight, bias, nbs, self.momentum,
                                self.eps)

    def _sync_forward(
        self,
        x: Tensor,
        group: dist.ProcessGroup,
        weight: Tensor | None,
        bias: Tensor | None,
        update: bool,
    ) -> Tensor:
        mean, var, total = sync_moments(x, group)
        if total <= 1:
            raise BnbenchError(self._one_value_message(total))
        if update:
            update_population(self._ema(), mean.detach(), var.detach(), total, self.eps)
        return normalize(x, mean, var, weight, bias, self.eps)

    def _observed_forward(self, x: Tensor) -> Tensor:
        """PreciseBN: normalize with the whole per-process batch and report its statistics."""
        self._check_group_size(x, x.shape[0])
        weight, bias = self._affine()
        y, mean, var = batch_norm_with_moments(x, weight, bias, self.eps)
        self._observer(self, self._slot(), mean, var, x.numel() // x.shape[1])
        return y

    def _ema(self) -> Ema:
        """This layer's population update in a training step (BN's rule)."""
        running_mean, running_var = self._population()
        return Ema(running_mean, running_var, self.num_batches_tracked, self.momentum)

    def _check_group_size(self, x: Tensor, samples: int) -> None:
        count = samples * math.prod(x.shape[2:]) if x.shape[0] else 0
        if count <= 1 and x.shape[0] > 0:
            raise BnbenchError(self._one_value_message(count))

    def _one_value_message(self, count: int) -> str:
        return (
            f"{type(self).__name__}({self.num_features}): batch statistics over {count} value "
            "per channel; increase the batch (or nbs), or use population statistics"
        )


__all__ = ["BatchNorm2d", "Ema", "average_copies", "batch_moments", "batch_norm_with_moments",
           "device_groups", "from_groups", "ghost_batch_norm", "normalize", "repeat_groups",
           "sync_moments", "to_groups", "update_population"]
