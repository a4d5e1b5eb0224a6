"""``bnbench analyze <name> run=<run dir> [key=value …] [force=true]``: analyses of a trained run's
population statistics ("Rethinking 'Batch' in BatchNorm", §3.1 and appendix A.2–A.3).

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

The default layer of ``channel_trace`` and ``estimator_error`` is :data:`DEFAULT_LAYER`, the first
BN of the third stage of bnbench's ResNets (a mid-network layer); a model without it takes the
middle one of its BN layers. ``bnbench analyze --help`` lists every analysis with its options.

Each analysis is an :class:`Analysis` of :data:`ANALYSES`: ``compute(run_dir, options)`` returns a
JSON-serializable result with ``table`` (``{row: {column: float | None}}``, a markdown table in the
report) and ``scalars`` (``{name: float | None}``, what claims compare), and ``plot(result, ax)``
draws it on a matplotlib axes. The command writes ``<run>/analyses/<name>.json`` atomically::

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
import tempfile
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
    from torch import Tensor, nn

    from bnbench.eval_app import LoadedRun
    from bnbench.evaluate import Reader

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


# -- option values ----------------------------------------------------------------------------

#: The kind of value of each option name (the same name means the same kind in every analysis).
_KINDS = MappingProxyType({
    "layer": "name", "channel": "index", "seed": "index", "num_batches": "count",
    "batch_size": "count or null", "num_samples": "count", "num_images": "count",
    "trials": "count", "batch_sizes": "counts", "reference_batch": "count or null",
})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_value(key: str, value: Any) -> None:
    """``value`` is of the kind that option ``key`` takes, else one :class:`BnbenchError`."""
    kind = _KINDS[key]
    if value is None and kind in ("name", "count or null"):
        return
    if kind == "name":
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
})

#: What ``null`` means for options whose default depends on the run or on other options.
_NULL_MEANS = MappingProxyType({
    "layer": f"{DEFAULT_LAYER}, else the middle BN layer",
    "batch_size": "the run's training normalization batch",
    "reference_batch": "num_samples",
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
    """Write ``record`` to its file atomically (a temporary file in the same folder, then
    renamed over), so that a reader never sees half of it."""
    path = record_path(run_dir, record["name"])
    text = json.dumps(record, indent=1, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
            meaning = _DEFAULT_SIZES[name] if key == "batch_sizes" else _NULL_MEANS.get(key)
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
    _check_run(run_dir)
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
    iteration = checkpoint_iteration(job.run_dir)
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
