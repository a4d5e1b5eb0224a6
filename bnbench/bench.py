"""``bnbench bench``: the cost of each normalization variant relative to ``torch.nn.BatchNorm2d``.

Measured in one run, each as the ratio of the variant's median time to the baseline's:

* **layer**: forward + backward of the lone layer (``y = layer(x); y.backward(g)``, ``x`` a leaf
  requiring grad) on each ``--layer-shape``, against ``nn.BatchNorm2d`` in training mode. Layers
  are made as ``convert(nn.Sequential(conv, nn.BatchNorm2d(C)), name)`` (CBN needs its conv); the
  conv does not run: each timed iteration clears the gradients and replays the conv's forward
  hooks (through which CBN records the conv's input), on both sides.
* **step**: one ResNet training step (forward, cross-entropy, backward, SGD with momentum) with
  the variant converted in, against the same model (same init, same batch) with BN.
* **first step**: per run a fresh ``python -c`` process builds the model as training does
  (``bnbench.models.build_model``) and times its first training step, so lazy imports,
  allocations and first-call setup show; also its time from process start to the end of that
  step. Against the same with plain ``nn.BatchNorm2d``.
* **PreciseBN**: ``update_population_stats`` over ``--precise-samples`` samples in batches of
  ``--precise-batch`` (the step's model, bnbench's BN), against a no-grad eval forward over the
  same batches.

Timing is ``torch.utils.benchmark``: ``Timer.blocked_autorange(min_run_time=--min-time)`` runs
``--repeats`` times per side, alternating (A B, B A, …, so slow drift falls on both sides), and
each side's Measurements are merged (``Measurement.merge``). A ratio is marked † when a side's
Measurement warns that its IQR is large for its median. First-step Measurements hold one time
per process (``--first-step-repeats`` per side).

Memory: on CUDA, the peak allocation of one iteration above what was allocated before it; on CPU,
the bytes autograd saves for backward (unique storages, parameters and buffers excluded) plus the
output. Cost references ``cbn_floor`` and ``cbn_official_jac`` (step only): the BN model plus only
the Jacobian work of an exact CBN (one weight-gradient conv per conv, the notes' method) or of the
official code (two ``autograd.grad`` passes per conv); ``cbn_floor:nbs=8`` is that floor for 8
simulated devices (GhostBN statistics and one grouped weight-gradient conv over the batch).

Simulated devices: a row of a per-device variant with ``nbs`` (``cbn:nbs=8``: 8 devices of the
default batch of 64), or of ``cbn_floor``, also gets its step ratio over the ratio of the same
variant without ``nbs`` (one device), ``step.vs_one_device`` and a note: each ratio against its
own interleaved baseline. ``cbn_floor:nbs=8`` over ``cbn_floor`` is the least such ratio an exact
per-device CBN can have.

States: the baseline's BN layers get a large ``num_batches_tracked``, which ``convert`` copies, so
BRN runs past its warm-up (r_max/d_max at their final values) and CBN past burn-in, its window
full after ``--warmup`` untimed iterations. SyncBN runs in a one-process gloo group; domain BN
with two domains (domain 0). First-step processes build fresh models (iteration 0).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbench.errors import BnbenchError, check_positive

# torch.utils.benchmark imports cpp_extension, which warns "No CUDA runtime is found" on CPU-only
# machines with a CUDA build of PyTorch.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402

#: Default options per registry name (the configs' defaults where they exist).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "ghost": {"nbs": 4},
    "batch_eval": {"eval_nbs": 32},
    "cbn": {"window": 4, "burnin": 0},
    "naive_cbn": {"window": 4, "burnin": 0},
    "domain": {"num_domains": 2},
}
#: The default variant list (``name`` or ``name:key=value:…``), in table order.
DEFAULT_VARIANTS = ("bn", "ghost", "ghost:nbs=2", "syncbn", "frozen", "batch_eval", "brn", "gn",
                    "ln", "in", "cbn", "cbn:nbs=8", "cbn:jacobian_dtype=bfloat16", "naive_cbn",
                    "cbn_floor", "cbn_floor:nbs=8", "cbn_official_jac", "domain")
#: Cost references for CBN (step only): the BN model plus the Jacobian work of an exact CBN.
REFERENCES = {
    "cbn_floor": "cost reference: BN + one weight-gradient conv per conv (∂σ²/∂W, the notes' "
                 "method): the least extra work of an exact CBN",
    "cbn_official_jac": "cost reference: BN + the official CBN's Jacobians, two autograd.grad "
                        "passes per conv (∂μ/∂W, ∂ν/∂W)",
}
NOTES = {
    "bn": "bnbench's BatchNorm2d: ≈ 1 expected",
    "batch_eval": "training = bn (differs at inference only)",
    "domain": "domain 0 of 2",
}
BASELINE = "nn.BatchNorm2d"
#: ``num_batches_tracked`` given to the baseline before ``convert``: past BRN's schedules.
PAST_SCHEDULES = 1_000_000

FULL = {"layer_shapes": [(64, 64, 16, 16), (32, 256, 8, 8), (64, 128, 4, 4)], "model_width": 0.25,
        "model_batch": 64, "image_size": 16, "repeats": 6, "warmup": 5, "min_time": 0.2,
        "first_step_repeats": 3, "precise_samples": 4096, "precise_batch": 64}
QUICK = {"layer_shapes": [(16, 16, 8, 8)], "model_width": 0.125, "model_batch": 16,
         "image_size": 8, "repeats": 2, "warmup": 1, "min_time": 0.01, "first_step_repeats": 1,
         "precise_samples": 64, "precise_batch": 16}
#: Flags whose values must be positive: (dest, integer).
POSITIVE = {"threads": True, "model_width": False, "model_batch": True, "image_size": True,
            "num_classes": True, "repeats": True, "min_time": False, "first_step_repeats": True,
            "precise_samples": True, "precise_batch": True}


# -- command line -------------------------------------------------------------------------------
class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise _ArgError(message)


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N,C,H,W (four positive integers)")
    return dims  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bnbench bench",
        description="Time (and memory) of each normalization variant relative to "
        "torch.nn.BatchNorm2d: lone layer, ResNet training step, first step in a fresh process, "
        "PreciseBN. Timing by torch.utils.benchmark.",
        epilog="Exit status: 0 when every measurement ran, 1 when some failed (the table "
        "still shows the others), 2 for bad arguments.",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, also of the timers and the first-step processes "
                   "(default: as is; 1 with --quick)")
    p.add_argument("--variants", default=None,
                   help="comma list of NAME or NAME:key=value[:key=value] (registry names; "
                   f"default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--layer-shape", type=_shape, action="append", default=None, metavar="N,C,H,W",
                   help="lone-layer input shape; repeat for several (default: 64,64,16,16, "
                   "32,256,8,8 and 64,128,4,4)")
    p.add_argument("--model-arch", default="resnet18", help="ResNet of the step (resnet18)")
    p.add_argument("--model-width", type=float, default=None,
                   help="width multiplier (default 0.25: the CPU-scale training run)")
    p.add_argument("--model-batch", type=int, default=None, help="default 64")
    p.add_argument("--image-size", type=int, default=None,
                   help="input resolution in pixels (default 16)")
    p.add_argument("--stem", choices=("small", "imagenet"), default="small",
                   help="small-input stem (3x3, no max-pool; default) or torchvision's")
    p.add_argument("--num-classes", type=int, default=15)
    p.add_argument("--repeats", type=int, default=None,
                   help="blocked_autorange calls per side, interleaved (default 6)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations of each side first (default 5)")
    p.add_argument("--min-time", type=float, default=None,
                   help="min_run_time of each blocked_autorange call, seconds (default 0.2)")
    p.add_argument("--first-step-repeats", type=int, default=None,
                   help="fresh processes per side for the first step (default 3)")
    p.add_argument("--precise-samples", type=int, default=None, help="PreciseBN N (4096)")
    p.add_argument("--precise-batch", type=int, default=None, help="PreciseBN B (64)")
    p.add_argument("--no-layer", action="store_true", help="skip the lone-layer measurements")
    p.add_argument("--no-model", action="store_true", help="skip the training-step measurements")
    p.add_argument("--no-first-step", action="store_true", help="skip the fresh-process rows")
    p.add_argument("--no-precise", action="store_true", help="skip the PreciseBN measurement")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, few repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the settings, environment and every number to PATH (JSON)")
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="write PREFIX.md (the printed report) and PREFIX.json")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults (``--quick``'s or the full run's) and check the values."""
    defaults = QUICK if args.quick else FULL
    if args.layer_shape is None:
        args.layer_shape = list(defaults["layer_shapes"])
    for key, value in defaults.items():
        if getattr(args, key, "") is None:
            setattr(args, key, value)
    if args.threads is None and args.quick:
        args.threads = 1  # a smoke run must not fight other processes with a thread pool
    for key, integer in POSITIVE.items():
        check_positive("--" + key.replace("_", "-"), getattr(args, key), integer=integer,
                       allow_none=True)
    if args.warmup < 0:
        raise BnbenchError(f"--warmup={args.warmup}: must be a non-negative integer")
    if args.no_layer and args.no_model and args.no_first_step and args.no_precise:
        raise BnbenchError("--no-layer, --no-model, --no-first-step and --no-precise: "
                           "nothing to measure")
    from bnbench.models.resnet import ARCHS

    if args.model_arch not in ARCHS:
        raise BnbenchError(f"--model-arch {args.model_arch}: choose one of {', '.join(ARCHS)}")
    return args


@dataclass
class Variant:
    """One row: a registry name (or a cost reference) and its options."""

    spec: str
    name: str
    options: dict[str, Any]

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items() if k not in _HIDDEN)
        return f"{self.name}({opts})" if opts else self.name


_HIDDEN = {"burnin", "eval_nbs", "num_domains"}


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_variants(text: str | None) -> list[Variant]:
    from bnbench import norm

    items = DEFAULT_VARIANTS if text is None else [s.strip() for s in text.split(",")]
    variants = []
    for item in items:
        if not item:
            raise BnbenchError(f"--variants {text!r}: empty variant name")
        name, *pairs = item.split(":")
        if name in REFERENCES:
            nbs = [p for p in pairs if p.startswith("nbs=")] if name == "cbn_floor" else []
            if len(pairs) != len(nbs) or len(nbs) > 1:
                raise BnbenchError(f"--variants: {item!r}: {name} takes "
                                   + ("only nbs=N" if name == "cbn_floor" else "no options"))
            options = {"nbs": _value(nbs[0].partition("=")[2])} if nbs else {}
            if options and not (isinstance(options["nbs"], int) and options["nbs"] > 0):
                raise BnbenchError(f"--variants: {item!r}: nbs must be a positive integer")
            variants.append(Variant(item, name, options))
            continue
        if name not in norm.NORMS:
            raise BnbenchError(f"--variants: unknown variant {name!r}; choose from "
                               f"{', '.join([*norm.NORMS, *REFERENCES])}")
        options = dict(DEFAULT_OPTIONS.get(name, {}))
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise BnbenchError(f"--variants: {item!r}: options are key=value")
            options[key] = _value(value)
        norm.check_options(name, options)  # an option the variant does not take: BnbenchError
        variants.append(Variant(item, name, options))
    labels = [v.label for v in variants]
    for v in variants:
        if labels.count(v.label) > 1:
            raise BnbenchError(f"--variants: {v.label} is listed more than once")
    return variants


# -- timing -------------------------------------------------------------------------------------
def time_pair(base: Callable[[], Any], var: Callable[[], Any], *, label: str, description: str,
              variant: str, repeats: int, min_time: float, threads: int,
              baseline: str = BASELINE, timer: Callable[..., Any] = benchmark.Timer,
              ) -> tuple[benchmark.Measurement, benchmark.Measurement]:
    """Merged Measurements of ``base`` and ``var``: ``repeats`` interleaved
    ``blocked_autorange(min_run_time=min_time)`` calls per side (A B, B A, …)."""
    timers = [timer(stmt="run()", globals={"run": fn}, label=label, sub_label=name,
                    description=description, num_threads=threads)
              for fn, name in ((base, baseline), (var, variant))]
    runs: tuple[list, list] = ([], [])
    for r in range(repeats):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            runs[side].append(timers[side].blocked_autorange(min_run_time=min_time))
    (b,), (v,) = benchmark.Measurement.merge(runs[0]), benchmark.Measurement.merge(runs[1])
    return b, v


def ratio(base: benchmark.Measurement, var: benchmark.Measurement) -> dict[str, Any]:
    """The variant's median over the baseline's, with both medians and IQRs (ms)."""
    return {
        "ratio": var.median / base.median,
        "base_ms": base.median * 1e3,
        "var_ms": var.median * 1e3,
        "base_iqr_ms": base.iqr * 1e3,
        "var_iqr_ms": var.iqr * 1e3,
        "runs": [len(base.times), len(var.times)],
        "noisy": base.has_warnings or var.has_warnings,
    }


# -- memory -------------------------------------------------------------------------------------
@dataclass
class Case:
    """One side of a comparison: an iteration is ``prepare()`` then ``finish(forward())``;
    ``persistent`` are the tensors (parameters, buffers) the memory measure leaves out."""

    prepare: Callable[[], None]
    forward: Callable[[], Tensor]
    finish: Callable[[Tensor], None]
    persistent: list[Tensor] = field(default_factory=list)

    def iteration(self) -> None:
        self.prepare()
        self.finish(self.forward())


def saved_bytes(case: Case) -> int:
    """Bytes of the unique storages autograd saves in ``case``'s forward, plus its output's,
    leaving out the storages of ``case.persistent`` (parameters and buffers)."""
    exclude = {t.untyped_storage().data_ptr() for t in case.persistent}
    storages: dict[int, int] = {}

    def note(t: Tensor) -> Tensor:
        if isinstance(t, Tensor) and t.layout == torch.strided:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in exclude:
                storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        return t

    case.prepare()
    with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
        out = case.forward()
    note(out)
    case.finish(out)
    return sum(storages.values())


def peak_bytes(case: Case, device: torch.device) -> int:
    """CUDA: peak allocation of one iteration above what was allocated before it."""
    case.prepare()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    case.finish(case.forward())
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def compare_memory(base: Case, var: Case, device: torch.device) -> dict[str, Any]:
    measure = partial(peak_bytes, device=device) if device.type == "cuda" else saved_bytes
    b, v = measure(base), measure(var)
    return {"mem_base": b, "mem_var": v, "mem_ratio": v / b if b else float("nan")}


MEMORY_MEANING = {
    "cpu": "bytes autograd saves for backward (unique storages; parameters and buffers "
           "excluded) plus the output, per forward (CPU has no allocator statistics)",
    "cuda": "peak CUDA allocation during one iteration above what was allocated before it "
            "(torch.cuda.max_memory_allocated delta)",
}


# -- variant setup ------------------------------------------------------------------------------
def convert_variant(module: nn.Module, variant: Variant) -> nn.Module:
    from bnbench import norm

    if variant.name in REFERENCES:
        nbs = variant.options.get("nbs")
        if nbs:  # simulated devices: their statistics are GhostBN's
            module = norm.convert(module, "ghost", nbs=nbs)
        return with_jacobian_work(module, variant.name, nbs)
    return norm.convert(module, variant.name, **variant.options)


@torch.no_grad()
def floor_jacobian(conv: nn.Conv2d, x: Tensor, y: Tensor, nbs: int | None = None) -> Tensor:
    """``Σ_p y_j(p)·patch(p)`` ``(G·C_out, C_in/groups·kh·kw)`` of ``conv`` (input ``x``, output
    ``y``) per device of ``nbs`` samples (``G = N/nbs``; one device without ``nbs``): the
    weight gradient for ``∂y = y``, ``∂σ²/∂W`` up to its scale and centring, as one
    convolution grouped by device."""
    from torch.nn.grad import conv2d_weight

    from bnbench.norm.base import to_groups
    from bnbench.norm.cbn import padded_input

    x, padding = padded_input(conv, x)  # padded as the conv pads
    devices = x.shape[0] // nbs if nbs else 1
    shape = (devices * conv.out_channels, *conv.weight.shape[1:])
    return conv2d_weight(to_groups(x, devices), shape, to_groups(y, devices), conv.stride,
                         padding, conv.dilation, devices * conv.groups)


def with_jacobian_work(model: nn.Module, kind: str, nbs: int | None = None) -> nn.Module:
    """``model`` (BN, or GhostBN with ``nbs``) with the Jacobian work of a CBN layer after
    every conv, results unused: ``"cbn_floor"`` one weight-gradient conv for ``∂y = y`` (the
    cost of ``∂σ²/∂W``; with ``nbs``, per device of ``nbs`` samples as one grouped conv over
    the batch), ``"cbn_official_jac"`` the official code's ``torch.autograd.grad`` of the
    per-channel ``μ = E[y]`` and ``ν = E[y²]`` w.r.t. the conv weight (``grad_outputs`` =
    ones)."""
    def floor(conv: nn.Conv2d, args: tuple, y: Tensor) -> None:
        floor_jacobian(conv, args[0], y, nbs)

    def official(conv: nn.Conv2d, args: tuple, y: Tensor) -> None:
        if not (torch.is_grad_enabled() and y.requires_grad):
            return
        mean, sq = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
        ones = torch.ones_like(mean)
        for stat in (mean, sq):
            torch.autograd.grad(stat, conv.weight, ones, retain_graph=True)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(floor if kind == "cbn_floor" else official)
    return model


def state_note(module: nn.Module) -> str:
    """The state the variant's layers were measured in (read after the measurement)."""
    from bnbench.norm.brn import BatchRenorm2d
    from bnbench.norm.cbn import CrossIterationBatchNorm2d

    notes = []
    with contextlib.suppress(AttributeError, TypeError):
        limits = {m.limits() for m in module.modules() if isinstance(m, BatchRenorm2d)}
        if limits:
            notes.append("r_max,d_max=" + ";".join(f"{r:g},{d:g}" for r, d in sorted(limits)))
    with contextlib.suppress(AttributeError, TypeError):
        cbn = [m for m in module.modules() if isinstance(m, CrossIterationBatchNorm2d)]
        if cbn:
            full = sum(m.history_length() == m.window - 1 for m in cbn)
            notes.append(f"window full in {full}/{len(cbn)} layers")
    return ", ".join(notes)


def _persistent(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _past_schedules(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(PAST_SCHEDULES)


def layer_cases(variant: Variant, shape: tuple[int, int, int, int], device: torch.device,
                seed: int) -> tuple[Case, Case, nn.Module]:
    """Baseline and variant lone-layer cases on the same input (a conv+norm pair each)."""
    torch.manual_seed(seed)
    c = shape[1]
    pair = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
    pair = pair.to(device).train()
    _past_schedules(pair)
    var_pair = convert_variant(copy.deepcopy(pair), variant).to(device).train()
    x = torch.randn(shape, device=device, requires_grad=True)
    grad, conv_in = torch.randn(shape, device=device), torch.randn(shape, device=device)

    def case(p: nn.Sequential) -> Case:
        conv, layer = p[0], p[1]
        params = list(layer.parameters())
        hooks = list(conv._forward_hooks.values())  # CBN records its conv's input through one

        def prepare() -> None:
            x.grad = None
            for q in params:
                q.grad = None
            for hook in hooks:
                hook(conv, (conv_in,), x)

        return Case(prepare, lambda: layer(x), lambda y: y.backward(grad), _persistent(p))

    return case(pair), case(var_pair), var_pair


def model_cases(variant: Variant, args: argparse.Namespace, device: torch.device,
                seed: int) -> tuple[Case, Case, nn.Module, Callable[[], bool]]:
    """Baseline and variant training steps of the same ResNet (same init, same batch)."""
    from bnbench import norm
    from bnbench.models.resnet import resnet

    torch.manual_seed(seed)
    base = resnet(args.model_arch, args.num_classes, width=args.model_width,
                  small_input=args.stem == "small").to(device)
    x = torch.randn(args.model_batch, 3, args.image_size, args.image_size, device=device)
    target = torch.randint(0, args.num_classes, (args.model_batch,), device=device)
    bns = [m for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # population statistics of this batch (FrozenBN/BRN see sane ones)
        for m in bns:
            m.momentum = 1.0
        base.train()(x)
        for m in bns:
            m.momentum = 0.1
    _past_schedules(base)
    var_model = convert_variant(copy.deepcopy(base), variant).to(device).train()
    converted = sum(type(m) is not nn.BatchNorm2d for m in var_model.modules() if norm.is_norm(m))
    if variant.name not in REFERENCES and converted != len(bns):
        raise BnbenchError(f"{variant.label}: convert left plain nn.BatchNorm2d layers")
    losses: dict[int, Tensor] = {}

    def case(model: nn.Module) -> Case:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def finish(loss: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[id(model)] = loss.detach()

        return Case(lambda: None, lambda: F.cross_entropy(model(x), target), finish,
                    _persistent(model))

    def finite() -> bool:
        return all(bool(torch.isfinite(v)) for v in losses.values())

    return case(base), case(var_model), var_model, finite


@contextlib.contextmanager
def single_process_group(wanted: bool) -> Iterator[str]:
    """A one-process gloo group for SyncBN (unless one exists); yields the row's note."""
    import torch.distributed as dist

    if not wanted or dist.is_initialized():
        yield f"existing group, world size {dist.get_world_size()}" if wanted else ""
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield "1-process gloo group"
    finally:
        dist.destroy_process_group()


# -- first step in a fresh process -------------------------------------------------------------
FIRST_STEP_CODE = ("import time; t0 = time.perf_counter(); import sys; "
                   "from bnbench.bench import first_step; first_step(sys.argv[1], t0)")


def first_step(spec_json: str, t0: float) -> None:
    """In a fresh process: build the model as training does, run and time its first training
    step, print ``{"first_step_s", "process_s"}`` as JSON (``process_s``: from ``t0``)."""
    from bnbench.config import ModelConfig
    from bnbench.models import build_model
    from bnbench.models.resnet import resnet

    s = json.loads(spec_json)
    torch.set_num_threads(s["threads"])
    torch.manual_seed(s["seed"])
    device = torch.device(s["device"])
    name = s["name"]
    with single_process_group(name == "syncbn"):
        if name is None:
            model = resnet(s["arch"], s["num_classes"], width=s["width"],
                           small_input=s["small_input"])
        else:
            cfg = ModelConfig(arch=s["arch"], width=s["width"], small_input=s["small_input"])
            model = build_model(cfg, name, s["options"], s["num_classes"])
        model = model.to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        x = torch.randn(s["batch"], 3, s["image_size"], s["image_size"], device=device)
        target = torch.randint(0, s["num_classes"], (s["batch"],), device=device)
        _sync(device)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
    print(json.dumps({"first_step_s": t2 - t1, "process_s": t2 - t0, "loss": loss.item()}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_first_step(variant: Variant | None, args: argparse.Namespace,
                   device: torch.device) -> dict[str, float]:
    """One fresh process (``variant`` None: plain ``nn.BatchNorm2d``); its JSON line."""
    spec = {"name": variant and variant.name, "options": variant.options if variant else {},
            "arch": args.model_arch, "width": args.model_width, "small_input": args.stem == "small",
            "num_classes": args.num_classes, "batch": args.model_batch,
            "image_size": args.image_size, "seed": args.seed, "threads": torch.get_num_threads(),
            "device": str(device)}
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", FIRST_STEP_CODE, json.dumps(spec)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"first-step process failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_first_steps(variants: list[Variant], args: argparse.Namespace, device: torch.device,
                        rows: dict[str, dict[str, Any]], measurements: list,
                        log: Callable[[str], None]) -> None:
    """``--first-step-repeats`` rounds of one process per side (baseline first, then each
    variant; the order reversed every other round); ratios into ``rows[label]["first_step"]``."""
    sides: list[Variant | None] = [None, *(v for v in variants if v.name not in REFERENCES)]
    times: dict[str | None, dict[str, list[float]]] = {}
    errors: dict[str | None, str] = {}
    with contextlib.suppress(Exception):  # untimed: warms the file cache for the imports
        run_first_step(None, args, device)
    for r in range(args.first_step_repeats):
        for v in sides if r % 2 == 0 else sides[::-1]:
            key = v and v.label
            if key in errors:
                continue
            log(f"first step [{r + 1}/{args.first_step_repeats}]: {key or BASELINE}")
            try:
                got = run_first_step(v, args, device)
            except Exception as err:
                errors[key] = _error(err)
                log(f"    {errors[key]}")
                continue
            for k in ("first_step_s", "process_s"):
                times.setdefault(key, {}).setdefault(k, []).append(got[k])

    def made(key: str | None, k: str, what: str) -> benchmark.Measurement:
        spec = benchmark.TaskSpec(stmt=FIRST_STEP_CODE, setup="", label=what,
                                  sub_label=key or BASELINE, description=_model_text(args),
                                  num_threads=torch.get_num_threads())
        return benchmark.Measurement(number_per_run=1, raw_times=times[key][k], task_spec=spec)

    for v in sides[1:]:
        if v.label in errors or None in errors:
            rows[v.label]["first_step"] = {"error": errors.get(v.label) or errors[None]}
            continue
        result = {}
        for k, what in (("first_step_s", "first training step, fresh process"),
                        ("process_s", "process start to end of first step")):
            base, var = made(None, k, what), made(v.label, k, what)
            result[k.removesuffix("_s")] = ratio(base, var)
            measurements += [base, var]
        rows[v.label]["first_step"] = result


# -- PreciseBN ----------------------------------------------------------------------------------
def measure_precise(args: argparse.Namespace, device: torch.device,
                    measurements: list) -> dict[str, Any]:
    """PreciseBN (``update_population_stats``) against a no-grad eval forward, same batches."""
    from bnbench.config import ModelConfig
    from bnbench.models import build_model
    from bnbench.population import update_population_stats

    n, b = args.precise_samples, args.precise_batch
    torch.manual_seed(args.seed)
    cfg = ModelConfig(arch=args.model_arch, width=args.model_width,
                      small_input=args.stem == "small")
    model = build_model(cfg, "bn", {}, args.num_classes).to(device)
    size = (3, args.image_size, args.image_size)
    batches = [torch.randn(b, *size, device=device) for _ in range(n // b)]
    batches += [torch.randn(n % b, *size, device=device)] if n % b else []

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(batch)

    def precise() -> None:
        update_population_stats(model, lambda: batches)

    forward()
    precise()
    base, var = time_pair(forward, precise, label=f"PreciseBN, N={n}, B={b}",
                          description=_model_text(args), variant="update_population_stats",
                          baseline="no-grad eval forward",
                          repeats=args.repeats, min_time=args.min_time,
                          threads=torch.get_num_threads())
    measurements += [base, var]
    return {"samples": n, "batch": b, **ratio(base, var)}


# -- the run ------------------------------------------------------------------------------------
def _error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:160]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _shape_text(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape)


def _model_text(args: argparse.Namespace) -> str:
    return (f"{args.model_arch} w{args.model_width:g} {args.image_size}px "
            f"b{args.model_batch}")


def _measure(case_fn: Callable[[], tuple], label: str, description: str, variant: Variant,
             args: argparse.Namespace, device: torch.device, measurements: list,
             warmup: int) -> dict[str, Any]:
    """Build the cases, warm up, time both sides and measure memory; errors are recorded."""
    try:
        base, var, module, *finite = case_fn()
        for _ in range(warmup):
            base.iteration()
            var.iteration()
        mb, mv = time_pair(base.iteration, var.iteration, label=label, description=description,
                           variant=variant.label, repeats=args.repeats, min_time=args.min_time,
                           threads=torch.get_num_threads())
        measurements += [mb, mv]
        result = {**ratio(mb, mv), **compare_memory(base, var, device)}
        result["state"] = state_note(module)
        if finite:
            result["finite_loss"] = finite[0]()
        return result
    except Exception as err:
        _log(f"    {_error(err)}")
        return {"error": _error(err), "traceback": traceback.format_exc()}


def run_bench(args: argparse.Namespace, variants: list[Variant], device: torch.device,
              log: Callable[[str], None] = _log) -> tuple[list[dict[str, Any]], dict | None, list]:
    """Every measurement: the rows, the PreciseBN result and all Measurements (for Compare)."""
    rows: dict[str, dict[str, Any]] = {}
    measurements: list[benchmark.Measurement] = []
    with single_process_group(any(v.name == "syncbn" for v in variants)) as sync_note:
        for i, v in enumerate(variants, 1):
            row: dict[str, Any] = {"variant": v.label, "name": v.name, "options": v.options,
                                   "layers": [], "step": None, "first_step": None,
                                   "notes": [n for n in (NOTES.get(v.name), REFERENCES.get(v.name))
                                             if n]}
            if v.name == "syncbn" and sync_note:
                row["notes"].append(sync_note)
            rows[v.label] = row
            warmup = args.warmup
            if v.name in ("cbn", "naive_cbn"):
                warmup = max(warmup, int(v.options.get("window", 4)) + 1)
            if not args.no_layer and v.name not in REFERENCES:  # references: step only
                for shape in args.layer_shape:
                    log(f"[{i}/{len(variants)}] {v.label}: layer {_shape_text(shape)}")
                    result = _measure(partial(layer_cases, v, shape, device, args.seed),
                                      "layer forward+backward", _shape_text(shape), v, args,
                                      device, measurements, warmup)
                    row["layers"].append({"shape": list(shape), **result})
            if not args.no_model:
                log(f"[{i}/{len(variants)}] {v.label}: {args.model_arch} training step")
                row["step"] = _measure(partial(model_cases, v, args, device, args.seed),
                                       "training step", _model_text(args), v, args, device,
                                       measurements, warmup)
                if row["step"].get("finite_loss") is False:
                    row["notes"].append("non-finite loss in the step")
    if not args.no_first_step:
        measure_first_steps(variants, args, device, rows, measurements, log)
    precise = None
    if not args.no_precise:
        log(f"PreciseBN: N={args.precise_samples}, B={args.precise_batch}")
        try:
            precise = measure_precise(args, device, measurements)
        except Exception as err:
            precise = {"error": _error(err), "traceback": traceback.format_exc()}
            log(f"    {precise['error']}")
    compare_devices(rows, args.model_batch)
    for row in rows.values():
        states = {f"{part}: {r['state']}"
                  for part, results in (("layer", row["layers"]), ("step", [row["step"] or {}]))
                  for r in results if r.get("state")}
        row["notes"].extend(sorted(states))
    return list(rows.values()), precise, measurements


def compare_devices(rows: dict[str, dict[str, Any]], batch: int) -> None:
    """Each step row of a per-device variant with ``nbs`` (``batch / nbs`` simulated devices)
    gets ``vs_one_device``: its ratio to the baseline over the ratio of the row with the same
    options but ``nbs`` (one device), and a note saying so. Rows without both steps: nothing."""
    from bnbench.plan import PER_DEVICE

    for row in rows.values():
        options = dict(row["options"])
        nbs = options.pop("nbs", None)
        one = next((r for r in rows.values() if r["name"] == row["name"]
                    and r["options"] == options), None)
        if nbs is None or row["name"] not in (*PER_DEVICE, "cbn_floor") or one is None:
            continue
        step, one_step = row["step"] or {}, one["step"] or {}
        if "ratio" not in step or "ratio" not in one_step:
            continue
        step["vs_one_device"] = step["ratio"] / one_step["ratio"]
        row["notes"].append(f"step {step['vs_one_device']:.2f}× {one['variant']} ({batch // nbs} "
                            f"devices of {nbs} vs one of {batch})")


# -- reporting ----------------------------------------------------------------------------------
def _cell(result: dict[str, Any] | None, key: str = "ratio") -> str:
    if not result:
        return "–"
    if "error" in result:
        return "error"
    value = result.get(key)
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.2f}" + (" †" if key == "ratio" and result.get("noisy") else "")


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The ratios to ``nn.BatchNorm2d`` (time, then memory), one row per variant."""
    shapes = [] if args.no_layer else args.layer_shape
    head = ["variant", *(f"layer {_shape_text(s)}" for s in shapes)]
    head += [] if args.no_model else ["step"]
    head += [] if args.no_first_step else ["first step (fresh process)", "start → first step"]
    head += ["layer mem"] if shapes else []
    head += [] if args.no_model else ["step mem"]
    head += ["notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        layers = row["layers"] or [{}] * len(shapes)  # references: step only
        first = row["first_step"] or {}
        cells = [row["variant"], *(_cell(r) for r in layers)]
        cells += [] if args.no_model else [_cell(row["step"])]
        if not args.no_first_step:
            cells += ([_cell(first)] * 2 if "error" in first else
                      [_cell(first.get("first_step")), _cell(first.get("process"))])
        cells += [" / ".join(_cell(r, "mem_ratio") for r in layers)] if shapes else []
        cells += [] if args.no_model else [_cell(row["step"], "mem_ratio")]
        errors = [r["error"] for r in [*row["layers"], row["step"] or {}, first] if "error" in r]
        notes = [*row["notes"], *(f"error: {e}" for e in dict.fromkeys(errors))]
        cells.append("; ".join(notes))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _git() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty.strip() else "")) if head else "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """``torch.utils.collect_env``'s report, plus what it lacks: git, date, threads, load."""
    from torch.utils import collect_env

    info = collect_env.get_env_info()
    cpu = {k.strip(): v.strip() for k, _, v in
           (line.partition(":") for line in (info.cpu_info or "").splitlines())}
    env: dict[str, Any] = {
        "git": _git(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": cpu.get("Architecture", "unknown"),
        "cpu": f"{cpu.get('Model name', 'unknown')} ({cpu.get('CPU(s)', '?')} CPUs)",
        "collect_env": info._asdict(),
        "pretty": collect_env.pretty_str(info),
    }
    with contextlib.suppress(OSError, AttributeError):
        env["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    return env


def report(rows: list[dict[str, Any]], precise: dict[str, Any] | None,
           measurements: list, args: argparse.Namespace, command: str, env: dict[str, Any],
           elapsed: float) -> str:
    dev = env["device"].split(":")[0]
    load = "".join(f"; load average at {k} {env['load_avg_' + k]}" for k in ("start", "end")
                   if "load_avg_" + k in env)
    model = (f"{args.model_arch}, width {args.model_width:g}, {args.stem} stem, batch "
             f"{args.model_batch}, {args.image_size}×{args.image_size} px, {args.num_classes} "
             "classes, SGD(lr 0.01, momentum 0.9, wd 5e-4), cross-entropy")
    lines = [
        f"$ {command}",
        "",
        f"- git {env['git']}; {env['date']}; machine {env['machine']}, CPU {env['cpu']}; "
        f"device {env['device']}; torch threads {env['threads']}{load}",
        f"- time: torch.utils.benchmark, {args.repeats} interleaved blocked_autorange calls "
        f"per side (min_run_time {args.min_time:g} s) merged; ratio = variant median / "
        f"{BASELINE} median; † = a side's IQR is large for its median (torch's warning); "
        f"first step: {args.first_step_repeats} fresh processes per side",
        f"- memory ({dev}): {MEMORY_MEANING[dev]}",
        f"- model: {model}",
        f"- run took {elapsed:.0f} s",
        "",
        f"## Ratios to {BASELINE}",
        "",
        table(rows, args),
    ]
    if precise is not None:
        lines += ["", f"## PreciseBN (N = {args.precise_samples}, B = {args.precise_batch}) vs "
                  "no-grad eval forward over the same batches", ""]
        lines += ([f"error: {precise['error']}"] if "error" in precise else
                  [f"ratio {_cell(precise)} ({precise['base_ms']:.4g} ms → "
                   f"{precise['var_ms']:.4g} ms)"])
    compare = benchmark.Compare(measurements)
    compare.trim_significant_figures()
    compare.highlight_warnings()
    lines += ["", "## Medians (torch.utils.benchmark.Compare)", "", "```", str(compare).strip(),
              "```", "", "## Environment (torch.utils.collect_env)", "", "```",
              env["pretty"].strip(), "```", ""]
    return "\n".join(lines)


# -- entry point --------------------------------------------------------------------------------
def _warn_if_loaded(threads: int) -> None:
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return
    cores = os.cpu_count() or 1
    if load > cores - 0.5:
        _log(f"bnbench bench: warning: load average {load:.1f} on {cores} cores: timings will "
             "be noisy" + (" (try --threads 1)" if threads > 1 else ""))


def _fail(message: str) -> int:
    print(f"bnbench: error: {message}", file=sys.stderr, flush=True)
    return 2


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``null`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _resolve(build_parser().parse_args(argv))
        variants = parse_variants(args.variants)
        from bnbench.distributed import device_for

        device = device_for(args.device)
        paths = [(Path(args.json), "json")] if args.json else []  # (path, what it gets)
        if args.out:
            prefix = Path(args.out)
            prefix = prefix.with_suffix("") if prefix.suffix in (".md", ".json") else prefix
            paths += [(prefix.with_name(prefix.name + ".md"), "md"),
                      (prefix.with_name(prefix.name + ".json"), "json")]
        for path, _ in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
    except _ArgError as err:
        return _fail(str(err))
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    except BnbenchError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"{err.filename}: {err.strerror or err}")

    command = "bnbench bench" + (" " + shlex.join(argv) if argv else "")
    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        _warn_if_loaded(torch.get_num_threads())
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            rows, precise, measurements = run_bench(args, variants, device)
        env = environment(device)
        if load_start:
            env["load_avg_start"] = load_start
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - start
    text = report(rows, precise, measurements, args, command, env, elapsed)
    print(text)
    payload = _clean({"command": command, "argv": argv, "environment": env,
                      "settings": vars(args), "memory": MEMORY_MEANING[device.type],
                      "elapsed_s": elapsed, "rows": rows, "precise": precise})
    for path, what in paths:
        try:
            path.write_text(text if what == "md" else
                            json.dumps(payload, indent=1, allow_nan=False) + "\n")
        except OSError as err:
            return _fail(f"{path}: {err.strerror or err}")
    failed = [r["variant"] for r in rows
              if any("error" in m for m in [*r["layers"], r["step"] or {}, r["first_step"] or {}])]
    failed += ["PreciseBN"] if precise and "error" in precise else []
    if failed:
        _log(f"bnbench bench: {len(failed)} measurement(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


__all__ = ["main", "build_parser", "time_pair", "ratio", "compare_memory", "saved_bytes", "Case"]
