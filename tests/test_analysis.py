"""``bnbench analyze`` (:mod:`bnbench.analysis`) and ``trainer.keep_checkpoints``.

A tiny run (2 epochs, every epoch's checkpoint kept) is trained once by the command line; each
test analyzes a fresh copy of it. Every number is checked against an independent computation:
the closed forms of appendix A.2 against a Monte-Carlo on data generated here, the simulated
estimators and the batch means against direct loops on the same values, PreciseBN at B = N
against PyTorch's own running-statistics update.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import fresh_copy, train_tiny

from bnbench import analysis as A
from bnbench import cli
from bnbench.eval_app import load_run
from bnbench.train import keep_epoch

TINY = ["dataset.num_train=256", "dataset.num_val=64", "dataset.resolution=8", "model.width=0.125",
        "trainer.epochs=2", "trainer.batch_size=32", "precise.num_samples=128",
        "precise.batch_size=64", "eval.batch_size=64", "trainer.threads=1", "dataset.workers=0",
        "trainer.keep_checkpoints=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run trained by the command line with every epoch's checkpoint kept."""
    return train_tiny(tmp_path_factory.mktemp("trained"), TINY)


@pytest.fixture
def run(trained, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the trained run; the cwd is an empty folder (nothing may land there)."""
    return fresh_copy(trained, tmp_path, monkeypatch)


def _analyze(*args: str) -> int:
    return cli.main(["analyze", *args])


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _loaded(run: Path, checkpoint: str = "last.pt"):
    from bnbench.eval_app import checkpoint_config

    path = run / "checkpoints" / checkpoint
    cfg, _ = checkpoint_config(run, path, "cpu")
    return load_run(cfg, path)


# -- trainer.keep_checkpoints -----------------------------------------------------------------


def test_every_epoch_checkpoint_is_kept(trained):
    folder = trained / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch1.pt", "epoch2.pt", "last.pt"]
    assert (folder / "epoch2.pt").read_bytes() == (folder / "last.pt").read_bytes()
    states = [torch.load(folder / f"epoch{e}.pt", weights_only=False)["state"] for e in (1, 2)]
    assert [s["epoch"] for s in states] == [1, 2]
    assert [s["iteration"] for s in states] == [8, 16]  # 256 images / 32 per step
    first, last = (torch.load(folder / f"epoch{e}.pt", weights_only=False)["model"]
                   for e in (1, 2))
    assert not torch.equal(first["layer1.0.bn1.running_mean"], last["layer1.0.bn1.running_mean"])


def test_kept_checkpoint_survives_the_next_one(tmp_path):
    last = tmp_path / "last.pt"
    last.write_bytes(b"epoch 1")
    kept = keep_epoch(last, 1)
    tmp = tmp_path / ".new.tmp"
    tmp.write_bytes(b"epoch 2")
    os.replace(tmp, last)  # how the trainer writes the next last.pt
    keep_epoch(last, 2)
    keep_epoch(last, 2)  # again (a resumed epoch): replaced, no error
    assert kept == tmp_path / "epoch1.pt"
    assert kept.read_bytes() == b"epoch 1"
    assert (tmp_path / "epoch2.pt").read_bytes() == b"epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch1.pt", "epoch2.pt", "last.pt"]


# -- estimator_error: closed form (appendix A.2) ----------------------------------------------


def _direct_estimators(x: torch.Tensor, b: int) -> dict[str, torch.Tensor]:
    """Eq. 2 / Eq. 3 of ``x`` ``(T, N)`` written out: the unbiased variance of all N values, the
    mean of the unbiased (and of the biased) variances of the batches of B."""
    batches = x.view(x.shape[0], -1, b)
    return {"eq2": x.var(1), "eq3": batches.var(2).mean(1),
            "eq3raw": batches.var(2, correction=0).mean(1)}


@pytest.mark.parametrize("distribution,kurtosis", [("gaussian", 3.0), ("exponential", 9.0)])
def test_closed_form_matches_monte_carlo(distribution, kurtosis):
    gen = torch.Generator().manual_seed(0)
    trials, n = 20000, 40
    x = torch.randn(trials, n, generator=gen, dtype=torch.float64) * 2 + 5
    if distribution == "exponential":  # rate 1: σ² = 1, κ = 9
        x = -torch.rand(trials, n, generator=gen, dtype=torch.float64).log()
    true_var = 4.0 if distribution == "gaussian" else 1.0
    for b in (2, 4, 40):
        closed = A.closed_form(b, n, kurtosis)
        for key, est in _direct_estimators(x, b).items():
            rel = est / true_var
            bias_se = rel.std() / math.sqrt(trials)
            centred = rel - rel.mean()
            var_se = math.sqrt(float(centred.pow(4).mean() - centred.var() ** 2) / trials)
            assert abs(float(rel.mean() - 1) - closed[key][0]) < 4 * bias_se, (b, key)
            assert abs(float(rel.var()) - closed[key][1]) < 4 * var_se, (b, key)


def test_eq2_is_the_variance_of_all_values_for_any_split():
    x = torch.randn(3, 60, dtype=torch.float64) * 3 + 7
    for b in (2, 3, 10, 60):
        estimates = A.variance_estimators(x.view(3, -1, b))
        assert torch.allclose(estimates["eq2"], x.var(1), rtol=1e-12)
        assert torch.allclose(estimates["eq3"], _direct_estimators(x, b)["eq3"], rtol=1e-12)


# -- estimator_error: simulation on real activations -------------------------------------------


def test_activation_pool_and_simulation_computed_another_way(run):
    loaded = _loaded(run)
    model = loaded.parts.model
    name, layer = A.bn_layer(model, None)
    assert name == A.DEFAULT_LAYER
    images = A.training_images(loaded.reader, 12, 5, augment=True, seed=3)
    assert [x.shape[0] for x in images] == [5, 5, 2]
    pool = A.activation_pool(model, layer, images)

    seen = []  # second way: the whole forward at inference, the layer's input kept by a hook
    handle = layer.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    model.eval()
    with torch.no_grad():
        for x in images:
            model(x)
    handle.remove()
    direct = torch.cat(seen)  # (images, C, H, W)
    channels = direct.shape[1]
    assert pool.shape == (channels, direct[:, 0].numel())
    for c in (0, channels - 1):
        assert torch.allclose(pool[c], direct[:, c].flatten().double())

    n, b, trials = 12, 3, 4
    estimates = A.simulate(pool, n, b, trials, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)  # the same draws
    for t in range(trials):
        index = torch.randint(pool.shape[1], (n,), generator=gen).tolist()
        for c in (0, 5, channels - 1):
            values = [float(pool[c, i]) for i in index]
            batches = [values[i:i + b] for i in range(0, n, b)]
            eq2 = statistics.variance(values)
            eq3 = statistics.fmean(statistics.variance(v) for v in batches)
            raw = statistics.fmean(statistics.pvariance(v) for v in batches)
            for key, want in (("eq2", eq2), ("eq3", eq3), ("eq3raw", raw)):
                assert float(estimates[key][t, c]) == pytest.approx(want, rel=1e-9, abs=1e-12)

    var, kurt = A.pool_moments(pool)
    values = [float(v) for v in pool[0]]
    mu = statistics.fmean(values)
    assert float(var[0]) == pytest.approx(statistics.pvariance(values), rel=1e-9)
    m4 = statistics.fmean((v - mu) ** 4 for v in values)
    assert float(kurt[0]) == pytest.approx(m4 / statistics.pvariance(values) ** 2, rel=1e-9)


def test_estimator_error_command(run, capsys):
    assert _analyze("estimator_error", f"run={run}", "num_images=32", "num_samples=40",
                    "batch_sizes=[2,4,40]", "trials=400", "device=cpu") == 0
    record = A.read_analysis(run, "estimator_error")
    assert record["options"] == {"layer": None, "num_images": 32, "num_samples": 40,
                                 "batch_sizes": [2, 4, 40], "trials": 400, "seed": 0}
    assert record["iter"] == 16
    result = record["result"]
    assert list(result["table"]) == ["B=2", "B=4", "B=40"]
    assert result["table"]["B=2"]["Eq. 3 bias (closed)"] == 0.0
    scalars = result["scalars"]
    assert scalars["eq3raw_bias_B2_closed"] == -0.5
    assert scalars["eq3raw_bias_B2_sim"] == pytest.approx(-0.5, abs=0.05)
    # At B = N the two estimators are the same number; at B = 2 Eq. 3 varies more (A.2).
    assert scalars["eq3_var_B40_sim"] == pytest.approx(scalars["eq2_var_B40_sim"], rel=1e-9)
    assert scalars["eq3_var_B2_closed"] > scalars["eq2_var_B2_closed"]
    assert scalars["eq3_var_B2_sim"] > scalars["eq2_var_B2_sim"]
    assert 0 <= scalars["max_rel_gap_closed_vs_sim"] < 0.5  # 400 trials: ~7 % MC error
    json.dumps(record, allow_nan=False)
    _render(A.ANALYSES["estimator_error"].plot, result)


# -- channel_trace (Fig. 2) -------------------------------------------------------------------


def test_batch_means_equal_a_direct_computation(run):
    loaded = _loaded(run, "epoch1.pt")
    model = loaded.parts.model
    name, layer = A.bn_layer(model, "layer2.0.bn2")
    before = copy.deepcopy(model.state_dict())
    batches = A.random_batches(loaded.reader, 16, 3, seed=1)
    means = A.batch_means(model, layer, batches, channel=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no buffer changed

    direct = copy.deepcopy(model).train()  # second way: a plain training-mode forward
    inputs = []
    dict(direct.named_modules())[name].register_forward_pre_hook(
        lambda m, args: inputs.append(args[0]))
    with torch.no_grad():
        for x in batches():
            direct(x)
    assert len(inputs) == len(means) == 3
    for x, mean in zip(inputs, means):
        assert mean == pytest.approx(float(x[:, 3].mean()), rel=1e-5, abs=1e-7)
        running = torch.zeros(x.shape[1])
        F.batch_norm(x, running, torch.ones(x.shape[1]), training=True, momentum=1.0)
        assert mean == pytest.approx(float(running[3]), rel=1e-5, abs=1e-7)


def test_channel_trace_command(run):
    assert _analyze("channel_trace", f"run={run}", "num_batches=4", "channel=2",
                    "device=cpu") == 0
    record = A.read_analysis(run, "channel_trace")
    assert record["options"] == {"layer": None, "channel": 2, "num_batches": 4,
                                 "batch_size": None, "seed": 0}
    result = record["result"]
    assert result["layer"] == "layer3.0.bn1"
    assert result["batch_size"] == 32  # the run's normalization batch
    assert result["epochs"] == [1, 2]
    assert list(result["table"]) == ["epoch 1", "epoch 2"]
    for i, epoch in enumerate((1, 2)):
        saved = torch.load(run / "checkpoints" / f"epoch{epoch}.pt", weights_only=False)
        ema = float(saved["model"]["layer3.0.bn1.running_mean"][2])
        means = result["batch_means"][i]
        assert result["ema_mean"][i] == pytest.approx(ema)
        assert result["population_mean"][i] == pytest.approx(statistics.fmean(means))
        assert result["batch_mean_std"][i] == pytest.approx(statistics.stdev(means))
        offset = abs(ema - statistics.fmean(means)) / statistics.stdev(means)
        assert result["table"][f"epoch {epoch}"]["|EMA−pop|/std"] == pytest.approx(offset)
    assert result["scalars"]["ema_offset_first"] == result["table"]["epoch 1"]["|EMA−pop|/std"]
    assert result["scalars"]["ema_offset_last"] == result["table"]["epoch 2"]["|EMA−pop|/std"]

    loaded = _loaded(run, "epoch2.pt")  # the same batches, computed apart from the command
    layer = dict(loaded.parts.model.named_modules())["layer3.0.bn1"]
    means = A.batch_means(loaded.parts.model, layer, A.random_batches(loaded.reader, 32, 4, 0), 2)
    assert means == pytest.approx(result["batch_means"][1], rel=1e-6)
    _render(A.ANALYSES["channel_trace"].plot, result)


# -- layerwise_error (appendix A.3) -----------------------------------------------------------


def test_precise_at_b_equal_n_is_one_training_forward(run):
    loaded = _loaded(run)
    model = loaded.parts.model
    images = torch.cat(A.training_images(loaded.reader, 48, 16, augment=False, seed=0))
    stats = A.population_statistics(model, lambda: [images], layerwise=False)

    direct = copy.deepcopy(model).train()  # PyTorch's own update: momentum 1 keeps the batch's
    layers = [m for _, m in A.bn_layers(direct)]
    for m in layers:
        m.momentum = 1.0
    with torch.no_grad():
        direct(images)
    assert len(stats) == len(layers) == 20
    for (mean, var), m in zip(stats, layers):
        assert torch.allclose(mean, m.running_mean.double(), rtol=1e-4, atol=1e-6)
        assert torch.allclose(var, m.running_var.double(), rtol=1e-4, atol=1e-6)


def test_layerwise_error_command(run):
    assert _analyze("layerwise_error", f"run={run}", "num_samples=64", "batch_sizes=[4,64]",
                    "reference_batch=16", "device=cpu") == 0
    record = A.read_analysis(run, "layerwise_error")
    assert record["options"] == {"num_samples": 64, "batch_sizes": [4, 64],
                                 "reference_batch": 16, "seed": 0}
    result = record["result"]
    assert len(result["layers"]) == 20 and result["layers"][0] == "bn1"
    scalars = result["scalars"]
    for b in (4, 64):
        # A.3: layer by layer, any batch gives the exact statistics (float rounding apart).
        assert scalars[f"layerwise_mean_err_max_B{b}"] < 1e-5
        assert scalars[f"layerwise_var_err_max_B{b}"] < 1e-5
        # The first layer sees the images themselves: Eq. 2 is exact for it at any B.
        first = result["per_layer"][str(b)]["precise"]
        assert first["mean"][0] < 1e-6 and first["var"][0] < 1e-6
    # Deeper layers: small batches' normalization differs; at B = N only by n/(n-1).
    assert scalars["precise_var_err_B4"] > 10 * scalars["precise_var_err_B64"]
    assert scalars["precise_var_err_max_B64"] < 0.02
    assert result["table"]["B=4"]["PreciseBN var err"] == scalars["precise_var_err_B4"]
    _render(A.ANALYSES["layerwise_error"].plot, result)


# -- taylor_error (CBN §3) --------------------------------------------------------------------

CBN_TINY = [*(o for o in TINY if not o.startswith(("trainer.epochs", "trainer.keep_checkpoints"))),
            "trainer.epochs=1", "norm=cbn", "norm.burnin=0", "trainer.float64=true"]


@pytest.fixture(scope="module")
def trained_cbn(tmp_path_factory) -> Path:
    """A CBN run (window 4, no burn-in) in float64, so that second-order terms stand far above
    the rounding."""
    return train_tiny(tmp_path_factory.mktemp("trained_cbn"), CBN_TINY)


@pytest.fixture
def cbn_run(trained_cbn, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the CBN run."""
    monkeypatch.setenv("BNBENCH_CACHE", str(trained_cbn.parent / "cache"))
    copy_dir = tmp_path / "cbn_run"
    shutil.copytree(trained_cbn, copy_dir)
    monkeypatch.chdir(tmp_path)
    return copy_dir


def _taylor(run: Path, **options) -> dict:
    return A.compute_taylor_error(run, {**A.ANALYSES["taylor_error"].defaults, **options},
                                  device="cpu")


def test_taylor_error_at_rate_zero_every_estimate_is_exact(cbn_run):
    before = _tree(cbn_run)
    assert _analyze("taylor_error", f"run={cbn_run}", "steps=2", "lr=0", "device=cpu") == 0
    record = A.read_analysis(cbn_run, "taylor_error")
    assert record["options"] == {"layer": None, "steps": 2, "lr": 0, "seed": 0}
    result = record["result"]
    assert result["norm"] == "cbn" and len(result["layers"]) == 20
    assert list(result["table"]) == ["τ=1", "τ=2"]
    assert result["weight_change"] == [0.0, 0.0]
    for errors in result["per_layer"].values():  # W_t = W_{t−τ}: (b) = (c) = (a)
        assert errors["naive_mean"] == errors["naive_var"] == [0.0, 0.0]
        assert max(errors["compensated_mean"] + errors["compensated_var"]) < 1e-13
    after = _tree(cbn_run)  # the run itself is not written
    assert {k: v for k, v in after.items() if not k.startswith("analyses")} == before
    _render(A.ANALYSES["taylor_error"].plot, result)


def test_taylor_error_is_second_order_in_the_step_for_the_first_layer(cbn_run):
    """bn1 normalizes conv1 of the images: its mean is linear in W (compensated exactly) and its
    variance quadratic, so halving the step halves the naive error and quarters the
    compensated one."""
    small, large = (_taylor(cbn_run, layer="bn1", steps=2, lr=lr) for lr in (1e-4, 2e-4))
    assert small["layers"] == ["bn1"]
    for tau in (1, 2):
        s, g = small["scalars"], large["scalars"]
        for stat in ("mean", "var"):
            ratio = g[f"naive_{stat}_err_tau{tau}"] / s[f"naive_{stat}_err_tau{tau}"]
            assert ratio == pytest.approx(2, rel=0.05), (stat, tau)
        assert g[f"compensated_var_err_tau{tau}"] / s[f"compensated_var_err_tau{tau}"] == \
            pytest.approx(4, rel=0.1)
        assert s[f"compensated_var_err_tau{tau}"] < 0.01 * s[f"naive_var_err_tau{tau}"]
        assert s[f"compensated_mean_err_tau{tau}"] < 1e-12
    assert small["weight_change"][1] == pytest.approx(2 * small["weight_change"][0], rel=0.1)


@pytest.mark.parametrize("path", ["cbn_layer", "conv_jacobians"])
def test_taylor_terms_equal_finite_differences(cbn_run, path):
    """A deep layer's stored entry, compensated to a change of its own conv only, against the
    exact statistics and a central difference of σ² (quadratic in W: exact) computed here; by
    the CBN layer's own Jacobians and by conv_jacobians (what a BN run uses)."""
    from bnbench.norm.cbn import compensate, conv_jacobians

    loaded = _loaded(cbn_run)
    model = loaded.parts.model
    [(name, layer, conv)] = A.taylor_layers(model, "layer2.0.bn1")
    jacobians = (A.jacobians_of(layer, conv) if path == "cbn_layer"
                 else functools.partial(conv_jacobians, conv))
    assert (jacobians == layer.jacobians) == (path == "cbn_layer")
    [(x, _)] = A.labelled_batches(loaded.reader, 16, 1, seed=2)
    history = A.History.empty(conv, 1, torch.float64)
    A.conv_outputs(model, [conv], x,
                   lambda i, inp, y: A.record_iteration(history, conv, jacobians, inp, y))

    def moments() -> tuple[torch.Tensor, torch.Tensor]:
        seen = []
        A.conv_outputs(model, [conv], x, lambda i, inp, y: seen.append(y))
        return seen[0].mean((0, 2, 3)), seen[0].var((0, 2, 3), correction=0)

    w0 = conv.weight.detach().clone()
    direction = torch.randn(w0.shape, generator=torch.Generator().manual_seed(0),
                            dtype=w0.dtype) * 0.01 * w0.norm() / w0.numel() ** 0.5
    mean0, var0 = moments()
    torch.testing.assert_close(history.mean[0], mean0)
    torch.testing.assert_close(history.var[0], var0)
    h = 1e-3
    with torch.no_grad():
        conv.weight.copy_(w0 + h * direction)
        var_plus = moments()[1]
        conv.weight.copy_(w0 - h * direction)
        var_minus = moments()[1]
        slope = (var_plus - var_minus) / (2 * h)  # ⟨∂σ²/∂W, D⟩ by finite differences
        conv.weight.copy_(w0 + direction)
        mean1, var1 = moments()
        mean, var, _ = compensate(history.mean, history.var, False, 1.0,
                                  *history.jacobians(conv))
    torch.testing.assert_close(mean[0], mean1, rtol=1e-10, atol=1e-12)  # linear: exact
    shift = mean1 - mean0
    torch.testing.assert_close(var[0], (var0 + slope - shift ** 2).clamp_min(0), rtol=1e-8,
                               atol=1e-12)
    assert (var[0] - var1).norm() < 0.05 * (var0 - var1).norm()  # and close to the truth


def test_taylor_error_on_a_bn_run(run):
    """A BN run: its own steps, CBN's compensation computed alongside (conv_jacobians)."""
    assert _analyze("taylor_error", f"run={run}", "steps=2", "device=cpu") == 0
    result = A.read_analysis(run, "taylor_error")["result"]
    assert result["norm"] == "bn" and len(result["layers"]) == 20
    assert result["lr"] == pytest.approx(0.2 * 32 / 256)  # the peak rate of the run
    first = result["per_layer"]["bn1"]
    assert first["compensated_mean"][0] < 1e-3 * first["naive_mean"][0]  # fp32: ~rounding
    scalars = result["scalars"]
    for tau in (1, 2):
        assert scalars[f"naive_mean_err_tau{tau}"] > scalars[f"compensated_mean_err_tau{tau}"]
    assert scalars["ratio_naive_over_compensated_mean_tau1"] == pytest.approx(
        scalars["naive_mean_err_tau1"] / scalars["compensated_mean_err_tau1"])
    assert result["table"]["τ=2"]["naive var err"] == scalars["naive_var_err_tau2"]


# -- cost (CBN cost table) --------------------------------------------------------------------


@pytest.mark.parametrize("window", [3, 1])
def test_cost_formulas_against_flop_counter_and_buffers(window):
    """FlopCounterMode counts the matrix products of a CBN step (convolutions, bmm): they must
    be the formula's terms less its elementwise parts; the history's bytes are those of a real
    layer's buffers. (FlopCounterMode ignores groups in convolution_backward: groups=1 here.)"""
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from bnbench.norm.cbn import CrossIterationBatchNorm2d

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    layer = CrossIterationBatchNorm2d(6, window=window)
    layer.pair(conv)
    x = torch.randn(5, 4, 9, 9)
    for _ in range(window):  # a full window
        layer(conv(x))
    with FlopCounterMode(display=False) as counter:
        y = conv(x)
    conv_count = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        layer(conv(x))
    site = A.NormSite("bn", tuple(y.shape), tuple(x.shape), tuple(conv.weight.shape), 1)
    assert A.conv_flops(site.shape, site.weight) == conv_count
    terms = A.norm_flops(site, "cbn", window)
    c, p = 6, 4 * 3 * 3
    assert terms["statistics"] == 3 * y.numel() and terms["normalize"] == 2 * y.numel()
    if window == 1:  # BN: no Jacobians
        assert set(terms) == {"statistics", "normalize"}
        assert counter.get_total_flops() == conv_count
    else:
        elementwise = x.numel() + c * p + 2 * c * p  # input sum, ∂σ²/∂W scaling, e_σ
        matrix = sum(v for k, v in terms.items() if k not in ("statistics", "normalize"))
        assert counter.get_total_flops() - conv_count == matrix - elementwise
    held = sum(b.numel() * b.element_size() for n, b in layer.named_buffers()
               if n.startswith("hist_"))
    assert A.history_bytes(site, window, 4) == held
    assert A.norm_flops(site, "cbn", window, training=False) == A.norm_flops(
        site, "bn", window, training=False) == {"statistics": 0, "normalize": 2 * y.numel()}


def test_cost_command(run):
    from torch.utils.flop_counter import FlopCounterMode

    assert _analyze("cost", f"run={run}", "batch_size=8", "window=3", "min_run_time=0.01",
                    "device=cpu") == 0
    record = A.read_analysis(run, "cost")
    assert record["options"] == {"window": 3, "batch_size": 8, "min_run_time": 0.01, "seed": 0}
    result = record["result"]
    assert list(result["table"]) == ["bn", "gn", "cbn"]
    assert result["inference_equal_to_bn"] is True and result["inference_max_abs_diff"] == 0.0
    scalars = result["scalars"]
    assert scalars["cbn_inference_equals_bn"] == 1.0
    assert result["table"]["bn"]["train vs bn"] == 1.0
    assert scalars["cbn_train_vs_bn"] == result["table"]["cbn"]["train vs bn"] > 0
    # the same model built apart: its convs' FLOPs counted by torch, its history's bytes held
    loaded = _loaded(run)
    cfg, x = loaded.cfg, torch.randn(result["input_shape"])
    model = A.build_variant(cfg, "cbn", {"window": 3, "burnin": 0},
                            loaded.parts.data.num_classes, torch.device("cpu"), 0)
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                  if "convolution" in str(op))
    assert result["conv_flops"] == counted
    model.train()(x)
    held = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".hist_" in n)
    assert scalars["cbn_extra_memory_mb"] == pytest.approx(held / 1e6, rel=1e-12)
    bn = result["table"]["bn"]
    assert bn["norm FLOPs (M)"] == result["table"]["gn"]["norm FLOPs (M)"]  # 5E each
    assert result["table"]["cbn"]["fraction of conv FLOPs"] > 1  # ∂σ²/∂W: a conv's worth
    assert bn["norm extra memory (MB)"] == result["table"]["gn"]["norm extra memory (MB)"] == 0
    _render(A.ANALYSES["cost"].plot, result)


# -- the command ------------------------------------------------------------------------------


def test_second_run_is_a_no_op(run, capsys):
    args = [f"run={run}", "num_samples=16", "batch_sizes=[16]", "device=cpu"]
    assert _analyze("layerwise_error", *args) == 0
    path = run / "analyses" / "layerwise_error.json"
    first, stamp = path.read_bytes(), path.stat().st_mtime_ns
    capsys.readouterr()
    assert _analyze("layerwise_error", *args) == 0
    assert "recorded already for iteration 16" in capsys.readouterr().out
    assert path.read_bytes() == first and path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == ["layerwise_error.json"]  # no tmp
    assert _analyze("layerwise_error", *args, "force=true") == 0
    assert "recorded in" in capsys.readouterr().out
    assert _analyze("layerwise_error", *args, "seed=1") == 0  # other options: computed again
    assert A.read_analysis(run, "layerwise_error")["options"]["seed"] == 1


def test_command_line_through_a_subprocess(run):
    """As the experiment runner calls it: a process of its own, options as strings."""
    proc = subprocess.run([sys.executable, "-m", "bnbench", "analyze", "layerwise_error",
                           f"run={run}", "num_samples=8", "batch_sizes=[8]", "device=cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"recorded in {run / 'analyses' / 'layerwise_error.json'}" in proc.stdout
    assert A.read_analysis(run, "layerwise_error")["options"]["batch_sizes"] == [8]


@pytest.mark.parametrize("args,message", [
    (["nonsense"], "unknown analysis; choose one of channel_trace, estimator_error, "
                   "layerwise_error"),
    (["channel_trace", "{run}", "chanel=1"], "unknown option chanel of channel_trace"),
    (["channel_trace", "{run}", "channel=-1"], "channel=-1: must be a non-negative integer"),
    (["channel_trace", "{run}", "channel=99"], "channel=99: layer layer3.0.bn1 has 32 channels"),
    (["channel_trace", "{run}", "layer=fc"], "layer=fc: not a BatchNorm layer of the model"),
    (["channel_trace", "{run}", "num_batches=1"], "num_batches=1: the spread"),
    (["channel_trace", "run={empty}"], "no checkpoint"),
    (["channel_trace", "run={nowhere}"], "no such directory"),
    (["channel_trace"], "run: missing"),
    (["estimator_error", "{run}", "batch_sizes=2,10"], "batch_sizes=2,10: must be a list of "
                                                       "positive integers"),
    (["estimator_error", "{run}", "batch_sizes=[1,10]"], "B=1 must be in [2, num_samples=1000]"),
    (["layerwise_error", "{run}", "num_samples=8", "batch_sizes=[16]"], "B=16 must be in [1, "),
    (["layerwise_error", "{run}", "batch_sizes=[10,2]"], "in increasing order"),
    (["layerwise_error", "{run}", "num_samples=true"], "num_samples=true: must be a positive"),
    (["layerwise_error", "{run}", "num_samples=100000"], "100000 images requested"),
    (["layerwise_error", "{run}", "force=maybe"], "force=maybe: must be true or false"),
    (["layerwise_error", "{run}", "device=gpu"], "device=gpu: choose one of auto, cpu, cuda"),
    (["taylor_error", "{run}", "lr=-1"], "lr=-1: must be a non-negative number or null"),
    (["taylor_error", "{run}", "steps=0"], "steps=0: must be a positive integer"),
    (["taylor_error", "{run}", "layer=fc"], "layer=fc: not a BatchNorm layer that follows a "
                                            "Conv2d"),
    (["cost", "{run}", "min_run_time=0"], "min_run_time=0: must be a positive number"),
    (["cost", "{run}", "window=true"], "window=true: must be a positive integer"),
    (["cost", "{run}", "batch_size=100000"], "fewer than one global batch of 100000"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(run, tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    names = {"run": f"run={run}", "empty": str(empty), "nowhere": str(tmp_path / "nowhere")}
    argv = [a.format(**names) for a in args]
    before = _tree(run)
    assert _analyze(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnbench: error: "), err
    assert message in err[0]
    assert _tree(run) == before and not (empty / "analyses").exists()
    assert list(Path.cwd().iterdir()) == []


def test_channel_trace_needs_kept_checkpoints(run, capsys):
    for kept in (run / "checkpoints").glob("epoch*.pt"):
        kept.unlink()
    assert _analyze("channel_trace", f"run={run}") == 2
    assert "train with trainer.keep_checkpoints=true" in capsys.readouterr().err
    assert not (run / "analyses").exists()


def test_help_lists_the_analyses(capsys):
    assert _analyze("--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bnbench analyze <name> run=<run dir>")
    for name in A.ANALYSES:
        assert f"  {name}: " in out
    assert "num_batches=100" in out and "trials=200" in out
    assert cli.main(["--help"]) == 0
    assert "analyze NAME run=DIR" in capsys.readouterr().out


def test_read_analysis_of_a_missing_or_torn_record(tmp_path):
    assert A.read_analysis(tmp_path, "channel_trace") is None
    (tmp_path / "analyses").mkdir()
    (tmp_path / "analyses" / "channel_trace.json").write_text('{"name": "chan')
    assert A.read_analysis(tmp_path, "channel_trace") is None


def _render(plot, result) -> None:
    """Draw the result on an axes of a figure of our own (no pyplot state) and save it."""
    from matplotlib.figure import Figure

    fig = Figure()
    plot(result, fig.add_subplot())
    fig.savefig(io.BytesIO(), format="png")
