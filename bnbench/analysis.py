"""``bnbench analyze <name> run=<run dir> [key=value …] [force=true]``: analyses of a trained run's
population statistics ("Rethinking 'Batch' in BatchNorm", §3.1 and appendix A.2–A.3) and of
Cross-Iteration BN (Yao et al., CVPR 2021: its Taylor compensation, §3, and its cost).

* ``channel_trace`` (§3.1, Fig. 2): for every kept checkpoint ``checkpoints/epoch{E}.pt`` (a run
  trained with ``trainer.keep_checkpoints=true``), one channel of one BN layer: its EMA mean (the
  checkpoint's ``running_mean``), its means over random augmented training batches forwarded in
  training mode, and their average (the population mean). How far the EMA lies from the
  population, in units of the spread of the batch means, is what Fig. 2 shows.
* ``estimator_error`` (appendix A.2): bias and variance of the population-variance estimators
  Eq. 2 and Eq. 3 as a function of the batch ``B``, in closed form and simulated on the real
  input activations of one BN layer of the last checkpoint.
* ``layerwise_error`` (appendix A.3, Table 2): how far PreciseBN's statistics at batch ``B``
  (Eq. 2, one forward per batch) and the layer-by-layer statistics at ``B`` lie from the exact
  population statistics, per layer, averaged over layers.
* ``taylor_error`` (CBN §3): a few more SGD steps from the last checkpoint; the statistics of the
  batch of iteration ``t−τ`` at the current weights — recomputed, Taylor-compensated as CBN does
  (first order in the preceding conv's weights), and uncompensated — and the error of the last
  two against the first, per ``τ`` and layer.
* ``cost`` (CBN's cost table): on the run's architecture with BN, GN and CBN, the normalization
  FLOPs and CBN's history memory from the layer shapes, and measured training-step and
  inference times; at inference CBN is checked to be BN.
* ``affine_fusion`` (appendix A.8): the paper's toy, no run needed — gradient descent on
  ``J = (λx)²`` with a frozen ``λ`` (FrozenBN's affine in front of a trained weight) and on the
  fused problem ``J = w²`` (``w = λx`` trained directly), from the same function: fusion is
  exact at inference and changes the optimization.

The default layer of ``channel_trace`` and ``estimator_error`` is :data:`DEFAULT_LAYER`, the first
BN of the third stage of bnbench's ResNets (a mid-network layer); a model without it takes the
middle one of its BN layers. ``bnbench analyze --help`` lists every analysis with its options.

Each analysis is an :class:`Analysis` of :data:`ANALYSES`: ``compute(run_dir, options)`` returns a
JSON-serializable result with ``table`` (``{row: {column: float | None}}``, a markdown table in the
report) and ``scalars`` (``{name: float | None}``, what claims compare), and ``plot(result, ax)``
draws it on a matplotlib axes. An analysis with ``needs_run=False`` (a toy) reads no run:
``run=`` names the directory its record goes to (made when it is written), at iteration 0.
The command writes ``<run>/analyses/<name>.json`` atomically::

    {"name": …, "options": {every option, defaults filled}, "iter": <last.pt's iteration>,
     "result": {"table": …, "scalars": …, …}}

and does nothing when that file holds the same options at the same iteration (``force=true``
computes it again). Bad input (an unknown analysis or option, a bad value, a run without a
checkpoint) is one ``bnbench: error:`` line, exit status 2, with nothing written. Torch is
imported once the command line is checked, so that those errors come fast.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from bnbench.errors import BnbenchError

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from bnbench.eval_app import LoadedRun
    from bnbench.evaluate import Reader
    from bnbench.plan import BatchPlan

#: ``<run>/analyses/<name>.json``.
ANALYSES_DIR = "analyses"
#: The default BN layer: the first of the third stage of bnbench's ResNets (``layer3.0.bn1``).
DEFAULT_LAYER = "layer3.0.bn1"
#: Options of the command itself (not recorded with the result).
COMMAND_KEYS = ("run", "force", "device")
DEVICES = ("auto", "cpu", "cuda")

Result = dict[str, Any]
Options = dict[str, Any]


@dataclass(frozen=True)
class Analysis:
    """One analysis: ``compute(run_dir, options, device=…)`` → result, its ``defaults`` (every
    option), ``plot(result, ax)``, a one-line ``summary``, and ``fill(options)``, which checks
    the values that depend on each other and fills the defaults that do (``None`` → a value)."""

    compute: Callable[..., Result]
    defaults: Mapping[str, Any]
    plot: Callable[[Result, Axes], None]
    summary: str
    fill: Callable[[Options], Options] = field(default=lambda options: options)
    needs_run: bool = True  # False: a toy that reads no checkpoint (run= is where it records)


# -- option values ----------------------------------------------------------------------------

#: The kind of value of each option name (the same name means the same kind in every analysis).
_KINDS = MappingProxyType({
    "layer": "name", "channel": "index", "seed": "index", "num_batches": "count",
    "batch_size": "count or null", "num_samples": "count", "num_images": "count",
    "trials": "count", "batch_sizes": "counts", "reference_batch": "count or null",
    "steps": "count", "window": "count", "lr": "non-negative number or null",
    "min_run_time": "positive number", "scale": "positive number", "init": "positive number",
})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_value(key: str, value: Any) -> None:
    """``value`` is of the kind that option ``key`` takes, else one :class:`BnbenchError`."""
    kind = _KINDS[key]
    if value is None and (kind == "name" or kind.endswith(" or null")):
        return
    if "number" in kind:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and (value > 0 if kind.startswith("positive") else
                                            value >= 0))
        what = "a " + kind
    elif kind == "name":
        ok, what = isinstance(value, str) and value != "", "a module name or null"
    elif kind == "index":
        ok, what = _is_int(value) and value >= 0, "a non-negative integer"
    elif kind == "counts":
        ok = (isinstance(value, list) and bool(value)
              and all(_is_int(v) and v > 0 for v in value))
        what = "a list of positive integers, e.g. [2,10,100]"
    else:
        ok = _is_int(value) and value > 0
        what = "a positive integer" + (" or null" if kind == "count or null" else "")
    if not ok:
        raise BnbenchError(f"{key}={_spelled(value)}: must be {what}")


def _spelled(value: Any) -> str:
    """A value as the command line spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_spelled(v) for v in value) + "]"
    return str(value)


def _parse(text: str) -> Any:
    """An option value as YAML reads it (``null``, ``true``, ``12``, ``[2,10]``, a name)."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _capped_sizes(sizes: Sequence[int], limit: int) -> list[int]:
    """``sizes`` with every value above ``limit`` replaced by it, sorted, without repeats."""
    return sorted({min(b, limit) for b in sizes})


def _check_sizes(key: str, sizes: Sequence[int], low: int, num_samples: int) -> None:
    """Batch sizes in ``[low, num_samples]``, increasing (the rows and curves go by ``B``)."""
    if list(sizes) != sorted(set(sizes)):
        raise BnbenchError(f"{key}={_spelled(list(sizes))}: list them in increasing order, "
                           "without repeats")
    for b in sizes:
        if not low <= b <= num_samples:
            raise BnbenchError(f"{key}: B={b} must be in [{low}, num_samples={num_samples}]")


# -- the run: model, layer, images ------------------------------------------------------------


def load_checkpoint(run_dir: Path, checkpoint: Path, device: str) -> LoadedRun:
    """The run's model rebuilt from its config with ``checkpoint``'s weights, and its data."""
    from bnbench.eval_app import checkpoint_config, load_run

    cfg, _ = checkpoint_config(run_dir, checkpoint, device)
    return load_run(cfg, checkpoint)


def _last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.pt"


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer of :func:`bnbench.population.population_layers` (BN
    layers with population statistics), in registration order; none is an error."""
    from bnbench.population import population_layers

    ids = {id(m) for m in population_layers(model)}
    named = [(n, m) for n, m in model.named_modules() if id(m) in ids]
    if not named:
        raise BnbenchError(f"{type(model).__name__} has no BatchNorm layer with population "
                           "statistics (GroupNorm/LayerNorm models have none to analyze)")
    return named


def bn_layer(model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    """The BN layer (with population statistics) named ``name``; ``None``: :data:`DEFAULT_LAYER`
    if the model has it, else the middle one of its BN layers (in registration order)."""
    named = bn_layers(model)
    layers = dict(named)
    if name is None:
        name = DEFAULT_LAYER if DEFAULT_LAYER in layers else named[len(named) // 2][0]
    if name not in layers:
        shown = ", ".join(n for n, _ in named[:6]) + (", …" if len(named) > 6 else "")
        raise BnbenchError(f"layer={name}: not a BatchNorm layer of the model; its "
                           f"{len(named)} BN layers are: {shown}")
    return name, layers[name]


def training_images(reader: Reader, count: int, batch: int, *, augment: bool,
                    seed: int) -> list[Tensor]:
    """The first ``count`` images of a random order of the training set (a loader seeded
    ``seed``, its epoch 0; augmented as in training with ``augment``), in batches of at most
    ``batch``, in the model's input precision."""
    size = reader.data.train_size
    if count > size:
        raise BnbenchError(f"{count} images requested, but the training set has {size}")
    loader = reader.loader("train", min(batch, count), augment=augment, shuffle=True,
                           drop_last=False, seed=seed)
    loader.set_epoch(0)
    out, taken = [], 0
    for x, _ in reader.cast(loader):
        out.append(x[: count - taken])
        taken += out[-1].shape[0]
        if taken >= count:
            break
    return out


def random_batches(reader: Reader, batch_size: int, num_batches: int,
                   seed: int) -> Callable[[], Iterator[Tensor]]:
    """A factory of ``num_batches`` random augmented training batches of ``batch_size`` images
    (a loader seeded ``seed``, epoch after epoch when one epoch has fewer), the same batches at
    every call: Fig. 2's "random mini-batches", the same for every checkpoint."""
    loader = reader.loader("train", batch_size, augment=True, shuffle=True, drop_last=True,
                           seed=seed)
    if len(loader) == 0:
        raise BnbenchError(f"batch_size={batch_size}: more than the training set has")

    def batches() -> Iterator[Tensor]:
        done, epoch = 0, 0
        while True:
            loader.set_epoch(epoch)
            for x, _ in reader.cast(loader):
                yield x
                done += 1
                if done == num_batches:
                    return
            epoch += 1

    return batches


class _Seen(Exception):
    """Raised once the layer of interest has reported: the rest of the forward is not needed."""


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` on exit (running statistics, ``num_batches_tracked``,
    CBN's window): a forward in training mode must leave the checkpoint's model as it was."""
    saved = [(module, name, buffer.clone()) for module in model.modules()
             for name, buffer in module.named_buffers(recurse=False) if buffer is not None]
    try:
        yield
    finally:
        for module, name, buffer in saved:
            now = getattr(module, name)
            if now is not None and now.shape == buffer.shape:
                now.copy_(buffer)  # in place: whoever holds the buffer sees it restored
            else:  # a buffer the forward reallocated (CBN's Jacobians)
                setattr(module, name, buffer)


def batch_means(model: nn.Module, layer: nn.Module, batches: Callable[[], Iterator[Tensor]],
                channel: int) -> list[float]:
    """The mean of channel ``channel`` of ``layer``'s input over each batch,
    ``μ_B = mean_{n∈B, h, w} x[n, channel, h, w]``, with the model in training mode (every BN
    normalizes with its own batch's statistics, as in a training step: Fig. 2's "forward the
    saved checkpoints under training mode"). No gradient, and every buffer restored. (A
    domain-specific layer: its first domain's statistics.)"""
    import torch

    from bnbench.population import observing

    means: list[float] = []

    def observer(seen: nn.Module, slot: int, mean: Tensor, var: Tensor, count: int) -> None:
        means.append(float(mean[channel]))
        raise _Seen

    was_training = model.training
    model.train()
    try:
        with torch.no_grad(), preserved_buffers(model), observing([layer], observer):
            for i, x in enumerate(batches()):
                with suppress(_Seen):
                    model(x)
                if len(means) != i + 1:
                    raise BnbenchError(f"{type(layer).__name__}({layer.num_features}) reported "
                                       "no batch statistics (a FrozenBN layer has none)")
    finally:
        model.train(was_training)
    return means


# -- channel_trace (Rethinking §3.1, Fig. 2) ------------------------------------------------


def epoch_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(E, checkpoints/epoch{E}.pt)`` of every kept checkpoint, by epoch."""
    found = []
    for path in (Path(run_dir) / "checkpoints").glob("epoch*.pt"):
        match = re.fullmatch(r"epoch(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise BnbenchError(f"run={run_dir}: no checkpoints/epoch*.pt; channel_trace needs the "
                           "checkpoint of every epoch: train with trainer.keep_checkpoints=true")
    return sorted(found)


def _offset(ema: float, population: float, std: float) -> float | None:
    """``|μ_EMA − μ_pop| / std(μ_B)``: how far the EMA lies from the population mean, in units
    of the spread of the batch means (``None`` when they do not spread)."""
    return abs(ema - population) / std if std > 0 else None


def _mean_of(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def compute_channel_trace(run_dir: Path, options: Options, *, device: str = "auto") -> Result:
    """Fig. 2 (§3.1) for one channel ``c`` of one BN layer, at every kept checkpoint ``E``:

    * the EMA mean ``μ_EMA`` (the checkpoint's ``running_mean[c]``);
    * the batch means ``μ_B`` of ``num_batches`` random augmented training batches of
      ``batch_size`` images (``null``: the run's training normalization batch), forwarded
      through the checkpoint's model in training mode (:func:`batch_means`);
    * the population mean ``μ_pop = mean(μ_B)`` (the paper's approximation) and ``std(μ_B)``
      (sample standard deviation), and ``|μ_EMA − μ_pop| / std(μ_B)``.

    Scalars: that offset at the first and last checkpoint (``ema_offset_first``,
    ``ema_offset_last``) and averaged over the first and the second half of them.
    """
    from bnbench.eval_app import load_weights

    checkpoints = epoch_checkpoints(run_dir)
    run = load_checkpoint(run_dir, checkpoints[-1][1], device)
    model = run.parts.model
    name, layer = bn_layer(model, options["layer"])
    channel = options["channel"]
    if channel >= layer.num_features:
        raise BnbenchError(f"channel={channel}: layer {name} has {layer.num_features} channels")
    # (a model with BN layers has a normalization batch: only GN/LN/IN runs have none)
    batch_size = options["batch_size"] or run.parts.plan.normalization
    batches = random_batches(run.reader, batch_size, options["num_batches"], options["seed"])
    epochs, ema, population, spread, means = [], [], [], [], []
    for epoch, path in checkpoints:
        load_weights(run.parts, run.cfg, path, run.device)
        per_batch = batch_means(model, layer, batches, channel)
        epochs.append(epoch)
        ema.append(float(layer.running_mean.flatten()[channel]))
        population.append(statistics.fmean(per_batch))
        spread.append(statistics.stdev(per_batch))
        means.append(per_batch)
    offsets = [_offset(e, p, s) for e, p, s in zip(ema, population, spread)]
    half = max(1, len(epochs) // 2)
    table = {f"epoch {e}": {"EMA mean": m, "population mean": p, "batch-mean std": s,
                            "|EMA−pop|/std": o}
             for e, m, p, s, o in zip(epochs, ema, population, spread, offsets)}
    scalars = {"ema_offset_first": offsets[0], "ema_offset_last": offsets[-1],
               "ema_offset_mean_first_half": _mean_of(offsets[:half]),
               "ema_offset_mean_second_half": _mean_of(offsets[len(epochs) // 2:])}
    return {"table": table, "scalars": scalars, "layer": name, "channel": channel,
            "batch_size": batch_size, "epochs": epochs, "ema_mean": ema,
            "population_mean": population, "batch_mean_std": spread, "batch_means": means}


def _check_channel_trace(options: Options) -> Options:
    if options["num_batches"] < 2:
        raise BnbenchError(f"num_batches={options['num_batches']}: the spread of the batch means "
                           "needs at least 2")
    return options


def plot_channel_trace(result: Result, ax: Axes) -> None:
    """Fig. 2: per epoch the batch means (blue dots), the population mean (blue line) and the
    EMA mean (red line)."""
    for i, (epoch, means) in enumerate(zip(result["epochs"], result["batch_means"])):
        jitter = [0.3 * (j / max(len(means) - 1, 1) - 0.5) for j in range(len(means))]
        ax.scatter([epoch + d for d in jitter], means, s=4, alpha=0.3, color="tab:blue",
                   label="batch means" if i == 0 else None)
    ax.plot(result["epochs"], result["population_mean"], color="tab:blue", marker=".",
            label="population mean")
    ax.plot(result["epochs"], result["ema_mean"], color="tab:red", marker=".", label="EMA mean")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"mean of channel {result['channel']} of {result['layer']}")
    ax.legend(fontsize=7)


# -- estimator_error (appendix A.2) -----------------------------------------------------------

#: The estimators compared: key → label (``eq3raw``: Eq. 3 without ``B/(B−1)``).
VARIANCE_ESTIMATORS = MappingProxyType({"eq2": "Eq. 2", "eq3": "Eq. 3",
                                        "eq3raw": "Eq. 3 w/o B/(B−1)"})


def variance_estimators(samples: Tensor) -> dict[str, Tensor]:
    """Eq. 2 and Eq. 3 of appendix A.2 from ``samples`` ``(…, k, B)``: ``k`` batches of ``B``
    values each, ``N = k·B``; per batch ``μ_i = Σ_j x_ij / B``, ``σ²_i = Σ_j (x_ij − μ_i)² / B``:

    * ``eq2 = N/(N−1) · [Σ_i (μ_i² + σ²_i)/k − (Σ_i μ_i/k)²]`` — the unbiased variance of all
      ``N`` values, whatever the split (PreciseBN's ``estimator=population``);
    * ``eq3 = B/(B−1) · Σ_i σ²_i / k`` — the mean of the unbiased batch variances (the estimator
      of the original BN paper, PreciseBN's ``estimator=batch_mean``);
    * ``eq3raw = Σ_i σ²_i / k`` — the mean of the biased batch variances.
    """
    k, b = samples.shape[-2], samples.shape[-1]
    n = k * b
    mean = samples.mean(-1)
    var = samples.var(-1, correction=0)
    eq2 = n / (n - 1) * ((mean * mean + var).mean(-1) - mean.mean(-1) ** 2)
    raw = var.mean(-1)
    return {"eq2": eq2, "eq3": b / (b - 1) * raw, "eq3raw": raw}


def closed_form(batch_size: int, num_samples: int,
                kurtosis: float) -> dict[str, tuple[float, float]]:
    """``(bias, variance)`` of each estimator relative to the true variance, ``E[σ̂²]/σ² − 1``
    and ``Var[σ̂²]/σ⁴``, for ``N = num_samples`` i.i.d. values of ``X`` with kurtosis
    ``κ = E[(X − μ)⁴]/σ⁴`` (3 for a Gaussian) in ``k = N/B`` batches of ``B`` (appendix A.2).

    The unbiased sample variance ``s²`` of ``n`` i.i.d. values has ``E[s²] = σ²`` and
    ``Var[s²] = σ⁴/n · (κ − 1 + 2/(n − 1))`` (the "variance of the sample variance"). Hence:

    * Eq. 2 is ``s²`` of all ``N`` values: bias 0, variance ``(κ − 1 + 2/(N − 1))/N``, for
      every ``B``;
    * Eq. 3 averages ``k`` independent ``s²`` of ``B`` values: bias 0, variance
      ``(κ − 1 + 2/(B − 1))/(k·B) = (κ − 1 + 2/(B − 1))/N`` — A.2's formula;
    * Eq. 3 without ``B/(B−1)`` is ``(B−1)/B`` times Eq. 3: bias ``−1/B`` (``E = σ² − σ²/B``,
      since ``Var[μ_i] = σ²/B``), variance ``((B − 1)/B)² (κ − 1 + 2/(B − 1))/N``.

    A small ``B`` thus costs Eq. 3 variance (``2/(B − 1)`` against ``2/(N − 1)``); in a Gaussian
    ``κ − 1 = 2``, so at ``B = 2`` Eq. 3's variance is twice Eq. 2's.
    """
    b, n, excess = batch_size, num_samples, kurtosis - 1
    eq3_var = (excess + 2 / (b - 1)) / n
    shrink = (b - 1) / b
    return {"eq2": (0.0, (excess + 2 / (n - 1)) / n), "eq3": (0.0, eq3_var),
            "eq3raw": (shrink - 1, shrink * shrink * eq3_var)}


@contextmanager
def _eval_with_population(model: nn.Module) -> Iterator[None]:
    """The model as at inference with its population statistics (the checkpoint's EMA)."""
    from bnbench.norm import eval_stats_mode

    was_training = model.training
    model.eval()
    try:
        with eval_stats_mode(model, "population"):
            yield
    finally:
        model.train(was_training)


def activation_pool(model: nn.Module, layer: nn.Module, images: Sequence[Tensor]) -> Tensor:
    """Every value of each channel of ``layer``'s input over ``images``: ``(C, M)`` float64 on
    the CPU, ``M`` = images × H × W, the model at inference with its population statistics (the
    forward stops at the layer)."""
    import torch

    parts: list[Tensor] = []

    def capture(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach()
        parts.append(x.transpose(0, 1).reshape(x.shape[1], -1).double().cpu())
        raise _Seen

    handle = layer.register_forward_pre_hook(capture)
    try:
        with torch.no_grad(), _eval_with_population(model):
            for x in images:
                with suppress(_Seen):
                    model(x)
    finally:
        handle.remove()
    return torch.cat(parts, dim=1)


def simulate(pool: Tensor, num_samples: int, batch_size: int, trials: int,
             generator: torch.Generator) -> dict[str, Tensor]:
    """Each estimator per trial and channel, ``(trials, C)``: a trial draws ``N = k·B`` values
    per channel i.i.d. from the pool (uniform with replacement, the same positions in every
    channel), ``k = num_samples // B``, and applies :func:`variance_estimators` to its ``k``
    batches of ``B``. Drawing with replacement makes the values i.i.d. samples of the pool's
    distribution: A.2's setting, with the pool's variance and kurtosis as the true ones."""
    import torch

    channels, size = pool.shape
    k = num_samples // batch_size
    out: dict[str, list[Tensor]] = {key: [] for key in VARIANCE_ESTIMATORS}
    for _ in range(trials):
        index = torch.randint(size, (k * batch_size,), generator=generator)
        estimates = variance_estimators(pool[:, index].view(channels, k, batch_size))
        for key, value in estimates.items():
            out[key].append(value)
    return {key: torch.stack(values) for key, values in out.items()}


def pool_moments(pool: Tensor) -> tuple[Tensor, Tensor]:
    """The true variance ``σ²`` and kurtosis ``κ = E[(X − μ)⁴]/σ⁴`` of each channel's pool
    (its empirical distribution: the biased moments)."""
    centred = pool - pool.mean(1, keepdim=True)
    var = centred.square().mean(1)
    return var, centred.pow(4).mean(1) / (var * var)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def compute_estimator_error(run_dir: Path, options: Options, *, device: str = "auto") -> Result:
    """Appendix A.2: bias and variance of the Eq. 2 / Eq. 3 estimators of the population
    variance against ``B``, closed form (:func:`closed_form`) and simulated
    (:func:`simulate`) on real activations.

    The pool: every value of each channel of one BN layer's input on ``num_images`` training
    images (the run's PreciseBN augmentation; the last checkpoint's model at inference with its
    EMA statistics); its variance is the true one. For each ``B`` of ``batch_sizes``, ``trials``
    draws of ``N = num_samples`` values (``k = N // B`` batches). Per channel, the simulated
    relative bias is ``mean_t(σ̂²)/σ² − 1`` and relative variance ``var_t(σ̂²)/σ⁴``; the closed
    form takes the channel's kurtosis; both are averaged over the channels (those with ``σ² >
    0``). Scalars: ``{eq2,eq3,eq3raw}_{bias,var}_B{B}_{closed,sim}``,
    ``max_rel_gap_closed_vs_sim`` (the largest ``|var_sim/var_closed − 1|``) and
    ``max_bias_gap_closed_vs_sim`` (the largest ``|bias_sim − bias_closed|``).
    """
    import torch

    run = load_checkpoint(run_dir, _last_checkpoint(run_dir), device)
    name, layer = bn_layer(run.parts.model, options["layer"])
    images = training_images(run.reader, options["num_images"], run.cfg.eval.batch_size,
                             augment=run.cfg.precise.augment, seed=options["seed"])
    pool = activation_pool(run.parts.model, layer, images)
    var, kurtosis = pool_moments(pool)
    live = var > 1e-12 * var.max()  # (a constant channel has no variance to estimate)
    if not bool(live.any()):
        raise BnbenchError(f"layer={name}: every channel of its input is constant on these "
                           "images; choose another layer")
    pool, var, kurtosis = pool[live], var[live], kurtosis[live]
    n = options["num_samples"]
    rows, scalars = {}, {}
    curves = {key: {f"{q}_{s}": [] for q in ("bias", "var") for s in ("closed", "sim")}
              for key in VARIANCE_ESTIMATORS}
    var_gaps, bias_gaps = [], []
    for b in options["batch_sizes"]:
        used = n // b * b
        generator = torch.Generator().manual_seed(options["seed"] * 1000003 + b)
        estimates = simulate(pool, n, b, options["trials"], generator)
        closed = [closed_form(b, used, float(k)) for k in kurtosis]
        row = {}
        for key, label in VARIANCE_ESTIMATORS.items():
            sim_bias = float((estimates[key].mean(0) / var - 1).mean())
            sim_var = float((estimates[key].var(0) / (var * var)).mean())
            closed_bias = statistics.fmean(c[key][0] for c in closed)
            closed_var = statistics.fmean(c[key][1] for c in closed)
            var_gaps.append(abs(sim_var / closed_var - 1))
            bias_gaps.append(abs(sim_bias - closed_bias))
            for curve, value in (("bias_closed", closed_bias), ("bias_sim", sim_bias),
                                 ("var_closed", closed_var), ("var_sim", sim_var)):
                quantity, source = curve.split("_")
                curves[key][curve].append(_finite(value))
                scalars[f"{key}_{quantity}_B{b}_{source}"] = _finite(value)
            if key != "eq3raw":  # the table: the paper's two estimators
                row.update({f"{label} bias (closed)": closed_bias, f"{label} bias (sim)": sim_bias,
                            f"{label} var (closed)": closed_var, f"{label} var (sim)": sim_var})
        rows[f"B={b}"] = {k: _finite(v) for k, v in row.items()}
    scalars["max_rel_gap_closed_vs_sim"] = _finite(max(var_gaps))
    scalars["max_bias_gap_closed_vs_sim"] = _finite(max(bias_gaps))
    return {"table": rows, "scalars": scalars, "layer": name, "batch_sizes":
            list(options["batch_sizes"]), "num_samples": n, "channels": int(live.sum()),
            "pool_size": int(pool.shape[1]), "mean_kurtosis": float(kurtosis.mean()),
            "curves": curves, "units": "bias: E[est]/var - 1; var: Var[est]/var^2"}


def _check_estimator_error(options: Options) -> Options:
    n = options["num_samples"]
    if n < 2:
        raise BnbenchError(f"num_samples={n}: the estimators need at least 2 values")
    if options["batch_sizes"] is None:
        options = {**options, "batch_sizes": _capped_sizes([2, 4, 10, 100, 1000], n)}
    _check_sizes("batch_sizes", options["batch_sizes"], 2, n)  # Eq. 3's B/(B−1): B ≥ 2
    if options["trials"] < 2:
        raise BnbenchError(f"trials={options['trials']}: a variance needs at least 2 trials")
    return options


def plot_estimator_error(result: Result, ax: Axes) -> None:
    """Relative variance (left axis, log) and bias (right axis) against ``B`` (log): closed form
    dashed, simulation solid."""
    sizes, colors = result["batch_sizes"], {"eq2": "tab:blue", "eq3": "tab:orange",
                                            "eq3raw": "tab:green"}
    bias_ax = ax.twinx()
    for key, label in VARIANCE_ESTIMATORS.items():
        curve = result["curves"][key]
        ax.plot(sizes, curve["var_closed"], "--", color=colors[key])
        ax.plot(sizes, curve["var_sim"], "-", marker=".", color=colors[key], label=f"{label} var")
        bias_ax.plot(sizes, curve["bias_closed"], "--", color=colors[key], alpha=0.5)
        bias_ax.plot(sizes, curve["bias_sim"], ":", marker="x", color=colors[key], alpha=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("Var[σ̂²]/σ⁴ (solid: simulated, dashed: closed form)")
    bias_ax.set_ylabel("bias E[σ̂²]/σ² − 1 (x)")
    ax.legend(fontsize=7)


# -- layerwise_error (appendix A.3, Table 2) ------------------------------------------------


def population_statistics(model: nn.Module, batches: Callable[[], Sequence[Tensor]], *,
                          layerwise: bool) -> list[tuple[Tensor, Tensor]]:
    """PreciseBN's ``(mean, var)`` (Eq. 2, float64 on the CPU) of every layer of
    :func:`bnbench.population.population_layers`, one forward per batch or layer by layer
    (A.3); the model's own statistics are restored."""
    from bnbench.population import (
        population_layers,
        preserved_population,
        update_population_stats,
    )

    layers = population_layers(model)
    with preserved_population(model):
        update_population_stats(model, batches, estimator="population", layerwise=layerwise)
        return [(m.running_mean.double().cpu().clone(), m.running_var.double().cpu().clone())
                for m in layers]


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``‖value − reference‖ / ‖reference‖`` (Euclidean, over the channels)."""
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def layer_errors(stats: Sequence[tuple[Tensor, Tensor]],
                 reference: Sequence[tuple[Tensor, Tensor]]) -> dict[str, list[float]]:
    """Per layer, the relative error of the means and of the variances."""
    return {"mean": [relative_error(m, rm) for (m, _), (rm, _) in zip(stats, reference)],
            "var": [relative_error(v, rv) for (_, v), (_, rv) in zip(stats, reference)]}


def compute_layerwise_error(run_dir: Path, options: Options, *, device: str = "auto") -> Result:
    """Appendix A.3 / Table 2: the error of population statistics estimated at batch ``B``.

    The population: ``num_samples`` = N training images (the run's PreciseBN augmentation),
    fixed for every ``B``. The reference: the exact population statistics, layer by layer at
    ``reference_batch`` (``null``: ``B = N``, the whole population as one batch) — by A.3 the
    layer-by-layer statistics are exact at any batch. For each ``B`` of ``batch_sizes`` (the
    last batch takes a remainder): PreciseBN's statistics (Eq. 2, ``N/B`` forwards of the whole
    model, each normalizing with its batch) and the layer-by-layer ones at ``B``. Per layer,
    ``‖μ − μ_ref‖/‖μ_ref‖`` and ``‖σ² − σ²_ref‖/‖σ²_ref‖``; the table and the scalars
    ``{precise,layerwise}_{mean,var}_err_B{B}`` average them over the layers, the scalars
    ``…_err_max_B{B}`` take the largest. The layer-by-layer error is ~0 at every ``B`` (float
    rounding); PreciseBN's first layer is exact at every ``B``, and at ``B = N`` its other
    layers differ only by the ``n/(n−1)`` of the variances the earlier layers normalize with.
    """
    import torch

    run = load_checkpoint(run_dir, _last_checkpoint(run_dir), device)
    model, n = run.parts.model, options["num_samples"]
    names = [name for name, _ in bn_layers(model)]
    images = torch.cat(training_images(run.reader, n, run.cfg.eval.batch_size,
                                       augment=run.cfg.precise.augment, seed=options["seed"]))

    def split(b: int) -> Callable[[], Sequence[Tensor]]:
        return lambda: images.split(b)

    reference_batch = options["reference_batch"] or n
    reference = population_statistics(model, split(reference_batch), layerwise=True)
    rows, scalars, per_layer = {}, {}, {}
    for b in options["batch_sizes"]:
        precise = population_statistics(model, split(b), layerwise=False)
        exact = reference if b == reference_batch else population_statistics(
            model, split(b), layerwise=True)
        errors = {"precise": layer_errors(precise, reference),
                  "layerwise": layer_errors(exact, reference)}
        per_layer[str(b)] = errors
        row = {}
        for method, label in (("precise", "PreciseBN"), ("layerwise", "layerwise")):
            for stat in ("mean", "var"):
                values = errors[method][stat]
                row[f"{label} {stat} err"] = _finite(statistics.fmean(values))
                scalars[f"{method}_{stat}_err_B{b}"] = row[f"{label} {stat} err"]
                scalars[f"{method}_{stat}_err_max_B{b}"] = _finite(max(values))
        rows[f"B={b}"] = row
    return {"table": rows, "scalars": scalars, "batch_sizes": list(options["batch_sizes"]),
            "num_samples": n, "reference_batch": reference_batch, "layers": names,
            "per_layer": per_layer}


def _check_layerwise_error(options: Options) -> Options:
    n = options["num_samples"]
    if n < 2:
        raise BnbenchError(f"num_samples={n}: population statistics need at least 2 images")
    if options["batch_sizes"] is None:
        options = {**options, "batch_sizes": _capped_sizes([2, 10, 100, n], n)}
    _check_sizes("batch_sizes", options["batch_sizes"], 1, n)
    ref = options["reference_batch"]
    if ref is not None and ref > n:
        raise BnbenchError(f"reference_batch={ref}: at most num_samples={n}")
    return options


def plot_layerwise_error(result: Result, ax: Axes) -> None:
    """Relative error of the means and variances against ``B`` (log-log): PreciseBN solid,
    layer by layer dashed."""
    sizes = result["batch_sizes"]
    for method, label, style in (("precise", "PreciseBN", "-"), ("layerwise", "layerwise", "--")):
        for stat, color in (("mean", "tab:blue"), ("var", "tab:orange")):
            ax.plot(sizes, [result["scalars"][f"{method}_{stat}_err_B{b}"] for b in sizes],
                    style, marker=".", color=color, label=f"{label} {stat}")
    ax.set_xscale("log")
    ax.set_yscale("log", nonpositive="clip")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("relative error vs exact population statistics")
    ax.legend(fontsize=7)


# -- taylor_error (CBN §3) ----------------------------------------------------------------------


def labelled_batches(reader: Reader, batch_size: int, count: int,
                     seed: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``count`` random augmented training batches ``(images, labels)`` of
    ``batch_size`` (a loader seeded ``seed``, epoch after epoch when one epoch has fewer), in the
    model's input precision: SGD batches for steps taken by an analysis."""
    loader = reader.loader("train", batch_size, augment=True, shuffle=True, drop_last=True,
                           seed=seed)
    if len(loader) == 0:
        raise BnbenchError(f"batch_size={batch_size}: more than the training set has "
                           f"({reader.data.train_size})")
    out: list[tuple[Tensor, Tensor]] = []
    epoch = 0
    while len(out) < count:
        loader.set_epoch(epoch)
        for x, y in reader.cast(loader):
            out.append((x, y))
            if len(out) == count:
                break
        epoch += 1
    return out


def taylor_layers(model: nn.Module,
                  name: str | None) -> list[tuple[str, nn.Module, nn.Conv2d]]:
    """``(name, layer, conv)`` of every BN-family layer (:func:`bn_layers`) that directly follows
    a conv — a CBN layer's paired conv, else the conv that CBN would pair it with
    (:func:`bnbench.norm.cbn.preceding_conv`) — or of the one named ``name``."""
    from bnbench.norm.cbn import preceding_conv

    found = []
    for layer_name, layer in bn_layers(model):
        conv = getattr(layer, "paired_conv", None)
        if conv is None:
            conv = preceding_conv(model, layer_name)
        if conv is not None:
            found.append((layer_name, layer, conv))
    if name is None:
        if not found:
            raise BnbenchError(f"{type(model).__name__}: no BatchNorm layer directly follows a "
                               "Conv2d (the Taylor expansion is over that conv's weights)")
        return found
    chosen = [site for site in found if site[0] == name]
    if not chosen:
        shown = ", ".join(n for n, _, _ in found[:6]) + (", …" if len(found) > 6 else "")
        raise BnbenchError(f"layer={name}: not a BatchNorm layer that follows a Conv2d; the "
                           f"{len(found)} such layers are: {shown}")
    return chosen


@dataclass(frozen=True)
class History:
    """One layer's recorded iterations in the buffers of a CBN layer's window, as
    :func:`bnbench.norm.cbn.record` writes and :func:`bnbench.norm.cbn.compensate` reads them
    (shapes in :class:`bnbench.norm.cbn.CrossIterationBatchNorm2d`'s docstring, ``L`` slots,
    ``P = C_in/groups·kh·kw``): ``mean``, ``var`` ``(L, C)``; ``state`` ``[count, next slot]``;
    ``dmean`` ``(L, groups, P)`` = ∂μ/∂W; ``dmean_ref`` ``(L, C)`` = ``⟨∂μ/∂W, W⟩ + b`` and
    ``dvar_ref`` ``(L, C)`` = ``⟨∂σ²/∂W, W⟩`` at the recorded weights; ``dvar`` ``(C, L, P)``
    = ∂σ²_j/∂W_j. With ``L`` = the steps, the ring never wraps: slot ``s`` is step ``s``."""

    mean: Tensor
    var: Tensor
    state: Tensor
    dmean: Tensor
    dmean_ref: Tensor
    dvar: Tensor
    dvar_ref: Tensor

    @classmethod
    def empty(cls, conv: nn.Conv2d, length: int, dtype: torch.dtype) -> History:
        import torch

        c, p, device = conv.out_channels, conv.weight[0].numel(), conv.weight.device

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(length, c), zeros(length, c),
                   torch.zeros(2, dtype=torch.long, device=device), zeros(length, conv.groups, p),
                   zeros(length, c), zeros(c, length, p), zeros(length, c))

    def jacobians(self, conv: nn.Conv2d) -> tuple[Tensor, ...]:
        """:func:`bnbench.norm.cbn.compensate`'s ``jacobians`` at ``conv``'s current weights."""
        w, b = conv_weights(conv, self.mean.dtype)
        return (w, b, self.dmean, self.dmean_ref, self.dvar, self.dvar_ref)


def conv_weights(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The conv's ``(W (C, P), b (C,))`` in ``dtype`` (``b = 0`` without a bias), detached."""
    w, b = conv.weight.detach(), conv.bias
    b = w.new_zeros(conv.out_channels) if b is None else b.detach()
    return w.to(dtype).reshape(conv.out_channels, -1), b.to(dtype)


if TYPE_CHECKING:
    #: ``(conv_input, y, dtype) → (∂μ/∂W, ∂σ²/∂W)``.
    JacobiansFn = Callable[[Tensor, Tensor, torch.dtype], tuple[Tensor, Tensor]]


def jacobians_of(layer: nn.Module, conv: nn.Conv2d) -> JacobiansFn:
    """``(conv_input, y, dtype) → (∂μ/∂W, ∂σ²/∂W)`` by the CBN code: a CBN layer's own
    :meth:`~bnbench.norm.cbn.CrossIterationBatchNorm2d.jacobians` (its ``jacobian_dtype``), for
    any other layer :func:`bnbench.norm.cbn.conv_jacobians` (exact)."""
    from functools import partial

    from bnbench.norm.cbn import CrossIterationBatchNorm2d, conv_jacobians

    if isinstance(layer, CrossIterationBatchNorm2d) and layer.paired_conv is conv:
        return layer.jacobians
    return partial(conv_jacobians, conv)


def record_iteration(history: History, conv: nn.Conv2d, jacobians: JacobiansFn,
                     conv_input: Tensor, y: Tensor) -> None:
    """Store one iteration as a CBN layer does (:func:`bnbench.norm.cbn.record`): the batch's
    ``μ``, ``σ²`` (biased) of the conv output ``y``, ``∂μ/∂W``, ``∂σ²/∂W`` and, at the conv's
    current weights ``W_{t−τ}``, the references ``e_μ``, ``e_σ``."""
    from bnbench.norm.base import batch_moments
    from bnbench.norm.cbn import record

    dtype = history.mean.dtype
    mean, var = (t.to(dtype) for t in batch_moments(y.detach()))
    dmean, dvar = jacobians(conv_input, y, dtype)
    # record() centres the entry's D by μ − c; with c = μ it is stored as given (∂σ²/∂W).
    record(mean, var, history.mean, history.var, history.state, (dmean, dvar, mean),
           history.jacobians(conv))


def conv_outputs(model: nn.Module, convs: Sequence[nn.Conv2d], x: Tensor,
                 visit: Callable[[int, Tensor, Tensor], None]) -> None:
    """Forward ``x`` with every BN-family layer normalizing with ``x``'s own statistics
    (PreciseBN's observed forward: no buffer changes, CBN's window unused), calling
    ``visit(i, conv input, conv output)`` for ``convs[i]``. The statistics of a batch are thus a
    function of the weights alone, ``μ_B(θ)``: what the Taylor expansion approximates."""
    import torch

    from bnbench.population import observing, population_layers

    calls = [0] * len(convs)

    def hook(i: int) -> Callable[..., None]:
        def seen(conv: nn.Module, args: tuple, out: Tensor) -> None:
            calls[i] += 1
            visit(i, args[0], out)
        return seen

    handles = [conv.register_forward_hook(hook(i)) for i, conv in enumerate(convs)]
    was_training = model.training
    model.eval()  # (other layers as at inference; observed BN layers use the batch regardless)
    try:
        with torch.no_grad(), observing(population_layers(model), lambda *report: None):
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    odd = [n for n in calls if n != 1]
    if odd:
        raise BnbenchError(f"a conv before a BN layer ran {odd[0]} times in one forward; the "
                           "statistics of its layer are those of its one call")


def run_optimizer(model: nn.Module, cfg: DictConfig, state: Mapping[str, Any] | None,
                  lr: float) -> torch.optim.Optimizer:
    """The run's SGD (``optim.*``: momentum, Nesterov, weight decay and its groups) at a constant
    learning rate ``lr``, continuing from the checkpoint's optimizer ``state`` (its momentum
    buffers) when there is one."""
    import torch

    from bnbench.train import param_groups

    o = cfg.optim
    optimizer = torch.optim.SGD(param_groups(model, o.weight_decay, o.no_wd_norm_bias), lr=lr,
                                momentum=o.momentum, nesterov=o.nesterov)
    if state:
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError) as err:
            raise BnbenchError(f"the checkpoint's optimizer state does not fit the model: "
                               f"{err}") from err
    for group in optimizer.param_groups:
        group["lr"] = lr  # (load_state_dict brought back the schedule's last rate)
    return optimizer


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
             cfg: DictConfig) -> None:
    """One training step as :class:`bnbench.train.Trainer` takes it: the model in training mode
    (its own normalization: a CBN run's window), bf16 autocast if the run used it, the trainer's
    loss (:func:`bnbench.train.training_loss`) with the run's label smoothing, backward, SGD."""
    import torch

    from bnbench.train import training_loss

    model.train()
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bool(cfg.trainer.bf16)):
        output = model(x)
    loss, _ = training_loss(model, output, y, cfg.optim.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def peak_lr(cfg: DictConfig, plan: BatchPlan, processes: int) -> float:
    """The run's schedule at its peak: ``optim.lr · B/256`` with ``B`` its global SGD batch
    (``per_process × processes``); :func:`bnbench.train.lr_at` after the warmup."""
    return float(cfg.optim.lr) * plan.per_process * processes / 256


def compute_taylor_error(run_dir: Path, options: Options, *, device: str = "auto") -> Result:
    """CBN §3: how well the first-order Taylor expansion brings the statistics of an earlier
    iteration to the current weights, against the uncompensated ("naive") statistics.

    From the last checkpoint (a copy of the model; nothing is written to the run), ``steps``
    further SGD steps ``t−S … t−1`` (``S`` = steps) on random augmented training batches of the
    run's per-process size, with the run's optimizer (:func:`run_optimizer`, its momentum
    buffers) at the constant rate ``lr`` (``null``: the schedule's peak, :func:`peak_lr`; at the
    end of a cosine schedule the rate is ~0 and the weights would not move). The steps use the
    run's own normalization (a CBN run: its window). Before step ``t−τ``, at its weights
    ``W_{t−τ}``, each layer stores its batch's statistics and Jacobians exactly as a CBN layer
    does (:func:`record_iteration`). Then, at the final weights ``W_t``, per layer and ``τ``:

    * (a) exact: ``μ_{t−τ}(W_t)``, ``σ²_{t−τ}(W_t)``, the old batch forwarded again;
    * (b) compensated (:func:`bnbench.norm.cbn.compensate`, ``ρ = 1``, clamp):
      ``μ_{t−τ}(W_t) ≈ μ_{t−τ} + ⟨∂μ/∂W, W_t − W_{t−τ}⟩`` (+ the bias change) and
      ``σ²_{t−τ}(W_t) ≈ max(σ²_{t−τ} + ⟨∂σ²/∂W, W_t − W_{t−τ}⟩ − Δμ², 0)`` — the paper's
      compensated ``ν − μ²``;
    * (c) naive: ``μ_{t−τ}(W_{t−τ})``, ``σ²_{t−τ}(W_{t−τ})``.

    The statistics of a batch are those of the conv output with every BN layer normalizing
    with that batch (:func:`conv_outputs`; for any BN-family run, CBN or not: a BN run gets
    the same Jacobian code through :func:`bnbench.norm.cbn.conv_jacobians`, so the errors say
    what CBN's compensation would do on that run's trajectory). ``W`` is the conv directly before
    the layer (paper §3: earlier layers' weights are left out); their changes are what (b)
    still misses: for the first layer (the images as input) the mean is exact and the variance
    error is second order in the step, deeper layers add the truncation.

    Errors ``‖s − s_exact‖ / ‖s_exact‖`` over the channels (:func:`relative_error`), per layer
    (``per_layer``) and averaged over the layers (table rows ``τ=1…S``; scalars
    ``{compensated,naive}_{mean,var}_err_tau{τ}``, ``ratio_naive_over_compensated_{mean,var}_
    tau1``). ``weight_change``: ``‖W_t − W_{t−τ}‖/‖W_t‖`` over the layers' convs, per ``τ``.
    Statistics in the layers' precision (fp32; fp64 for fp64 runs).
    """
    import torch

    from bnbench import checkpoint as ckpt
    from bnbench.norm.base import batch_moments, statistics_dtype
    from bnbench.norm.cbn import compensate

    path = _last_checkpoint(run_dir)
    run = load_checkpoint(run_dir, path, device)
    model, cfg, steps = run.parts.model, run.cfg, options["steps"]
    sites = taylor_layers(model, options["layer"])
    convs = [conv for _, _, conv in sites]
    saved = ckpt.load(path, run.device)
    processes = int(saved.get("config", {}).get("dist", {}).get("nproc", 1) or 1)
    lr = peak_lr(cfg, run.parts.plan, processes) if options["lr"] is None else options["lr"]
    optimizer = run_optimizer(model, cfg, saved.get("optimizer"), float(lr))
    batches = labelled_batches(run.reader, run.parts.plan.per_process, steps, options["seed"])
    dtype = statistics_dtype(convs[0].weight)
    histories = [History.empty(conv, steps, dtype) for conv in convs]
    jacobians = [jacobians_of(layer, conv) for _, layer, conv in sites]

    def store(i: int, conv_input: Tensor, y: Tensor) -> None:
        record_iteration(histories[i], convs[i], jacobians[i], conv_input, y)

    weights = []  # W_{t−τ} of the layers' convs (for weight_change only)
    for x, y in batches:
        weights.append(torch.cat([c.weight.detach().flatten().to(dtype) for c in convs]))
        conv_outputs(model, convs, x, store)
        sgd_step(model, optimizer, x, y, cfg)
    final = torch.cat([c.weight.detach().flatten().to(dtype) for c in convs])

    exact: list[list[tuple[Tensor, Tensor]]] = [[] for _ in sites]
    for x, _ in batches:  # (a): every old batch at W_t
        conv_outputs(model, convs, x,
                     lambda i, _, y: exact[i].append(tuple(t.to(dtype) for t in batch_moments(y))))
    taus = list(range(1, steps + 1))
    kinds = [f"{way}_{stat}" for stat in ("mean", "var") for way in ("compensated", "naive")]
    per_layer: dict[str, dict[str, list[float | None]]] = {}
    for (name, _, conv), history, truth in zip(sites, histories, exact):
        with torch.no_grad():
            mean, var, _ = compensate(history.mean, history.var, False, 1.0,
                                      *history.jacobians(conv))
        estimates = {"compensated_mean": mean, "compensated_var": var,
                     "naive_mean": history.mean, "naive_var": history.var}
        per_layer[name] = {kind: [] for kind in kinds}
        for tau in taus:
            slot = steps - tau  # the batch of step t−τ
            exact_mean, exact_var = truth[slot]
            for kind in kinds:
                reference = exact_var if kind.endswith("var") else exact_mean
                error = relative_error(estimates[kind][slot], reference)
                per_layer[name][kind].append(_finite(error))
    rows, scalars = {}, {}
    for i, tau in enumerate(taus):
        row = {}
        for kind in kinds:
            value = _mean_of([errors[kind][i] for errors in per_layer.values()])
            row[kind.replace("_", " ") + " err"] = value
            scalars[f"{kind}_err_tau{tau}"] = value
        rows[f"τ={tau}"] = row
    for stat in ("mean", "var"):
        naive, comp = scalars[f"naive_{stat}_err_tau1"], scalars[f"compensated_{stat}_err_tau1"]
        scalars[f"ratio_naive_over_compensated_{stat}_tau1"] = (
            _finite(naive / comp) if naive is not None and comp else None)
    change = [_finite(float((final - w).norm() / final.norm().clamp_min(1e-30)))
              for w in reversed(weights)]
    return {"table": rows, "scalars": scalars, "taus": taus, "lr": float(lr), "steps": steps,
            "batch_size": run.parts.plan.per_process, "layers": [n for n, _, _ in sites],
            "norm": cfg.norm.name, "per_layer": per_layer, "weight_change": change}


def plot_taylor_error(result: Result, ax: Axes) -> None:
    """Relative error against ``τ`` (log): compensated solid, naive dashed; mean blue, variance
    orange."""
    taus, scalars = result["taus"], result["scalars"]
    for stat, color in (("mean", "tab:blue"), ("var", "tab:orange")):
        for way, style in (("compensated", "-"), ("naive", "--")):
            ax.plot(taus, [scalars[f"{way}_{stat}_err_tau{t}"] for t in taus], style,
                    marker=".", color=color, label=f"{way} {stat}")
    ax.set_yscale("log", nonpositive="clip")
    ax.set_xlabel("iterations back τ")
    ax.set_ylabel("relative error vs recomputed at W_t")
    ax.legend(fontsize=7)


# -- cost (CBN paper's cost table) ------------------------------------------------------------

#: The normalizations of the cost table (rows).
COST_NORMS = ("bn", "gn", "cbn")


@dataclass(frozen=True)
class NormSite:
    """One normalization layer of an architecture, by its shapes: its input ``shape``
    ``(N, C, H, W)`` (the output of the conv before it), that conv's input ``conv_input``
    ``(N, C_in, H_in, W_in)``, ``weight`` ``(C, C_in/groups, kh, kw)`` and ``groups``."""

    name: str
    shape: tuple[int, ...]
    conv_input: tuple[int, ...]
    weight: tuple[int, ...]
    groups: int

    @property
    def elements(self) -> int:
        """``E = N·C·H·W``, the values the layer normalizes."""
        return math.prod(self.shape)

    @property
    def per_filter(self) -> int:
        """``P = C_in/groups·kh·kw``, the weights of one output channel."""
        return math.prod(self.weight[1:])


def norm_flops(site: NormSite, norm: str, window: int, *,
               training: bool = True) -> dict[str, int]:
    """FLOPs of one forward of the layer at ``site`` (a multiply-add is 2), by term, with
    ``E = N·C·H·W``, ``P = C_in/groups·kh·kw`` and ``k`` = ``window``:

    * ``statistics``: ``Σx`` and ``Σx²`` per channel (GN: per sample and group): ``3E``, in
      training for BN and CBN, always for GN (it has no population statistics);
    * ``normalize``: ``y = a·x + b`` with the affine folded into ``a, b``: ``2E``;
    * CBN in training with ``k > 1`` (what :mod:`bnbench.norm.cbn` computes, one device, exact
      Jacobians):

      - ``jacobian_mean``, ``∂μ/∂W``: the conv's input summed over the samples (one add per
        input value), then one weight-gradient convolution of that sum against ones:
        ``N·C_in·H_in·W_in + 2·H·W·C_in·kh·kw``;
      - ``jacobian_var``, ``∂σ²/∂W``: the conv's weight gradient for ``2y/M`` — ``2·E·P``,
        as many as the conv's own forward — then its scaling and centring (a rank-1 update):
        ``3·C·P``;
      - ``references``: ``e_μ = ⟨∂μ/∂W, W⟩ + b``, ``e_σ = ⟨∂σ²/∂W, W⟩`` of the new entry:
        ``4·C·P``;
      - ``compensation``: ``⟨∂μ/∂W, W_t⟩`` and ``⟨∂σ²/∂W, W_t⟩`` of the ``k − 1`` stored
        entries (CBN paper §3, Eq. for ``μ_{t−τ}(θ_t)``, ``ν_{t−τ}(θ_t)``): ``4·(k−1)·C·P``.

    At inference BN and CBN are the same layer (population statistics: ``normalize`` only).
    Per-channel terms (``O(k·C)``: the affine fold, the window average) are left out.
    """
    e = site.elements
    batch_stats = training or norm == "gn"
    terms = {"statistics": 3 * e if batch_stats else 0, "normalize": 2 * e}
    if norm == "cbn" and training and window > 1:
        c, p = site.shape[1], site.per_filter
        h, w = site.shape[2], site.shape[3]
        terms["jacobian_mean"] = math.prod(site.conv_input) + 2 * h * w * site.groups * p
        terms["jacobian_var"] = 2 * e * p + 3 * c * p
        terms["references"] = 4 * c * p
        terms["compensation"] = 4 * (window - 1) * c * p
    return terms


def history_bytes(site: NormSite, window: int, element_size: int) -> int:
    """Bytes of a CBN layer's history (its buffers beyond BN's, one device): per stored entry
    (``k − 1`` of them) ``μ, σ², e_μ, e_σ`` (``C`` each), ``∂μ/∂W`` (``groups·P``) and
    ``∂σ²/∂W`` (``C·P``), in the statistics' precision (``element_size`` bytes), and the ring's
    ``[count, next slot]`` (2 int64): ``(k−1)·(4C + (groups + C)·P)·element_size + 16``. No
    Jacobians are kept with ``k = 1`` (BN)."""
    c, p = site.shape[1], site.per_filter
    return (window - 1) * (4 * c + (site.groups + c) * p) * element_size + 16


def conv_flops(output: tuple[int, ...], weight: tuple[int, ...]) -> int:
    """Forward FLOPs of a conv: ``2·N·H_out·W_out·C_out·(C_in/groups)·kh·kw`` =
    ``2·numel(output)·P``."""
    return 2 * math.prod(output) * math.prod(weight[1:])


def norm_sites(model: nn.Module, x: Tensor) -> tuple[list[NormSite], int]:
    """The BN layers of ``model`` (built with ``norm=bn``) as :class:`NormSite` from one forward
    of ``x`` at inference, each with the conv CBN pairs it with
    (:func:`bnbench.norm.cbn.preceding_conv`), and the forward FLOPs of all of the model's
    convs (:func:`conv_flops`)."""
    import torch
    from torch import nn

    from bnbench.norm.cbn import preceding_conv

    shapes: dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def seen(module: nn.Module, args: tuple, out: Tensor) -> None:
        shapes[module] = (tuple(args[0].shape), tuple(out.shape))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    layers = bn_layers(model)
    handles = [m.register_forward_hook(seen) for m in [*convs, *(m for _, m in layers)]]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    sites = []
    for name, layer in layers:
        conv = preceding_conv(model, name)
        if conv is None or conv not in shapes or layer not in shapes:
            raise BnbenchError(f"cost: layer {name} does not directly follow a Conv2d that ran "
                               "in the forward; CBN pairs every layer with one")
        sites.append(NormSite(name, shapes[layer][0], shapes[conv][0], tuple(conv.weight.shape),
                              conv.groups))
    total = sum(conv_flops(shapes[m][1], tuple(m.weight.shape)) for m in convs if m in shapes)
    return sites, total


def build_variant(cfg: DictConfig, norm: str, options: Mapping[str, Any], num_classes: int,
                  device: torch.device, seed: int) -> nn.Module:
    """The run's architecture (``cfg.model``) with normalization ``norm`` (``options``),
    initialized from ``seed``, on ``device`` in the run's precision and memory format (as
    :func:`bnbench.train.build_run` builds it)."""
    import torch

    from bnbench.models import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model, norm, dict(options), num_classes).to(device)
    if cfg.trainer.float64:
        model = model.double()
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def predict(model: nn.Module, x: Tensor, cfg: DictConfig) -> Tensor:
    """One inference forward (population statistics; bf16 autocast if the run used it)."""
    import torch

    model.eval()
    with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16,
                                         enabled=bool(cfg.trainer.bf16)):
        return model(x)


def median_seconds(fn: Callable[[], Any], min_run_time: float) -> float:
    """The median time of ``fn()`` by ``torch.utils.benchmark`` (``blocked_autorange``; CUDA
    synchronized), with the threads the process has (the run's ``trainer.threads``)."""
    import torch
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def inference_equal(cbn_model: nn.Module, bn_model: nn.Module, x: Tensor,
                    cfg: DictConfig) -> tuple[bool, float | None]:
    """Whether ``cbn_model`` at inference equals ``bn_model`` given its parameters and
    population statistics (its state dict less CBN's history), bit for bit, and the largest
    difference of the outputs."""
    keys = bn_model.state_dict().keys()
    bn_model.load_state_dict({k: v for k, v in cbn_model.state_dict().items() if k in keys})
    a, b = predict(cbn_model, x, cfg), predict(bn_model, x, cfg)
    return bool(a.equal(b)), _finite(float((a.double() - b.double()).abs().max()))


def compute_cost(run_dir: Path, options: Options, *, device: str = "auto") -> Result:
    """The CBN paper's cost table (theoretical memory and FLOPs, measured training and inference
    speed) for BN, GN and CBN on the run's architecture (its config; its weights are unused).

    Theoretical, per normalization layer from its shapes (one forward of a batch of
    ``batch_size`` training images, ``null``: the run's per-process batch), summed over the
    model: the training-forward FLOPs of the normalization (:func:`norm_flops`; for CBN with the
    Jacobians and the compensation over the window of ``window`` iterations), also as a
    fraction of the forward FLOPs of the model's convs (:func:`conv_flops`), and CBN's extra
    memory, its history (:func:`history_bytes`; BN and GN keep nothing across iterations beyond
    BN's population statistics: 0). MB and M are 10⁶.

    Measured (``torch.utils.benchmark``, median of ``blocked_autorange(min_run_time)``): one
    training step (forward, cross-entropy, backward, SGD with the run's settings at rate 0: the
    same work, a model that stays put) and one inference forward, on the same batch, for each
    model built from ``seed`` with the layer's defaults (GN: 32 groups or the largest divisor of
    C below; CBN: ``window``, no burn-in, ρ = 1, exact Jacobians), after ``window + 1`` steps
    (a full window). At inference CBN is BN (population statistics, the same kernel): checked
    by giving a BN model the CBN model's parameters and statistics after its steps and
    comparing the outputs (``inference_equal_to_bn``, bit for bit).
    """
    import torch

    run = load_checkpoint(run_dir, _last_checkpoint(run_dir), device)
    cfg, window, seed = run.cfg, options["window"], options["seed"]
    batch_size = options["batch_size"] or run.parts.plan.per_process
    x, y = labelled_batches(run.reader, batch_size, 1, seed)[0]
    classes = run.parts.data.num_classes
    layer_options = {"bn": {}, "gn": {}, "cbn": {"window": window, "burnin": 0}}
    models = {norm: build_variant(cfg, norm, layer_options[norm], classes, run.device, seed)
              for norm in COST_NORMS}
    sites, total_conv = norm_sites(models["bn"], x)
    element_size = 8 if cfg.trainer.float64 else 4  # CBN's history: fp32 (fp64 models: fp64)
    flops = {norm: sum(sum(norm_flops(s, norm, window).values()) for s in sites)
             for norm in COST_NORMS}
    inference_flops = {norm: sum(sum(norm_flops(s, norm, window, training=False).values())
                                 for s in sites) for norm in COST_NORMS}
    memory = {"bn": 0, "gn": 0, "cbn": sum(history_bytes(s, window, element_size)
                                           for s in sites)}
    seconds: dict[str, dict[str, float]] = {}
    for norm, model in models.items():
        optimizer = run_optimizer(model, cfg, None, 0.0)

        def step(model: nn.Module = model, optimizer: Any = optimizer) -> None:
            sgd_step(model, optimizer, x, y, cfg)

        for _ in range(window + 1):  # CBN's window full, allocations made
            step()
        train = median_seconds(step, options["min_run_time"])
        predict(model, x, cfg)
        infer = median_seconds(lambda model=model: predict(model, x, cfg),
                               options["min_run_time"])
        seconds[norm] = {"train": train, "inference": infer}
    equal, difference = inference_equal(models["cbn"], models["bn"], x, cfg)
    rows, per_layer = {}, {}
    for norm in COST_NORMS:
        rows[norm] = {
            "norm FLOPs (M)": flops[norm] / 1e6,
            "norm extra memory (MB)": memory[norm] / 1e6,
            "fraction of conv FLOPs": flops[norm] / total_conv,
            "train step (ms)": 1e3 * seconds[norm]["train"],
            "inference (ms)": 1e3 * seconds[norm]["inference"],
            "train vs bn": seconds[norm]["train"] / seconds["bn"]["train"],
            "inference vs bn": seconds[norm]["inference"] / seconds["bn"]["inference"],
        }
    for s in sites:
        per_layer[s.name] = {**{f"{norm}_flops": sum(norm_flops(s, norm, window).values())
                                for norm in COST_NORMS},
                             "cbn_history_bytes": history_bytes(s, window, element_size)}
    cbn_terms: dict[str, int] = {}
    for s in sites:
        for term, value in norm_flops(s, "cbn", window).items():
            cbn_terms[term] = cbn_terms.get(term, 0) + value
    scalars = {"cbn_train_vs_bn": rows["cbn"]["train vs bn"],
               "cbn_infer_vs_bn": rows["cbn"]["inference vs bn"],
               "gn_train_vs_bn": rows["gn"]["train vs bn"],
               "gn_infer_vs_bn": rows["gn"]["inference vs bn"],
               "cbn_extra_memory_mb": memory["cbn"] / 1e6,
               "cbn_flops_fraction": rows["cbn"]["fraction of conv FLOPs"],
               "cbn_inference_equals_bn": 1.0 if equal else 0.0}
    return {"table": rows, "scalars": scalars, "window": window, "batch_size": batch_size,
            "input_shape": list(x.shape), "device": str(run.device),
            "threads": torch.get_num_threads(), "conv_flops": total_conv, "flops": flops,
            "inference_flops": inference_flops, "extra_memory_bytes": memory,
            "cbn_flops_terms": cbn_terms, "seconds": seconds, "per_layer": per_layer,
            "inference_equal_to_bn": equal, "inference_max_abs_diff": difference}


def plot_cost(result: Result, ax: Axes) -> None:
    """Measured time relative to BN per normalization: training step and inference bars."""
    norms = list(result["table"])
    for offset, (column, color) in ((-0.2, ("train vs bn", "tab:blue")),
                                    (0.2, ("inference vs bn", "tab:orange"))):
        ax.bar([i + offset for i in range(len(norms))],
               [result["table"][n][column] for n in norms], width=0.4, color=color, label=column)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(norms)), norms)
    ax.set_ylabel(f"time relative to BN (batch {result['batch_size']}, {result['device']})")
    ax.legend(fontsize=7)


# -- appendix A.8: affine fusion ----------------------------------------------------------------


def gradient_descent(loss: Callable[[Tensor], Tensor], init: float, lr: float,
                     steps: int) -> list[float]:
    """``x_0 = init`` and ``steps`` steps of ``x ← x − lr · dJ/dx`` (the gradient by autograd,
    float64): ``[x_0, …, x_T]``."""
    import torch

    x = torch.tensor(float(init), dtype=torch.float64, requires_grad=True)
    path = [x.item()]
    for _ in range(steps):
        (grad,) = torch.autograd.grad(loss(x), x)
        with torch.no_grad():
            x -= lr * grad
        path.append(x.item())
    return path


def _step_ratio(path: Sequence[float]) -> float | None:
    """``x_T / x_{T−1}``: GD on a quadratic multiplies the parameter by a constant each step."""
    return path[-1] / path[-2] if len(path) > 1 and path[-2] != 0 else None


def compute_affine_fusion(run_dir: Path, options: Options, *, device: str = "auto") -> Result:
    """Appendix A.8: a frozen affine scale ``λ`` in front of a trained weight ``x`` (FrozenBN
    before a layer), loss ``J = (λx)²``, against the fused problem ``J = w²`` whose weight
    ``w = λx`` starts where the unfused one does (``w_0 = λ x_0``: the same function). Gradient
    descent with step ``lr``:

    * unfused: ``dJ/dx = 2λ²x``, so ``x ← (1 − 2·lr·λ²) x`` (``λ = 0.5``, ``lr = 1``: ``x ← x/2``,
      converging to 0);
    * fused: ``dJ/dw = 2w``, so ``w ← (1 − 2·lr) w`` (``lr = 1``: ``w ← −w``, never converging).

    The function's weight moves by factors ``1 − 2·lr·λ²`` and ``1 − 2·lr``: fusion multiplies
    the effective step size by ``1/λ²``. Scalars: each problem's ratio per step, that step-size
    factor, and the losses at the start and the end. No run is read (``run_dir``, ``device``
    unused); float64 on the CPU.
    """
    scale, lr, init, steps = (options["scale"], options["lr"], options["init"],
                              options["steps"])
    unfused = gradient_descent(lambda x: (scale * x) ** 2, init, lr, steps)
    fused = gradient_descent(lambda w: w**2, scale * init, lr, steps)
    unfused_loss = [(scale * x) ** 2 for x in unfused]
    fused_loss = [w**2 for w in fused]
    table = {f"step {t}": {"unfused x": x, "unfused λx": scale * x, "unfused J": ju,
                           "fused w": w, "fused J": jf}
             for t, (x, w, ju, jf) in enumerate(zip(unfused, fused, unfused_loss, fused_loss))}
    ratio_unfused, ratio_fused = _step_ratio(unfused), _step_ratio(fused)
    factor = None
    if ratio_unfused is not None and ratio_fused is not None and ratio_unfused != 1:
        factor = (1 - ratio_fused) / (1 - ratio_unfused)
    return {
        "table": table,
        "scalars": {"unfused_step_ratio": ratio_unfused, "fused_step_ratio": ratio_fused,
                    "step_size_factor": factor, "initial_loss": unfused_loss[0],
                    "unfused_final_loss": unfused_loss[-1], "fused_final_loss": fused_loss[-1]},
        "scale": scale, "lr": lr,
        "unfused": unfused, "fused": fused,
        "unfused_loss": unfused_loss, "fused_loss": fused_loss,
    }


def _fill_affine_fusion(options: Options) -> Options:
    return {**options, "lr": 1.0 if options["lr"] is None else options["lr"]}


def plot_affine_fusion(result: Result, ax: Axes) -> None:
    """The function's weight (``λx`` unfused, ``w`` fused) and the loss per GD step."""
    scale = result["scale"]
    series = [([scale * x for x in result["unfused"]], "o-", "unfused: λx (x trained)"),
              (result["fused"], "s-", "fused: w = λx trained"),
              (result["unfused_loss"], "o--", "unfused: J = (λx)²"),
              (result["fused_loss"], "s--", "fused: J = w²")]
    for values, style, label in series:
        ax.plot(range(len(values)), values, style, label=label,
                alpha=0.6 if "--" in style else 1.0)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    top = max(abs(v) for values, _, _ in series for v in values) or 1.0
    ax.set_ylim(-1.9 * top, 1.15 * top)  # (the band below -top holds the legend)
    ax.set_xlabel(f"gradient-descent step (lr {result['lr']:g}, λ {scale:g})")
    ax.set_ylabel("weight / loss")
    ax.legend(fontsize=7, loc="lower center", ncol=2)


# -- the registry -------------------------------------------------------------------------------

ANALYSES: Mapping[str, Analysis] = MappingProxyType({
    "channel_trace": Analysis(
        compute_channel_trace,
        MappingProxyType({"layer": None, "channel": 0, "num_batches": 100, "batch_size": None,
                          "seed": 0}),
        plot_channel_trace,
        "Fig. 2 (§3.1): EMA vs batch and population means of one channel over training",
        _check_channel_trace,
    ),
    "estimator_error": Analysis(
        compute_estimator_error,
        MappingProxyType({"layer": None, "num_images": 128, "num_samples": 1000,
                          "batch_sizes": None, "trials": 200, "seed": 0}),
        plot_estimator_error,
        "appendix A.2: bias and variance of the Eq. 2 / Eq. 3 variance estimators vs B",
        _check_estimator_error,
    ),
    "layerwise_error": Analysis(
        compute_layerwise_error,
        MappingProxyType({"num_samples": 1000, "batch_sizes": None, "reference_batch": None,
                          "seed": 0}),
        plot_layerwise_error,
        "appendix A.3: error of PreciseBN and layer-by-layer statistics vs B",
        _check_layerwise_error,
    ),
    "taylor_error": Analysis(
        compute_taylor_error,
        MappingProxyType({"layer": None, "steps": 8, "lr": None, "seed": 0}),
        plot_taylor_error,
        "CBN §3: error of Taylor-compensated vs naive statistics of iteration t−τ at W_t",
    ),
    "cost": Analysis(
        compute_cost,
        MappingProxyType({"window": 4, "batch_size": None, "min_run_time": 1.0, "seed": 0}),
        plot_cost,
        "CBN cost table: norm FLOPs, CBN's memory, measured train/inference time (BN, GN, CBN)",
    ),
    "affine_fusion": Analysis(
        compute_affine_fusion,
        MappingProxyType({"scale": 0.5, "lr": 1.0, "init": 1.0, "steps": 10}),
        plot_affine_fusion,
        "appendix A.8 (a toy, no run): GD on J = (λx)² with λ frozen vs on the fused J = w²",
        _fill_affine_fusion,
        needs_run=False,
    ),
})

#: What ``null`` means for options whose default depends on the run or on other options.
_NULL_MEANS = MappingProxyType({
    "layer": f"{DEFAULT_LAYER}, else the middle BN layer",
    "batch_size": "the run's training normalization batch",
    "reference_batch": "num_samples",
    # (an analysis whose null means something else: "<analysis>.<option>")
    "taylor_error.layer": "every BN layer that follows a conv",
    "taylor_error.lr": "the run's peak rate, optim.lr x global batch / 256",
    "cost.batch_size": "the run's per-process training batch",
    "affine_fusion.lr": "1, the paper's step size",
})
_DEFAULT_SIZES = MappingProxyType({
    "estimator_error": "[2,4,10,100,1000] capped at num_samples",
    "layerwise_error": "[2,10,100,num_samples] capped at num_samples",
})


# -- records ------------------------------------------------------------------------------------


def record_path(run_dir: Path, name: str) -> Path:
    """``<run>/analyses/<name>.json``."""
    return Path(run_dir) / ANALYSES_DIR / f"{name}.json"


def read_analysis(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The record of analysis ``name`` in ``run_dir`` (``name``, ``options``, ``iter``,
    ``result``), or ``None`` if there is none (or it cannot be read)."""
    try:
        record = json.loads(record_path(run_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "result" in record else None


def write_analysis(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` to its file atomically (:func:`bnbench.logs.write_json`)."""
    from bnbench.logs import write_json

    return write_json(record_path(run_dir, record["name"]), record, allow_nan=False)


# -- the command --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeJob:
    """One ``bnbench analyze`` command, checked: the analysis, the run, every option (defaults
    filled), ``force`` and the device."""

    name: str
    run_dir: Path
    options: Options
    force: bool
    device: str


def usage() -> str:
    """``bnbench analyze --help``: the command line and every analysis with its options."""
    lines = ["usage: bnbench analyze <name> run=<run dir> [key=value ...] [force=true] "
             "[device=auto|cpu|cuda]", "",
             "Analyses of a trained run, recorded in <run>/analyses/<name>.json (a second run "
             "with the same options", "at the same checkpoint does nothing; force=true computes "
             "it again). Lists as [2,10,100].", "", "analyses (option=default):"]
    for name, analysis in ANALYSES.items():
        lines.append(f"  {name}: {analysis.summary}")
        for key, value in analysis.defaults.items():
            meaning = (_DEFAULT_SIZES[name] if key == "batch_sizes"
                       else _NULL_MEANS.get(f"{name}.{key}", _NULL_MEANS.get(key)))
            note = f"  (null: {meaning})" if value is None and meaning else ""
            lines.append(f"      {key}={_spelled(value)}{note}")
    return "\n".join(lines)


def parse_command(argv: Sequence[str]) -> AnalyzeJob:
    """The job of ``bnbench analyze <argv>``; :class:`BnbenchError` for any bad input (no run
    is read beyond its checkpoint's existence)."""
    known = ", ".join(ANALYSES)
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise BnbenchError(f"analyze: name the analysis first: bnbench analyze <name> run=<run "
                           f"dir> …; choose one of {known}")
    name, given = argv[0], {}
    if name not in ANALYSES:
        raise BnbenchError(f"analyze {name}: unknown analysis; choose one of {known}")
    analysis = ANALYSES[name]
    for arg in argv[1:]:
        key, eq, text = arg.partition("=")
        if not eq or not key:
            raise BnbenchError(f"{arg}: expected key=value")
        if key not in analysis.defaults and key not in COMMAND_KEYS:
            raise BnbenchError(f"unknown option {key} of {name}; its options: "
                               f"{', '.join([*analysis.defaults, *COMMAND_KEYS])}")
        given[key] = text if key == "run" else _parse(text)
    if "run" not in given or not given["run"]:
        raise BnbenchError(f"run: missing; name the run: bnbench analyze {name} run=<run dir>")
    force, device = given.pop("force", False), given.pop("device", "auto")
    if not isinstance(force, bool):
        raise BnbenchError(f"force={_spelled(force)}: must be true or false")
    if device not in DEVICES:
        raise BnbenchError(f"device={_spelled(device)}: choose one of {', '.join(DEVICES)}")
    run_dir = Path(given.pop("run"))
    if analysis.needs_run:
        _check_run(run_dir)
    else:
        _check_record_dir(run_dir)
    for key, value in given.items():
        check_value(key, value)
    options = analysis.fill({**analysis.defaults, **given})
    return AnalyzeJob(name, run_dir, options, force, device)


def _check_run(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise BnbenchError(f"run={run_dir}: no such directory")
    if not _last_checkpoint(run_dir).is_file():
        raise BnbenchError(f"run={run_dir}: no checkpoint {_last_checkpoint(run_dir)} (a run "
                           "with trainer.checkpoint=false, or stopped before its first epoch "
                           "ended)")
    if not os.access(run_dir, os.W_OK):
        raise BnbenchError(f"run={run_dir}: not writable (the result goes to "
                           f"{run_dir / ANALYSES_DIR})")


def _check_record_dir(run_dir: Path) -> None:
    """A toy's ``run=``: a directory (or none yet) that can take its record."""
    if run_dir.exists() and not run_dir.is_dir():
        raise BnbenchError(f"run={run_dir}: not a directory (a toy analysis records in "
                           f"{run_dir / ANALYSES_DIR})")
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK):
        raise BnbenchError(f"run={run_dir}: not writable (the result goes to "
                           f"{run_dir / ANALYSES_DIR})")


def checkpoint_iteration(run_dir: Path) -> int:
    """The iteration of the run's last checkpoint (what a record is valid for)."""
    import torch

    from bnbench import checkpoint as ckpt

    saved = ckpt.load(_last_checkpoint(run_dir), torch.device("cpu"))
    return int(saved.get("state", {}).get("iteration", 0))


def recorded(job: AnalyzeJob, iteration: int) -> dict[str, Any] | None:
    """The record of ``job`` if its file holds the same options at ``iteration``."""
    record = read_analysis(job.run_dir, job.name)
    same = (record is not None and record.get("iter") == iteration
            and record.get("options") == json.loads(json.dumps(job.options)))
    return record if same else None


def run_analysis(argv: Sequence[str]) -> None:
    """``bnbench analyze <argv>`` without the exit status: computes and records the analysis
    unless it is recorded already (what ``bnbench experiment`` calls); raises
    :class:`BnbenchError` for a bad input, writing nothing."""
    job = parse_command(argv)
    iteration = checkpoint_iteration(job.run_dir) if ANALYSES[job.name].needs_run else 0
    if not job.force and recorded(job, iteration) is not None:
        print(f"{job.name}: recorded already for iteration {iteration} with these options "
              f"in {record_path(job.run_dir, job.name)}; force=true computes it again",
              flush=True)
        return
    result = ANALYSES[job.name].compute(job.run_dir, dict(job.options), device=job.device)
    path = write_analysis(job.run_dir, {"name": job.name, "options": job.options,
                                        "iter": iteration, "result": result})
    print(f"{job.name}: iteration {iteration}, recorded in {path}", flush=True)
    for key, value in result["scalars"].items():
        print(f"  {key} = {'n/a' if value is None else f'{value:.4g}'}", flush=True)


def main(argv: Sequence[str]) -> int:
    """``bnbench analyze``; the exit status (0 done or recorded already, 2 a ``bnbench:
    error:`` line said why). Nothing is written unless the analysis completes."""
    if not argv or {"-h", "--help"} & set(argv):
        print(usage())
        return 0 if argv else 2
    try:
        run_analysis(argv)
    except BnbenchError as err:
        print(f"bnbench: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0
