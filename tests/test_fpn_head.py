"""The head shared over feature levels (``model.head=fpn``, Rethinking §5.2, Table 5) against
independent references, in float64.

References reuse the model's own backbone, laterals, convs and classifier (plain torch modules),
and write the head's normalization out with ``torch.nn.functional.batch_norm``: one BatchNorm per
level in separate passes (Alg. 1, row 6), or one BatchNorm over the flattened and concatenated
levels (Alg. 1, row 1); PreciseBN's per-level statistics by hand from the collected inputs.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bnbench import cli
from bnbench import norm as norms
from bnbench.config import TrainConfig
from bnbench.errors import BnbenchError
from bnbench.models import build_model, resnet
from bnbench.models.fpn import FPNClassifier
from bnbench.norm.domain import DomainBatchNorm2d
from bnbench.population import update_population_stats
from bnbench.train import training_loss

F64 = torch.float64
EPS, M = 1e-5, 0.1
K = 5  # classes
LEVELS = [2, 3, 4]  # 8×8, 4×4, 2×2 for 16×16 inputs (small-input stem)
MODES = ("domain", "shared")


def fpn(backbone_norm: str = "bn", seed: int = 0, **fpn_options) -> FPNClassifier:
    """A float64 FPN classifier on a 1/8-width ResNet-18 built from config, as the trainer
    builds it; the head's norm layers get random affine parameters (per slot where per level)."""
    cfg = OmegaConf.structured(TrainConfig).model
    cfg.width, cfg.small_input, cfg.head = 0.125, True, "fpn"
    cfg.fpn.width, cfg.fpn.levels, cfg.fpn.convs = 8, LEVELS, 2
    for key, value in fpn_options.items():
        cfg.fpn[key] = value
    torch.manual_seed(seed)
    model = build_model(cfg, backbone_norm, {}, K).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.head.norms:
            if getattr(layer, "weight", None) is not None:
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=g, dtype=F64) + 0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=F64))
    return model


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=F64)


def labels(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(seed + 100))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def affine_of(layer: DomainBatchNorm2d, level: int):
    """``(γ, β)`` that level ``level`` uses (its row with a per-level affine)."""
    if layer.affine_mode == "domain":
        return layer.weight[level], layer.bias[level]
    return layer.weight, layer.bias


def slot(layer: DomainBatchNorm2d, level: int) -> int:
    return level if layer.pop_stats == "domain" else 0


def buffers(layer: DomainBatchNorm2d) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the layer's population statistics, one ``(mean, var)`` per slot."""
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    return list(zip(mean, var)) if mean.dim() == 2 else [(mean, var)]


def step(model, forward, x, y):
    """``Σ_l CE(z_l, y)`` of ``forward(x)``'s level logits, backpropagated; the logits and
    every parameter's gradient (the gradients are reset first)."""
    model.zero_grad(set_to_none=True)
    z = forward(x)
    sum(F.cross_entropy(zl, y) for zl in z).backward()
    return z.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# -- training: the head's normalization over the levels ------------------------------------------
def separate_passes(ref, x, ema):
    """Alg. 1, row 6: the head on each level in its own pass, each norm a BatchNorm on that
    level alone (``F.batch_norm`` with slot ``l``'s buffers ``ema``, updated in place: a shared
    slot takes one BatchNorm's updates level after level)."""
    outputs = []
    for level, p in enumerate(ref.pyramid(x)):
        h = p
        for k, (conv, layer) in enumerate(zip(ref.head.convs, ref.head.norms, strict=True)):
            mean, var = ema[k][slot(layer, level)]
            h = F.relu(F.batch_norm(conv(h), mean, var, *affine_of(layer, level), True, M, EPS))
        outputs.append(ref.fc(h.mean((2, 3))))
    return torch.stack(outputs)


def joined_levels(ref, x, ema):
    """Alg. 1, row 1 (detectron2's ``RetinaNetHead_SharedTrainingBN``): each norm is one
    BatchNorm over the levels flattened and concatenated, then split back; a shared slot is its
    EMA, per-level slots take each level's own moments (written out)."""
    levels = ref.pyramid(x)
    for k, (conv, layer) in enumerate(zip(ref.head.convs, ref.head.norms, strict=True)):
        levels = [conv(p) for p in levels]
        shapes = [p.shape for p in levels]
        joined = torch.cat([p.flatten(2) for p in levels], dim=2).unsqueeze(3)
        shared_affine = layer.affine_mode == "shared"
        mean, var = ema[k][0] if layer.pop_stats == "shared" else (None, None)
        out = F.batch_norm(joined, mean, var, layer.weight if shared_affine else None,
                           layer.bias if shared_affine else None, True, M, EPS)
        parts = out.split([s[2] * s[3] for s in shapes], dim=2)
        outputs = [q.reshape(s) for q, s in zip(parts, shapes, strict=True)]
        if not shared_affine:
            outputs = [q * layer.weight[i].view(1, -1, 1, 1) + layer.bias[i].view(1, -1, 1, 1)
                       for i, q in enumerate(outputs)]
        if layer.pop_stats == "domain":
            for i, p in enumerate(levels):
                values = p.detach().transpose(0, 1).reshape(p.shape[1], -1)
                old_mean, old_var = ema[k][i]
                ema[k][i] = ((1 - M) * old_mean + M * values.mean(1),
                             (1 - M) * old_var + M * values.var(1, unbiased=True))
        levels = [F.relu(q) for q in outputs]
    return torch.stack([ref.fc(p.mean((2, 3))) for p in levels])


def check_step_against(reference, train, pop, affine):
    """One training step of the model and of ``reference`` on a copy of it: the same level
    logits, the same gradient of every parameter (backbone included), and the model's EMA equal
    to the reference's buffers."""
    model = fpn(train_stats=train, pop_stats=pop, affine_mode=affine).train()
    ref = copy.deepcopy(model)
    ema = [buffers(layer) for layer in ref.head.norms]
    start = [buffers(layer) for layer in ref.head.norms]
    x, y = images(), labels()
    z, grads = step(model, model, x, y)
    z_ref, grads_ref = step(ref, lambda x: reference(ref, x, ema), x, y)
    close(z, z_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        close(grads[name], grads_ref[name])
    for k, layer in enumerate(model.head.norms):
        got = buffers(layer)
        assert len(got) == len(ema[k]) == (len(LEVELS) if pop == "domain" else 1)
        for (mean, var), (ref_mean, ref_var), (old_mean, _) in zip(got, ema[k], start[k],
                                                                    strict=True):
            close(mean, ref_mean)
            close(var, ref_var)
            assert not torch.equal(mean, old_mean)  # (the EMA did move)
        assert int(layer.num_batches_tracked) == 1  # one per step, not one per level


@pytest.mark.parametrize("pop,affine", list(itertools.product(MODES, MODES)))
def test_per_level_statistics_equal_separate_passes_per_level(pop, affine):
    """Per-level SGD statistics (Table 5, rows 3–6) ≡ the head run on each level in a separate
    pass with its own BatchNorm: outputs, gradients, buffers."""
    check_step_against(separate_passes, "domain", pop, affine)


@pytest.mark.parametrize("pop,affine", list(itertools.product(MODES, MODES)))
def test_shared_statistics_equal_one_batchnorm_over_concatenated_levels(pop, affine):
    """Shared SGD statistics (rows 1–2) ≡ one BatchNorm over the joined levels."""
    check_step_against(joined_levels, "shared", pop, affine)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("affine", MODES)
def test_population_choice_never_enters_sgd(train, affine):
    """Rows 1–2, 3–4, 5–6 of Table 5 differ only in ``pop_stats``: from the same seed they take
    the same SGD step (same logits and gradients), so the experiment's pairs share weights."""
    x, y = images(), labels()
    shared = fpn(train_stats=train, pop_stats="shared", affine_mode=affine).train()
    per_level = fpn(train_stats=train, pop_stats="domain", affine_mode=affine).train()
    z_a, g_a = step(shared, shared, x, y)
    z_b, g_b = step(per_level, per_level, x, y)
    assert torch.equal(z_a, z_b)
    for name in g_a:
        assert torch.equal(g_a[name], g_b[name]), name


# -- PreciseBN and inference ------------------------------------------------------------------
def hand_statistics(model, batches, train: str, pop: str):
    """Each head layer's population statistics by hand: its inputs collected per level over all
    batches, the earlier head layers normalizing with the batch's statistics as PreciseBN's
    pass does (per level, or the union of the levels for shared SGD statistics); one
    ``(mean, unbiased var)`` per level, or one of all levels' values for a shared slot."""
    layers = list(model.head.norms)
    seen = [[[] for _ in LEVELS] for _ in layers]  # layer → level → (C, values)
    with torch.no_grad():
        for x in batches:
            levels = model.pyramid(x)
            for k, (conv, layer) in enumerate(zip(model.head.convs, layers, strict=True)):
                levels = [conv(p) for p in levels]
                for i, p in enumerate(levels):
                    seen[k][i].append(p.transpose(0, 1).reshape(p.shape[1], -1))
                if train == "shared":
                    union = torch.cat([v[-1] for v in seen[k]], dim=1)
                    stats = [(union.mean(1), union.var(1, unbiased=False))] * len(levels)
                else:
                    stats = [(v[-1].mean(1), v[-1].var(1, unbiased=False)) for v in seen[k]]
                levels = [F.relu(F.batch_norm(p, mean, var, *affine_of(layer, i), False, 0.0,
                                              EPS))
                          for i, (p, (mean, var)) in enumerate(zip(levels, stats, strict=True))]
    out = []
    for per_level in seen:
        values = [torch.cat(v, dim=1) for v in per_level]
        if pop == "shared":
            values = [torch.cat(values, dim=1)]
        out.append([(v.mean(1), v.var(1, unbiased=True)) for v in values])
    return out


@pytest.mark.parametrize("train,pop", list(itertools.product(MODES, MODES)))
@pytest.mark.parametrize("affine", MODES)
def test_precise_bn_slots_and_inference_per_level(train, pop, affine):
    """PreciseBN writes each level's statistics into its slot (or all levels' into the shared
    one), equal to statistics computed by hand; inference normalizes level ``l`` with slot
    ``l`` (or the shared slot) and predicts the mean of the level logits. (Backbone: FrozenBN,
    constant statistics that PreciseBN leaves alone.)"""
    model = fpn("frozen", train_stats=train, pop_stats=pop, affine_mode=affine)
    batches = [images(6, seed=s) for s in range(3)]
    update_population_stats(model, lambda: batches)
    expected = hand_statistics(model, batches, train, pop)
    layers = list(model.head.norms)
    for layer, stats in zip(layers, expected, strict=True):
        got = buffers(layer)
        assert len(got) == len(stats) == (len(LEVELS) if pop == "domain" else 1)
        for (mean, var), (ref_mean, ref_var) in zip(got, stats, strict=True):
            close(mean, ref_mean)
            close(var, ref_var)

    x = images(5, seed=9)
    model.eval()
    with torch.no_grad():
        logits = []
        for level, p in enumerate(model.pyramid(x)):
            h = p
            for k, (conv, layer) in enumerate(zip(model.head.convs, layers, strict=True)):
                mean, var = expected[k][slot(layer, level)]
                h = F.relu(F.batch_norm(conv(h), mean, var, *affine_of(layer, level), False,
                                        0.0, EPS))
            logits.append(model.fc(h.mean((2, 3))))
        close(model(x), torch.stack(logits).mean(0))


def test_training_loss_and_prediction():
    """The trainer's hook: an FPN model's loss is the sum of its levels' cross-entropies
    (log-softmax written out), its counted logits and its eval-mode prediction the mean of the
    level logits; any other model's loss is its logits' cross-entropy."""
    model = fpn("frozen", norm="gn")  # no batch statistics: train and eval modes agree
    x, y = images(), labels()
    z = model.train()(x)
    assert z.shape == (len(LEVELS), x.shape[0], K)
    loss, counted = training_loss(model, z, y)
    by_hand = -sum(zl.log_softmax(1).gather(1, y[:, None]).mean() for zl in z)
    close(loss, by_hand)
    close(counted, z.mean(0))
    close(model.eval()(x), z.mean(0))
    plain = resnet("resnet18", K, width=0.125, small_input=True).double()
    logits = plain(x)
    loss, counted = training_loss(plain, logits, y, 0.1)
    close(loss, F.cross_entropy(logits, y, label_smoothing=0.1))
    assert counted is logits


@pytest.mark.parametrize("norm,width,groups", [("none", 8, None), ("gn", 32, 4), ("gn", 12, 1)])
def test_norm_free_heads(norm, width, groups):
    """GN (groups of 8 channels as RetinaNet's, else fewer) and no norm (convs with a bias)."""
    model = fpn(norm=norm, width=width)
    assert not any(isinstance(m, DomainBatchNorm2d) for m in model.head.modules())
    for conv, layer in zip(model.head.convs, model.head.norms, strict=True):
        assert (conv.bias is not None) == (norm == "none")
        assert (getattr(layer, "num_groups", None)) == groups


@pytest.mark.parametrize("top_down", [False, True])
def test_pyramid_levels(top_down):
    """The levels: each stage's 1×1 lateral; with the top-down sum, plus the coarser level
    upsampled 2× by nearest neighbour (written as repeated pixels), from the coarsest down."""
    model = fpn("frozen", top_down=top_down).eval()
    x = images()
    with torch.no_grad():
        stages = model.backbone.forward_stages(x)
        expected = [lateral(stages[s - 1]) for lateral, s in zip(model.laterals, LEVELS)]
        if top_down:
            for i in (1, 0):
                coarser = expected[i + 1].repeat_interleave(2, 2).repeat_interleave(2, 3)
                expected[i] = expected[i] + coarser
        got = model.pyramid(x)
    assert [p.shape[-1] for p in got] == [8, 4, 2]
    for p, ref in zip(got, expected, strict=True):
        close(p, ref)


# -- bad input -------------------------------------------------------------------------------
def test_domain_layers_must_match_the_levels():
    backbone = norms.convert(resnet("resnet18", K, width=0.125, small_input=True), "bn")
    with pytest.raises(BnbenchError, match="2 domains for the 3 levels"):
        FPNClassifier(backbone, LEVELS, 8, 1, True, norms.make("domain", num_domains=2), K)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("bnbench: error: ")
    return err[0]


@pytest.mark.parametrize("args,needle", [
    (["norm=domain", "norm.num_domains=3"], "norm.num_domains=3: with model.head=fpn the "
     "backbone normalizes each image once, in one domain; the 3 levels are domains of the head"),
    (["model.fpn.levels=[3,2]"], "model.fpn.levels=[3, 2]: distinct backbone stages in "
     "increasing order"),
    (["model.fpn.levels=[0,1]"], "model.fpn.levels=[0, 1]"),
    (["model.fpn.levels=[]"], "model.fpn.levels=[]"),
    (["model.fpn.norm=bn"], "model.fpn.norm=bn: choose one of domain, gn, none"),
    (["model.fpn.train_stats=both"], "model.fpn.train_stats=both: choose one of domain, shared"),
    (["model.fpn.affine_mode=yes"], "model.fpn.affine_mode=yes: choose one of domain, shared"),
    (["model.fpn.width=0"], "model.fpn.width=0: must be positive"),
    (["model.fpn.convs=0"], "model.fpn.convs=0: must be positive"),
    (["norm=gn"], "model.fpn.norm=domain under norm=gn: a BatchNorm head needs a backbone"),
    (["model.head=pyramid"], "model.head=pyramid: choose one of pool, fpn"),
])
def test_bad_fpn_config_is_one_line_before_the_run_dir(args, needle, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "model.head=fpn", *args, f"hydra.run.dir={run}"]) == 2
    assert needle in error_line(capsys)
    assert not run.exists()
