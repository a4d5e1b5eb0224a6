"""Domain-specific BatchNorm: one layer used on inputs from several domains (Rethinking §5.2).

A BatchNorm layer that is *shared* across domains — RetinaNet's head applied to the D = 5 FPN
levels, or one network trained on several datasets — has three independent choices (Table 5;
§5.3 lists the same three for "Domain-Specific BN", "Split BN", ...). With inputs
``X_1 … X_D``, ``X_d`` of shape ``(N_d, C, H_d, W_d)`` and ``M_d = N_d·H_d·W_d`` elements per
channel:

* **SGD training statistics** (``train_stats``), how a training step normalizes inputs that are
  given together (:meth:`DomainBatchNorm2d.forward_domains`):

  - ``"shared"`` (Fig. 7b): one set of statistics over the union of all elements,
    ``μ = Σ_d Σ_{X_d} x / Σ_d M_d``, ``σ² = Σ_d Σ_{X_d} (x − μ)² / Σ_d M_d``; gradients flow
    through ``μ, σ²`` into every input. As in the paper's Alg. 1 (row 1) the inputs are
    flattened and concatenated, ``cat([X_d.flatten(2)], dim=2).unsqueeze(3)`` of shape
    ``(N, C, Σ_d H_d W_d, 1)``, and that one tensor goes through the batch path of
    :class:`~bnbench.norm.base.BatchNorm2d` — so GhostBN (``nbs``: a group holds samples
    ``n … n+k`` of *every* domain) and SyncBN work on it unchanged. Unequal ``N_d`` are joined
    as ``(1, C, Σ_d M_d, 1)`` instead (channel-major flattening, same union statistics); there
    is then no sample axis to group, so ``nbs`` (or ``eval_nbs`` with ``eval_stats="batch"``)
    is an error.
  - ``"domain"`` (Fig. 7a): ``X_d`` is normalized by its own ``μ_d, σ²_d`` — the base class's
    forward with ``domain = d`` (nbs, sync, frozen, … apply per input).

* **Population statistics** (``pop_stats``), the EMA ``running ← (1 − m)·running + m·batch``
  (unbiased batch variance ``σ²·M/(M − 1)``, as in the base class):

  - ``"domain"``: one slot per domain, ``running_mean``/``running_var`` of shape ``(D, C)``;
    slot ``d`` receives the statistics of ``X_d`` alone, whatever ``train_stats`` is (with shared
    training statistics these are ``X_d``'s share of the normalization batch: its per-process
    batch, its groups of ``nbs`` samples, or synced over the process group).
  - ``"shared"``: one slot, shape ``(C,)`` as in ``nn.BatchNorm2d``. With shared training
    statistics it receives the union statistics once per step. With domain training statistics
    it is updated once per input, in the order ``d = 1 … D`` — exactly one ``nn.BatchNorm2d``
    applied to each input in turn (Alg. 1, row 3), so after one step domain ``d``'s statistics
    carry weight ``m(1 − m)^{D−d}``.

* **Affine** (``affine_mode``): ``γ, β`` shared (shape ``(C,)``) or one pair per domain
  (``(D, C)``), applied after normalizing: ``y_d = γ_{a(d)} · x̂_d + β_{a(d)}``.

At inference (``eval_stats="population"``) and with ``frozen=True``, input ``d`` is normalized
by slot ``p(d)``: ``y_d = γ_{a(d)} (x − μ_{p(d)}) / sqrt(σ²_{p(d)} + ε) + β_{a(d)}`` with
``p(d) = d`` for domain population statistics and ``0`` for shared ones (likewise ``a(d)``).
With ``eval_stats="batch"`` the inputs are normalized by batch statistics grouped as in training
(union for ``train_stats="shared"``, per input for ``"domain"``).

Table 5 (RetinaNet R50-FPN, SyncBN in the shared head, AP) in these terms::

    row  train_stats  pop_stats  affine_mode   AP
    1    shared       shared     shared        39.1   consistent
    2    shared       domain     shared         2.1   inconsistent: union in SGD, per level in test
    3    domain       shared     shared        34.1   inconsistent: the "straightforward" head
    4    domain       domain     shared        39.1   consistent
    5    domain       shared     domain        35.5   inconsistent
    6    domain       domain     domain        39.2   consistent (Alg. 1 row 6: one BN per level)

The paper's conclusion: population statistics must be computed the way SGD normalized; sharing the
affine transform or not matters little.

Two ways to say which domain an input is from:

* :meth:`DomainBatchNorm2d.forward_domains` takes the inputs of all domains at once (input ``i``
  is domain ``i``); it is the only way to get ``train_stats="shared"``.
* ``forward(x)`` normalizes one input of the domain in the layer's ``domain`` attribute (set it
  on a whole model with :func:`set_domain`) — the "layer with an extra state" variant of
  Appendix A.9; ``train_stats`` plays no role there (one input is one domain).

PreciseBN: the observer receives the slot of the statistics it is given (``domain`` with domain
population statistics, 0 otherwise); in :meth:`~DomainBatchNorm2d.forward_domains` it gets what
the EMA would get (the union, or each input with its slot), and
:func:`bnbench.population.update_population_stats` writes each slot's estimate through
:meth:`~DomainBatchNorm2d.slot_population`: one pass over batches of all domains
(``forward_domains``), or one pass per domain (``set_domain(model, d)``, then domain-``d``
batches).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbench.errors import BnbenchError, check_positive
from bnbench.norm.base import BatchNorm2d

MODES = ("domain", "shared")

#: Config options of ``norm=domain`` (the registry's ``BN_OPTIONS`` plus the three choices).
DOMAIN_OPTIONS = frozenset({"eps", "momentum", "eval_stats", "eval_nbs", "num_domains",
                            "train_stats", "pop_stats", "affine_mode"})


def _check_mode(name: str, value: str) -> str:
    if value not in MODES:
        raise BnbenchError(f"norm.{name}={value}: choose one of {', '.join(MODES)}")
    return value


class DomainBatchNorm2d(BatchNorm2d):
    """BatchNorm with per-domain statistics and/or affine (see the module docstring).

    Args:
        num_features: channels ``C``.
        num_domains: ``D`` ≥ 1.
        train_stats: ``"domain"`` or ``"shared"``: how :meth:`forward_domains` normalizes inputs
            from several domains in training.
        pop_stats: ``"domain"`` (``running_mean``/``running_var`` of shape ``(D, C)``) or
            ``"shared"`` (shape ``(C,)``).
        affine_mode: ``"shared"`` (``weight``/``bias`` of shape ``(C,)``) or ``"domain"``
            (``(D, C)``).
        eps, momentum, affine, **kwargs: as :class:`~bnbench.norm.base.BatchNorm2d` (nbs,
            process_group, eval_stats, eval_nbs, frozen, device, dtype).

    Defaults are Table 5's row 4 (domain-specific statistics in training and in population,
    shared affine); with ``num_domains=1`` the layer computes what a plain BatchNorm does
    (per-domain tensors are then ``(1, C)``).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        *,
        num_domains: int = 1,
        train_stats: str = "domain",
        pop_stats: str = "domain",
        affine_mode: str = "shared",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, **kwargs)
        self.num_domains = check_positive("norm.num_domains", num_domains, integer=True)
        self.train_stats = _check_mode("train_stats", train_stats)
        self.pop_stats = _check_mode("pop_stats", pop_stats)
        self.affine_mode = _check_mode("affine_mode", affine_mode)
        if self.affine_mode == "domain" and not affine:
            raise BnbenchError("norm.affine_mode=domain needs an affine layer (affine=True)")
        self._domain = 0
        self._affine_off = False
        d = self.num_domains
        with torch.no_grad():
            if self.pop_stats == "domain":
                self.running_mean = self.running_mean.repeat(d, 1)
                self.running_var = self.running_var.repeat(d, 1)
            if self.affine_mode == "domain":
                self.weight = nn.Parameter(self.weight.detach().repeat(d, 1))
                self.bias = nn.Parameter(self.bias.detach().repeat(d, 1))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_domains={self.num_domains}, "
                f"train_stats={self.train_stats}, pop_stats={self.pop_stats}, "
                f"affine_mode={self.affine_mode}")

    # -- the current domain ------------------------------------------------------------------
    @property
    def domain(self) -> int:
        """Domain of the inputs of ``forward(x)`` (0 … D − 1)."""
        return self._domain

    @domain.setter
    def domain(self, value: int) -> None:
        self._domain = self.check_domain(value)

    def check_domain(self, value: Any) -> int:
        try:
            index = operator.index(value)
        except TypeError:
            index = None
        if index is None or not 0 <= index < self.num_domains:
            raise BnbenchError(f"{type(self).__name__}: domain={value!r} is not one of the "
                               f"{self.num_domains} domains (0 … {self.num_domains - 1})")
        return index

    @contextmanager
    def _selected(self, domain: int) -> Iterator[None]:
        previous = self._domain
        self._domain = domain
        try:
            yield
        finally:
            self._domain = previous

    @contextmanager
    def _without_affine(self, off: bool) -> Iterator[None]:
        previous = self._affine_off
        self._affine_off = off
        try:
            yield
        finally:
            self._affine_off = previous

    # -- slots (the base class reads statistics and affine only through these) ---------------
    def _slot(self) -> int:
        return self._domain if self.pop_stats == "domain" else 0

    def _population(self) -> tuple[Tensor, Tensor]:
        if self.pop_stats == "domain":  # row views: in-place EMA updates land in the buffer
            return self.running_mean[self._domain], self.running_var[self._domain]
        return self.running_mean, self.running_var

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        if self._affine_off or self.weight is None:
            return None, None
        if self.affine_mode == "domain":
            return self.weight[self._domain], self.bias[self._domain]
        return self.weight, self.bias

    def slot_population(self, slot: int) -> tuple[Tensor, Tensor]:
        """``(running_mean, running_var)`` of one slot as writable views (for PreciseBN)."""
        slots = self.num_domains if self.pop_stats == "domain" else 1
        if not 0 <= slot < slots:
            raise BnbenchError(f"{type(self).__name__}: slot {slot} out of range ({slots} slots)")
        with self._selected(slot if self.pop_stats == "domain" else 0):
            return self._population()

    # -- several domains at once -------------------------------------------------------------
    def forward_domains(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """Normalize ``xs[i]`` (from domain ``i``) as configured; returns one output per input.

        Outputs may be non-contiguous views of one joined tensor (shared statistics).
        One call counts as one batch in ``num_batches_tracked``.
        """
        xs = list(xs)
        self._check_inputs(xs)
        tracked = self.num_batches_tracked.clone()
        uses_batch = self._observer is not None or not (
            self.frozen or (not self.training and self.eval_stats == "population"))
        if self.train_stats == "shared" and uses_batch:
            ys = self._joint_forward(xs)
        else:
            ys = []
            for i, x in enumerate(xs):
                with self._selected(i):
                    ys.append(self(x))
        if self.training and not self.frozen and self._observer is None:
            with torch.no_grad():
                self.num_batches_tracked.copy_(tracked + 1)
        return ys

    def _check_inputs(self, xs: list[Tensor]) -> None:
        name = type(self).__name__
        if not 1 <= len(xs) <= self.num_domains:
            raise BnbenchError(f"{name}.forward_domains: {len(xs)} inputs for "
                               f"{self.num_domains} domains (give 1 … {self.num_domains})")
        for i, x in enumerate(xs):
            if x.dim() != 4 or x.shape[1] != self.num_features:
                raise BnbenchError(f"{name}.forward_domains: input {i} has shape "
                                   f"{tuple(x.shape)}; expected (N, {self.num_features}, H, W)")

    def _joint_forward(self, xs: list[Tensor]) -> list[Tensor]:
        """Shared statistics: the joined inputs go through the base class as one batch."""
        joined, split = self._join(xs)
        per_domain_affine = self.affine_mode == "domain" and self.weight is not None
        with self._selected(0), self._without_affine(per_domain_affine):
            if self._observer is not None:
                y = self._joint_observed_forward(xs, joined)
            elif not self.training:
                y = self._batch_forward(joined, self.eval_nbs, update=False)
            elif self.pop_stats == "shared":
                y = self._train_forward(joined)
            else:
                y = self._batch_forward(joined, self.nbs, update=False)
                self._update_domains(xs)
        ys = split(y)
        if per_domain_affine:
            shape = (1, -1, 1, 1)
            ys = [torch.addcmul(self.bias[i].view(shape).to(y.dtype), y,
                                self.weight[i].view(shape).to(y.dtype)) for i, y in enumerate(ys)]
        return ys

    def _join(self, xs: list[Tensor]) -> tuple[Tensor, Callable[[Tensor], list[Tensor]]]:
        """One ``(N, C, L, 1)`` tensor holding every element of ``xs``, and its inverse."""
        n = xs[0].shape[0]
        if all(x.shape[0] == n for x in xs):
            flat = [x.flatten(2) for x in xs]
            sizes = [f.shape[2] for f in flat]

            def split(y: Tensor) -> list[Tensor]:
                return [p.reshape(x.shape) for p, x in zip(y.split(sizes, dim=2), xs, strict=True)]

            return torch.cat(flat, dim=2).unsqueeze(3), split
        nbs = self.nbs if self.training else self.eval_nbs
        if nbs is not None and nbs < max(x.shape[0] for x in xs) and self._observer is None:
            raise BnbenchError(f"{type(self).__name__}: shared statistics over inputs with "
                               f"batch sizes {[x.shape[0] for x in xs]} have no sample groups; "
                               "nbs/eval_nbs need equal batch sizes")
        c = self.num_features
        flat = [x.transpose(0, 1).reshape(c, -1) for x in xs]
        sizes = [f.shape[1] for f in flat]

        def split_channel_major(y: Tensor) -> list[Tensor]:
            parts = y[0, :, :, 0].split(sizes, dim=1)
            return [p.reshape(c, x.shape[0], *x.shape[2:]).transpose(0, 1)
                    for p, x in zip(parts, xs, strict=True)]

        return torch.cat(flat, dim=1)[None, :, :, None], split_channel_major

    def _joint_observed_forward(self, xs: list[Tensor], joined: Tensor) -> Tensor:
        """PreciseBN pass with shared training statistics."""
        if self.pop_stats == "shared":
            return self._observed_forward(joined)  # reports the union to slot 0
        with torch.no_grad():  # report each domain to its slot; outputs not needed
            for i, x in enumerate(xs):
                with self._selected(i):
                    self._observed_forward(x)
        # normalize as training does (the union), per process like the base observed path
        self._check_group_size(joined, joined.shape[0])
        weight, bias = self._affine()
        return F.batch_norm(joined, None, None, weight, bias, True, 0.0, self.eps)

    @torch.no_grad()
    def _update_domains(self, xs: list[Tensor]) -> None:
        """EMA of each domain's own part of the (shared) normalization batch into its slot: the
        training batch path on that part alone (its groups of ``nbs``, or synced), output
        discarded."""
        for i, x in enumerate(xs):
            if x.shape[0] == 0:
                continue
            with self._selected(i), self._without_affine(True):
                self._batch_forward(x.detach(), self.nbs, update=True)

    # -- loading a shared (C,) state into per-domain (D, C) tensors --------------------------
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            own, value = getattr(self, name, None), state_dict.get(prefix + name)
            if (isinstance(own, Tensor) and isinstance(value, Tensor) and own.dim() == 2
                    and value.shape == own.shape[1:]):
                state_dict[prefix + name] = value.expand_as(own)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def set_domain(model: nn.Module, domain: int) -> nn.Module:
    """Set ``domain`` on every :class:`DomainBatchNorm2d` of ``model`` (all or none); returns it."""
    layers = [m for m in model.modules() if isinstance(m, DomainBatchNorm2d)]
    for layer in layers:
        layer.check_domain(domain)
    for layer in layers:
        layer.domain = domain
    return model


__all__ = ["DOMAIN_OPTIONS", "MODES", "DomainBatchNorm2d", "set_domain"]
