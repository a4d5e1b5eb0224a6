"""``bnbench bench``: cost of each normalization variant relative to ``torch.nn.BatchNorm2d``.

Two measurements per variant, both as ratios to the same measurement with plain
``torch.nn.BatchNorm2d`` in training mode, taken in one run:

* **layer**: forward + backward of the lone layer (``y = layer(x); y.backward(g)``, ``x`` a leaf
  that requires grad) on inputs of ``--layer-shape``. CBN layers need their conv: every layer is
  built as ``convert(nn.Sequential(conv, nn.BatchNorm2d(C)), name)`` and, for CBN, the conv runs
  (untimed, without grad) before each timed iteration so that the layer sees its conv's input;
  the baseline gets the same untimed conv call.
* **step**: one full training step of a ResNet (forward, cross-entropy, backward, SGD step with
  momentum) with the variant converted in, against the same model (same initialization) with
  ``nn.BatchNorm2d``.

Timing is robust to a noisy machine: baseline and variant alternate (A B, B A, A B, …, so linear
drift cancels), each timed segment runs enough iterations to last ``--min-time``, the garbage
collector is off while timing, and the reported ratio is the median over ``--repeats`` of the
per-segment ratios, with their interquartile range. On CUDA, segments are timed with CUDA
events around each iteration (untimed preparation between them excluded).

Memory: on CUDA, the peak allocation of one iteration above what was allocated before it
(``torch.cuda.max_memory_allocated`` delta: output, saved activations, gradients, workspaces).
On CPU (no allocator statistics), the bytes autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``; unique storages, parameters and buffers excluded)
plus the output: the activation memory the variant keeps alive between forward and backward.

Cost references (rows ``cbn_floor``, ``cbn_official_jac``; step only): the BN model plus only
the Jacobian work of an exact CBN — one weight-gradient convolution per conv (the least the
notes' method needs), or the official code's two ``torch.autograd.grad`` passes per conv — to
put CBN's step beside what its Jacobians alone cost.

Variant states are the interesting ones: BRN past its warm-up with r_max/d_max at their final
values (corrections active); CBN/naive CBN past burn-in with a full window; SyncBN with a real
single-process gloo group (the layer's group checks run; with one process it must cost no more
than BN); domain BN with two domains (domain 0).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbench.errors import BnbenchError

#: Default options per registry name (the configs' defaults where they exist).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "ghost": {"nbs": 4},
    "batch_eval": {"eval_nbs": 32},
    "cbn": {"window": 4, "burnin": 0},
    "naive_cbn": {"window": 4, "burnin": 0},
    "domain": {"num_domains": 2},
}
#: The default variant list (``name`` or ``name:key=value:…``), in table order.
DEFAULT_VARIANTS = ("bn", "ghost", "ghost:nbs=2", "ghost:kernel=eager", "syncbn", "frozen",
                    "batch_eval", "brn", "brn:kernel=eager", "gn", "ln", "in", "cbn",
                    "cbn:jacobian_dtype=bfloat16", "cbn:kernel=eager", "naive_cbn", "cbn_floor",
                    "cbn_official_jac", "domain")
#: The issue's targets: (measurement, largest ratio).
TARGETS: dict[str, tuple[str, float]] = {
    "ghost": ("layer", 1.2),
    "frozen": ("layer", 1.0),
    "syncbn": ("layer", 1.1),
    "brn": ("layer", 1.5),
    "cbn": ("step", 1.3),
}
#: Cost references for CBN (step only): the BN model plus the Jacobian work of an exact CBN
#: and nothing else (no statistics are changed: the rows time work, they are not layers).
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

FULL = {"layer_shapes": [(64, 64, 16, 16), (32, 256, 8, 8), (64, 128, 4, 4)], "model_width": 0.25,
        "model_batch": 64, "image_size": 16, "repeats": 21, "warmup": 5, "min_time": 0.03}
QUICK = {"layer_shapes": [(16, 16, 8, 8)], "model_width": 0.125, "model_batch": 16,
         "image_size": 8, "repeats": 5, "warmup": 2, "min_time": 0.003}


# -- command line -------------------------------------------------------------------------------
class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise _ArgError(message)

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, file=sys.stderr, end="")
        raise SystemExit(status)


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N,C,H,W (four positive integers)")
    return dims  # type: ignore[return-value]


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a positive {kind.__name__}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a non-negative integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bnbench bench",
        description="Forward+backward time and memory of each normalization variant relative to "
        "torch.nn.BatchNorm2d: as a lone layer and in a ResNet training step.",
        epilog="Exit status: 0 when every measurement ran, 1 when some failed (the table "
        "still shows the others), 2 for bad arguments.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=_positive(int), default=None,
                   help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--variants", default=None,
                   help="comma list of NAME or NAME:key=value[:key=value] (registry names; "
                   f"default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--layer-shape", type=_shape, action="append", default=None, metavar="N,C,H,W",
                   help="lone-layer input shape; repeat for several (default: 64,64,16,16, "
                   "32,256,8,8 and 64,128,4,4)")
    p.add_argument("--model-arch", default="resnet18", help="ResNet of the step (resnet18)")
    p.add_argument("--model-width", type=_positive(float), default=None,
                   help="width multiplier (default 0.25: the CPU-scale training run)")
    p.add_argument("--model-batch", type=_positive(int), default=None, help="default 64")
    p.add_argument("--image-size", type=_positive(int), default=None,
                   help="input resolution in pixels (default 16)")
    p.add_argument("--stem", choices=("small", "imagenet"), default="small",
                   help="small-input stem (3x3, no max-pool; default) or torchvision's")
    p.add_argument("--num-classes", type=_positive(int), default=15)
    p.add_argument("--repeats", type=_positive(int), default=None,
                   help="timed segment pairs per measurement (default 21)")
    p.add_argument("--warmup", type=_non_negative_int, default=None,
                   help="untimed iterations of each side first (default 5)")
    p.add_argument("--min-time", type=_positive(float), default=None,
                   help="seconds each timed segment lasts at least (default 0.03)")
    p.add_argument("--no-layer", action="store_true", help="skip the lone-layer measurements")
    p.add_argument("--no-model", action="store_true", help="skip the training-step measurements")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run (tiny shapes, few repeats)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="write PREFIX.md (table, command, environment) and PREFIX.json")
    return p


@dataclass
class Variant:
    """One row: a registry name and its options."""

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

    if text is None:  # the defaults that this checkout's registry has
        known = {*norm.NORMS, *REFERENCES}
        items = [v for v in DEFAULT_VARIANTS if v.split(":")[0] in known]
        missing = [v for v in DEFAULT_VARIANTS if v.split(":")[0] not in known]
        if missing:
            _log(f"bnbench bench: skipping {', '.join(missing)}: not in the registry")
    else:
        items = [s.strip() for s in text.split(",")]
    variants = []
    for item in items:
        if not item:
            raise BnbenchError(f"--variants {text!r}: empty variant name")
        name, *pairs = item.split(":")
        if name in REFERENCES and not pairs:
            variants.append(Variant(item, name, {}))
            continue
        if name in REFERENCES:
            raise BnbenchError(f"--variants: {item!r}: {name} takes no options")
        if name not in norm.NORMS:
            raise BnbenchError(f"--variants: unknown variant {name!r}; choose from "
                               f"{', '.join([*norm.NORMS, *REFERENCES])}")
        options = dict(DEFAULT_OPTIONS.get(name, {}))
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise BnbenchError(f"--variants: {item!r}: options are key=value")
            options[key] = _value(value)
        norm.check_options(name, options)  # unknown option → BnbenchError
        variants.append(Variant(item, name, options))
    return variants


# -- measurement primitives -------------------------------------------------------------------
@dataclass
class Case:
    """One side of a comparison: ``run()`` = ``finish(forward())``, after an untimed
    ``prepare()``; ``persistent`` are the tensors (parameters, buffers) memory excludes."""

    prepare: Callable[[], None]
    forward: Callable[[], Tensor]
    finish: Callable[[Tensor], None]
    persistent: list[Tensor] = field(default_factory=list)

    def run(self) -> None:
        self.finish(self.forward())

    def iteration(self) -> None:
        self.prepare()
        self.run()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_segment(case: Case, iters: int, device: torch.device) -> float:
    """Seconds spent in ``iters`` runs of ``case`` (preparation excluded)."""
    if device.type == "cuda":
        events = []
        for _ in range(iters):
            case.prepare()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            case.run()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return sum(s.elapsed_time(e) for s, e in events) / 1e3
    total = 0.0
    for _ in range(iters):
        case.prepare()
        t0 = time.perf_counter()
        case.run()
        total += time.perf_counter() - t0
    return total


@contextlib.contextmanager
def _gc_off() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def compare_time(base: Case, var: Case, *, repeats: int, warmup: int, min_time: float,
                 device: torch.device) -> dict[str, Any]:
    """Interleaved timing of ``var`` against ``base``: median ratio over ``repeats`` pairs."""
    for _ in range(warmup):
        base.iteration()
        var.iteration()
    _sync(device)
    with _gc_off():
        probe = min(time_segment(base, 1, device) for _ in range(3))
        iters = max(1, min(10_000, math.ceil(min_time / max(probe, 1e-7))))
        t_base, t_var = [], []
        for r in range(repeats):
            if r % 2 == 0:
                t_base.append(time_segment(base, iters, device))
                t_var.append(time_segment(var, iters, device))
            else:
                t_var.append(time_segment(var, iters, device))
                t_base.append(time_segment(base, iters, device))
    ratios = [v / b for v, b in zip(t_var, t_base)]
    q1, q3 = _quartiles(ratios)
    return {
        "ratio": statistics.median(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "ratio_of_min": min(t_var) / min(t_base),
        "base_ms": statistics.median(t_base) / iters * 1e3,
        "var_ms": statistics.median(t_var) / iters * 1e3,
        "iters": iters,
        "repeats": repeats,
        "ratios": ratios,
    }


def saved_bytes(case: Case) -> int:
    """Bytes of the unique storages autograd saves in ``case``'s forward, plus its output's,
    leaving out the storages of ``case.persistent`` (parameters and buffers)."""
    exclude = {t.untyped_storage().data_ptr() for t in case.persistent}
    storages: dict[int, int] = {}

    def note(t: Tensor) -> None:
        if not isinstance(t, Tensor) or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in exclude:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())

    def pack(t: Tensor) -> Tensor:
        note(t)
        return t

    case.prepare()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
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
    case.run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def compare_memory(base: Case, var: Case, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    b, v = saved_bytes(base), saved_bytes(var)
    out.update(saved_base=b, saved_var=v)
    if device.type == "cuda":
        pb, pv = peak_bytes(base, device), peak_bytes(var, device)
        out.update(peak_base=pb, peak_var=pv)
        b, v = pb, pv
    out["mem_base"], out["mem_var"] = b, v
    out["mem_ratio"] = v / b if b else float("nan")
    return out


# -- variant setup ------------------------------------------------------------------------------
def _brn_layers(module: nn.Module) -> list[nn.Module]:
    from bnbench.norm.brn import BatchRenorm2d

    return [m for m in module.modules() if isinstance(m, BatchRenorm2d)]


def _cbn_layers(module: nn.Module) -> list[nn.Module]:
    try:
        from bnbench.norm.cbn import CrossIterationBatchNorm2d
    except ImportError:  # CBN not in this checkout: no layer is one
        return []
    return [m for m in module.modules() if isinstance(m, CrossIterationBatchNorm2d)]


def prime(module: nn.Module) -> None:
    """Put stateful variants where their extra work is active: BRN past its schedules."""
    for m in _brn_layers(module):
        end = max(m.warmup_iters, m.rmax_iters, m.dmax_iters) * m.schedule_scale
        m.num_batches_tracked.fill_(int(math.ceil(end)) + 1)


def state_note(module: nn.Module) -> str:
    """What state the variant's layers were measured in (checked after the measurement)."""
    notes = []
    brn = _brn_layers(module)
    if brn:
        limits = {m.limits() for m in brn}
        notes.append("r_max,d_max=" + ";".join(f"{r:g},{d:g}" for r, d in sorted(limits)))
    cbn = _cbn_layers(module)
    if cbn:
        full = sum(m.history_length() == m.window - 1 for m in cbn)
        notes.append(f"window full in {full}/{len(cbn)} layers")
    return ", ".join(notes)


def convert_variant(module: nn.Module, variant: Variant) -> nn.Module:
    from bnbench import norm

    if variant.name in REFERENCES:
        return with_jacobian_work(module, variant.name)
    return norm.convert(module, variant.name, **variant.options)


def with_jacobian_work(model: nn.Module, kind: str) -> nn.Module:
    """``model`` (BN) with the Jacobian work of a CBN layer after every conv, results unused:
    ``"cbn_floor"`` one weight-gradient conv for ``∂y = y`` (the cost of ``∂σ²/∂W``),
    ``"cbn_official_jac"`` the official code's ``torch.autograd.grad`` of the per-channel
    ``μ = E[y]`` and ``ν = E[y²]`` w.r.t. the conv weight (``grad_outputs`` = ones)."""
    from torch.nn.grad import conv2d_weight

    from bnbench.norm.cbn import padded_input

    def floor(conv: nn.Conv2d, args: tuple, y: Tensor) -> None:
        x, padding = padded_input(conv, args[0])
        with torch.no_grad():
            conv2d_weight(x, conv.weight.shape, y, conv.stride, padding, conv.dilation,
                          conv.groups)

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


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm))


def _persistent(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def layer_cases(variant: Variant, shape: tuple[int, int, int, int], device: torch.device,
                seed: int) -> tuple[Case, Case, nn.Module]:
    """Baseline and variant lone-layer cases on the same input (a conv+norm pair each)."""
    n, c, h, w = shape
    torch.manual_seed(seed)
    pair = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)).to(device)
    base_pair = pair.train()
    var_pair = convert_variant(copy.deepcopy(pair), variant).to(device).train()
    prime(var_pair)
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    conv_in = torch.randn(shape, device=device)
    needs_conv = bool(_cbn_layers(var_pair))

    def case(p: nn.Sequential) -> Case:
        conv, layer = p[0], p[1]
        params = list(layer.parameters())

        def prepare() -> None:
            x.grad = None
            for q in params:
                q.grad = None
            if needs_conv:
                with torch.no_grad():
                    conv(conv_in)  # CBN's paired conv records its input

        return Case(prepare, lambda: layer(x), lambda y: y.backward(grad), _persistent(p))

    return case(base_pair), case(var_pair), var_pair


def model_cases(variant: Variant, args: argparse.Namespace, device: torch.device,
                seed: int) -> tuple[Case, Case, nn.Module, Callable[[], bool]]:
    """Baseline and variant training steps of the same ResNet (same init, same batch)."""
    from bnbench.models.resnet import resnet

    torch.manual_seed(seed)
    base = resnet(args.model_arch, args.num_classes, width=args.model_width,
                  small_input=args.stem == "small").to(device)
    x = torch.randn(args.model_batch, 3, args.image_size, args.image_size, device=device)
    target = torch.randint(0, args.num_classes, (args.model_batch,), device=device)
    with torch.no_grad():  # population statistics of this batch (FrozenBN/BRN see sane ones)
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
        base.train()(x)
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
                m.num_batches_tracked.zero_()
    var_model = convert_variant(copy.deepcopy(base), variant).to(device).train()
    prime(var_model)
    converted = sum(type(m) is not nn.BatchNorm2d for m in var_model.modules() if _is_norm(m))
    if (variant.name not in REFERENCES
            and converted != sum(isinstance(m, nn.BatchNorm2d) for m in base.modules())):
        raise BnbenchError(f"{variant.label}: convert left plain nn.BatchNorm2d layers")
    losses: dict[int, Tensor] = {}

    def case(model: nn.Module) -> Case:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def forward() -> Tensor:
            return F.cross_entropy(model(x), target)

        def finish(loss: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[id(model)] = loss.detach()

        return Case(lambda: None, forward, finish, _persistent(model))

    def finite() -> bool:
        return all(bool(torch.isfinite(v)) for v in losses.values())

    return case(base), case(var_model), var_model, finite


# -- single-process SyncBN ----------------------------------------------------------------------
@contextlib.contextmanager
def single_process_group(wanted: bool) -> Iterator[str]:
    """A one-process gloo group for SyncBN rows (when none exists); yields a note."""
    import torch.distributed as dist

    if not wanted:
        yield ""
        return
    if not dist.is_available():
        yield "torch.distributed unavailable: syncbn ≡ bn (no group)"
        return
    if dist.is_initialized():
        yield f"existing group, world size {dist.get_world_size()}"
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield "WORLD_SIZE>1 without a group"
        return
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    except Exception as err:  # no gloo: measure the group-less layer instead
        yield f"no process group ({type(err).__name__}): syncbn ≡ bn"
        return
    try:
        yield "1-process gloo group"
    finally:
        dist.destroy_process_group()


# -- the run ------------------------------------------------------------------------------------
def _error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:120]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_bench(args: argparse.Namespace, variants: list[Variant], device: torch.device,
              log: Callable[[str], None] = _log) -> list[dict[str, Any]]:
    rows = []
    wants_sync = any(v.name == "syncbn" for v in variants)
    with single_process_group(wants_sync) as sync_note:
        for i, variant in enumerate(variants, 1):
            torch._dynamo.reset()  # each variant compiles its fused kernels afresh (in warmup)
            row: dict[str, Any] = {"variant": variant.label, "name": variant.name,
                                   "options": variant.options, "layers": [], "step": None,
                                   "notes": []}
            if variant.name in NOTES:
                row["notes"].append(NOTES[variant.name])
            if variant.name in REFERENCES:
                row["notes"].append(REFERENCES[variant.name]
                                    + ("; not run: step only, --no-model" if args.no_model else ""))
            if variant.name == "syncbn" and sync_note:
                row["notes"].append(sync_note)
            warmup = args.warmup
            if variant.name in ("cbn", "naive_cbn"):
                warmup = max(warmup, int(variant.options.get("window", 4)) + 1)
            if not args.no_layer and variant.name not in REFERENCES:  # references: step only
                for shape in args.layer_shape:
                    log(f"[{i}/{len(variants)}] {variant.label}: layer {_shape_text(shape)}")
                    result: dict[str, Any] = {"shape": list(shape)}
                    try:
                        base, var, module = layer_cases(variant, shape, device, args.seed)
                        result.update(compare_time(base, var, repeats=args.repeats,
                                                   warmup=warmup, min_time=args.min_time,
                                                   device=device))
                        result.update(compare_memory(base, var, device))
                        result["state"] = _prefixed("layer", state_note(module))
                    except Exception as err:
                        result["error"] = _error(err)
                        result["traceback"] = traceback.format_exc()
                        log(f"    {result['error']}")
                    row["layers"].append(result)
            if not args.no_model:
                log(f"[{i}/{len(variants)}] {variant.label}: {args.model_arch} training step")
                step: dict[str, Any] = {}
                try:
                    base, var, model, finite = model_cases(variant, args, device, args.seed)
                    step.update(compare_time(base, var, repeats=args.repeats, warmup=warmup,
                                             min_time=args.min_time, device=device))
                    step.update(compare_memory(base, var, device))
                    step["state"] = _prefixed("step", state_note(model))
                    step["finite_loss"] = finite()
                    if not step["finite_loss"]:
                        row["notes"].append("non-finite loss in the step")
                except Exception as err:
                    step["error"] = _error(err)
                    step["traceback"] = traceback.format_exc()
                    log(f"    {step['error']}")
                row["step"] = step
            states = {r.get("state") for r in [*row["layers"], row["step"] or {}]} - {None, ""}
            row["notes"].extend(sorted(states))
            row["target"], row["meets"] = judge(variant.name, row)
            rows.append(row)
    return rows


def _prefixed(part: str, note: str) -> str:
    return f"{part}: {note}" if note else ""


def judge(name: str, row: dict[str, Any]) -> tuple[str, str]:
    """Target text and verdict: ``yes``/``no`` by the median ratio, ``~yes``/``~no`` when the
    interquartile range straddles the target (within noise), ``n/a`` when not measured."""
    if name not in TARGETS:
        return "", ""
    kind, limit = TARGETS[name]
    results = row["layers"] if kind == "layer" else [row["step"] or {}]
    text = f"{kind} ≤ {limit:g}×"
    measured = [r for r in results if "ratio" in r]
    if not measured or len(measured) < len(results):
        return text, "n/a"
    worst = max(measured, key=lambda r: r["ratio"])
    verdict = "yes" if worst["ratio"] <= limit else "no"
    if worst["ratio_q1"] <= limit <= worst["ratio_q3"]:
        verdict = "~" + verdict
    return text, verdict


# -- reporting ----------------------------------------------------------------------------------
def _shape_text(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape)


def _ratio(result: dict[str, Any] | None, key: str = "ratio") -> str:
    if not result:
        return "–"
    if "error" in result:
        return "error"
    value = result.get(key)
    if value is None or not math.isfinite(value):
        return "–"
    if key == "ratio":
        return f"{value:.2f} ({result['ratio_q1']:.2f}–{result['ratio_q3']:.2f})"
    return f"{value:.2f}"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = ["variant"]
    if not args.no_layer:
        for shape in args.layer_shape:
            s = _shape_text(shape)
            head += [f"layer time {s}", f"layer mem {s}"]
    if not args.no_model:
        head += ["step time", "step mem"]
    head += ["target", "meets?", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [row["variant"]]
        if not args.no_layer:
            for result in row["layers"] or [{}] * len(args.layer_shape):  # [] : step only
                cells += [_ratio(result), _ratio(result, "mem_ratio")]
        if not args.no_model:
            cells += [_ratio(row["step"]), _ratio(row["step"], "mem_ratio")]
        errors = [r["error"] for r in [*row["layers"], row["step"] or {}] if "error" in r]
        notes = [*row["notes"], *(f"error: {e}" for e in dict.fromkeys(errors))]
        cells += [row["target"], row["meets"], "; ".join(notes)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def absolute_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = ["variant"]
    if not args.no_layer:
        head += [f"layer ms {_shape_text(s)} (bn → variant)" for s in args.layer_shape]
    if not args.no_model:
        head += ["step ms (bn → variant)"]
    head += [] if args.no_layer else ["layer MiB (bn → variant)"]
    head += [] if args.no_model else ["step MiB (bn → variant)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def ms(r: dict[str, Any] | None) -> str:
        if not r or "var_ms" not in r:
            return "–"
        return f"{r['base_ms']:.3g} → {r['var_ms']:.3g} (min ratio {r['ratio_of_min']:.2f})"

    def mib(r: dict[str, Any] | None) -> str:
        if not r or "mem_var" not in r:
            return "–"
        return f"{r['mem_base'] / 2**20:.3g} → {r['mem_var'] / 2**20:.3g}"

    for row in rows:
        cells = [row["variant"]]
        if not args.no_layer:
            cells += [ms(r) for r in row["layers"] or [{}] * len(args.layer_shape)]
        if not args.no_model:
            cells += [ms(row["step"])]
        if not args.no_layer:
            cells += [" / ".join(mib(r) for r in row["layers"]) or "–"]
        if not args.no_model:
            cells += [mib(row["step"])]
        lines.append("| " + " | ".join(cells) + " |")
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
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": _git(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):
        env["load_avg"] = [round(v, 2) for v in os.getloadavg()]
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


MEMORY_MEANING = {
    "cpu": "bytes autograd saves for backward (unique storages; parameters and buffers "
           "excluded) plus the output, per forward; transient temporaries are not seen "
           "(CPU has no allocator statistics)",
    "cuda": "peak CUDA allocation during one iteration (forward, backward, and for the step "
            "the SGD update) above what was allocated before it (torch.cuda.max_memory_allocated "
            "delta)",
}


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str,
           env: dict[str, Any], elapsed: float) -> str:
    dev = env["device"].split(":")[0]
    model = (f"{args.model_arch}, width {args.model_width:g}, {args.stem} stem, "
             f"batch {args.model_batch}, {args.image_size}×{args.image_size} px, "
             f"{args.num_classes} classes, SGD(lr 0.01, momentum 0.9, wd 5e-4), cross-entropy")
    load = f", load average {env['load_avg']}" if "load_avg" in env else ""
    lines = [
        f"$ {command}",
        "",
        "# Normalization cost relative to torch.nn.BatchNorm2d",
        "",
        f"- date: {env['date']}; git {env['git']}; torch {env['torch']}; python {env['python']}",
        f"- device: {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else "")
        + f"; CPU {env['cpu']} ({env['cpus']} cores); torch threads {env['threads']}{load}",
        f"- time: median over {args.repeats} interleaved segment pairs (≥ {args.min_time:g} s "
        "each) of variant/bn, (interquartile range); forward+backward of the lone layer "
        "(training mode, input requires grad); full training step for the model",
        f"- memory ({dev}): {MEMORY_MEANING[dev]}",
        *([] if args.no_model else [f"- model step: {model}"]),
        f"- run took {elapsed:.0f} s",
        "",
        table(rows, args),
        "",
        "Absolute medians per iteration, ms (min ratio: fastest variant segment over fastest "
        "bn segment, a cross-check of the median), and memory, MiB:",
        "",
        absolute_table(rows, args),
        "",
    ]
    return "\n".join(lines)


# -- entry point --------------------------------------------------------------------------------
def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = QUICK if args.quick else FULL
    if args.layer_shape is None:
        args.layer_shape = list(defaults["layer_shapes"])
    for key in ("model_width", "model_batch", "image_size", "repeats", "warmup", "min_time"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    return args


def _device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BnbenchError("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def _warn_if_loaded(threads: int) -> None:
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return
    cores = os.cpu_count() or 1
    if load > cores - 0.5:
        _log(f"bnbench bench: warning: load average {load:.1f} on {cores} cores: timings will "
             f"be noisy" + (" (and a pool of several threads stalls: try --threads 1)"
                            if threads > 1 else ""))


def _fail(message: str) -> int:
    print(f"bnbench bench: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _resolve(build_parser().parse_args(argv))
    except _ArgError as err:
        return _fail(str(err))
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    try:
        from bnbench.models.resnet import ARCHS

        if args.model_arch not in ARCHS:
            raise BnbenchError(f"--model-arch {args.model_arch}: choose one of "
                               f"{', '.join(ARCHS)}")
        if args.no_layer and args.no_model:
            raise BnbenchError("--no-layer and --no-model: nothing to measure")
        variants = parse_variants(args.variants)
        device = _device(args.device)
        out = Path(args.out) if args.out else None
        if out is not None and out.suffix in (".md", ".json"):  # a file name, not a prefix
            out = out.with_suffix("")
        if out is not None and not out.parent.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
    except BnbenchError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"--out {args.out}: {err.strerror or err}")

    command = "bnbench bench" + (" " + shlex.join(argv) if argv else "")
    threads_before = torch.get_num_threads()
    if args.threads is None and args.quick:
        args.threads = 1  # a smoke run must not fight other processes with a thread pool
    start = time.perf_counter()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        _warn_if_loaded(torch.get_num_threads())
        cuda = [torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            rows = run_bench(args, variants, device)
        env = environment(device)
    finally:
        torch.set_num_threads(threads_before)
    if args.threads:
        env["threads"] = args.threads
    elapsed = time.perf_counter() - start
    text = report(rows, args, command, env, elapsed)
    print(text)
    if out is not None:
        try:
            out.with_name(out.name + ".md").write_text(text)
            payload = {"command": command, "argv": argv, "environment": env,
                       "settings": {k: v for k, v in vars(args).items()},
                       "memory": MEMORY_MEANING[device.type], "elapsed_s": elapsed,
                       "rows": rows}
            out.with_name(out.name + ".json").write_text(
                json.dumps(_clean(payload), indent=1, allow_nan=False) + "\n")
        except OSError as err:
            return _fail(f"--out {args.out}: {err.strerror or err}")
    failed = [r["variant"] for r in rows
              if any("error" in m for m in [*r["layers"], r["step"] or {}])]
    if failed:
        _log(f"bnbench bench: {len(failed)} variant(s) failed to measure: {', '.join(failed)}")
    return 1 if failed else 0


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


__all__ = ["main", "build_parser", "compare_time", "compare_memory", "saved_bytes", "Case"]
