"""DomainBatchNorm2d (Rethinking §5.2, Table 5) against independent references.

References are ``torch.nn.functional.batch_norm`` on explicitly chosen tensors, the paper's
flatten-and-concatenate construction (Alg. 1, row 1), or moments written out by hand.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnbench.errors import BnbenchError
from bnbench.norm.base import BatchNorm2d
from bnbench.norm.domain import DOMAIN_OPTIONS, DomainBatchNorm2d, set_domain

C = 3
D = 3
EPS = 1e-5
M = 0.1
F64 = torch.float64
MODES = ("domain", "shared")
COMBOS = list(itertools.product(MODES, MODES))  # (train_stats, pop_stats)
SHAPES = [(4, 5, 5), (4, 3, 4), (4, 2, 2)]  # (N, H, W) per domain: FPN-like sizes
UNEQUAL = [(4, 5, 5), (2, 3, 4), (3, 2, 2)]


def inputs(shapes=SHAPES, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, C, h, w, generator=g, dtype=F64) * (1 + i) + 2 * i
          for i, (n, h, w) in enumerate(shapes)]
    return [x.requires_grad_(grad) for x in xs]


def layer(train="domain", pop="domain", affine="shared", num_domains=D, seed=1, **kw):
    """A layer whose slots all hold different, random statistics and affine parameters."""
    bn = DomainBatchNorm2d(C, EPS, M, num_domains=num_domains, train_stats=train, pop_stats=pop,
                           affine_mode=affine, dtype=F64, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=F64))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=F64) + 0.5)
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g, dtype=F64) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=F64))
    return bn


def row(t, i):
    """Slot ``i`` of a per-domain ``(D, C)`` tensor, or the shared ``(C,)`` tensor itself."""
    return t[i] if t.dim() == 2 else t


def moments(x):
    """Biased and unbiased variance and mean per channel, written out by hand."""
    flat = x.detach().transpose(0, 1).reshape(C, -1)
    mean = flat.mean(1)
    sq = ((flat - mean[:, None]) ** 2).sum(1)
    return mean, sq / flat.shape[1], sq / (flat.shape[1] - 1)


def union(xs):
    return torch.cat([x.detach().transpose(0, 1).reshape(C, -1) for x in xs], 1).T[:, :, None,
                                                                                   None]


def lerp(old, new):
    return (1 - M) * old + M * new


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, **kw)


# -- options, shapes, state -----------------------------------------------------------------
def test_options_and_shapes():
    expected = {"eps", "momentum", "eval_stats", "eval_nbs", "num_domains", "train_stats",
                "pop_stats", "affine_mode"}
    assert expected == DOMAIN_OPTIONS
    bn = DomainBatchNorm2d(C, num_domains=D, pop_stats="domain", affine_mode="domain")
    assert bn.running_mean.shape == bn.running_var.shape == (D, C)
    assert bn.weight.shape == bn.bias.shape == (D, C)
    assert torch.all(bn.running_var == 1) and torch.all(bn.weight == 1)
    assert isinstance(bn, nn.BatchNorm2d) and bn.domain == 0
    shared = DomainBatchNorm2d(C, num_domains=D, pop_stats="shared", affine_mode="shared")
    assert shared.running_mean.shape == shared.weight.shape == (C,)
    assert "num_domains=3" in repr(bn) and "affine_mode=domain" in repr(bn)


@pytest.mark.parametrize("kwargs", [
    {"num_domains": 0}, {"num_domains": -1}, {"num_domains": 1.5}, {"num_domains": "2"},
    {"train_stats": "both"}, {"pop_stats": "mixed"}, {"affine_mode": "yes"},
    {"affine_mode": "domain", "affine": False}, {"momentum": 2.0}, {"eval_stats": "median"},
])
def test_bad_options(kwargs):
    with pytest.raises(BnbenchError):
        DomainBatchNorm2d(C, **{"num_domains": 2, **kwargs})


def test_bad_domain_index_and_inputs():
    bn = layer()
    for bad in (D, -1, 1.0, "1", None):
        with pytest.raises(BnbenchError):
            bn.domain = bad
    assert bn.domain == 0
    bn.domain = D - 1
    assert bn.domain == D - 1
    with pytest.raises(BnbenchError):
        bn.forward_domains(inputs() + inputs()[:1])  # 4 inputs, 3 domains
    with pytest.raises(BnbenchError):
        bn.forward_domains([])
    with pytest.raises(BnbenchError):
        bn.forward_domains([torch.randn(2, C + 1, 3, 3, dtype=F64)])
    with pytest.raises(BnbenchError):
        bn.slot_population(D)


def test_set_domain_all_or_nothing():
    model = nn.Sequential(nn.Conv2d(C, C, 1), DomainBatchNorm2d(C, num_domains=3), nn.ReLU(),
                          nn.Sequential(DomainBatchNorm2d(C, num_domains=2)), nn.BatchNorm2d(C))
    assert set_domain(model, 1) is model
    assert model[1].domain == model[3][0].domain == 1
    with pytest.raises(BnbenchError):
        set_domain(model, 2)  # valid for the first layer, not for the second
    assert model[1].domain == model[3][0].domain == 1
    with pytest.raises(BnbenchError):
        set_domain(model, -1)


@pytest.mark.parametrize("pop,affine", list(itertools.product(MODES, MODES)))
def test_state_dict_round_trip(pop, affine):
    bn = layer(pop=pop, affine=affine)
    bn.train()
    bn.forward_domains(inputs())
    state = bn.state_dict()
    fresh = DomainBatchNorm2d(C, num_domains=D, pop_stats=pop, affine_mode=affine, dtype=F64)
    fresh.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    fresh.eval()
    bn.eval()
    for a, b in zip(bn.forward_domains(inputs(seed=5)), fresh.forward_domains(inputs(seed=5)),
                    strict=True):
        assert torch.equal(a, b)


def test_load_plain_batchnorm_state():
    ref = nn.BatchNorm2d(C, dtype=F64)
    with torch.no_grad():
        for t in (ref.weight, ref.bias, ref.running_mean):
            t.copy_(torch.randn(C, dtype=F64))
        ref.running_var.copy_(torch.rand(C, dtype=F64) + 0.5)
    shared = DomainBatchNorm2d(C, num_domains=D, pop_stats="shared", dtype=F64)
    shared.load_state_dict(ref.state_dict())  # identical layout to nn.BatchNorm2d
    ref.load_state_dict(shared.state_dict())
    split = DomainBatchNorm2d(C, num_domains=D, pop_stats="domain", affine_mode="domain",
                              dtype=F64)
    split.load_state_dict(ref.state_dict())  # (C,) expanded into every domain
    for key in ("weight", "bias", "running_mean", "running_var"):
        for d in range(D):
            assert torch.equal(getattr(split, key)[d], getattr(ref, key)), key


def test_registry_convert():
    import bnbench.norm as norm

    model = nn.Sequential(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)))
    with torch.no_grad():
        for bn in (model[1], model[3][1]):
            bn.running_mean.copy_(torch.randn(C))
            bn.running_var.copy_(torch.rand(C) + 0.5)
            bn.weight.copy_(torch.randn(C))
    old = [m.state_dict() for m in (model[1], model[3][1])]
    norm.convert(model, "domain", num_domains=2)
    new = [model[1], model[3][1]]
    assert all(isinstance(m, DomainBatchNorm2d) and m.num_domains == 2 for m in new)
    for m, state in zip(new, old, strict=True):
        assert m.running_mean.shape == (2, C) and m.weight.shape == (C,)  # defaults: row 4
        for d in range(2):
            assert torch.equal(m.running_mean[d], state["running_mean"])
            assert torch.equal(m.running_var[d], state["running_var"])
        assert torch.equal(m.weight, state["weight"])
    assert norm.spec("domain").options == DOMAIN_OPTIONS


# -- one domain at a time ---------------------------------------------------------------------
@pytest.mark.parametrize("train,pop", COMBOS)
@pytest.mark.parametrize("affine", MODES)
def test_single_domain_is_batchnorm(train, pop, affine):
    bn = layer(train, pop, affine, num_domains=1)
    ref = BatchNorm2d(C, EPS, M, dtype=F64)
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref, key).copy_(getattr(bn, key).reshape(C))
    w0, b0 = ref.weight.detach().clone(), ref.bias.detach().clone()
    rm0, rv0 = ref.running_mean.clone(), ref.running_var.clone()
    x = inputs(grad=True)[0]
    x_ref = x.detach().clone().requires_grad_(True)
    x_fn = x.detach().clone().requires_grad_(True)
    w_fn, b_fn = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (y,) = bn.forward_domains([x])
    y_ref = ref(x_ref)
    y_fn = F.batch_norm(x_fn, rm0, rv0, w_fn, b_fn, True, M, EPS)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    (y_fn * g).sum().backward()
    for other, xo, w, b, rm, rv in ((ref, x_ref, ref.weight, ref.bias, ref.running_mean,
                                     ref.running_var), (None, x_fn, w_fn, b_fn, rm0, rv0)):
        yo = y_ref if other is ref else y_fn
        close(y, yo)
        close(x.grad, xo.grad)
        close(bn.weight.grad.reshape(C), w.grad)
        close(bn.bias.grad.reshape(C), b.grad)
        close(bn.running_mean.reshape(C), rm)
        close(bn.running_var.reshape(C), rv)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    ref.eval()
    close(bn(x.detach()), ref(x.detach()))


def test_forward_uses_slot_statistics_and_affine():
    bn = layer("domain", "domain", "domain")
    x = inputs(grad=True)[0]
    for d in range(D):
        bn.domain = d
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        w, b = bn.weight.detach()[d], bn.bias.detach()[d]
        bn.eval()
        close(bn(x), F.batch_norm(x, rm[d], rv[d], w, b, False, 0.0, EPS))
        bn.train()
        bn.zero_grad()
        rm_d, rv_d = rm[d].clone(), rv[d].clone()
        g = torch.randn_like(x)
        x_ref = x.detach().clone().requires_grad_(True)
        w_ref, b_ref = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = bn(x)
        y_ref = F.batch_norm(x_ref, rm_d, rv_d, w_ref, b_ref, True, M, EPS)
        close(y, y_ref)
        x.grad = None
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        close(x.grad, x_ref.grad)
        close(bn.weight.grad[d], w_ref.grad)
        close(bn.bias.grad[d], b_ref.grad)
        others = [i for i in range(D) if i != d]
        assert torch.all(bn.weight.grad[others] == 0) and torch.all(bn.bias.grad[others] == 0)
        close(bn.running_mean[d], rm_d)
        close(bn.running_var[d], rv_d)
        assert torch.equal(bn.running_mean[others], rm[others])
        assert torch.equal(bn.running_var[others], rv[others])


def test_forward_shared_population_slot():
    bn = layer("domain", "shared", "domain")
    x = inputs()[1]
    bn.eval()
    for d in range(D):
        bn.domain = d
        close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight[d], bn.bias[d],
                                  False, 0.0, EPS))


# -- several domains at once ------------------------------------------------------------------
@pytest.mark.parametrize("affine", MODES)
@pytest.mark.parametrize("pop", MODES)
def test_shared_train_stats_equal_concatenation(affine, pop):
    bn = layer("shared", pop, affine)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    xs = inputs(grad=True)
    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    w = bn.weight.detach().clone().requires_grad_(True)
    b = bn.bias.detach().clone().requires_grad_(True)
    gs = [torch.randn_like(x) for x in xs]
    ys = bn.forward_domains(xs)
    # Alg. 1 row 1: flatten, concatenate, one BN, split
    sizes = [x.shape[2] * x.shape[3] for x in xr]
    cat = torch.cat([x.flatten(2) for x in xr], dim=2).unsqueeze(3)
    if affine == "shared":
        parts = F.batch_norm(cat, None, None, w, b, True, 0.0, EPS).split(sizes, dim=2)
        y_ref = [p.reshape(x.shape) for p, x in zip(parts, xr, strict=True)]
    else:
        parts = F.batch_norm(cat, None, None, None, None, True, 0.0, EPS).split(sizes, dim=2)
        y_ref = [p.reshape(x.shape) * w[i].view(1, C, 1, 1) + b[i].view(1, C, 1, 1)
                 for i, (p, x) in enumerate(zip(parts, xr, strict=True))]
    for y, yr in zip(ys, y_ref, strict=True):
        close(y, yr)
    sum((y * g).sum() for y, g in zip(ys, gs, strict=True)).backward()
    sum((y * g).sum() for y, g in zip(y_ref, gs, strict=True)).backward()
    for x, x_ref in zip(xs, xr, strict=True):
        close(x.grad, x_ref.grad)
    close(bn.weight.grad, w.grad)
    close(bn.bias.grad, b.grad)
    if pop == "shared":
        F.batch_norm(cat.detach(), rm, rv, None, None, True, M, EPS)
        close(bn.running_mean, rm)
        close(bn.running_var, rv)


@pytest.mark.parametrize("affine", MODES)
def test_shared_train_stats_unequal_batch_sizes(affine):
    bn = layer("shared", "shared", affine)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    xs = inputs(UNEQUAL, grad=True)
    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    w = bn.weight.detach().clone().requires_grad_(True)
    b = bn.bias.detach().clone().requires_grad_(True)
    ys = bn.forward_domains(xs)
    # hand-written union moments (differentiable)
    flat = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in xr], 1)
    mean = flat.mean(1)
    var = ((flat - mean[:, None]) ** 2).mean(1)
    y_ref = []
    for i, x in enumerate(xr):
        xhat = (x - mean.view(1, C, 1, 1)) / torch.sqrt(var.view(1, C, 1, 1) + EPS)
        wi, bi = (w, b) if affine == "shared" else (w[i], b[i])
        y_ref.append(xhat * wi.view(1, C, 1, 1) + bi.view(1, C, 1, 1))
    gs = [torch.randn_like(x) for x in xs]
    for y, yr in zip(ys, y_ref, strict=True):
        assert y.shape == yr.shape
        close(y, yr)
    sum((y * g).sum() for y, g in zip(ys, gs, strict=True)).backward()
    sum((y * g).sum() for y, g in zip(y_ref, gs, strict=True)).backward()
    for x, x_ref in zip(xs, xr, strict=True):
        close(x.grad, x_ref.grad)
    close(bn.weight.grad, w.grad)
    close(bn.bias.grad, b.grad)
    n = flat.shape[1]
    close(bn.running_mean, lerp(rm, mean.detach()))
    close(bn.running_var, lerp(rv, var.detach() * n / (n - 1)))


@pytest.mark.parametrize("train,pop", COMBOS)
@pytest.mark.parametrize("shapes", [SHAPES, UNEQUAL], ids=["equal_n", "unequal_n"])
def test_ema_lands_in_the_right_slots(train, pop, shapes):
    bn = layer(train, pop)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    xs = inputs(shapes)
    ys = bn.forward_domains(xs)
    if pop == "domain":  # slot d ← its own input's statistics, whatever train_stats is
        for d, x in enumerate(xs):
            mean, _, unbiased = moments(x)
            close(bn.running_mean[d], lerp(rm[d], mean))
            close(bn.running_var[d], lerp(rv[d], unbiased))
    elif train == "shared":  # one update with the union
        mean, _, unbiased = moments(union(xs))
        close(bn.running_mean, lerp(rm, mean))
        close(bn.running_var, lerp(rv, unbiased))
    else:  # one nn.BatchNorm2d applied per input in turn (Alg. 1 row 3)
        for x in xs:
            mean, _, unbiased = moments(x)
            rm, rv = lerp(rm, mean), lerp(rv, unbiased)
        close(bn.running_mean, rm)
        close(bn.running_var, rv)
    assert int(bn.num_batches_tracked) == 1
    if train == "domain":  # each input by its own statistics, shared affine
        for x, y in zip(xs, ys, strict=True):
            close(y, F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, EPS))


def test_domain_train_stats_gradients_with_domain_affine():
    bn = layer("domain", "domain", "domain")
    xs = inputs(UNEQUAL, grad=True)
    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    w = bn.weight.detach().clone().requires_grad_(True)
    b = bn.bias.detach().clone().requires_grad_(True)
    ys = bn.forward_domains(xs)
    y_ref = [F.batch_norm(x, None, None, w[i], b[i], True, 0.0, EPS) for i, x in enumerate(xr)]
    gs = [torch.randn_like(x) for x in xs]
    sum((y * g).sum() for y, g in zip(ys, gs, strict=True)).backward()
    sum((y * g).sum() for y, g in zip(y_ref, gs, strict=True)).backward()
    for y, yr, x, x_ref in zip(ys, y_ref, xs, xr, strict=True):
        close(y, yr)
        close(x.grad, x_ref.grad)
    close(bn.weight.grad, w.grad)
    close(bn.bias.grad, b.grad)


@pytest.mark.parametrize("train,pop", COMBOS)
@pytest.mark.parametrize("affine", MODES)
@pytest.mark.parametrize("frozen", [False, True])
def test_population_statistics_per_domain(train, pop, affine, frozen):
    bn = layer(train, pop, affine, frozen=frozen)
    bn.train(frozen)  # frozen: population statistics in training too; else inference
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    xs = inputs(UNEQUAL)
    ys = bn.forward_domains(xs)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        close(y, F.batch_norm(x, row(state["running_mean"], i), row(state["running_var"], i),
                              row(state["weight"], i), row(state["bias"], i), False, 0.0, EPS))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("train", MODES)
def test_batch_statistics_at_inference(train):
    bn = layer(train, "domain", "domain", eval_stats="batch")
    bn.eval()
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    xs = inputs()
    ys = bn.forward_domains(xs)
    if train == "shared":
        mean, var, _ = moments(union(xs))
        ref = [F.batch_norm(x, mean, var, bn.weight[i], bn.bias[i], False, 0.0, EPS)
               for i, x in enumerate(xs)]
    else:
        ref = [F.batch_norm(x, None, None, bn.weight[i], bn.bias[i], True, 0.0, EPS)
               for i, x in enumerate(xs)]
    for y, yr in zip(ys, ref, strict=True):
        close(y, yr)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key


def ghost_reference(x, k):
    """GhostBN by hand: each group of ``k`` samples normalized alone; group moments."""
    ys, stats = [], []
    for start in range(0, x.shape[0], k):
        part = x[start:start + k]
        ys.append(F.batch_norm(part, None, None, None, None, True, 0.0, EPS))
        stats.append(moments(part))
    return torch.cat(ys), stats


@pytest.mark.parametrize("train,pop", COMBOS)
def test_ghost_batches(train, pop):
    k = 2
    bn = layer(train, pop, nbs=k)
    with torch.no_grad():
        bn.weight.fill_(1)
        bn.bias.zero_()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    xs = inputs()
    ys = bn.forward_domains(xs)
    if train == "shared":  # groups of k samples of the joined tensor (every domain)
        sizes = [x.shape[2] * x.shape[3] for x in xs]
        cat = torch.cat([x.flatten(2) for x in xs], dim=2).unsqueeze(3)
        y_cat, stats = ghost_reference(cat, k)
        ref = [p.reshape(x.shape) for p, x in zip(y_cat.split(sizes, dim=2), xs, strict=True)]
        if pop == "shared":
            close(bn.running_mean, lerp(rm, sum(s[0] for s in stats) / len(stats)))
            close(bn.running_var, lerp(rv, sum(s[2] for s in stats) / len(stats)))
    else:
        ref = [ghost_reference(x, k)[0] for x in xs]
    for y, yr in zip(ys, ref, strict=True):
        close(y, yr)
    if pop == "domain":  # each slot: the average of its own groups' statistics
        for d, x in enumerate(xs):
            stats = ghost_reference(x, k)[1]
            close(bn.running_mean[d], lerp(rm[d], sum(s[0] for s in stats) / len(stats)))
            close(bn.running_var[d], lerp(rv[d], sum(s[2] for s in stats) / len(stats)))
    if train == "shared":
        with pytest.raises(BnbenchError):
            bn.forward_domains(inputs(UNEQUAL))


# -- PreciseBN's observer ---------------------------------------------------------------------
@pytest.mark.parametrize("train,pop", COMBOS)
def test_observer_receives_domain_slot(train, pop):
    bn = layer(train, pop, "domain")
    calls = []
    bn._observer = lambda lyr, slot, mean, var, count: calls.append((lyr, slot, mean, var, count))
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    xs = inputs(UNEQUAL)
    ys = bn.forward_domains(xs)
    if train == "shared" and pop == "shared":
        expected = [(0, union(xs))]
    else:
        expected = [(d if pop == "domain" else 0, x) for d, x in enumerate(xs)]
    assert [c[1] for c in calls] == [slot for slot, _ in expected]
    for (lyr, _, mean, var, count), (_, x) in zip(calls, expected, strict=True):
        ref_mean, ref_var, _ = moments(x)
        assert lyr is bn and count == x.numel() // C
        close(mean.double(), ref_mean)
        close(var.double(), ref_var)
    # outputs normalized as in training (union or per domain), each with its own affine
    mean, var, _ = moments(union(xs))
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if train == "domain":
            mean, var, _ = moments(x)
        close(y, F.batch_norm(x, mean, var, bn.weight[i], bn.bias[i], False, 0.0, EPS),
              check_dtype=False)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key
    calls.clear()
    for d in range(D):  # one input at a time: the slot of the current domain
        bn.domain = d
        bn(xs[d])
    assert [c[1] for c in calls] == [d if pop == "domain" else 0 for d in range(D)]


def test_slot_population_views_are_writable():
    bn = layer(pop="domain")
    mean, var = bn.slot_population(2)
    mean.fill_(7.0)
    var.fill_(3.0)
    assert torch.all(bn.running_mean[2] == 7) and torch.all(bn.running_var[2] == 3)
    assert not torch.any(bn.running_mean[:2] == 7)
    shared = layer(pop="shared")
    assert shared.slot_population(0)[0] is shared.running_mean


def test_unequal_batch_sizes_with_nbs_covering_every_input():
    bn = layer("shared", "shared", nbs=4)  # every group would hold the whole batch: the union
    xs = inputs(UNEQUAL)
    mean, var, _ = moments(union(xs))
    for x, y in zip(xs, bn.forward_domains(xs), strict=True):
        close(y, F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, EPS))


@pytest.mark.parametrize("train", MODES)
def test_low_precision_inputs_keep_their_dtype(train):
    bn = DomainBatchNorm2d(C, num_domains=2, train_stats=train, pop_stats="domain",
                           affine_mode="domain")
    xs = [torch.randn(2, C, 4, 4).bfloat16(), torch.randn(2, C, 2, 2).bfloat16()]
    assert [y.dtype for y in bn.forward_domains(xs)] == [torch.bfloat16] * 2
    assert bn.running_mean.dtype == torch.float32 and torch.all(bn.running_mean != 0)


class _AllDomains(nn.Module):
    """A head that takes the inputs of all domains at once (forward_domains)."""

    def __init__(self, bn: DomainBatchNorm2d) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, xs):
        return self.bn.forward_domains(xs)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("layerwise", [False, True])
def test_precise_bn_estimates_every_domain_in_one_pass(train, layerwise):
    """PreciseBN over batches holding all domains (forward_domains): each slot gets the unbiased
    statistics of its own domain's concatenated data (Table 5's domain-specific rows)."""
    from bnbench.population import update_population_stats

    bn = layer(train, "domain")
    passes = [inputs(seed=s) for s in range(3)]
    update_population_stats(_AllDomains(bn), lambda: passes, layerwise=layerwise)
    for d in range(D):
        whole = torch.cat([xs[d].transpose(0, 1).reshape(C, -1) for xs in passes], dim=1)
        close(bn.running_mean[d], whole.mean(1))
        close(bn.running_var[d], whole.var(1, unbiased=True))
