"""The passes over the activations of BN with per-group statistics, eager or fused.

GhostBN, Batch Renormalization and Cross-Iteration BN normalize ``x`` viewed as ``(G, n, C, L)``
(``G`` groups of ``n`` samples, ``L = H·W``) with per-``(g, c)`` constants. They share three
functions, written once in plain tensor ops:

* :func:`moments` — mean and biased variance over ``(n, L)``, two passes (``Σ (x − μ)²`` on the
  centered tensor, so nothing cancels when ``|μ| ≫ σ``);
* :func:`forward` — the moments, a variant's :class:`Normalization` of them (BN: themselves;
  BRN's r/d; CBN's window), ``y = γ (r x̂ + d) + β`` and, in a training step with equal
  groups, the population EMA (:class:`Ema`, in place on the layer's buffers; a GhostBN remainder
  group, SyncBN and domain layers update eagerly with ``base.update_population``);
* :func:`backward` — BN's training backward per group with weight ``γ r`` and an effective count
  ``count·M`` per ``(g, c)``: ``∂x = γ r s (∂y − (Σ∂y + x̂ Σ(∂y x̂)) / (count·M))``.

``kernel="eager"`` runs them as PyTorch ops (several passes each, and a temporary per op);
``"compiled"`` runs them through ``torch.compile`` (Inductor fuses each into one or two loops over
the data; on the 2-core CPU here the fused forward+backward passes took 2–5× less time than
``torch.nn.BatchNorm2d``'s CPU kernels on 0.5–16 MB activations, plus 20–30 µs of wrapper
code per call (:class:`Precompiled` calls the compiled code without ``torch.compile``'s frame
hook), after a one-off compile of a few seconds per process, cached on disk by PyTorch; the
functions are compiled with dynamic shapes and Parameters passed detached, so one compile serves
all layer sizes up to a few specializations); ``"auto"`` (default)
is ``"compiled"`` where ``torch.compile`` works on the device (probed once; a warning and eager
otherwise) and eager inside a model that is itself being compiled. Both run the same code, so
they agree to rounding (tested).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from bnbench.errors import BnbenchError

KERNELS = ("auto", "compiled", "eager")


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise BnbenchError(f"norm.kernel={kernel}: choose one of {', '.join(KERNELS)}")
    return kernel


def _sum_nl(t: Tensor) -> Tensor:
    """``Σ`` over dims 1 and 3 (``n``, ``L``) of a ``(G, n, C, L)`` tensor → ``(G, 1, C, 1)``.

    Two single-dim reductions (eager: one over two non-adjacent dims is several times slower on
    CPU); with short rows (``L < 64``) the ``n`` rows are summed first, which leaves an
    ``n``-times smaller short-row reduction; with long rows the contiguous row sums go first.
    Traced by ``torch.compile``: one reduction (fused anyway, and no guard on ``L``).
    """
    if torch.compiler.is_compiling():  # Inductor fuses either way; no shape guard
        return t.sum(dim=(1, 3), keepdim=True)
    if t.shape[3] < 64:
        return t.sum(dim=1, keepdim=True).sum(dim=3, keepdim=True)
    return t.sum(dim=3, keepdim=True).sum(dim=1, keepdim=True)


class Normalization(NamedTuple):
    """How a variant normalizes, per ``(g, c)`` (tensors ``(G, 1, C, 1)``; constants for autograd):

        y = γ (r (x − center) / sqrt(var + ε) + d) + β,

    with ``r = gain``, ``d = offset`` (Batch Renormalization; ``None``: 1 and 0), and statistics
    that pool ``count`` times the batch's elements (Cross-Iteration BN's window: the gradient of
    ``center`` and ``var`` w.r.t. ``x`` is ``1/count`` of BN's; ``None``: 1).
    """

    center: Tensor
    var: Tensor
    gain: Tensor | None = None
    offset: Tensor | None = None
    count: Tensor | None = None


class Ema(NamedTuple):
    """A training step's update of the population statistics (buffers, updated in place):

    * ``rule="var"`` (BN): ``μ ← (1 − m) μ + m μ_B``, ``σ² ← (1 − m) σ² + m σ²_B·M/(M − 1)``
      (PyTorch's EMA of the unbiased variance; ``m`` = ``momentum``, the paper's λ = 1 − m;
      groups of unequal size: count-weighted means of the groups' terms);
    * ``rule="std"`` (Batch Renormalization, Algorithm 1): the same on ``μ`` and on
      ``σ = sqrt(σ² + ε)``, stored as ``σ² − ε``;

    and ``tracked`` (``num_batches_tracked``) += 1. In fp16/bf16 buffers the fused and eager
    updates may differ by an ulp of the buffer (Inductor rounds once).
    """

    running_mean: Tensor
    running_var: Tensor
    tracked: Tensor
    momentum: float
    rule: str = "var"


def ema_step(ema: Ema, mean: Tensor, var: Tensor, unbiased: Tensor, eps: float) -> None:
    """One :class:`Ema` step from the batch mean, biased and unbiased variance ``(C,)``."""
    rm, rv = ema.running_mean, ema.running_var
    rm.lerp_(mean.to(rm.dtype), ema.momentum)
    if ema.rule == "var":
        rv.lerp_(unbiased.to(rv.dtype), ema.momentum)
    else:
        sigma = torch.lerp((rv.to(var.dtype) + eps).sqrt(), (var + eps).sqrt(), ema.momentum)
        rv.copy_((sigma * sigma - eps).clamp_min(0))
    ema.tracked.add_(1)


#: ``transform(mean, var, eps, *args) -> Normalization`` from the batch statistics: a
#: module-level function (it runs inside the fused forward), its arguments tensors or Python
#: constants (specialized by :class:`Precompiled`: one graph per value; anything that changes
#: per step must be a tensor, e.g. BRN's schedule); it may update
#: state arguments in place once it has read them (CBN's ring: :func:`bnbench.norm.cbn.record`),
#: and nothing it returns may be such a state tensor.
Transform = Callable[..., Normalization]


def moments(xv: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(g, c) mean and biased variance ``(G, 1, C, 1)`` of ``xv`` over ``(n, L)``."""
    inv_m = 1.0 / (xv.shape[1] * xv.shape[3])
    mean = _sum_nl(xv) * inv_m
    d = xv - mean
    return mean, _sum_nl(d * d) * inv_m


def _channels(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.view(1, 1, -1, 1)


def forward(xv: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
            ema: Ema | None, transform: Transform | None, *args: Tensor):
    """``y = (x − center)·a + b`` (centered first: exact when ``|μ| ≫ σ``) with the
    :class:`Normalization` of the batch statistics, then the ``ema`` step from the groups'
    average statistics (after ``transform``: BRN reads the EMA before this batch's update).
    Returns ``y``, the biased statistics and what :func:`backward` needs."""
    mean, var = moments(xv)
    norm = transform(mean, var, eps, *args) if transform is not None else Normalization(mean, var)
    m = xv.shape[1] * xv.shape[3]
    if ema is not None:  # equal groups: the EMA of their plain averages
        mean_b, var_b = mean.mean(0).view(-1), var.mean(0).view(-1)
        ema_step(ema, mean_b, var_b, var_b * (m / max(m - 1, 1)), eps)
    invstd = torch.rsqrt(norm.var + eps)
    scale = invstd if norm.gain is None else invstd * norm.gain
    shift = torch.zeros_like(scale)
    if norm.offset is not None:
        shift = norm.offset if weight is None else norm.offset * _channels(weight)
    if bias is not None:
        shift = shift + _channels(bias)
    if weight is not None:
        scale = scale * _channels(weight)
    y = (xv - norm.center).mul_(scale).add_(shift)  # in place: one temporary when eager
    inv_m = 1.0 / (m if norm.count is None else norm.count * m) * torch.ones_like(invstd)
    return y, mean, var, norm.center, invstd, norm.gain, norm.offset, inv_m


def backward(grad: Tensor, xv: Tensor, weight: Tensor | None, center: Tensor, invstd: Tensor,
             gain: Tensor | None, offset: Tensor | None, inv_m: Tensor):
    """``(∂x, ∂γ, ∂β)``: with ``x̂ = (x − center)·invstd`` and ``a = γ r invstd``,
    ``∂x = a (∂y − inv_m (Σ∂y + x̂ Σ∂y x̂))``, ``∂γ = Σ_g (r Σ∂y x̂ + d Σ∂y)``, ``∂β = Σ_g Σ∂y``
    (sums per ``(g, c)`` over ``(n, L)``)."""
    xhat = (xv - center) * invstd
    sum_g = _sum_nl(grad)
    sum_gx = _sum_nl(grad * xhat)
    a = invstd if gain is None else invstd * gain
    if weight is not None:
        a = a * _channels(weight)
    grad_x = xhat.mul_(sum_gx).add_(sum_g).mul_(inv_m).neg_().add_(grad).mul_(a)  # in place
    grad_w = sum_gx if gain is None else sum_gx * gain
    if offset is not None:
        grad_w = grad_w + offset * sum_g
    return grad_x, grad_w.sum(dim=0).view(-1), sum_g.sum(dim=0).view(-1)


@dataclass(frozen=True)
class Kernels:
    name: str
    moments: Callable[[Tensor], tuple[Tensor, Tensor]]
    forward: Callable[..., tuple]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


EAGER = Kernels("eager", moments, forward, backward)


class Precompiled:
    """``torch.compile(fn, dynamic=True)``, called without its per-call frame hook once compiled.

    The first call of each kind goes through ``torch.compile`` (Dynamo traces, guards and
    compiles; Inductor's caches apply), with Python floats specialized (ε, the EMA momentum,
    CBN's ρ: constants of a layer, one graph per value; as dynamic graph inputs each cost a
    tensor conversion and a kernel argument per call: ~25 µs per GhostBN step measured on the
    tiny bench layer). Later calls check the guards of the entry that last served their
    argument count and first shape (:func:`_hint`), then of the others (Dynamo's guard
    managers, global state such as grad mode, autocast and dtype defaults included), and run
    that entry's compiled code (the function's transformed bytecode) directly; a call no entry
    accepts goes through ``torch.compile`` again. So a guard hit runs the code
    ``torch.compile`` would, with less Python around it: 15–25 µs less per call on the 2-core
    CPU here, most of a small layer's fixed cost (two calls per training step).

    Scope: ``fn`` takes positional parameters and ``*args`` only (no defaults, no closure;
    otherwise every call goes through ``torch.compile``), and the entries used are those of
    this wrapper's own recompile region (``isolate_recompiles``) without graph breaks.
    Calls go through ``torch.compile`` under a non-default ``torch.compiler.set_stance``,
    under FX or TorchScript tracing, and where PyTorch lacks recompile regions. Not
    supported: ``torch.compiler.set_enable_guard_collectives(True)`` (a direct call issues no
    guard collective). Dynamo's entries are read afresh on every call, never held
    (``torch._dynamo.reset()`` frees them; an invalidated one has no code); only their
    compiled code is kept, released when Dynamo drops the entry and at exit (before the
    interpreter tears down Dynamo's cleanup hooks of that code).
    """

    def __init__(self, fn: Callable, recompile_limit: int = 64) -> None:
        self.fn = fn
        self._names, self._star = _positional(fn)
        self._runs: dict[types.CodeType, Callable | None] = {}  # compiled code → function
        self._by_hint: dict[tuple, types.CodeType] = {}  # :func:`_hint` → code that served it
        self._dynamo_keys: set[tuple] = set()  # :func:`_key`\ s no entry is compiled for
        config = torch._dynamo.config
        self._floats = (functools.partial(config.patch, specialize_float=True)
                        if hasattr(config, "specialize_float") else contextlib.nullcontext)
        try:
            self.compiled = torch.compile(fn, dynamic=True, recompile_limit=recompile_limit,
                                          isolate_recompiles=True)
            self._region = self.compiled._isolate_recompiles_id
            self._eval_frame = torch._dynamo.eval_frame
            self._entries_of = torch._C._dynamo.eval_frame._get_cache_entries_for_region
            self._jit_tracing = torch._C._is_tracing
            self._fx_tracing = torch.fx._symbolic_trace._get_is_fx_tracing
            self._direct = self._names is not None and self._eval_frame._stance is not None
        except (TypeError, AttributeError):  # older PyTorch: plain torch.compile calls
            limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, limit, max(getattr(config, limit), recompile_limit))  # raised only
            self.compiled = torch.compile(fn, dynamic=True)
            self._direct = False
        _LIVE.add(self)

    def __call__(self, *args):
        if not self._direct or self._wrapper_needed():
            return self._through_dynamo(*args)
        hint = _hint(args)
        last = self._by_hint.get(hint)
        # Dynamo's live entries, fetched on every call: an entry must not be held (reset()
        # frees them; an invalidated one has its code cleared and accepts anything).
        cache = self._entries_of(self.fn.__code__, self._region)
        f_locals = self._locals(args)
        code = _last_accepting(cache, last, f_locals) if last is not None else None
        if code is None:
            key = _key(args)
            if key in self._dynamo_keys:
                return self._through_dynamo(*args)
            code = self._accepting(cache, last, f_locals)
            if code is None:  # Dynamo decides (and compiles) as usual
                out = self._through_dynamo(*args)
                if not self._take_new_entries():  # e.g. past the recompile limit: Dynamo's
                    self._dynamo_keys.add(key)
                return out
            self._by_hint[hint] = code
        return self._runs[code](*args)

    def _accepting(self, cache: list, last: object, f_locals: dict) -> types.CodeType | None:
        """The compiled code of an entry other than ``last`` whose guards accept
        ``f_locals``."""
        for entry in cache:
            code = entry.code
            if (code is not None and code is not last and self._runs.get(code) is not None
                    and entry.guard_manager.check(f_locals)):
                return code
        return None

    def _take_new_entries(self) -> bool:
        """Make functions of the live entries' compiled code (none for code with graph
        breaks), forget those of dropped entries; whether any entry is new."""
        live = [e.code for e in self._entries_of(self.fn.__code__, self._region)
                if e.code is not None]
        new = [code for code in live if code not in self._runs]
        if len(live) - len(new) < len(self._runs):  # some were dropped
            self._runs = {code: run for code, run in self._runs.items() if code in live}
            self._by_hint.clear()
            self._dynamo_keys.clear()
        for code in new:
            self._runs[code] = (types.FunctionType(code, self.fn.__globals__, self.fn.__name__)
                                if _runs_whole(code) else None)
        return bool(new)

    def _wrapper_needed(self) -> bool:
        """Whether ``torch.compile``'s wrapper must run: a non-default stance (e.g.
        ``force_eager``), or FX or TorchScript tracing."""
        return (self._eval_frame._stance.stance != "default" or self._jit_tracing()
                or self._fx_tracing())

    def _through_dynamo(self, *args):
        with self._floats():
            return self.compiled(*args)

    def _locals(self, args: tuple) -> dict:
        """The frame locals the guards read: parameters by name (``*args``: one tuple)."""
        f_locals = dict(zip(self._names, args))
        if self._star is not None:
            f_locals[self._star] = args[len(self._names):]
        return f_locals

    def _release(self) -> None:
        self._runs, self._by_hint, self._dynamo_keys = {}, {}, set()


def _last_accepting(cache: list, last: types.CodeType, f_locals: dict) -> types.CodeType | None:
    """``last`` if its entry is live and its guards accept ``f_locals``."""
    for entry in cache:
        if entry.code is last:
            return last if entry.guard_manager.check(f_locals) else None
    return None


_LIVE: weakref.WeakSet[Precompiled] = weakref.WeakSet()


@atexit.register
def _release_all() -> None:
    for wrapper in list(_LIVE):
        wrapper._release()


def _positional(fn: Callable) -> tuple[tuple[str, ...] | None, str | None]:
    """``fn``'s positional parameter names and ``*args`` name; ``(None, None)`` if it has
    anything else (keyword-only or ``**`` parameters, defaults, a closure)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(fn).parameters.values())
    star = [p for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL]
    if (fn.__defaults__ or fn.__kwdefaults__ or fn.__closure__
            or any(p.kind not in kinds for p in params if p not in star)):
        return None, None
    return tuple(p.name for p in params if p not in star), star[0].name if star else None


def _runs_whole(code: types.CodeType) -> bool:
    """Compiled code that calls no resume function (no graph break: those would run eagerly
    outside ``torch.compile``'s frame hook)."""
    return not any(n.startswith("__resume_at_") for n in code.co_names)


_CONSTANTS = (bool, int, float, str, type(None), types.FunctionType)


def _hint(args: tuple) -> tuple:
    """Which entry probably serves ``args``, cheaply: their number and the first one's
    shape (the guards decide)."""
    first = args[0] if args else None
    return len(args), first.shape if isinstance(first, Tensor) else type(first)


def _key(args: tuple) -> tuple:
    """The arguments as far as the guards can tell them apart here, to remember those Dynamo
    serves itself: tensor shapes, plain constants and functions by value, any other object by
    type (a key holds no tensor or instance alive)."""
    return tuple(a.shape if isinstance(a, Tensor) else a if isinstance(a, _CONSTANTS) else type(a)
                 for a in args)


@functools.cache
def _compiled() -> Kernels:
    return Kernels("compiled", Precompiled(moments), Precompiled(forward), Precompiled(backward))


@functools.cache
def _compile_works(device_type: str) -> bool:
    """Probe ``torch.compile`` once per device type (a C++ compiler on CPU, Triton on CUDA)."""
    try:
        x = torch.arange(48.0, device=device_type).view(2, 2, 3, 4).sin()  # no RNG draws
        mean, var = _compiled().moments(x)
        ok = bool(torch.allclose(var, moments(x)[1], rtol=1e-4, atol=1e-6))
        if not ok:
            raise RuntimeError("compiled moments disagree with eager ones")
        return True
    except Exception as err:  # any failure: the eager kernels are always correct
        first = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"bnbench: torch.compile is not usable on {device_type} ({type(err).__name__}: "
            f"{first}); GhostBN/BRN/CBN use the slower eager kernels (norm.kernel=eager "
            "silences this)",
            stacklevel=2,
        )
        return False


def select(kernel: str, device: torch.device) -> Kernels:
    """The kernels for ``norm.kernel`` on ``device`` (see the module docstring)."""
    if kernel == "eager" or torch.compiler.is_compiling():
        return EAGER
    if kernel == "compiled" or _compile_works(device.type):
        return _compiled()
    return EAGER
