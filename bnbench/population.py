"""Population-statistics algorithms: PreciseBN (Rethinking §3.2, appendix A.2–A.3).

PreciseBN recomputes the population statistics of every BN-family layer from a fixed model:
(1) forward ``N`` training samples in batches of ``B``, each layer normalizing with the statistics
of its batch and reporting them (per slot: domain-specific layers keep one set per domain);
(2) aggregate the per-batch statistics. With batch ``i`` of ``c_i`` elements per channel (samples
× H × W), biased mean ``μ_i`` and variance ``σ²_i``, and ``n = Σ c_i``:

* ``estimator="population"`` (Eq. 2): ``μ = Σ c_i μ_i / n``,
  ``σ² = n/(n−1) · (Σ c_i (μ_i² + σ²_i) / n − μ²)`` — the unbiased variance of all ``n`` values,
  i.e. exactly the statistics of the concatenated data, for any split into batches;
* ``estimator="batch_mean"`` (Eq. 3): ``σ² = Σ c_i · c_i/(c_i−1) · σ²_i / n``, the mean of the
  unbiased batch variances (what an EMA averages).

Sums are float64 and, in a multi-process run, all-reduced (each process forwards its share), so
every rank ends with the same statistics. ``layerwise=True`` is appendix A.3: layer ``k`` is
estimated with layers ``< k`` already using their (exact) population statistics, which equals one
forward of the whole population as a single batch (up to the ``n/(n−1)`` of the unbiased variance
the earlier layers normalize with, as at inference), at a cost quadratic in depth; a layer that
runs more than once per forward (shared across inputs) is refused there.
Domain-specific layers report each input to its domain's slot, written to that slot.

It works on any model, as fvcore's ``update_bn_stats`` does: bnbench's layers and PyTorch's own
``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` (with running statistics; observed through a
forward hook that normalizes with the batch's statistics, per process). Other stateful layers are
not touched: the model runs in eval mode (dropout off). A model without any such layer is an
error, not a silent no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnbench.errors import BnbenchError
from bnbench.norm import eval_stats_mode
from bnbench.norm.base import BatchNorm2d, batch_norm_with_moments

ESTIMATORS = ("population", "batch_mean")
Batches = Callable[[], Iterable[Tensor]]


class _Moments:
    """Running float64 sums ``[Σc, Σcμ, Σc(μ²+σ²), Σc²σ²/(c−1)]`` per channel for one slot."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.sums = torch.zeros(4, channels, dtype=torch.float64, device=device)

    def add(self, mean: Tensor, var: Tensor, count: int) -> None:
        mean, var = mean.double(), var.double()
        self.sums[0] += count
        self.sums[1] += count * mean
        self.sums[2] += count * (mean * mean + var)
        self.sums[3] += count * var * (count / max(count - 1, 1))

    def finish(self, estimator: str) -> tuple[Tensor, Tensor]:
        n, s_mean, s_sq, s_var = self.sums
        if float(n[0]) <= 1:
            raise BnbenchError("PreciseBN: fewer than 2 values per channel were seen")
        mean = s_mean / n
        if estimator == "population":
            var = (s_sq / n - mean * mean).clamp_min(0) * n / (n - 1)
        else:
            var = s_var / n
        return mean, var


class _StopForward(Exception):
    """Raised by a layer-by-layer observer once its layer has reported."""


#: PyTorch's layers with population statistics that PreciseBN recomputes (ours subclass one).
TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def population_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose population statistics PreciseBN recomputes, in
    registration order: batch norms with running statistics, FrozenBN excluded (its
    statistics are constants of the model)."""
    return [m for m in model.modules()
            if isinstance(m, TORCH_BN) and m.running_mean is not None
            and not getattr(m, "frozen", False)]


def _has_population(model: nn.Module) -> bool:
    return any(isinstance(m, TORCH_BN) and m.running_mean is not None for m in model.modules())


def _torch_hook(observer):
    """A forward hook for a PyTorch batch norm (in eval mode): report the batch statistics of
    its input and replace its output by the input normalized with them."""

    def hook(layer: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        x = inputs[0]
        y, mean, var = batch_norm_with_moments(x, layer.weight, layer.bias, layer.eps)
        observer(layer, 0, mean, var, x.numel() // x.shape[1])
        return y

    return hook


@contextmanager
def observing(layers: Iterable[nn.Module], observer) -> Iterator[None]:
    """Attach ``observer`` to ``layers`` for the duration of the block."""
    layers = list(layers)
    handles = []
    for layer in layers:
        if isinstance(layer, BatchNorm2d):
            layer._observer = observer
        else:
            handles.append(layer.register_forward_hook(_torch_hook(observer)))
    try:
        yield
    finally:
        for layer in layers:
            if isinstance(layer, BatchNorm2d):
                layer._observer = None
        for handle in handles:
            handle.remove()


@contextmanager
def preserved_population(model: nn.Module) -> Iterator[None]:
    """Restore every layer's population statistics on exit (PreciseBN must not alter training)."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone()) for m in population_layers(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, mean, var in saved:
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)


def _collect(
    model: nn.Module, layers: list[nn.Module], batches: Batches, stop_after: int = 0
) -> dict[tuple[int, int], _Moments]:
    """Forward every batch, accumulating the statistics each of ``layers`` reports per slot;
    with ``stop_after > 0`` each forward stops after that many reports (layer-by-layer)."""
    index = {id(layer): i for i, layer in enumerate(layers)}
    acc: dict[tuple[int, int], _Moments] = {}
    reports = [0]

    def observer(layer: nn.Module, slot: int, mean: Tensor, var: Tensor, count: int) -> None:
        reports[0] += 1
        if count > 0:
            key = (index[id(layer)], slot)
            if key not in acc:
                acc[key] = _Moments(mean.numel(), mean.device)
            acc[key].add(mean, var, count)
        if reports[0] == stop_after:
            raise _StopForward

    with observing(layers, observer):
        for x in batches():
            reports[0] = 0
            with suppress(_StopForward):
                model(x)
    return acc


def _reduce(acc: dict[tuple[int, int], _Moments], keys: list[tuple[int, int]]) -> None:
    """Sum the moments over all processes (every rank must see the same keys)."""
    if not (dist.is_available() and dist.is_initialized()) or not keys:
        return
    flat = torch.cat([acc[k].sums.flatten() for k in keys])
    dist.all_reduce(flat)
    offset = 0
    for k in keys:
        size = acc[k].sums.numel()
        acc[k].sums.copy_(flat[offset : offset + size].view_as(acc[k].sums))
        offset += size


@torch.no_grad()
def _assign(
    layers: list[nn.Module], acc: dict[tuple[int, int], _Moments], estimator: str
) -> None:
    keys = sorted(acc)
    _check_keys(keys, layers[0].running_mean.device)
    _reduce(acc, keys)
    for i, slot in keys:
        mean, var = acc[(i, slot)].finish(estimator)
        layer = layers[i]
        running_mean, running_var = (layer.slot_population(slot) if isinstance(layer, BatchNorm2d)
                                     else (layer.running_mean, layer.running_var))
        running_mean.copy_(mean.to(running_mean.dtype))
        running_var.copy_(var.to(running_var.dtype))


def _forward_order(
    model: nn.Module, layers: list[nn.Module], batches: Batches
) -> list[tuple[nn.Module, int]]:
    """The layers in the order they first report, each with its number of reports per forward
    (its slots: one, or one per domain with domain statistics)."""
    slots: dict[int, list[int]] = {}
    order: list[nn.Module] = []

    def record(layer: nn.Module, slot: int, mean: Tensor, var: Tensor, count: int) -> None:
        seen = slots.setdefault(id(layer), [])
        if not seen:
            order.append(layer)
        if slot in seen:
            raise BnbenchError(
                f"PreciseBN layerwise: a {type(layer).__name__}({layer.num_features}) runs more "
                "than once per forward (shared across inputs), so layers after its first call "
                "are not yet estimated at its later calls; use precise.layerwise=false"
            )
        seen.append(slot)

    first = next(iter(batches()))
    with observing(layers, record):
        model(first)
    return [(layer, len(slots[id(layer)])) for layer in order]


def _check_keys(keys: list[tuple[int, int]], device: torch.device) -> None:
    """Every rank must report the same (layer, slot) keys, else the all-reduce would mix them.

    Compared through a count and a checksum of the keys, reduced with MIN and MAX (a tensor on
    the statistics' device, so it works with NCCL as with gloo).
    """
    if dist.is_available() and dist.is_initialized():
        code = torch.tensor(
            [len(keys), sum((i + 1) * 1009 + s for i, s in keys)],
            dtype=torch.float64,
            device=device,
        )
        low, high = code.clone(), code.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise BnbenchError(
                "PreciseBN: processes saw different layers/domains (or one saw "
                "no samples); raise precise.num_samples or check the data"
            )
    if not keys:
        raise BnbenchError("PreciseBN: no samples were seen; raise precise.num_samples")


@torch.no_grad()
def update_population_stats(
    model: nn.Module, batches: Batches, *, estimator: str = "population", layerwise: bool = False
) -> None:
    """Recompute the population statistics of every batch-norm layer of ``model`` in place.

    ``batches`` is a factory returning an iterable of input tensors (called once, or once per
    layer with ``layerwise=True``, which needs the same batches each time).
    """
    if estimator not in ESTIMATORS:
        raise BnbenchError(f"precise.estimator={estimator}: choose one of {', '.join(ESTIMATORS)}")
    if not _has_population(model):
        raise BnbenchError(
            f"PreciseBN: {type(model).__name__} has no BatchNorm layer with population "
            "statistics (GroupNorm/LayerNorm models have none to recompute)"
        )
    layers = population_layers(model)
    if not layers:  # only FrozenBN: its statistics are constants
        return
    was_training = model.training
    model.eval()  # other layers (dropout) as at inference; BN layers observe regardless
    try:
        # Layers before the observed one (layer-by-layer) must use their population statistics.
        with eval_stats_mode(model, "population"):
            if not layerwise:
                _assign(layers, _collect(model, layers, batches), estimator)
                return
            for layer, reports in _forward_order(model, layers, batches):
                _assign([layer], _collect(model, [layer], batches, reports), estimator)
    finally:
        model.train(was_training)
