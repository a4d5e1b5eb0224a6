"""Cross-Iteration BN (bnbench.norm.cbn), each property against an independent reference.

References are computed here from scratch: per-iteration conv outputs recomputed with plain
``F.conv2d``, Jacobians and Taylor terms from autograd (``torch.func``), BN from
``F.batch_norm``. Precision-sensitive checks run in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50

from bnbench.errors import BnbenchError
from bnbench.models.resnet import resnet
from bnbench.norm.base import normalize
from bnbench.norm.cbn import CBN_OPTIONS, CrossIterationBatchNorm2d, pair_convs, window_statistics

D = torch.float64


def _pair(cin=3, cout=4, k=3, stride=1, padding=1, *, bias=False, groups=1, padding_mode="zeros",
          dilation=1, dtype=D, seed=0, **options):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=bias, groups=groups,
                     padding_mode=padding_mode).to(dtype)
    layer = CrossIterationBatchNorm2d(cout, **options).to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    layer.pair(conv)
    return conv, layer


def _moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``μ = E[y]``, ``ν = E[y²]`` (differentiable)."""
    return y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))


def _normalize(x, mean, var, gamma, beta, eps):
    shape = (1, -1, 1, 1)
    return ((x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * gamma.view(shape)
            + beta.view(shape))


def _conv_fn(conv: nn.Conv2d, x: torch.Tensor):
    """``(W, b) -> conv(x)`` with the conv's hyper-parameters (for autograd references)."""
    def f(weight, bias=None):
        if conv.padding_mode != "zeros":
            xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            return F.conv2d(xp, weight, bias, conv.stride, 0, conv.dilation, conv.groups)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return f


def _taylor(conv, x, w_old, b_old, w_new, b_new, rho=1.0):
    """First-order Taylor estimate of ``(μ, ν)`` of ``conv(x)`` at the new weights (autograd)."""
    f = _conv_fn(conv, x)
    primals = (w_old,) if b_old is None else (w_old, b_old)
    tangents = (w_new - w_old,) if b_old is None else (w_new - w_old, b_new - b_old)
    (mu, nu), (dmu, dnu) = torch.func.jvp(lambda *p: _moments(f(*p)), primals, tangents)
    return mu + rho * dmu, nu + rho * dnu


def _window_reference(x, entries, layer, mode="clamp", gamma=None):
    """Output for current input ``x`` and earlier ``(μ, ν)`` entries (constants), per the paper:
    ``μ̄ = mean μ``, ``ν̄ = mean max(ν, μ²)`` (clamp) or the kept entries only (drop)."""
    mu_t, nu_t = _moments(x)
    mus = [mu_t] + [m.detach() for m, _ in entries]
    nus = [nu_t] + [n.detach() for _, n in entries]
    if mode == "clamp":
        mean = torch.stack(mus).mean(0)
        nu = torch.stack([torch.maximum(n, m * m) if i else n
                          for i, (m, n) in enumerate(zip(mus, nus))]).mean(0)
    else:
        keep = torch.stack([torch.ones_like(mu_t)] + [(n - m * m >= 0).to(x.dtype)
                                                      for m, n in entries])
        count = keep.sum(0)
        mean = (keep * torch.stack(mus)).sum(0) / count
        nu = (keep * torch.stack(nus)).sum(0) / count
    gamma = layer.weight if gamma is None else gamma
    return _normalize(x, mean, nu - mean * mean, gamma, layer.bias, layer.eps)


def _swap_bn(model: nn.Module, **options) -> nn.Module:
    """Replace every nn.BatchNorm2d by CBN (keeping its state), then pair the convs."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                new = CrossIterationBatchNorm2d(child.num_features, **options)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
    pair_convs(model)
    return model


def _small_resnet(seed: int, **options) -> nn.Module:
    """ResNet-18 (torchvision blocks and module names) at a quarter width, CIFAR stem."""
    torch.manual_seed(seed)
    return _swap_bn(resnet("resnet18", 5, width=0.25, small_input=True), **options)


# -- options ---------------------------------------------------------------------------------------
def test_options_and_validation():
    assert {"eps", "momentum", "eval_stats", "eval_nbs", "window", "burnin", "rho",
            "neg_var"} <= CBN_OPTIONS
    for bad in (0, -1, 1.5, None, True):
        with pytest.raises(BnbenchError, match="window"):
            CrossIterationBatchNorm2d(4, window=bad)
    with pytest.raises(BnbenchError, match="neg_var"):
        CrossIterationBatchNorm2d(4, neg_var="abs")
    with pytest.raises(BnbenchError, match="jacobian_dtype"):
        CrossIterationBatchNorm2d(4, jacobian_dtype="float16")
    for bad in (-1, 2.5, None, "8"):
        with pytest.raises(BnbenchError, match="burnin"):
            CrossIterationBatchNorm2d(4, burnin=bad)
    for bad in (float("nan"), "1", None):
        with pytest.raises(BnbenchError, match="rho"):
            CrossIterationBatchNorm2d(4, rho=bad)
    with pytest.raises(BnbenchError, match="channels"):
        CrossIterationBatchNorm2d(4).pair(nn.Conv2d(3, 5, 1))


# -- window = 1, burn-in ---------------------------------------------------------------------------
def test_window_one_is_bn_forward_and_backward():
    conv, layer = _pair(window=1)
    ref = nn.BatchNorm2d(4).to(D)
    ref.load_state_dict(layer.state_dict(), strict=False)
    for it in range(3):
        x = torch.randn(5, 3, 6, 6, dtype=D) * (it + 1)
        y1 = conv(x).detach().requires_grad_()
        y2 = y1.detach().clone().requires_grad_()
        out = layer(y1)
        expect = F.batch_norm(y2, ref.running_mean, ref.running_var, ref.weight, ref.bias, True,
                              0.1, 1e-5)
        g = torch.randn_like(out)
        out.backward(g)
        expect.backward(g)
        torch.testing.assert_close(out, expect)
        torch.testing.assert_close(y1.grad, y2.grad)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    assert int(layer.num_batches_tracked) == 3


def test_burnin_iterations_are_plain_bn_and_keep_no_history():
    conv, layer = _pair(window=3, burnin=2)
    running_mean, running_var = torch.zeros(4, dtype=D), torch.ones(4, dtype=D)
    outs = []
    for it in range(4):
        x = torch.randn(4, 3, 5, 5, dtype=D)
        with torch.no_grad():
            conv.weight.add_(0.05 * torch.randn_like(conv.weight))
        y = conv(x)
        out = layer(y)
        expect = F.batch_norm(y, running_mean, running_var, layer.weight, layer.bias, True, 0.1,
                              layer.eps)
        outs.append((out, expect))
        # burn-in: 0, 1; then the first CBN step has an empty window (= BN) and stores itself
        assert layer.history_length() == max(0, it - 1)
    for it in range(3):
        torch.testing.assert_close(*outs[it])
    assert not torch.allclose(*outs[3])  # the window has one earlier iteration now


# -- naive CBN -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["clamp", "drop"])
def test_naive_cbn_is_the_plain_window_average(mode):
    conv, layer = _pair(window=3, rho=0.0, neg_var=mode)
    entries = []
    for _ in range(6):
        with torch.no_grad():
            conv.weight.add_(0.3 * torch.randn_like(conv.weight))  # large changes: no effect
        x = torch.randn(3, 3, 5, 5, dtype=D)
        y = conv(x).detach().requires_grad_()
        out = layer(y)
        y_ref = y.detach().clone().requires_grad_()
        expect = _window_reference(y_ref, entries[-2:], layer, mode)
        torch.testing.assert_close(out, expect)
        g = torch.randn_like(out)
        out.backward(g)
        expect.backward(g)
        torch.testing.assert_close(y.grad, y_ref.grad)
        entries.append(tuple(t.detach() for t in _moments(y)))
    assert layer.hist_dvar.numel() == 0  # no Jacobians are kept for rho = 0


# -- Jacobians ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    dict(cin=3, cout=4, k=3, stride=2, padding=1),
    dict(cin=4, cout=6, k=3, stride=1, padding=2, bias=True, groups=2),
    dict(cin=2, cout=3, k=(3, 2), stride=(1, 2), padding=1, padding_mode="reflect"),
    dict(cin=256, cout=2, k=3, stride=1, padding=1),  # CPU: the unfold + GEMM path
    dict(cin=3, cout=4, k=3, stride=1, padding=2, dilation=2, bias=True),
    dict(cin=3, cout=4, k=2, stride=1, padding="same"),  # even kernel: asymmetric padding
    dict(cin=4, cout=4, k=3, stride=1, padding=1, groups=4),  # depthwise
    dict(cin=2, cout=3, k=3, stride=2, padding=1, padding_mode="replicate"),
    dict(cin=2, cout=3, k=3, stride=1, padding=1, padding_mode="circular"),
])
def test_analytic_jacobians_equal_autograd(spec):
    conv, layer = _pair(**spec)
    x = torch.randn(3, spec["cin"], 7, 6, dtype=D)
    y = conv(x)
    dmean, dvar = layer.jacobians(x, y, D)
    f = _conv_fn(conv, x)

    def moments(w):
        z = f(w, conv.bias)
        return z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)

    jac_mu, jac_var = torch.autograd.functional.jacobian(moments, conv.weight.detach())
    c, groups = conv.out_channels, conv.groups
    jac_mu, jac_var = jac_mu.reshape(c, c, -1), jac_var.reshape(c, c, -1)
    for j in range(c):
        torch.testing.assert_close(jac_mu[j, j], dmean[j // (c // groups)])
        torch.testing.assert_close(jac_var[j, j], dvar[j])
    off = ~torch.eye(c, dtype=torch.bool)
    assert jac_mu[off].abs().max() == 0 and jac_var[off].abs().max() == 0  # row j ↔ W_j only
    # the layer stores e_μ = ⟨∂μ/∂W, W⟩ + b = μ and e_σ = ⟨∂σ²/∂W, W⟩ = 2σ² (Euler)
    with torch.no_grad():
        layer(y)
        layer(conv(x))
    mu, var = moments(conv.weight.detach())
    torch.testing.assert_close(layer.hist_dmean_ref[0], mu.detach())
    torch.testing.assert_close(layer.hist_dvar_ref[0], 2 * var.detach())


# -- Taylor compensation --------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [dict(), dict(cin=4, cout=6, stride=2, bias=True, groups=2)])
def test_compensation_is_first_order_accurate(spec):
    conv, layer = _pair(window=2, **spec)
    x_old = torch.randn(4, conv.in_channels, 6, 6, dtype=D)
    w_old = conv.weight.detach().clone()
    b_old = None if conv.bias is None else conv.bias.detach().clone()
    layer(conv(x_old))  # stores the iteration (μ, σ², Jacobians)
    torch.manual_seed(1)
    direction = torch.randn_like(w_old) * 0.02
    direction_b = None if b_old is None else torch.randn_like(b_old) * 0.02
    errors = []
    for delta in (1.0, 0.5, 0.25):
        with torch.no_grad():
            conv.weight.copy_(w_old + delta * direction)
            if b_old is not None:
                conv.bias.copy_(b_old + delta * direction_b)
        with torch.no_grad():
            true_mu, true_nu = _moments(conv(x_old))
            mean, var, keep = layer._compensated(1, D)
        old_mu, old_nu = _moments(_conv_fn(conv, x_old)(w_old, b_old))
        # the layer's compensation is the first-order Taylor polynomial (autograd reference) ...
        t_mu, t_nu = _taylor(conv, x_old, w_old, b_old, conv.weight.detach(),
                             None if b_old is None else conv.bias.detach())
        torch.testing.assert_close(mean[0], t_mu)
        torch.testing.assert_close(var[0], (t_nu - t_mu ** 2).clamp_min(0))
        # ... the mean is linear in the weights (exact), the second moment is closer than stale
        torch.testing.assert_close(mean[0], true_mu)
        err = (var[0] + mean[0] ** 2 - true_nu).abs().max()
        assert err < 0.5 * (old_nu - true_nu).abs().max()
        errors.append(err)
    for big, small in zip(errors, errors[1:]):
        assert 3 <= big / small <= 5  # second-order remainder: halving δ divides it by ≈ 4


def test_bfloat16_jacobian_is_close_and_compensates_only_weight_changes():
    """bf16 ∂ν/∂W: within bf16 rounding of the exact one; with unchanged weights the stored
    entry comes back unchanged (Δν uses the stored ⟨∂ν/∂W, W⟩, not 2ν), and a weight step is
    still compensated to well under the stale error."""
    conv, exact = _pair(cin=8, cout=6, window=2, dtype=torch.float32, seed=3)
    fast = CrossIterationBatchNorm2d(6, window=2, jacobian_dtype="bfloat16")
    fast.load_state_dict(exact.state_dict())
    fast.pair(conv)
    x_old = torch.randn(4, 8, 6, 6)
    y = conv(x_old)
    _, dsq = exact.jacobians(x_old, y)
    _, dsq_bf16 = fast.jacobians(x_old, y)
    assert dsq_bf16.dtype == torch.float32
    torch.testing.assert_close(dsq_bf16, dsq, rtol=0, atol=1e-2 * dsq.abs().max().item())
    assert not torch.equal(dsq_bf16, dsq)  # it is rounded
    with torch.no_grad():
        fast(conv(x_old))
        stored_var = fast.hist_var[0].clone()
        mean, var, _ = fast._compensated(1, torch.float32)
    torch.testing.assert_close(var[0], stored_var, rtol=1e-5, atol=1e-6)
    exact.pair(conv)
    with torch.no_grad():
        exact(conv(x_old))
    w_old = conv.weight.detach().clone()
    with torch.no_grad():
        conv.weight.add_(0.001 * torch.randn_like(w_old))
        true_nu = _moments(conv(x_old))[1]
        stale = (_moments(F.conv2d(x_old, w_old, None, 1, 1))[1] - true_nu).abs().max()
        errors = []
        for layer in (exact, fast):
            mean, var, _ = layer._compensated(1, torch.float32)
            errors.append((var[0] + mean[0] ** 2 - true_nu).abs().max())
    assert errors[0] < 0.1 * stale  # exact: the second-order remainder only
    assert errors[1] < errors[0] + 0.02 * stale  # bf16: + ~0.3 % of the first-order term


def test_compensated_window_end_to_end_and_gradient_only_through_current():
    """Several iterations with changing weights and bias: each output equals the paper's window
    of Taylor-compensated entries (autograd reference), and gradients (input, γ, β and the conv
    weight through its output) are those of the current iteration's statistics only."""
    conv, layer = _pair(cin=4, cout=6, bias=True, groups=2, window=3, rho=0.7)
    past = []  # (x, W, b) of earlier iterations
    for _ in range(5):
        with torch.no_grad():
            conv.weight.add_(0.02 * torch.randn_like(conv.weight))
            conv.bias.add_(0.02 * torch.randn_like(conv.bias))
        x = torch.randn(3, 4, 5, 5, dtype=D)
        w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
        entries = [_taylor(conv, xo, wo, bo, w, b, rho=0.7) for xo, wo, bo in past[-2:]]
        out = layer(conv(x))
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, [conv.weight, layer.weight], g)
        w_ref = conv.weight.detach().clone().requires_grad_()
        gamma = layer.weight.detach().clone().requires_grad_()
        expect = _window_reference(_conv_fn(conv, x)(w_ref, conv.bias), entries, layer,
                                   gamma=gamma)
        torch.testing.assert_close(out, expect)
        ref_grads = torch.autograd.grad(expect, [w_ref, gamma], g)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want)
        past.append((x, w, b))
    assert layer.history_length() == 2


def test_window_function_gradcheck():
    """The normalization with constant earlier entries passes gradcheck (x, γ, β); earlier
    statistics are inputs without gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 3, 2, dtype=D, requires_grad=True)
    gamma = torch.rand(2, dtype=D, requires_grad=True)
    beta = torch.randn(2, dtype=D, requires_grad=True)
    past_mean, past_var = torch.randn(2, 2, dtype=D), torch.rand(2, 2, dtype=D)
    keep = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D)

    def f(x, gamma, beta):
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0)
        wmean, wvar = window_statistics(mean, var, past_mean, past_var, keep)
        return normalize(x, wmean, wvar, gamma, beta, 1e-3)

    assert torch.autograd.gradcheck(f, (x, gamma, beta))


# -- negative variances ---------------------------------------------------------------------------
def test_negative_compensated_variance_clamp_vs_drop():
    """Shrinking half of the filters by 10× makes their compensated ν − μ² negative
    (ν' = ν(1 − 2·0.9) < 0): clamp keeps the entry as max(ν', μ'²), drop leaves it out."""
    torch.manual_seed(0)
    x_old, x_new = torch.randn(4, 3, 5, 5, dtype=D), torch.randn(4, 3, 5, 5, dtype=D) + 0.3
    outs = {}
    for mode in ("clamp", "drop"):
        conv, layer = _pair(window=2, neg_var=mode, seed=3)
        w_old = conv.weight.detach().clone()
        layer(conv(x_old))
        with torch.no_grad():
            conv.weight[:2].mul_(0.1)
        entries = [_taylor(conv, x_old, w_old, None, conv.weight.detach(), None)]
        mu_c, nu_c = entries[0]
        assert (nu_c[:2] - mu_c[:2] ** 2 < 0).all() and (nu_c[2:] - mu_c[2:] ** 2 > 0).all()
        y = conv(x_new).detach()
        outs[mode] = layer(y)
        torch.testing.assert_close(outs[mode], _window_reference(y, entries, layer, mode))
    bn = F.batch_norm(y, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    torch.testing.assert_close(outs["drop"][:, :2], bn[:, :2])  # all earlier entries dropped
    assert not torch.allclose(outs["clamp"][:, :2], bn[:, :2])
    torch.testing.assert_close(outs["clamp"][:, 2:], outs["drop"][:, 2:])  # nothing negative


# -- population statistics, eval ------------------------------------------------------------------
def test_ema_from_current_batch_and_eval_uses_running_stats():
    conv, layer = _pair(window=3, momentum=0.2)
    mean, var = torch.zeros(4, dtype=D), torch.ones(4, dtype=D)
    for _ in range(4):
        y = conv(torch.randn(4, 3, 5, 5, dtype=D)).detach()
        layer(y)
        n = y.numel() // 4
        mean = 0.8 * mean + 0.2 * y.mean((0, 2, 3))
        var = 0.8 * var + 0.2 * y.var((0, 2, 3), correction=0) * n / (n - 1)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_var, var)
    layer.eval()
    y = conv(torch.randn(2, 3, 5, 5, dtype=D)).detach()
    expect = F.batch_norm(y, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(layer(y), expect)
    assert layer.history_length() == 2 and int(layer.num_batches_tracked) == 4


# -- pairing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [resnet18, resnet50])
def test_pair_convs_pairs_every_layer_of_torchvision_resnets(build):
    model = build(norm_layer=lambda c: CrossIterationBatchNorm2d(c, window=2))
    pair_convs(model)
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if isinstance(m, CrossIterationBatchNorm2d)}
    assert len(layers) == (20 if build is resnet18 else 53)
    for name, layer in layers.items():
        parent, _, attr = name.rpartition(".")
        conv_name = (f"{parent}.0" if attr == "1" else
                     (f"{parent}." if parent else "") + "conv" + attr[2:])
        assert layer.paired_conv is modules[conv_name], name
        assert layer.layer_name == name
    assert layers["bn1"].paired_conv is model.conv1
    assert layers["layer2.0.downsample.1"].paired_conv is model.layer2[0].downsample[0]
    assert sum(len(c._forward_hooks) for c in modules.values() if isinstance(c, nn.Conv2d)) \
        == len(layers)
    pair_convs(model)  # pairing again replaces the hooks
    assert sum(len(c._forward_hooks) for c in modules.values() if isinstance(c, nn.Conv2d)) \
        == len(layers)


def test_unpaired_layers_are_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(),
                                          CrossIterationBatchNorm2d(4))

    with pytest.raises(BnbenchError, match=r"layer features\.2 has no preceding Conv2d"):
        pair_convs(Net())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 1)
            self.bn2 = CrossIterationBatchNorm2d(4)

    with pytest.raises(BnbenchError, match=r"layer inner\.bn2 has no preceding"):
        pair_convs(nn.ModuleDict({"inner": Block()}))
    # a paired layer whose conv did not run just before it (after burn-in)
    conv, layer = _pair(window=2)
    y = conv(torch.randn(2, 3, 4, 4, dtype=D))
    layer(y)
    with pytest.raises(BnbenchError, match="paired conv did not run"):
        layer(y)
    with pytest.raises(BnbenchError, match="not paired"):
        CrossIterationBatchNorm2d(4).to(D)(y)
    naive = CrossIterationBatchNorm2d(4, rho=0.0).to(D)  # needs no conv input
    naive(y)
    naive(y)


# -- state dict, copies ---------------------------------------------------------------------------
def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    outs = []
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen).to(dtype)
        target = torch.randint(0, 5, (4,), generator=gen)
        out = model(x)
        loss = F.cross_entropy(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        outs.append(out.detach())
    return outs


def test_state_dict_round_trip_continues_bit_identically():
    model = _small_resnet(0, window=3, burnin=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, 4, seed=1)
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert state["layer1.0.bn1.hist_dvar"].abs().sum() > 0
    assert int(state["layer1.0.bn1.hist_state"][0]) == 2
    fresh = _small_resnet(7, window=3, burnin=1)
    fresh.load_state_dict(state)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh_opt.load_state_dict(opt_state)
    for a, b in zip(_train(model, opt, 3, seed=2), _train(fresh, fresh_opt, 3, seed=2)):
        assert torch.equal(a, b)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_before_pairing_and_from_plain_bn():
    conv, layer = _pair(window=3)
    for _ in range(3):
        layer(conv(torch.randn(2, 3, 4, 4, dtype=D)))
    unpaired = CrossIterationBatchNorm2d(4, window=3).to(D)
    unpaired.load_state_dict(layer.state_dict())  # Jacobian buffers take the stored shapes
    assert torch.equal(unpaired.hist_dvar, layer.hist_dvar)
    unpaired.pair(conv)  # same shape: the history is kept
    assert unpaired.history_length() == 2
    plain = nn.BatchNorm2d(4).to(D)
    layer.load_state_dict(plain.state_dict())  # a BN checkpoint: empty window, strict is fine
    assert layer.history_length() == 0


@pytest.mark.parametrize("with_ref", [True, False])
def test_load_bnbench_0_1_second_moment_checkpoint(with_ref):
    """Checkpoints that stored ∂ν/∂W (``hist_dsq``; older ones without ``hist_dsq_ref``) load
    into the centred layout: ∂σ²/∂W = ∂ν/∂W − 2μ ∂μ/∂W, e_μ = μ, e_σ = 2σ²."""
    conv, layer = _pair(cin=4, cout=6, groups=2, bias=True, window=3)
    for _ in range(3):
        layer(conv(torch.randn(2, 4, 5, 5, dtype=D)))
    new = layer.state_dict()
    mean, var, dmean = new["hist_mean"], new["hist_var"], new["hist_dmean"]  # (2, 6), (2, 2, P)
    per_channel = dmean.repeat_interleave(3, dim=1).transpose(0, 1)  # (6, 2, P)
    old = {k: v for k, v in new.items()
           if k not in ("hist_dmean_ref", "hist_dvar", "hist_dvar_ref")}
    old["hist_dsq"] = new["hist_dvar"] + 2 * mean.t()[:, :, None] * per_channel  # ∂ν/∂W
    if with_ref:
        old["hist_dsq_ref"] = 2 * (var + mean * mean)
    loaded = CrossIterationBatchNorm2d(6, window=3).to(D)
    loaded.load_state_dict(old)
    loaded.pair(conv)
    assert loaded.history_length() == 2
    for name in ("hist_dvar", "hist_dmean_ref", "hist_dvar_ref"):
        torch.testing.assert_close(getattr(loaded, name), new[name])
    with torch.no_grad():
        torch.testing.assert_close(loaded._compensated(2, D), layer._compensated(2, D))


def test_deepcopy_keeps_pairs_within_the_copy():
    model = _small_resnet(0, window=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, opt, 2, seed=1)
    clone = copy.deepcopy(model)
    assert clone.layer1[0].bn1.paired_conv is clone.layer1[0].conv1
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.05)
    for a, b in zip(_train(model, opt, 2, seed=3), _train(clone, clone_opt, 2, seed=3)):
        assert torch.equal(a, b)


def test_registry_convert_pairs():
    norms = pytest.importorskip("bnbench.norm")
    model = norms.convert(resnet18(num_classes=3), "cbn", window=2, burnin=0)
    assert model.layer3[0].downsample[1].paired_conv is model.layer3[0].downsample[0]
    naive = norms.convert(resnet18(num_classes=3), "naive_cbn", window=2)
    assert naive.bn1.rho == 0.0


def test_autocast_bf16_step():
    model = _small_resnet(0, window=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        with torch.autocast("cpu", torch.bfloat16):
            out = model(torch.randn(2, 3, 8, 8))
        out.float().sum().backward()
        opt.step()
    bn = model.layer1[0].bn1
    assert bn.hist_dvar.dtype == torch.float32 and torch.isfinite(bn.hist_dvar).all()
    assert torch.isfinite(bn.running_var).all() and bn.history_length() == 1


def test_float32_compensation_survives_large_means():
    """|μ| ≫ σ (same-sign filters on positive inputs, μ²/σ² ~ 10³–10⁴): the compensated σ² in
    float32 stays close to the float64 first-order Taylor value — well below the change of σ²
    over the step (compensating through ∂ν/∂W would cancel ``μ²`` and miss it by more)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 16, 3, bias=False)
    layer = CrossIterationBatchNorm2d(16, window=2)
    layer.pair(conv)
    x = torch.rand(4, 32, 8, 8) + 10.0
    with torch.no_grad():
        conv.weight.abs_()
        y = conv(x)
        layer(y)
        mu, var = y.double().mean((0, 2, 3)), y.double().var((0, 2, 3), unbiased=False)
        assert (mu * mu / var).max() > 1e3
        w_old = conv.weight.detach().clone()
        conv.weight.add_(1e-3 * w_old.abs().mean() * torch.randn_like(w_old))
        _, var_c, _ = layer._compensated(1, torch.float32)
        xd, w0, w1 = x.double(), w_old.double(), conv.weight.double()
        reference = _taylor(conv.double(), xd, w0, None, w1, None)
        ref_var = reference[1] - reference[0] ** 2
        true_var = F.conv2d(xd, w1).var((0, 2, 3), unbiased=False)
    error = ((var_c[0].double() - ref_var) / ref_var).abs().max()
    change = ((true_var - var) / var).abs().max()
    assert error < 0.1 * change


def test_autocast_unchanged_weights_give_back_the_stored_statistics():
    """Under bf16 autocast the conv runs with rounded weights; with the weights unchanged the
    stored entry must come back as stored (compensation 0, not the rounding of W)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=True)
    layer = CrossIterationBatchNorm2d(16, window=2)
    layer.pair(conv)
    x = torch.relu(torch.randn(4, 16, 8, 8))
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            layer(conv(x))
            conv(x)  # the paired conv ran under autocast: the next CBN forward compensates
        mean, var, _ = layer._compensated(1, torch.float32)  # (as it does, autocast off)
    sigma = layer.hist_var[0].sqrt()
    torch.testing.assert_close(mean[0] / sigma, layer.hist_mean[0] / sigma, rtol=0, atol=1e-5)
    torch.testing.assert_close(var[0], layer.hist_var[0], rtol=1e-5, atol=0)


def test_half_precision_model_keeps_a_float32_history():
    conv, layer = _pair(window=3, dtype=torch.float32)
    for _ in range(3):
        layer(conv(torch.randn(2, 3, 5, 5)))
    before = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("hist_")}
    layer.to(torch.bfloat16)
    for name, value in before.items():
        assert torch.equal(getattr(layer, name), value), name
    assert layer.running_var.dtype == torch.bfloat16  # the rest is cast as PyTorch casts BN


# -- simulated devices (nbs) ----------------------------------------------------------------------
def _device_block(name: str, value: torch.Tensor, device: int, devices: int) -> torch.Tensor:
    """Device ``device``'s part of a history buffer of ``devices`` devices (see the layer's
    docstring: ``hist_dvar`` is channel-major, the others have the devices in dim 1)."""
    return value.chunk(devices, 0 if name == "hist_dvar" else 1)[device]


@pytest.mark.parametrize("spec", [
    dict(window=3, burnin=1),
    dict(cin=4, cout=6, stride=2, bias=True, groups=2, window=3, rho=0.7, neg_var="drop"),
    dict(padding_mode="reflect", bias=True, window=2),
    dict(window=3, rho=0.0),  # naive CBN
    dict(window=3, jacobian_dtype="bfloat16", dtype=torch.float32),
], ids=["cbn", "groups-bias-drop", "reflect", "naive", "bf16-jacobian"])
def test_devices_equal_separate_layers_with_shared_weights(spec):
    """``nbs=n`` on a batch of ``G·n``: ``G`` separate conv+CBN copies, each fed its own slice,
    weights shared (gradients summed, one SGD update), give the same outputs, input and weight
    gradients, per-device histories (the layer's device blocks) and, averaged, the EMA — over
    steps through burn-in and a full window."""
    devices, n, lr = 3, 2, 0.1
    dtype = spec.get("dtype", D)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    conv, layer = _pair(nbs=n, **spec)
    copies = [_pair(**spec) for _ in range(devices)]  # the same init (seeded)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        x = (torch.randn(devices * n, conv.in_channels, 6, 6, generator=gen) + 0.5).to(dtype)
        x.requires_grad_(True)
        out = layer(conv(x))
        g = torch.randn(out.shape, generator=gen).to(dtype)
        params = [*conv.parameters(), *layer.parameters()]
        dx, *grads = torch.autograd.grad(out, [x, *params], g)
        ref_out, ref_dx, ref_grads = [], [], [torch.zeros_like(p) for p in params]
        for (c, lay), xs, gs in zip(copies, x.detach().split(n), g.split(n)):
            xs = xs.clone().requires_grad_(True)
            o = lay(c(xs))
            d, *gr = torch.autograd.grad(o, [xs, *c.parameters(), *lay.parameters()], gs)
            ref_out.append(o.detach())
            ref_dx.append(d)
            ref_grads = [a + b for a, b in zip(ref_grads, gr)]
        torch.testing.assert_close(out.detach(), torch.cat(ref_out), **tol)
        torch.testing.assert_close(dx, torch.cat(ref_dx), **tol)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, **tol)
        with torch.no_grad():  # SGD on the shared weights: every copy the same update
            for p, grad in zip(params, grads):
                p.sub_(lr * grad)
            for c, lay in copies:
                for p, grad in zip([*c.parameters(), *lay.parameters()], ref_grads):
                    p.sub_(lr * grad)
    assert layer.history_devices() == devices
    assert layer.history_length() == copies[0][1].history_length() == spec["window"] - 1
    state = layer.state_dict()
    for name, value in state.items():
        refs = [lay.state_dict()[name] for _, lay in copies]
        if name.startswith("running_"):  # the EMA: the devices' buffers averaged
            torch.testing.assert_close(value, sum(refs) / devices, **tol)
        elif name in ("weight", "bias", "hist_state", "num_batches_tracked"):  # shared
            for ref in refs:
                torch.testing.assert_close(value, ref, **tol, msg=name)
        elif value.numel():
            for device, ref in enumerate(refs):
                close = tol
                if spec.get("jacobian_dtype") == "bfloat16" and name.startswith("hist_dvar"):
                    # y − c rounded to bf16: an fp32 ulp apart (weights) can round 2⁻⁸ apart
                    close = {"rtol": 0.0, "atol": 1e-2 * float(ref.abs().max())}
                torch.testing.assert_close(_device_block(name, value, device, devices), ref,
                                           **close, msg=f"{name} of device {device}")


def test_devices_jacobians_are_one_grouped_pass(monkeypatch):
    """The per-device Jacobians cost one weight-gradient pass over the batch (grouped by
    device), not one per device: two ``conv2d_weight`` calls per step (∂μ/∂W, ∂σ²/∂W) for any
    number of devices."""
    from bnbench.norm import cbn

    groups, real = [], cbn.conv2d_weight
    monkeypatch.setattr(cbn, "conv2d_weight", lambda *a: groups.append(a[-1]) or real(*a))
    conv, layer = _pair(cin=4, cout=6, groups=2, window=2, nbs=2)
    layer(conv(torch.randn(8, 4, 5, 5, dtype=D)))
    assert layer.history_devices() == 4
    assert groups == [4, 8]  # ∂μ/∂W: a group per device; ∂σ²/∂W: per device and conv group


def test_devices_checkpoint_round_trip_keeps_every_device_history():
    """A ResNet with ``nbs=2`` on batches of 4 (2 devices): the state dict holds both devices'
    windows; a fresh model (one device's buffers, never run) loads them and continues
    bit-identically; so does an unpaired layer."""
    model = _small_resnet(0, window=3, burnin=1, nbs=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, 4, seed=1)
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    c = model.layer1[0].bn1.num_features
    assert state["layer1.0.bn1.hist_mean"].shape == (2, 2 * c)
    assert state["layer1.0.bn1.hist_dvar"].shape[0] == 2 * c
    halves = state["layer1.0.bn1.hist_mean"].chunk(2, 1)
    assert not torch.equal(*halves)  # two devices, two histories
    fresh = _small_resnet(7, window=3, burnin=1, nbs=2)
    assert fresh.layer1[0].bn1.history_devices() == 1
    fresh.load_state_dict(state)
    assert fresh.layer1[0].bn1.history_devices() == 2
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh_opt.load_state_dict(opt_state)
    for a, b in zip(_train(model, opt, 3, seed=2), _train(fresh, fresh_opt, 3, seed=2)):
        assert torch.equal(a, b)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    conv, layer = _pair(window=3, nbs=2)
    for _ in range(3):
        layer(conv(torch.randn(6, 3, 4, 4, dtype=D)))
    unpaired = CrossIterationBatchNorm2d(4, window=3, nbs=2).to(D)
    unpaired.load_state_dict(layer.state_dict())
    unpaired.pair(conv)  # the loaded shapes fit the conv: the history is kept
    assert unpaired.history_devices() == 3 and unpaired.history_length() == 2
    for name, value in layer.state_dict().items():
        assert torch.equal(unpaired.state_dict()[name], value), name


@pytest.mark.parametrize("options,batches,needle", [
    ({"nbs": 2}, [5], "nbs=2 simulates devices of 2 samples each, but the batch has 5 samples"),
    ({"nbs": 4}, [2], "nbs=4 simulates devices of 4 samples each, but the batch has 2 samples"),
    ({"nbs": 2, "rho": 0.0}, [5], "not a multiple of 2"),
    ({"nbs": 2}, [4, 6], r"holds the windows of 2 device\(s\) \(nbs=2\) but a batch of 6"),
    ({"nbs": 2, "burnin": 1}, [3], "not a multiple of 2"),  # refused in burn-in too
])
def test_devices_bad_batches_are_one_line(options, batches, needle):
    conv, layer = _pair(window=2, **options)
    with pytest.raises(BnbenchError, match=needle) as info:
        for size in batches:
            layer(conv(torch.randn(size, 3, 4, 4, dtype=D)))
    assert "\n" not in str(info.value)
