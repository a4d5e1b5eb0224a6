"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021, arXiv 2002.05712).

CBN (paper §3) normalizes with statistics averaged over the last ``k`` iterations (``window``),
the earlier ones corrected to the current weights by a first-order Taylor expansion. Per channel,
with ``μ = E[x]`` and ``ν = E[x²]`` of the layer input over the ``M = N·H·W`` positions,

    μ_{t−τ}(θ_t) ≈ μ_{t−τ} + ρ ⟨∂μ_{t−τ}/∂W, W_t − W_{t−τ}⟩          (same for ν)
    μ̄_t = (1/k) Σ_{τ=0..k−1} μ_{t−τ}(θ_t)
    ν̄_t = (1/k) Σ_{τ=0..k−1} max(ν_{t−τ}(θ_t), μ_{t−τ}(θ_t)²)
    σ̄²_t = ν̄_t − μ̄_t²,        y = γ (x − μ̄_t) / sqrt(σ̄²_t + ε) + β.

The expansion is truncated to the weights ``W`` (and bias ``b``) of the conv directly before the
layer (paper §3: the gradients through earlier layers are small), so every CBN layer is paired with
its conv (:func:`pair_convs`, :meth:`CrossIterationBatchNorm2d.pair`). Only the current ``μ_t, ν_t``
carry gradient; the compensated earlier terms and the stored statistics and Jacobians are
constants (the conv weight enters the compensation detached).
``ρ = 0`` is naive CBN (the paper's ablation, §4); ``window = 1`` is BN; for the first ``burnin``
iterations the layer is plain BN and keeps no history; right after burn-in, fewer than ``k``
iterations exist and the average is over those that do. ε is added to the variance (standard BN).

Implementation (our choices, exact in exact arithmetic):

* Jacobians are analytic, from the conv's input ``x`` and output ``y`` of the iteration, no
  autograd pass: for output channel ``j`` (of group ``g``) ``∂μ_j/∂W_j`` is the mean input patch
  of group ``g`` (shared by the channels of a group: stored once per group), ``∂ν_j/∂W_j =
  (2/M) Σ_p y_j(p)·patch(p)`` is the conv's weight gradient for the output gradient ``2y/M``,
  ``∂μ_j/∂b_j = 1`` and ``∂ν_j/∂b_j = 2μ_j``.
* The variance is compensated through its own Jacobian ``∂σ²/∂W = ∂ν/∂W − 2μ ∂μ/∂W =
  (2/M) Σ_p (y(p) − μ)·patch(p)`` (the weight gradient for ``2(y − μ)/M``): with
  ``Δμ = ⟨∂μ/∂W, ΔW⟩ + Δb``, the paper's ``ν(θ_t) − μ(θ_t)²`` is exactly

      σ²(θ_t) = σ² + ρ ⟨∂σ²/∂W, ΔW⟩ − (ρ Δμ)²        (the bias drops out: ∂σ²/∂b = 0)

  — the same first-order expansion, but the terms are of the size of σ², not of ν = σ² + μ²,
  so nothing cancels in fp32 when ``|μ| ≫ σ`` (with ∂ν/∂W the error on σ² grows as
  ``ulp·μ²/σ²``: above the change over an iteration once ``μ²/σ² ≈ 600``).
* Past weights are not stored: each entry keeps ``e_μ = ⟨∂μ/∂W, W_{t−τ}⟩ + b_{t−τ}`` and
  ``e_σ = ⟨∂σ²/∂W, W_{t−τ}⟩`` (numbers per channel, computed when it is stored), so

      Δμ = ⟨∂μ/∂W, W_t⟩ + b_t − e_μ,   ⟨∂σ²/∂W, ΔW⟩ = ⟨∂σ²/∂W, W_t⟩ − e_σ

  — one batched matrix product over the window (saves ``k−1`` copies of every conv weight and a
  pass over them per step). In exact arithmetic ``e_μ = μ_{t−τ}`` and ``e_σ = 2σ²_{t−τ}``
  (Euler); storing them keeps the differences consistent with the stored Jacobians when those
  are rounded (``jacobian_dtype="bfloat16"``) and when the conv ran under autocast (its weights
  then are the bf16/fp16-rounded ones, used both when storing and when compensating).
* Cost: ``∂σ²/∂W`` is one weight-gradient convolution per layer and iteration (the notes'
  method; the official code does two extra autograd passes). In fp32 it is the weight gradient
  for ``2y/M`` less ``2μ ∂μ/∂W`` (a rank-1 update of the small Jacobian, not a pass over ``y``;
  that subtraction costs ulp·|μ|·|patch| per entry, measured as accurate as centring ``y``
  first up to ``μ²/σ² = 3·10⁶``). ``jacobian_dtype="bfloat16"`` runs it on bf16 inputs, ``y``
  centred before rounding (fp32 accumulation): about 1.7× faster on CPUs with AVX512-BF16 and on
  GPUs, with ~0.3 % relative error on ``∂σ²/∂W`` and so on its term (not on ``σ²``); the default
  (``"float32"``: the statistics' precision, float64 for float64 models) is exact.
* Statistics are kept as ``(μ, σ² = ν − μ²)`` and averaged in the equivalent form
  ``σ̄² = mean_τ σ²_τ(θ_t)⁺ + mean_τ (μ_τ(θ_t) − μ̄)²`` (no ``ν̄ − μ̄²`` cancellation);
  ``max(ν, μ²)`` is ``σ²(θ_t)⁺ = max(σ²(θ_t), 0)``.
* ``neg_var="drop"`` (the official code) leaves out the earlier ``(iteration, channel)`` entries
  whose compensated ``ν − μ²`` is negative and divides by the count kept. The current iteration's
  variance is non-negative by construction and is always kept, so the count is at least one (an
  all-dropped channel falls back to the current statistics).
* The history (the last ``k−1`` iterations) lives in buffers, so it is in the state dict and
  survives checkpoint/resume. Statistics and history are fp32 (fp64 for fp64 models), also under
  autocast and after ``model.half()``/``.to(torch.bfloat16)`` (the history buffers stay fp32).
  The EMA population statistics are updated from the current batch only, as in BN (unbiased
  variance); ``num_batches_tracked`` is also the iteration count of the burn-in (``convert``
  copies it from the BN it replaces: a converted trained model skips the burn-in).
* The history is a ring of fixed shape ``(k−1, …)`` with its count and next slot in the
  ``hist_state`` buffer; the new entry is written at a device-side index (:func:`record`), so a
  training step reads nothing back to the host (only ``burnin > 0`` reads the iteration count).
* The step is plain autograd: ``μ_t, σ²_t`` from ``torch.var_mean``, the window average, and
  ``y = γ (x − μ̄) / sqrt(σ̄² + ε) + β`` run as PyTorch's batch-norm kernel with a folded affine
  (:func:`window_batch_norm`); the gradient through ``μ̄, σ̄²`` is BN's with ``M`` replaced by
  ``n·M`` (``n`` entries kept in the window).

Simulated devices (``nbs``; :func:`bnbench.norm.base.device_groups`): the per-process batch of
``N`` samples is ``G = N / nbs`` devices of ``nbs`` samples (``nbs`` must divide ``N``), and the
layer computes what ``G`` processes with per-process CBN compute: every device has its own
statistics, Jacobians, window and history; the weights (conv ``W, b`` and ``γ, β``) are shared.
The device dimension is folded into the channels (:func:`bnbench.norm.base.to_groups`: channel
``g·C + c`` is channel ``c`` of device ``g``), so every formula above runs unchanged on ``G·C``
channels (and ``G·groups`` conv groups), with ``W, b, γ, β`` repeated per device (their gradients
sum over the devices). The EMA is ``update_population`` with ``groups=G``: each device steps its
own copy, the buffers are the copies' mean, i.e. ``G`` processes with ``dist.ema_sync=average``
(the EMA does not feed back into training, so averaging every step or once is the same). Burn-in
and ``window=1`` are GhostBN with the same ``nbs`` (each device's plain BN).
Cost with ``G`` devices: ``∂σ²/∂W`` of all devices is one grouped weight-gradient convolution
(``G·groups`` groups) over the whole batch rearranged to ``(nbs, G·C_in, …)`` — the
multiply-adds of one weight gradient of the conv over the ``N`` samples, not ``G`` of them — plus
a rearranging copy of the conv's input and output; ``∂μ/∂W`` is one grouped pass over the
devices' summed inputs. What grows ``G``-fold is the history (``(k−1)·G`` Jacobians the size of
``W`` per layer) and the compensation's batched product over it.

Not supported: activation checkpointing (``torch.utils.checkpoint``) of a CBN layer: the rerun of
the forward would store a second entry and normalize with another window.

Not the official code's quirks: ε on the std, unbiased variance in the normalization, γ ~ U(0, 1),
history in Python lists, two extra autograd passes per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from bnbench.errors import BnbenchError, check_positive
from bnbench.norm.base import (
    BatchNorm2d,
    batch_moments,
    device_groups,
    from_groups,
    repeat_groups,
    run_eagerly,
    to_groups,
    update_population,
)

CBN_OPTIONS = frozenset({"eps", "momentum", "eval_stats", "eval_nbs", "nbs", "window", "burnin",
                         "rho", "neg_var", "jacobian_dtype"})
NEG_VAR = ("clamp", "drop")
JACOBIAN_DTYPES = ("float32", "bfloat16")

#: History buffers whose shape depends on the paired conv (allocated by ``pair``).
_CONV_BUFFERS = ("hist_dmean", "hist_dmean_ref", "hist_dvar", "hist_dvar_ref")
_HISTORY = ("hist_mean", "hist_var", "hist_state", *_CONV_BUFFERS)
_HISTORY_FLOAT = ("hist_mean", "hist_var", *_CONV_BUFFERS)


class _Pending:
    """The paired conv's latest input, output shape and the dtype it computed in (autocast);
    transient: never copied or pickled."""

    __slots__ = ("input", "shape", "dtype")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.input: Tensor | None = None
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None

    def __deepcopy__(self, memo: dict) -> _Pending:
        return _Pending()

    def __reduce__(self):
        return (_Pending, ())


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def window_statistics(mean: Tensor, var: Tensor, past_mean: Tensor, past_var: Tensor,
                      past_keep: Tensor) -> tuple[Tensor, Tensor]:
    """The window's statistics ``(μ̄, σ̄²)`` ``(C,)`` from the current batch's ``(mean, var)``
    ``(C,)`` (these carry the gradient) and the earlier entries ``past_mean``, ``past_var``
    (≥ 0), ``past_keep`` (0/1) ``(L, C)`` (constants). With ``n = 1 + Σ keep`` per channel,

        μ̄ = (μ_t + Σ keep·μ_τ) / n,   σ̄² = (σ²_t + (μ_t − μ̄)² + Σ keep·(σ²_τ + (μ_τ − μ̄)²)) / n

    which is the paper's ``ν̄ − μ̄²`` without its cancellation. Entries not kept are masked, not
    multiplied by 0 (an unused ring slot may hold anything).
    """
    dtype = mean.dtype
    keep = past_keep.to(dtype) > 0
    past_mean, past_var = past_mean.to(dtype), past_var.to(dtype)
    count = 1 + keep.to(dtype).sum(0)
    wmean = (mean + torch.where(keep, past_mean, 0).sum(0)) / count
    spread = past_var + (past_mean - wmean).square()
    wvar = (var + (mean - wmean).square() + torch.where(keep, spread, 0).sum(0)) / count
    return wmean, wvar


def window_batch_norm(x: Tensor, mean: Tensor, var: Tensor, wmean: Tensor, wvar: Tensor,
                      weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``y = γ (x − μ̄) / sqrt(σ̄² + ε) + β`` as PyTorch's batch-norm kernel over ``x``'s own batch
    statistics ``(μ_t, σ²_t)`` with the affine folded, as BRN folds it but with corrections that
    carry the gradient:

        r = sqrt(σ²_t + ε) / sqrt(σ̄² + ε),   d = (μ_t − μ̄) / sqrt(σ̄² + ε),
        y = γ r x̂ + (γ d + β),   x̂ = (x − μ_t) / sqrt(σ²_t + ε).

    Autograd through the kernel and through ``r, d`` (functions of ``μ_t, σ²_t``, hence of ``x``)
    gives the exact gradient of ``y``."""
    inv = torch.rsqrt(wvar + eps)
    r, d = torch.sqrt(var + eps) * inv, (mean - wmean) * inv
    scale = r if weight is None else weight * r
    shift = d if weight is None else weight * d
    if bias is not None:
        shift = shift + bias
    dtype = x.dtype if weight is None else weight.dtype
    return F.batch_norm(x, None, None, scale.to(dtype), shift.to(dtype), True, 0.0, eps)


def compensate(hist_mean: Tensor, hist_var: Tensor, drop: bool, rho: float,
               *jacobians: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stored entries ``(μ_τ, σ²_τ)`` ``(L, C)`` at the current weights: ``(μ, σ²⁺, keep)``.

    ``jacobians`` = ``(W (C, P), b (C,), ∂μ/∂W (L, Q, P), e_μ (L, C), ∂σ²/∂W (C, L, P),
    e_σ (L, C))`` (none: naive CBN, no compensation; ``Q`` groups of consecutive channels share
    ``∂μ/∂W``: the conv's groups, times the simulated devices):

        Δμ = ρ (⟨∂μ/∂W, W⟩ + b − e_μ),   σ²(θ_t) = σ² + ρ (⟨∂σ²/∂W, W⟩ − e_σ) − Δμ²

    (one batched product over the window, see the module docstring). ``keep`` is 0 where
    ``drop`` and the compensated variance is negative; ``σ²⁺ = max(σ², 0)`` (paper: max(ν, μ²)).
    """
    mean, var = hist_mean, hist_var
    if jacobians:
        w, b, dmean, dmean_ref, dvar, dvar_ref = jacobians
        shift = rho * (_group_dot(w, dmean, dmean.shape[1]) + b - dmean_ref)  # ρ Δμ (L, C)
        change = torch.bmm(w[:, None, :], dvar.transpose(1, 2))[:, 0].t()  # ⟨∂σ²/∂W, W⟩ (L, C)
        var = var + rho * (change - dvar_ref) - shift * shift
        mean = mean + shift
    keep = (var >= 0) if drop else torch.ones_like(var, dtype=torch.bool)
    return mean, var.clamp_min(0), keep.to(var.dtype)


@torch.no_grad()
def record(mean: Tensor, var: Tensor, hist_mean: Tensor, hist_var: Tensor, hist_state: Tensor,
           entry: tuple[Tensor, ...], jacobians: tuple[Tensor, ...]) -> None:
    """Store the current iteration's ``(μ, σ²)`` ``(C,)`` in ring slot ``hist_state[1]`` (a
    device-side index) and advance the ring ``[count, next slot]`` (in place).

    With ``jacobians`` (:func:`compensate`'s, their buffers written too), ``entry`` is the
    iteration's ``(∂μ/∂W (Q, P), D (C, P), c)`` with ``D = (2/M) Σ_p (y(p) − c)·patch(p)``
    (``c`` per channel, ``None`` = 0); stored: ``∂σ²/∂W = D − 2(μ − c) ∂μ/∂W``,
    ``e_μ = ⟨∂μ/∂W, W⟩ + b`` and ``e_σ = ⟨∂σ²/∂W, W⟩`` at the current weights.
    """
    pos = hist_state[1:]
    hist_mean.index_copy_(0, pos, mean[None].to(hist_mean.dtype))
    hist_var.index_copy_(0, pos, var[None].to(hist_var.dtype))
    if jacobians:
        w, b, hist_dmean, hist_dmean_ref, hist_dvar, hist_dvar_ref = jacobians
        dmean, dvar, centre = entry
        dvar = _centre(dvar, mean if centre is None else mean - centre, dmean)
        mean_ref = _group_dot(w, dmean[None], dmean.shape[0])[0] + b  # e_μ
        hist_dmean.index_copy_(0, pos, dmean[None])
        hist_dmean_ref.index_copy_(0, pos, mean_ref[None])
        hist_dvar.index_copy_(1, pos, dvar[:, None])
        hist_dvar_ref.index_copy_(0, pos, (dvar * w).sum(1)[None])  # e_σ = ⟨∂σ²/∂W, W⟩
    k1 = hist_mean.shape[0]
    hist_state[:1].add_(1).clamp_(max=k1)
    hist_state[1:].add_(1).remainder_(k1)


class CrossIterationBatchNorm2d(BatchNorm2d):
    """Cross-Iteration BN (see the module docstring); pair it with its conv before training.

    Args:
        num_features: channels ``C``.
        window: ``k``, iterations averaged including the current one (≥ 1; 1 = BN).
        burnin: iterations of plain BN first (counted by ``num_batches_tracked``); no history is
            kept during burn-in.
        rho: scale of the Taylor compensation (1 = CBN, 0 = naive CBN). Fixed at construction:
            the Jacobian buffers are only allocated for ``rho != 0``.
        neg_var: ``"clamp"`` (paper: ``max(ν, μ²)`` per entry) or ``"drop"`` (official code: drop
            earlier entries with negative compensated variance, average over those kept).
        jacobian_dtype: ``"float32"`` (exact; the statistics' precision) or ``"bfloat16"``
            (faster ∂σ²/∂W weight-gradient convolution, ~0.3 % relative error on its term).
        nbs: simulated devices of ``nbs`` samples each (see the module docstring); ``None``: one
            device, the whole per-process batch.
        eps, momentum, eval_stats, eval_nbs: as :class:`BatchNorm2d` (SyncBN excluded).

    Buffers (all in the state dict), for ``G`` devices (1 without ``nbs``; column ``g·C + c`` is
    channel ``c`` of device ``g``) and ``P = C_in/groups·kh·kw``: ``hist_mean``, ``hist_var``
    ``(k−1, G·C)`` — mean and biased variance of the stored iterations; ``hist_state``
    ``[count, next slot]`` of the ring (shared: the devices step together); and, once paired
    (``rho != 0``): ``hist_dmean`` ``(k−1, G·groups, P)`` — ∂μ/∂W per device and conv group;
    ``hist_dmean_ref`` ``(k−1, G·C)`` — ``⟨∂μ/∂W, W⟩ + b`` at the stored weights; ``hist_dvar``
    ``(G·C, k−1, P)`` — ∂σ²_j/∂W_j, channel-major so that the window's compensation is one
    batched product; ``hist_dvar_ref`` ``(k−1, G·C)`` — ``⟨∂σ²/∂W, W⟩`` at the stored weights.
    Ring slots ``[0, count)`` are valid (order is irrelevant to the average). ``G`` is taken
    from the first training step after burn-in (or from a loaded state dict); a batch of
    another number of devices while a history is held is an error.
    """

    def __init__(self, num_features: int, *args: Any, window: int = 4, burnin: int = 0,
                 rho: float = 1.0, neg_var: str = "clamp", jacobian_dtype: str = "float32",
                 **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        if self.process_group is not None:
            raise BnbenchError("cbn: statistics of the per-process (or per-device, nbs) batch; "
                               "sync is not supported")
        if isinstance(window, bool):
            raise BnbenchError(f"norm.window={window}: must be a positive integer")
        self.window = check_positive("norm.window", window, integer=True)
        if (isinstance(burnin, bool) or not isinstance(burnin, (int, float))
                or int(burnin) != burnin or burnin < 0):
            raise BnbenchError(f"norm.burnin={burnin}: must be a non-negative integer (iterations)")
        self.burnin = int(burnin)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho):
            raise BnbenchError(f"norm.rho={rho}: must be a finite number")
        self.rho = float(rho)
        if neg_var not in NEG_VAR:
            raise BnbenchError(f"norm.neg_var={neg_var}: choose one of {', '.join(NEG_VAR)}")
        self.neg_var = neg_var
        if jacobian_dtype not in JACOBIAN_DTYPES:
            raise BnbenchError(f"norm.jacobian_dtype={jacobian_dtype}: choose one of "
                               f"{', '.join(JACOBIAN_DTYPES)}")
        self.jacobian_dtype = jacobian_dtype
        dev = self.running_mean.device
        hd = torch.float64 if self.running_mean.dtype == torch.float64 else torch.float32
        k1 = self.window - 1
        self.register_buffer("hist_mean", torch.zeros(k1, num_features, device=dev, dtype=hd))
        self.register_buffer("hist_var", torch.zeros(k1, num_features, device=dev, dtype=hd))
        self.register_buffer("hist_state", torch.zeros(2, dtype=torch.long, device=dev))
        for name in _CONV_BUFFERS:
            self.register_buffer(name, torch.zeros(0, device=dev, dtype=hd))
        object.__setattr__(self, "_paired_conv", None)
        object.__setattr__(self, "_hook_id", None)
        object.__setattr__(self, "_pending", _Pending())
        self.layer_name: str | None = None

    def extra_repr(self) -> str:
        extra = [f"window={self.window}", f"burnin={self.burnin}", f"rho={self.rho}",
                 f"neg_var={self.neg_var}"]
        if self.jacobian_dtype != "float32":
            extra.append(f"jacobian_dtype={self.jacobian_dtype}")
        return ", ".join([super().extra_repr(), *extra])

    def _describe(self) -> str:
        return (f"layer {self.layer_name}" if self.layer_name
                else f"{type(self).__name__}({self.num_features})")

    @property
    def paired_conv(self) -> nn.Conv2d | None:
        return self._paired_conv

    def _needs_jacobians(self) -> bool:
        return self.rho != 0.0 and self.window > 1

    # -- history ----------------------------------------------------------------------------------
    def reset_history(self) -> None:
        """Forget the stored iterations (the next training step starts a new window)."""
        if hasattr(self, "hist_state"):
            self.hist_state.zero_()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()  # also restarts the burn-in (num_batches_tracked = 0)
        self.reset_history()

    def history_length(self) -> int:
        return int(self.hist_state[0])

    def history_devices(self) -> int:
        """``G``, the simulated devices whose windows the history buffers hold."""
        return self.hist_mean.shape[1] // self.num_features

    def _conv_shapes(self, conv: nn.Conv2d, devices: int) -> dict[str, tuple[int, ...]]:
        k1, c = self.window - 1, devices * self.num_features
        if not self._needs_jacobians():
            return {name: (0,) for name in _CONV_BUFFERS}
        per_group = conv.weight[0].numel()
        return {"hist_dmean": (k1, devices * conv.groups, per_group), "hist_dmean_ref": (k1, c),
                "hist_dvar": (c, k1, per_group), "hist_dvar_ref": (k1, c)}

    def _allocate(self, devices: int) -> None:
        """Empty history buffers for ``devices`` windows (the Jacobians' once paired)."""
        shapes = {"hist_mean": (self.window - 1, devices * self.num_features)}
        shapes["hist_var"] = shapes["hist_mean"]
        if self._paired_conv is not None:
            shapes.update(self._conv_shapes(self._paired_conv, devices))
        for name, shape in shapes.items():
            buf = getattr(self, name)
            setattr(self, name, torch.zeros(shape, device=buf.device, dtype=buf.dtype))
        self.reset_history()

    def _fit_history(self, devices: int, samples: int) -> None:
        """History buffers for ``devices`` windows: reallocated while empty; a held history of
        another number of devices is an error (it is not this batch's devices' window)."""
        held = self.history_devices()
        if held == devices:
            return
        if self.history_length():
            raise BnbenchError(
                f"cbn: {self._describe()} holds the windows of {held} device(s) (nbs="
                f"{self.nbs}) but a batch of {samples} samples is {devices}; keep the training "
                "batch size, or reset_history()")
        self._allocate(devices)

    # -- pairing ----------------------------------------------------------------------------------
    def pair(self, conv: nn.Conv2d) -> None:
        """Pair with the conv whose output this layer normalizes (its input is recorded by a
        forward hook). Allocates the Jacobian buffers for the conv's shape (keeping the history
        if the shape is unchanged), so ``load_state_dict`` works before the first forward.

        The conv is not registered as a submodule (the module tree and state dict are unchanged).
        The pair survives ``.to()``, ``copy.deepcopy`` and pickling of a model holding both.
        """
        if not isinstance(conv, nn.Conv2d):
            raise BnbenchError(f"cbn: {self._describe()} can only pair with an nn.Conv2d, "
                               f"got {type(conv).__name__}")
        if conv.out_channels != self.num_features:
            raise BnbenchError(f"cbn: {self._describe()} has {self.num_features} channels but "
                               f"the conv it pairs with has {conv.out_channels} outputs")
        old = self._paired_conv
        if old is not None and self._hook_id is not None:
            old._forward_hooks.pop(self._hook_id, None)
        handle = conv.register_forward_hook(self._conv_hook)
        object.__setattr__(self, "_paired_conv", conv)
        object.__setattr__(self, "_hook_id", handle.id)
        self._pending.clear()
        changed = False
        for name, shape in self._conv_shapes(conv, self.history_devices()).items():
            buf = getattr(self, name)
            if tuple(buf.shape) != shape:
                setattr(self, name, torch.zeros(shape, device=buf.device, dtype=buf.dtype))
                changed = True
        if changed:
            self.reset_history()

    def _conv_hook(self, conv: nn.Module, args: tuple, output: Any) -> None:
        if self.training and conv is self._paired_conv:
            self._pending.input = args[0] if args and isinstance(args[0], Tensor) else None
            self._pending.shape = tuple(output.shape) if isinstance(output, Tensor) else None
            self._pending.dtype = output.dtype if isinstance(output, Tensor) else None

    def _conv_input(self, x: Tensor) -> Tensor:
        if self._paired_conv is None:
            raise BnbenchError(f"cbn: {self._describe()} is not paired with its Conv2d; call "
                               "bnbench.norm.cbn.pair_convs(model) (or layer.pair(conv))")
        pending = self._pending
        if pending.input is None or pending.shape != tuple(x.shape):
            got = "did not run" if pending.shape is None else f"produced {list(pending.shape)}"
            raise BnbenchError(f"cbn: {self._describe()} got an input of shape {list(x.shape)} "
                               f"but its paired conv {got} just before; CBN must directly follow "
                               "the conv it is paired with")
        return pending.input

    def _apply(self, fn, recurse=True):
        # .half()/.to(torch.bfloat16) would round the window: the history stays fp32 (moves only).
        before = {name: getattr(self, name) for name in _HISTORY_FLOAT}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, old.to(new.device))
        return self

    # -- state dict -------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        keys = [prefix + name for name in _HISTORY]
        if prefix + "hist_dsq" in state_dict and prefix + "hist_dvar" not in state_dict:
            state_dict = _from_second_moment(state_dict, prefix)
        if not all(key in state_dict for key in keys):
            # A checkpoint without (complete) history, e.g. of plain BN: an empty window.
            state_dict = {k: v for k, v in state_dict.items() if k not in keys}
            before = len(missing_keys)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            missing_keys[before:] = [k for k in missing_keys[before:] if k not in keys]
            self.reset_history()
            return
        stored = state_dict[prefix + "hist_mean"]  # (k−1, G·C): the checkpoint's G devices
        if self.nbs is not None and stored.dim() == 2 and stored.shape[1] % self.num_features == 0:
            devices = stored.shape[1] // self.num_features
            if devices != self.history_devices():
                self._allocate(devices)
        if self._paired_conv is None:  # not paired yet: take the stored shapes
            for name in _CONV_BUFFERS:
                src, buf = state_dict.get(prefix + name), getattr(self, name)
                if isinstance(src, Tensor) and src.shape != buf.shape:
                    setattr(self, name, torch.zeros(src.shape, device=buf.device,
                                                    dtype=buf.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        try:
            return super().forward(x)
        finally:
            self._pending.clear()

    # Not traced into a compiled model (as BRN): the step reads history buffers that it then
    # updates, and a traced backward may recompute from the updated ones.
    @run_eagerly
    def _train_forward(self, x: Tensor) -> Tensor:
        devices = device_groups(x.shape[0], self.nbs, "cbn")
        # The burn-in reads the iteration count back (a device sync) only when there is one.
        # Burn-in and window 1: BN, with nbs GhostBN (every device's own BN, EMA averaged).
        if self.window == 1 or (self.burnin and int(self.num_batches_tracked) < self.burnin):
            return super()._train_forward(x)
        self._check_group_size(x, x.shape[0] // devices)
        conv_input = self._conv_input(x) if self._needs_jacobians() else None
        self._fit_history(devices, x.shape[0])
        grouped = to_groups(x, devices)  # channel g·C + c: channel c of device g
        with _no_autocast(x.device):
            mean, var = batch_moments(grouped)  # μ_t, σ²_t: the only terms with gradient
            cd = mean.dtype
            jacobians = self._jacobian_args(cd)
            entry = () if conv_input is None else self._raw_jacobians(conv_input, grouped, cd,
                                                                       devices)
            with torch.no_grad():  # the earlier iterations, compensated to the current weights
                past_mean, past_var, keep = compensate(
                    self.hist_mean.to(cd), self.hist_var.to(cd), self.neg_var == "drop",
                    self.rho, *(t.to(cd) for t in jacobians))
                valid = torch.arange(self.window - 1, device=keep.device) < self.hist_state[0]
                keep = torch.where(valid[:, None], keep, 0)
            wmean, wvar = window_statistics(mean, var, past_mean, past_var, keep)
            record(mean.detach(), var.detach(), self.hist_mean, self.hist_var, self.hist_state,
                   entry, jacobians)
            update_population(self._ema(), mean.detach(), var.detach(),
                              grouped.numel() // grouped.shape[1], self.eps, devices)
            weight, bias = (repeat_groups(t, devices) for t in self._affine())
            y = window_batch_norm(grouped, mean, var, wmean, wvar, weight, bias, self.eps)
        return from_groups(y, devices)

    def _weights(self, cd: torch.dtype) -> tuple[Tensor, Tensor]:
        """The conv's ``(W (C, P), b (C,))`` in ``cd`` (``b = 0`` without bias), rounded first
        to the dtype the conv just computed in (autocast: the weights it actually used)."""
        conv = self._paired_conv
        run = self._pending.dtype
        w, b = conv.weight.detach(), conv.bias
        b = w.new_zeros(conv.out_channels) if b is None else b.detach()
        if run is not None and run != w.dtype and run.is_floating_point:
            w, b = w.to(run), b.to(run)
        return w.to(cd).reshape(conv.out_channels, -1), b.to(cd)

    def _jacobian_args(self, cd: torch.dtype) -> tuple[Tensor, ...]:
        """:func:`compensate`'s ``jacobians`` (empty for naive CBN); ``W, b`` repeated for the
        history's devices (shared weights)."""
        if not self._needs_jacobians():
            return ()
        devices = self.history_devices()
        w, b = self._weights(cd)
        if devices > 1:
            w, b = w.repeat(devices, 1), b.repeat(devices)
        return (w, b, self.hist_dmean, self.hist_dmean_ref, self.hist_dvar, self.hist_dvar_ref)

    @torch.no_grad()
    def _compensated(self, length: int, cd: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The first ``length`` stored iterations' ``(μ, σ²⁺, keep)`` ``(L, C)`` at the current
        weights (what the next training forward averages; for inspection and tests)."""
        entries = compensate(self.hist_mean.to(cd), self.hist_var.to(cd),
                             self.neg_var == "drop", self.rho,
                             *(t.to(cd) for t in self._jacobian_args(cd)))
        return tuple(t[:length] for t in entries)

    @torch.no_grad()
    def jacobians(self, conv_input: Tensor, y: Tensor, dtype: torch.dtype = torch.float32, *,
                  mean: Tensor | None = None, devices: int = 1) -> tuple[Tensor, Tensor]:
        """``∂μ/∂W`` ``(G·groups, C_in/groups·kh·kw)`` (per device and conv group) and
        ``∂σ²_j/∂W_j`` ``(G·C, C_in/groups·kh·kw)`` (per device) of the paired conv, from its
        input ``conv_input`` and output ``y`` ``(G·n, C, …)`` (analytic; ``mean``: the
        per-channel mean of ``y`` ``(G·C,)`` if known). What a training step stores
        (:func:`record` does the centring there)."""
        grouped = to_groups(y.detach(), devices)
        dmean, dvar, centre = self._raw_jacobians(conv_input, grouped, dtype, devices)
        mean = grouped.to(dtype).mean((0, 2, 3)) if mean is None else mean.to(dtype)
        return dmean, _centre(dvar, mean if centre is None else mean - centre, dmean)

    @torch.no_grad()
    def _raw_jacobians(self, conv_input: Tensor, y: Tensor, dtype: torch.dtype,
                       devices: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(∂μ/∂W, D, c)`` in ``dtype`` with ``D = (2/M) Σ_p (y(p) − c)·patch(p)``:
        ``∂σ²/∂W = D − 2(μ − c) ∂μ/∂W`` (:func:`_centre`), per device: ``conv_input``
        ``(G·n, C_in, …)`` as the conv got it, its output ``y`` in the devices' layout
        ``(n, G·C, …)`` (:func:`to_groups`), ``M = n·H·W``. Each is one convolution over the
        whole batch, grouped by device (not one per device).

        ``jacobian_dtype="float32"``: ``c = 0`` (``None``), the weight gradient for ``2y/M``;
        the centring is then a rank-1 update of the small Jacobian, not a pass over ``y``, and
        costs ulp·|μ|·|patch| per entry (a few ulps of ∂σ²/∂W when |μ| ≫ σ), not ulp·μ² on σ².
        ``"bfloat16"``: ``c`` = the mean of ``y``, subtracted before rounding (bf16 of ``y − c``
        keeps σ's precision, not μ's); fp32 accumulation.
        """
        conv = self._paired_conv
        x, padding = padded_input(conv, conv_input.detach())
        x, y = x.to(dtype), y.detach().to(dtype)
        m = y.shape[0] * y.shape[2] * y.shape[3]
        c_in, spatial = x.shape[1], x.shape[2:]
        with _no_autocast(x.device):
            # ∂μ/∂W: each device's summed input against a ones output, one group per device
            sums = x.view(devices, -1, c_in, *spatial).sum(1).reshape(1, -1, *spatial)
            ones = x.new_ones(1, devices, y.shape[2], y.shape[3])
            patch = conv2d_weight(sums, (devices, c_in, *conv.kernel_size), ones, conv.stride,
                                  padding, conv.dilation, devices)
            dmean = patch.reshape(devices * conv.groups, -1).div_(m)
            x = to_groups(x, devices)
            if self.jacobian_dtype == "float32":
                return dmean, _weight_grad(x, y, conv, padding, devices).mul_(2.0 / m), None
            centre = y.mean((0, 2, 3))  # ∂σ²/∂y = 2(y − μ)/M
            low = torch.bfloat16
            centered = (y - centre.view(1, -1, 1, 1)).to(low)
            dvar = _weight_grad(x.to(low), centered, conv, padding, devices)
            return dmean, dvar.to(dtype).mul_(2.0 / m), centre


@torch.no_grad()
def conv_jacobians(conv: nn.Conv2d, conv_input: Tensor, y: Tensor,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """:meth:`CrossIterationBatchNorm2d.jacobians` of ``conv`` without a CBN layer after it (one
    device, the exact ``jacobian_dtype="float32"`` path): ``(∂μ/∂W (groups, P), ∂σ²_j/∂W_j
    (C, P))`` of its output ``y`` on ``conv_input`` — the layer's own code, for analyses of runs
    whose layers are not CBN (``bnbench analyze taylor_error``)."""
    probe = CrossIterationBatchNorm2d(conv.out_channels, window=2, device=conv.weight.device)
    # Only the Jacobian code runs: the conv is referenced, not paired (no hook, no buffers).
    object.__setattr__(probe, "_paired_conv", conv)
    return probe.jacobians(conv_input, y, dtype)


def padded_input(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Any]:
    """``(x, padding)`` for the weight-gradient convolution of ``conv`` on ``x``: padded here as
    the conv pads (``padding="same"``/``"valid"``, non-zero padding modes), else the conv's own
    integer padding."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return x, conv.padding


def _from_second_moment(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A bnbench 0.1 state dict (second-moment Jacobians ``hist_dsq`` = ∂ν/∂W) in the current
    layout: ``∂σ²/∂W = ∂ν/∂W − 2μ ∂μ/∂W``, ``e_μ = μ`` and ``e_σ = 2σ²`` (Euler: exact in
    exact arithmetic)."""
    out = {k: v for k, v in state_dict.items()
           if k not in (prefix + "hist_dsq", prefix + "hist_dsq_ref")}
    dsq, dmean = state_dict[prefix + "hist_dsq"], state_dict.get(prefix + "hist_dmean")
    mean, var = state_dict.get(prefix + "hist_mean"), state_dict.get(prefix + "hist_var")
    if dsq.numel() == 0 or dmean is None or mean is None or var is None:
        empty = dsq.new_zeros(0)
        out.update({prefix + name: empty for name in ("hist_dmean_ref", "hist_dvar",
                                                      "hist_dvar_ref")})
        return out
    dvar = dsq.clone()
    for slot in range(dsq.shape[1]):
        dvar[:, slot] = _centre(dvar[:, slot], mean[slot], dmean[slot])
    out[prefix + "hist_dvar"] = dvar
    out[prefix + "hist_dmean_ref"] = mean.clone()
    out[prefix + "hist_dvar_ref"] = 2 * var
    return out


def _centre(jac: Tensor, offset: Tensor, dmean: Tensor) -> Tensor:
    """``jac − 2·offset ∂μ/∂W`` ``(C, P)`` (``offset`` ``(C,)``, per-group ``dmean`` ``(Q, P)``):
    one batched rank-1 update; ``∂ν/∂W`` with ``offset = μ`` gives ``∂σ²/∂W``."""
    g, c = dmean.shape[0], jac.shape[0]
    out = torch.baddbmm(jac.view(g, c // g, -1), offset.view(g, c // g, 1), dmean.view(g, 1, -1),
                        alpha=-2.0)
    return out.view(c, -1)


def _group_dot(w: Tensor, patch: Tensor, groups: int) -> Tensor:
    """``⟨patch_{l,q(j)}, W_j⟩`` ``(L, C)``: ``w`` ``(C, P)``, per-group ``patch`` ``(L, Q, P)``."""
    c, length = w.shape[0], patch.shape[0]
    out = torch.bmm(w.view(groups, c // groups, -1), patch.permute(1, 2, 0))  # (Q, C/Q, L)
    return out.reshape(c, length).t()


def _weight_grad(x: Tensor, y: Tensor, conv: nn.Conv2d, padding: Any, devices: int) -> Tensor:
    """``Σ_p y_j(p)·patch(p)`` ``(G·C, C_in/groups·kh·kw)`` per device: the conv's weight
    gradient for ``∂y = y`` (``torch.nn.grad.conv2d_weight``, the kernel of the conv's own
    backward), on ``x``, ``y`` in the devices' layout (:func:`to_groups`) as one grouped
    convolution with ``G·groups`` groups: the work of one weight gradient over the batch."""
    shape = (devices * conv.out_channels, *conv.weight.shape[1:])
    grad = conv2d_weight(x, shape, y, conv.stride, padding, conv.dilation,
                         devices * conv.groups)
    return grad.reshape(y.shape[1], -1)


def preceding_conv(model: nn.Module, name: str) -> nn.Conv2d | None:
    """The conv a norm layer at dotted ``name`` follows: in an ``nn.Sequential`` the preceding
    element, otherwise the sibling ``convX`` of an attribute ``bnX`` (torchvision ResNets)."""
    if not name:
        return None
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    conv = None
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        index = names.index(attr)
        conv = parent._modules[names[index - 1]] if index > 0 else None
    elif attr.startswith("bn"):
        conv = parent._modules.get("conv" + attr[2:])
    return conv if isinstance(conv, nn.Conv2d) else None


def pair_convs(model: nn.Module) -> None:
    """Pair every :class:`CrossIterationBatchNorm2d` of ``model`` with the conv before it.

    Rules: in an ``nn.Sequential`` the preceding element (ResNet ``downsample.0``/``.1``); a layer
    at attribute ``bnX`` pairs with the sibling ``convX`` (ResNet stem ``conv1``/``bn1``, block
    ``convJ``/``bnJ``). Run it after the norm layers are in place (``convert`` does); moving the
    model with ``.to()`` afterwards is fine. A layer without a conv is an error.
    """
    for name, layer in model.named_modules():
        if not isinstance(layer, CrossIterationBatchNorm2d):
            continue
        conv = preceding_conv(model, name)
        if conv is None:
            raise BnbenchError(f"cbn: layer {name or '<root>'} has no preceding Conv2d to pair "
                               "with")
        layer.layer_name = name
        layer.pair(conv)


__all__ = ["CBN_OPTIONS", "NEG_VAR", "CrossIterationBatchNorm2d", "conv_jacobians",
           "pair_convs", "preceding_conv"]
