"""PreciseBN against the statistics of the concatenated data and a one-batch forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnbench import norm as norms
from bnbench.errors import BnbenchError
from bnbench.population import preserved_population, update_population_stats


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 3, 1),
        nn.BatchNorm2d(3),
    )
    return norms.convert(net.double(), "bn")


def _data(n: int = 37) -> torch.Tensor:
    return (
        torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
        + 2
    )


@pytest.mark.parametrize("sizes", [[37], [10, 10, 10, 7], [1, 5, 31], [2] * 18 + [1]])
def test_first_layer_equals_concatenated_statistics(sizes):
    model, x = _model(), _data()
    update_population_stats(model, lambda: x.split(sizes))
    with torch.no_grad():
        feats = model[0](x)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, feats.var((0, 2, 3), unbiased=True))


def test_batch_mean_estimator_is_eq3():
    model, x = _model(), _data(36)
    update_population_stats(model, lambda: x.split(6), estimator="batch_mean")
    with torch.no_grad():
        feats = model[0](x)
    expected = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats.split(6)]).mean(0)
    torch.testing.assert_close(model[1].running_var, expected)


def _one_batch_stats(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every BN layer's statistics with the whole population as one batch, by hand.

    Each BN normalizes with the mean and unbiased variance (the ``N/(N−1)`` of Eq. 2, which is
    what ``running_var`` stores) of its whole input; an independent sequential forward.
    """
    out = []
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.BatchNorm2d):
                mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
                out.append((mean, var))
                x = torch.nn.functional.batch_norm(
                    x, mean, var, module.weight, module.bias, False, 0.0, module.eps
                )
            else:
                x = module(x)
    return out


def test_layerwise_equals_whole_population_as_one_batch():
    model, x = _model(), _data()
    expected = _one_batch_stats(model, x)
    update_population_stats(model, lambda: x.split(4), layerwise=True)
    for layer, (mean, var) in zip(norms.bn_layers(model), expected):
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)


def test_split_approximation_differs_in_deeper_layers():
    """Without layerwise, deeper layers see batch-normalized inputs (Rethinking §3.2)."""
    model, x = _model(), _data()
    expected = _one_batch_stats(model, x)
    update_population_stats(model, lambda: x.split(4))
    deep = norms.bn_layers(model)[-1]
    assert not torch.allclose(deep.running_var, expected[-1][1], rtol=1e-6)


def test_preserved_population_restores_ema_and_ghost_layers_report_whole_batch():
    model, x = _model(), _data()
    norms.convert(model, "ghost", nbs=2)
    for chunk in x.split(8):
        model.train()(chunk)
    before = [m.running_var.clone() for m in norms.bn_layers(model)]
    with preserved_population(model):
        update_population_stats(model, lambda: [x])
        changed = [m.running_var.clone() for m in norms.bn_layers(model)]
    after = [m.running_var for m in norms.bn_layers(model)]
    for a, b, c in zip(before, changed, after):
        assert torch.equal(a, c) and not torch.equal(a, b)
    assert model.training


def test_other_bn_family_layers_get_precise_stats():
    for name, opts in [("brn", {}), ("batch_eval", {}), ("ghost", {"nbs": 2})]:
        model, x = _model(), _data()
        norms.convert(model, name, **opts)
        update_population_stats(model, lambda x=x: x.split(10))
        with torch.no_grad():
            feats = model[0](x)
        torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)))


def test_frozen_statistics_are_constants_for_precise_bn():
    model, x = _model(), _data()
    norms.convert(model, "frozen")
    before = [m.running_var.clone() for m in norms.bn_layers(model)]
    out = model.eval()(x)
    update_population_stats(model, lambda: x.split(10))
    assert all(torch.equal(a, m.running_var) for a, m in zip(before, norms.bn_layers(model)))
    torch.testing.assert_close(model(x), out)


def test_layerwise_is_exact_for_layers_evaluated_with_batch_statistics():
    model, x = _model(), _data()
    expected = _one_batch_stats(model, x)
    norms.convert(model, "batch_eval", eval_nbs=4)
    update_population_stats(model, lambda: x.split(4), layerwise=True)
    for layer, (mean, var) in zip(norms.bn_layers(model), expected):
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)
    assert all(m.eval_stats == "batch" for m in norms.bn_layers(model))


class _Shared(nn.Module):
    """One BN layer applied to two inputs per forward (a head shared across FPN levels)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) + self.bn(3 * x + 5).mean()


def test_shared_layer_sees_every_call_and_layerwise_refuses_it():
    torch.manual_seed(0)
    model = norms.convert(_Shared().double(), "bn")
    x = _data(12)
    update_population_stats(model, lambda: x.split(4))
    union = torch.cat([x, 3 * x + 5]).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(model.bn.running_mean, union.mean(1))
    torch.testing.assert_close(model.bn.running_var, union.var(1))
    with pytest.raises(BnbenchError, match="runs more than once per forward"):
        update_population_stats(model, lambda: x.split(4), layerwise=True)


def _torch_bn_model() -> nn.Module:
    """PyTorch's own layers of three ranks, never converted: PreciseBN must cover them all."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.Flatten(2),  # (N, 4, 25)
        nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(1),  # (N, 150)
        nn.Linear(150, 5), nn.BatchNorm1d(5), nn.Unflatten(1, (5, 1, 1)),
        nn.Conv2d(5, 3, 1), nn.SyncBatchNorm(3),  # one process: SyncBN is per-process BN
    ).double()


def test_plain_torch_layers_of_every_rank():
    """On a model of ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm``, PreciseBN (Eq. 2) gives
    each layer the mean and unbiased variance of all its inputs over the batches, every layer
    normalizing with its own batch's statistics as in training. Reference: training-mode
    forwards of the same batches (torch's own layers, no bnbench code), inputs recorded by
    hooks and concatenated."""
    model, x = _torch_bn_model(), _data(30)[:, :, None]  # (30, 3, 1, 5, 5)
    batches = x.split([7, 13, 10])
    reference = _torch_bn_model().train()
    seen: dict[nn.Module, list[torch.Tensor]] = {}
    for layer in reference.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.register_forward_pre_hook(lambda m, a: seen.setdefault(m, []).append(a[0]))
    with torch.no_grad():
        for batch in batches:
            reference(batch)
    update_population_stats(model, lambda: batches)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == 4 and len(seen) == 4
    for got, inputs in zip(layers, seen.values()):
        h = torch.cat(inputs)
        dims = [0, *range(2, h.dim())]
        torch.testing.assert_close(got.running_mean, h.mean(dims))
        torch.testing.assert_close(got.running_var, h.var(dims, unbiased=True))
    assert model.training and all(int(m.num_batches_tracked) == 0 for m in layers)  # restored


def test_plain_torch_layers_layerwise():
    """Appendix A.3 on PyTorch's layers: each layer's exact population statistics with the
    earlier ones already at theirs (a sequential float64 forward, layer by layer)."""
    model, x = _torch_bn_model(), _data(24)[:, :, None]
    update_population_stats(model, lambda: x.split(5), layerwise=True)
    h = x
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                dims = [0, *range(2, h.dim())]
                torch.testing.assert_close(layer.running_mean, h.mean(dims))
                torch.testing.assert_close(layer.running_var, h.var(dims, unbiased=True))
            h = layer.eval()(h)


def test_a_model_without_batch_norm_is_an_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU())
    with pytest.raises(BnbenchError, match="no BatchNorm layer"):
        update_population_stats(net.double(), lambda: [_data(4)])


def test_convert_leaves_other_ranks_alone():
    """Every variant is 2-D: a BatchNorm1d/3d (or SyncBatchNorm) is never replaced by it."""
    model = _torch_bn_model()
    for name in ("ghost", "frozen", "gn"):
        kinds = [type(m) for m in norms.convert(model, name).modules()]
        assert kinds.count(nn.BatchNorm1d) == 2 and kinds.count(nn.BatchNorm3d) == 1
        assert kinds.count(nn.SyncBatchNorm) == 1
    x = _data(6)[:, :, None]
    assert model.train()(x).shape == (6, 3, 1, 1)  # still runs
