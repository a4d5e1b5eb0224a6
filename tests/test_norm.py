"""BN-family layers against torch.nn.functional, closed forms and separate per-group calls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnbench import norm as norms
from bnbench.errors import BnbenchError
from bnbench.norm.base import BatchNorm2d
from bnbench.norm.brn import BatchRenorm2d, ramp


def _affine(layer: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(
            torch.rand(layer.weight.shape, generator=g, dtype=layer.weight.dtype) + 0.5
        )
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=layer.bias.dtype))
    return layer


def _x(*shape: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * 2 + 1).requires_grad_()


def _grads(fn, x, layer):
    y = fn(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    return y, torch.autograd.grad(y, [x, layer.weight, layer.bias], gy)


def test_bn_matches_functional_forward_backward_and_ema():
    layer = _affine(BatchNorm2d(3, momentum=0.2).double())
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    x = _x(6, 3, 4, 5)
    y, grads = _grads(layer, x, layer)
    y_ref, grads_ref = _grads(
        lambda t: F.batch_norm(t, rm, rv, layer.weight, layer.bias, True, 0.2, layer.eps), x, layer
    )
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)


@pytest.mark.parametrize("n,nbs", [(8, 2), (8, 4), (9, 4), (6, 1)])
def test_ghost_equals_separate_bn_calls(n, nbs):
    """GhostBN with G groups ≡ G separate F.batch_norm calls (outputs, all gradients, EMA)."""
    hw = (3, 3)
    layer = _affine(BatchNorm2d(4, momentum=0.1, nbs=nbs).double())
    x = _x(n, 4, *hw)
    y, grads = _grads(layer, x, layer)

    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    means, vars_, counts = [], [], []

    def reference(t):
        outs = []
        for chunk in t.split(nbs):
            outs.append(
                F.batch_norm(chunk, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
            )
            c = chunk.detach()
            m = chunk.numel() // 4
            means.append(c.mean((0, 2, 3)))
            vars_.append(c.var((0, 2, 3), unbiased=True))
            counts.append(m)
        return torch.cat(outs)

    y_ref, grads_ref = _grads(reference, x, layer)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    w = torch.tensor(counts, dtype=torch.float64)
    k = len(w)
    w = w / w.sum()
    ema_mean = 0.9 * rm + 0.1 * (w[:, None] * torch.stack(means[:k])).sum(0)
    ema_var = 0.9 * rv + 0.1 * (w[:, None] * torch.stack(vars_[:k])).sum(0)
    torch.testing.assert_close(layer.running_mean, ema_mean)
    torch.testing.assert_close(layer.running_var, ema_var)


def test_ghost_gradcheck_and_gradgradcheck():
    """The grouped native call is differentiable twice (γ, β repeated per group)."""
    layer = _affine(BatchNorm2d(3, nbs=2).double())
    x = _x(7, 3, 2, 2)  # three groups of 2 and a remainder of 1 sample (4 values per channel)

    def f(t, w, b):
        return norms.base.ghost_batch_norm(t, None, None, w, b, 2, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, layer.weight, layer.bias))
    assert torch.autograd.gradgradcheck(f, (x, layer.weight, layer.bias))


@pytest.mark.parametrize("offset", [0.0, 30.0, 1000.0])
def test_float32_statistics_survive_large_means(offset):
    """Centered two-pass moments: a mean ≫ std must not destroy the variance in float32.

    (One-pass E[x²] − E[x]² in float32 is off by ~8% in the variance at offset 1000; what is
    left here is the rounding of x − μ in float32, ~1e-4 of σ.)
    """
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 8, 8, 8, generator=g, dtype=torch.float64) * 0.5 + offset).float()
    x64 = x.double()  # the reference sees exactly the same (rounded) input
    ref = torch.cat([F.batch_norm(c, None, None, training=True) for c in x64.split(4)])
    layer = BatchNorm2d(8, nbs=4)
    torch.testing.assert_close(layer(x).double(), ref, atol=5e-4, rtol=0)
    mean, var = norms.base.batch_moments(x)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=0, atol=1e-6 * (1 + offset))


def test_frozen_is_constant_affine_and_trains_affine():
    layer = _affine(BatchNorm2d(3, frozen=True).double())
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    x = _x(4, 3, 2, 2)
    layer.train()
    y = layer(x)
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    shift = layer.bias - layer.running_mean * scale
    torch.testing.assert_close(y, x * scale[:, None, None] + shift[:, None, None])
    y.sum().backward()
    assert layer.weight.grad is not None
    assert layer.num_batches_tracked.item() == 0  # no EMA update


def test_freeze_switch_keeps_eval_function():
    model = norms.convert(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        ),
        "bn",
    )
    x = torch.randn(8, 3, 8, 8)
    for _ in range(3):
        model.train()(x)
    before = model.eval()(x)
    for layer in norms.bn_layers(model):
        layer.frozen = True
    torch.testing.assert_close(model.eval()(x), before)
    torch.testing.assert_close(model.train()(x), before)  # training now uses population stats


def test_batch_stats_at_inference_uses_eval_nbs_groups():
    layer = _affine(BatchNorm2d(3, eval_stats="batch", eval_nbs=2).double()).eval()
    x = _x(6, 3, 2, 2)
    ref = torch.cat(
        [
            F.batch_norm(c, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
            for c in x.split(2)
        ]
    )
    torch.testing.assert_close(layer(x), ref)
    assert layer.num_batches_tracked.item() == 0


@pytest.mark.parametrize("ema", ["var", "std"])
def test_brn_identity_limits_equal_bn(ema):
    """r_max = 1, d_max = 0: BN's outputs and gradients (and with ``ema="var"`` its EMA)."""
    brn = _affine(BatchRenorm2d(3, rmax=1.0, dmax=0.0, warmup_iters=0, ema=ema).double())
    bn = _affine(BatchNorm2d(3).double())
    for seed in range(3):
        x = _x(5, 3, 3, 3, seed=seed)
        y1, g1 = _grads(brn, x, brn)
        y2, g2 = _grads(bn, x, bn)
        torch.testing.assert_close(y1, y2)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(brn.running_mean, bn.running_mean)
    if ema == "var":
        torch.testing.assert_close(brn.running_var, bn.running_var)


def test_brn_corrections_closed_form_forward_and_backward():
    """y = γ (r x̂ + d) + β with r, d clipped and detached; gradients by autograd of that."""
    brn = _affine(BatchRenorm2d(3, warmup_iters=0, rmax_iters=1, dmax_iters=1).double())
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        brn.running_var.copy_(torch.tensor([9.0, 0.1, 4.0]))
        brn.num_batches_tracked.fill_(10)
    rm, rv = brn.running_mean.clone(), brn.running_var.clone()
    x = _x(4, 3, 3, 3)

    def reference(t):
        mu, var = t.mean((0, 2, 3)), t.var((0, 2, 3), unbiased=False)
        sb, s = (var + brn.eps).sqrt(), (rv + brn.eps).sqrt()
        r = (sb / s).clamp(1 / 3, 3).detach()
        dd = ((mu - rm) / s).clamp(-5, 5).detach()
        xhat = (t - mu[:, None, None]) / sb[:, None, None]
        w, b = brn.weight[:, None, None], brn.bias[:, None, None]
        return w * (xhat * r[:, None, None] + dd[:, None, None]) + b, r, dd

    y, grads = _grads(brn, x, brn)
    (y_ref, grads_ref), (_, r, dd) = _grads(lambda t: reference(t)[0], x, brn), reference(x)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    assert (r != 1).all() and (dd != 0).all()  # both corrections active


def test_brn_schedule():
    def at(t, start=5000, end=40000):
        return float(ramp(torch.tensor(float(t), dtype=torch.float64), start, end, 3.0, 1.0))

    assert at(0) == 1.0 and at(5000) == 1.0
    assert at(22500) == pytest.approx(2.0)
    assert at(40000) == 3.0 and at(50000) == 3.0
    assert at(0, 0, 0) == 1.0 and at(1, 0, 0) == 3.0  # zero-length ramp: a step after start
    brn = BatchRenorm2d(2, schedule_scale=0.5)
    brn.num_batches_tracked.fill_(2500 + 8750)
    assert brn.limits() == pytest.approx((2.0, 5.0 * (22500 - 5000) / 20000))


def test_brn_during_warmup_equals_bn():
    """Before ``warmup_iters`` the limits are (1, 0): r = 1 and d = 0 exactly, so BRN is BN
    (outputs, gradients, EMA), without a host-side branch on the iteration count."""
    brn = _affine(BatchRenorm2d(3, warmup_iters=3, rmax_iters=10, dmax_iters=10,
                                ema="var").double())
    bn = _affine(BatchNorm2d(3).double())
    with torch.no_grad():
        for layer in (brn, bn):
            layer.running_mean.copy_(torch.tensor([5.0, -3.0, 0.0]))  # r, d far from 1, 0
            layer.running_var.copy_(torch.tensor([0.01, 100.0, 1.0]))
    for seed in range(4):  # iterations 0..3 ≤ warmup_iters
        assert brn.limits() == (1.0, 0.0)
        x = _x(5, 3, 3, 3, seed=seed)
        (y1, g1), (y2, g2) = _grads(brn, x, brn), _grads(bn, x, bn)
        torch.testing.assert_close(y1, y2)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(brn.running_mean, bn.running_mean)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    assert brn.limits() == pytest.approx((1 + 2 / 7, 5 / 7))  # one iteration past it


@pytest.mark.parametrize("name,groups", [("gn", 4), ("ln", 1), ("in", 8)])
def test_group_family_matches_functional(name, groups):
    opts = {"groups": 4} if name == "gn" else {}
    layer = _affine(norms.make(name, **opts)(8).double())
    x = _x(3, 8, 4, 4)
    y, grads = _grads(layer, x, layer)
    y_ref, grads_ref = _grads(
        lambda t: F.group_norm(t, groups, layer.weight, layer.bias, layer.eps), x, layer
    )
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    if name == "in":
        ref = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
        torch.testing.assert_close(y, ref)
    if name == "ln":
        ref = F.layer_norm(x, x.shape[1:], eps=layer.eps)
        torch.testing.assert_close(y, ref * layer.weight[:, None, None] + layer.bias[:, None, None])


def test_gn_default_groups():
    assert norms.make("gn")(64).num_groups == 32
    assert norms.make("gn")(16).num_groups == 16
    assert norms.make("gn")(24).num_groups == 24


def test_convert_keeps_state_and_types():
    from torchvision.models import resnet18

    model = resnet18(num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    model.train()(x)
    ref = model.eval()(x)
    norms.convert(model, "bn")
    assert all(type(m) is BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(model.eval()(x), ref)
    norms.convert(model, "frozen")
    torch.testing.assert_close(model.train()(x), ref, atol=1e-5, rtol=1e-5)
    norms.convert(model, "gn", groups=8)
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 20


def test_syncbn_single_process_is_bn():
    layer = _affine(norms.make("syncbn")(3).double())
    bn = _affine(BatchNorm2d(3).double())
    x = _x(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), bn(x))
    assert layer.process_group is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: norms.make("gn", groups=5)(16),
        lambda: norms.make("ghost", nbs=0)(4),
        lambda: norms.make("bn", momentum=1.5)(4),
        lambda: norms.make("bn", nbs_typo=3),
        lambda: norms.make("nope"),
        lambda: norms.make("bn", eval_stats="sometimes")(4),
        lambda: norms.make("batch_eval", eval_stats="population"),
        lambda: norms.make("brn", ema="mean")(4),
        lambda: norms.make("brn", nbs=3, warmup_iters=0)(4)(torch.randn(4, 4, 2, 2)),
        lambda: norms.make("brn", nbs=3, rmax=1.0, dmax=0.0, ema="var")(4)(torch.randn(4, 4, 2, 2)),
        lambda: BatchNorm2d(3)(torch.randn(1, 3, 1, 1)),
        lambda: BatchNorm2d(3, nbs=1)(torch.randn(4, 3, 1, 1)),
    ],
)
def test_bad_input_is_one_clear_error(call):
    with pytest.raises(BnbenchError) as info:
        call()
    assert "\n" not in str(info.value)


def test_syncbn_multiprocess_without_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BnbenchError, match="no process group"):
        norms.make("syncbn")


@pytest.mark.parametrize(
    "name,opts",
    [
        ("bn", {}),
        ("ghost", {"nbs": 2}),
        ("syncbn", {}),
        ("frozen", {}),
        ("batch_eval", {"eval_nbs": 2}),
        ("gn", {"groups": 3}),
        ("ln", {}),
        ("in", {}),
        ("brn", {"warmup_iters": 0, "rmax_iters": 4, "dmax_iters": 4}),
        ("brn", {"warmup_iters": 0, "rmax_iters": 4, "dmax_iters": 4, "nbs": 2}),
    ],
)
def test_state_dict_round_trip_continues_identically(name, opts):
    torch.manual_seed(0)
    a = norms.make(name, **opts)(3)
    xs = [torch.randn(4, 3, 3, 3) for _ in range(6)]
    for x in xs[:3]:
        a(x)
    b = norms.make(name, **opts)(3)
    b.load_state_dict(a.state_dict())
    for x in xs[3:]:
        assert torch.equal(a(x), b(x))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    a.eval(), b.eval()
    assert torch.equal(a(xs[0]), b(xs[0]))


def test_ghost_bf16_input_keeps_dtype_and_fp32_statistics():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 4, 6, 6, generator=g) * 0.5 + 4.0).bfloat16()
    layer = BatchNorm2d(4, nbs=2)
    y = layer(x)
    ref = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.float().split(2)])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=0)  # bf16 output rounding only
    expected_mean = torch.stack([c.mean((0, 2, 3)) for c in x.float().split(2)]).mean(0)
    torch.testing.assert_close(layer.running_mean, 0.1 * expected_mean)


def test_kernel_option_is_gone():
    """The layers run PyTorch's kernels only: there is no kernel choice to make."""
    for name in ("bn", "ghost", "brn", "cbn", "domain"):
        assert "kernel" not in norms.spec(name).options
    with pytest.raises(BnbenchError, match="unknown option kernel"):
        norms.check_options("ghost", {"kernel": "eager"})


def test_convert_keeps_eps_and_momentum_unless_given():
    """A BN with eps=1e-3 (TF-ported models) converted to frozen keeps its function."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.03))
    with torch.no_grad():
        net[1].running_var.uniform_(1e-4, 1e-3)
        net[1].running_mean.normal_()
    x = torch.randn(2, 3, 6, 6)
    expect = net.eval()(x)
    frozen = norms.convert(copy.deepcopy(net), "frozen")
    assert frozen[1].eps == 1e-3 and frozen[1].momentum == 0.03
    torch.testing.assert_close(frozen.eval()(x), expect)
    given = norms.convert(copy.deepcopy(net), "bn", eps=1e-5, momentum=0.1)
    assert given[1].eps == 1e-5 and given[1].momentum == 0.1


def test_failed_convert_leaves_the_model_untouched():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(BnbenchError, match="no preceding Conv2d"):
        norms.convert(net, "cbn")  # the first BN has no conv to pair with
    assert all(type(m) is nn.BatchNorm2d for m in (net[0], net[2]))
    mixed = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1),
                          nn.BatchNorm2d(6))
    with pytest.raises(BnbenchError, match="norm.groups=4"):
        norms.convert(mixed, "gn", groups=4)  # divides 8, not 6
    assert type(mixed[1]) is nn.BatchNorm2d


def _grad_nodes(root) -> set[str]:
    seen, stack, names = set(), [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


_BRN_LIMITS = {"rmax": 2.0, "dmax": 1.0, "warmup_iters": 0, "rmax_iters": 0, "dmax_iters": 0}


@pytest.mark.parametrize("cls,opts", [(BatchNorm2d, {"nbs": 2}), (BatchNorm2d, {"nbs": 3}),
                                      (BatchRenorm2d, _BRN_LIMITS),
                                      (BatchRenorm2d, {**_BRN_LIMITS, "nbs": 2})])
def test_inplace_relu_after_grouped_layers(cls, opts):
    """An inplace ReLU after the layer (torchvision ResNets) gives the out-of-place gradients,
    without autograd's view fallback (a zero-filled gradient copy per layer: AsStridedBackward)."""
    layer0 = _affine(cls(4, **opts).double())
    layer0.num_batches_tracked.fill_(1)  # BRN past its (zero-length) plain-BN warmup
    x = _x(8, 4, 3, 3)
    grads = []
    for relu in (F.relu, lambda t: t.relu_()):
        layer = copy.deepcopy(layer0)  # the same EMA (BRN's r, d) for both
        y = relu(layer(x))
        if relu is not F.relu:
            nodes = _grad_nodes(y.grad_fn)
            assert not nodes & {"AsStridedBackward0", "CopySlices"}
        grads.append(torch.autograd.grad((y * y).sum(), [x, layer.weight, layer.bias]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_brn_ema_of_std_is_algorithm_1():
    """``ema="std"``: μ ← μ + m(μ_B − μ), σ ← σ + m(σ_B − σ) with σ_B = sqrt(σ²_B + ε) (BRN
    paper, Algorithm 1); inference normalizes with that σ. ``ema="var"``: BN's unbiased EMA."""
    layers = {ema: _affine(BatchRenorm2d(3, ema=ema, momentum=0.3, eps=1e-3, warmup_iters=0,
                                         rmax_iters=0, dmax_iters=0).double())
              for ema in ("std", "var")}
    mu, sigma = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    var = torch.ones(3, dtype=torch.float64)
    sigma = (sigma + 1e-3).sqrt()
    for seed in range(4):
        x = _x(6, 3, 2, 2, seed=seed)
        for layer in layers.values():
            layer(x)
        batch_var = x.detach().var((0, 2, 3), correction=0)
        n = x.numel() // 3
        mu = mu + 0.3 * (x.detach().mean((0, 2, 3)) - mu)
        sigma = sigma + 0.3 * ((batch_var + 1e-3).sqrt() - sigma)
        var = var + 0.3 * (batch_var * n / (n - 1) - var)
    for layer in layers.values():
        torch.testing.assert_close(layer.running_mean, mu)
    torch.testing.assert_close(layers["std"].running_var, sigma**2 - 1e-3)
    torch.testing.assert_close(layers["var"].running_var, var)
    x = _x(2, 3, 2, 2, seed=9)
    w, b = layers["std"].weight, layers["std"].bias
    expect = (x - mu[:, None, None]) / sigma[:, None, None] * w[:, None, None] + b[:, None, None]
    torch.testing.assert_close(layers["std"].eval()(x), expect)


@pytest.mark.parametrize("opts", [
    {"rmax": 1.5, "dmax": 0.3, "ema": "std"},
    {"rmax": 1.5, "dmax": 0.3, "ema": "var", "momentum": 0.3},
    {"rmax": 1.0, "dmax": 0.0, "ema": "var"},  # BN's limits: the GhostBN path
], ids=["std", "var", "identity"])
def test_brn_devices_equal_separate_layers_with_averaged_buffers(opts):
    """``nbs=n`` on a batch of ``G·n``: ``G`` separate BRN layers, each fed its own slice, with
    shared γ, β (gradients summed, one SGD update) and their EMA buffers averaged after every
    step: the same outputs, input and affine gradients, and buffers, over several steps (each
    device's r, d from its own batch statistics against the shared EMA)."""
    devices, n, lr = 3, 2, 0.1
    limits = {"warmup_iters": 0, "rmax_iters": 0, "dmax_iters": 0}
    layer = _affine(BatchRenorm2d(4, nbs=n, **limits, **opts).double())
    with torch.no_grad():  # an EMA away from the batches' statistics: r, d clip
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        layer.running_var.copy_(torch.tensor([0.3, 4.0, 1.0, 9.0]))
        layer.num_batches_tracked.fill_(1)
    copies = [copy.deepcopy(layer) for _ in range(devices)]
    for device in copies:
        device.nbs = None  # one device each: its whole batch
    gen = torch.Generator().manual_seed(5)
    for step in range(4):
        x = _x(devices * n, 4, 3, 3, seed=step)
        gy = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        y = layer(x)
        dx, *grads = torch.autograd.grad(y, [x, layer.weight, layer.bias], gy)
        ref_y, ref_dx, ref_grads = [], [], [0, 0]
        for device, xs, gs in zip(copies, x.detach().split(n), gy.split(n)):
            xs.requires_grad_()
            ys = device(xs)
            d, *gr = torch.autograd.grad(ys, [xs, device.weight, device.bias], gs)
            ref_y.append(ys.detach())
            ref_dx.append(d)
            ref_grads = [a + b for a, b in zip(ref_grads, gr)]
        torch.testing.assert_close(y.detach(), torch.cat(ref_y))
        torch.testing.assert_close(dx, torch.cat(ref_dx))
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want)
        with torch.no_grad():
            for layer_ in (layer, *copies):  # SGD on the shared γ, β
                layer_.weight.sub_(lr * ref_grads[0])
                layer_.bias.sub_(lr * ref_grads[1])
            for key in ("running_mean", "running_var"):  # the devices' EMAs averaged
                mean = sum(getattr(device, key) for device in copies) / devices
                for device in copies:
                    getattr(device, key).copy_(mean)
        torch.testing.assert_close(layer.running_mean, copies[0].running_mean)
        torch.testing.assert_close(layer.running_var, copies[0].running_var)
        assert torch.equal(layer.num_batches_tracked, copies[0].num_batches_tracked)
    assert int(layer.num_batches_tracked) == 5


_COMPILE_CASES = {
    "bn": {}, "ghost": {"nbs": 2}, "syncbn": {}, "frozen": {}, "batch_eval": {"nbs": 3},
    "brn": {"rmax": 2.0, "dmax": 1.0, "warmup_iters": 0, "rmax_iters": 0, "dmax_iters": 0},
    "gn": {"groups": 2}, "ln": {}, "in": {}, "cbn": {"window": 3}, "naive_cbn": {"window": 3},
    "domain": {"num_domains": 2},
}


def test_every_variant_is_covered_by_the_compile_test():
    assert set(_COMPILE_CASES) == set(norms.NORMS)


@pytest.mark.parametrize("name", list(_COMPILE_CASES))
def test_layer_inside_a_compiled_model_matches_eager(name):
    """``torch.compile(model)`` (what ``trainer.compile=true`` does), three SGD steps: outputs,
    gradients and buffers as eager, for every variant. (BRN's and CBN's steps read buffers that
    the same step then updates: those steps run outside the graph, ``torch.compiler.disable``.)"""
    _compiled_matches_eager(name, _COMPILE_CASES[name])


@pytest.mark.parametrize("name,options", [("cbn", {"window": 3, "nbs": 2}),
                                          ("brn", {**_COMPILE_CASES["brn"], "nbs": 3})])
def test_simulated_devices_inside_a_compiled_model_match_eager(name, options):
    """The same with ``nbs`` devices (CBN allocates its devices' history on the first step)."""
    _compiled_matches_eager(name, options)


def _compiled_matches_eager(name: str, options: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                          nn.ReLU(inplace=True)).double()
    options = dict(options)
    if "momentum" in norms.spec(name).options:
        options["momentum"] = 0.3  # a visible EMA step
    norms.convert(model, name, **options)
    _affine(model[1])
    with torch.no_grad():
        if hasattr(model[1], "running_mean"):
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.3, 3.0)
            model[1].num_batches_tracked.fill_(5)
    xs = [_x(6, 3, 5, 5, seed=seed) for seed in range(3)]
    results = []
    for compiled in (False, True):
        m = copy.deepcopy(model)
        f = torch.compile(m) if compiled else m
        steps = []
        for x in xs:
            y = f(x)
            grads = torch.autograd.grad((y * y).sum(), [x, *m.parameters()])
            with torch.no_grad():
                for p, g in zip(m.parameters(), grads[1:]):
                    p.sub_(0.01 * g)
            steps.append((y.detach(), *grads))
        results.append((steps, [b.clone() for b in m.buffers()]))
    (steps0, bufs0), (steps1, bufs1) = results
    for got, want in zip(steps1, steps0):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    for a, b in zip(bufs1, bufs0):
        torch.testing.assert_close(a, b)


_moments = norms.base.batch_moments


def test_batch_moments_match_var_mean_and_pass_gradcheck():
    """The statistics behind BRN, CBN and SyncBN: ``torch.var_mean``'s values (any rank), and
    gradients that pass gradcheck (each output alone and both)."""
    for shape in [(5, 3, 4, 2), (6, 4), (3, 2, 2, 3, 2)]:
        x = _x(*shape)
        mean, var = norms.base.batch_moments(x)
        dims = [0, *range(2, x.dim())]
        ref_var, ref_mean = torch.var_mean(x, dim=dims, correction=0)
        torch.testing.assert_close(mean, ref_mean)
        torch.testing.assert_close(var, ref_var)
        for pick in (_moments, lambda t: _moments(t)[0], lambda t: _moments(t)[1]):
            assert torch.autograd.gradcheck(pick, (x,))
