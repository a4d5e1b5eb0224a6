"""The crop head (``model.head=crops``, Rethinking Tables 3 and 6; bnbench/models/crops.py).

Crops ≡ torchvision's RoIAlign; a simulated device normalizes the crops of its own images and no
other (group membership, and the statistics ≡ ``F.batch_norm`` of each device's crops); one-process
ShuffleBN ≡ an explicit permutation, the head, the inverse permutation; one-process SyncBN ≡ BN over
all crops; 2 gloo processes ≡ 1 process with 2 simulated devices (per-device BN), ≡ an explicit
cross-process shuffle (ShuffleBN), ≡ BN over all crops (SyncBN); ``dist.nproc=2`` end to end; bad
inputs are one line. Float64 throughout.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_jobs
from torch import nn

from bnbench import cli
from bnbench.errors import BnbenchError
from bnbench.models.crops import CropNorm, crop_boxes, crop_features

TOL = {"rtol": 1e-10, "atol": 1e-10}
R, K, B = 3, 5, 2  # crops per image, classes, images per process (per device) in the 2-rank jobs


def crop_model(norm: str = "ghost", options: dict | None = None, **crops) -> nn.Module:
    """A tiny crop classifier in float64, the same initial weights for every caller: 1/8-width
    ResNet-18 (small-input stem) cropped after layer2 (a 4×4 map for 8×8 images), ``R`` crops of
    2×2, a 2-layer head, the run's ``norm`` with ``options``."""
    from omegaconf import OmegaConf

    from bnbench.config import ModelConfig
    from bnbench.models import build_model

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {
        "arch": "resnet18", "width": 0.125, "small_input": True, "head": "crops",
        "crops": {"num": R, "size": 2, "stage": 2, "layers": 2, "min_side": 0.4,
                  "max_side": 0.8, **crops}})
    torch.manual_seed(0)
    return build_model(cfg, norm, dict(options or {}), num_classes=K).double()


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    return x, torch.randint(0, K, (n,), generator=gen)


def norm_inputs(model: nn.Module) -> list[tuple[CropNorm, list]]:
    """Every :class:`CropNorm` of ``model``, each with a list its forward hook fills with
    ``(input, output)`` in crop layout."""
    seen = []
    for m in model.modules():
        if isinstance(m, CropNorm):
            calls: list = []
            m.register_forward_hook(  # (copies: the head's ReLU works in place)
                lambda _m, inp, out, calls=calls: calls.append((inp[0].clone(), out.clone())))
            seen.append((m, calls))
    return seen


def batch_norm_rows(z: torch.Tensor, layer: nn.Module, groups: list[torch.Tensor]) -> torch.Tensor:
    """``F.batch_norm`` (training mode, PyTorch's kernel) of each group of rows (crops) of ``z``
    on its own, with ``layer``'s affine parameters: the reference normalization."""
    out = torch.empty_like(z)
    for rows in groups:
        out[rows] = F.batch_norm(z[rows], None, None, layer.weight, layer.bias, True, 0.0,
                                 layer.eps)
    return out


def device_rows(images_per_device: int, devices: int) -> list[torch.Tensor]:
    """The crop rows of each simulated device: its images' crops (image-major layout)."""
    size = images_per_device * R
    return [torch.arange(d * size, (d + 1) * size) for d in range(devices)]


# -- crops ----------------------------------------------------------------------------------


def test_crops_equal_roi_align():
    """The bilinear crops are torchvision's RoIAlign (aligned, one sample per bin) of the same
    boxes on every image, scaled to the map; rows are image-major."""
    from torchvision.ops import roi_align

    gen = torch.Generator().manual_seed(3)
    features = torch.randn(2, 4, 5, 7, generator=gen, dtype=torch.float64)
    boxes = crop_boxes(6, 0.2, 1.0, seed=1).double()
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert bool((boxes[:, 2:] > boxes[:, :2]).all())
    scale = torch.tensor([7, 5, 7, 5], dtype=torch.float64)
    ref = roi_align(features, [boxes * scale] * 2, output_size=3, spatial_scale=1.0,
                    sampling_ratio=1, aligned=True)
    torch.testing.assert_close(crop_features(features, boxes, 3), ref, **TOL)


def test_crop_loss_and_image_predictions():
    """Every crop has its image's label (mean cross-entropy over the crops); an image's
    prediction is the mean of its crops' logits."""
    model = crop_model()
    targets = torch.tensor([4, 0])
    logits = torch.randn(2 * R, K, dtype=torch.float64)
    loss, predictions = model.training_loss(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([4, 4, 4, 0, 0, 0])))
    torch.testing.assert_close(predictions, torch.stack([logits[:3].mean(0), logits[3:].mean(0)]),
                               **TOL)


def test_crops_are_image_major():
    """Rows ``n·R … n·R + R − 1`` are image ``n``'s crops (a map constant ``n`` gives ``n``)."""
    features = torch.arange(4, dtype=torch.float64).view(4, 1, 1, 1).expand(4, 2, 3, 3)
    crops = crop_features(features, crop_boxes(R, 0.5, 1.0, seed=0).double(), 2)
    assert crops.shape == (4 * R, 2, 2, 2)
    torch.testing.assert_close(crops[:, 0, 0, 0], torch.arange(4.0).repeat_interleave(R).double())


# -- one process: per-device BN, ShuffleBN, SyncBN ------------------------------------------


def test_device_groups_hold_only_their_own_images_crops():
    """Per-device BN with 2 images per device: (1) group membership — the BN layer's samples are
    images, sample ``n`` holds exactly image ``n``'s crops, so each group of ``nbs`` samples is a
    device's images; (2) every head norm's output ≡ ``F.batch_norm`` of each device's crops
    alone, and its EMA ≡ the mean of the devices' EMA steps."""
    tagged = torch.arange(4 * R, dtype=torch.float64).view(-1, 1, 1, 1).expand(-1, 2, 2, 2)
    seen = []
    recorder = nn.BatchNorm2d(2)
    recorder.forward = lambda x: seen.append(x) or x  # the layer's input, in its own layout
    CropNorm(recorder, R)(tagged)
    samples = seen[0]
    assert samples.shape == (4, 2, R * 2, 2)
    for n in range(4):  # crop n·R + r of image n, and nothing else
        assert set(samples[n].unique().tolist()) == {float(n * R + r) for r in range(R)}

    model = crop_model("ghost", {"nbs": 2}).train()
    hooks = norm_inputs(model)
    bn = [m.norm for m, _ in hooks]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in bn]
    x, _ = images(6)
    model(x)
    groups = device_rows(2, 3)
    for (layer, calls), (mean0, var0) in zip(hooks, before):
        z, out = calls[0]
        torch.testing.assert_close(out, batch_norm_rows(z, layer.norm, groups), **TOL)
        means, vars_ = [], []
        for rows in groups:  # one EMA step per device from the same buffers, then their mean
            m, v = mean0.clone(), var0.clone()
            F.batch_norm(z[rows], m, v, None, None, True, layer.norm.momentum, layer.norm.eps)
            means.append(m)
            vars_.append(v)
        torch.testing.assert_close(layer.norm.running_mean, torch.stack(means).mean(0), **TOL)
        torch.testing.assert_close(layer.norm.running_var, torch.stack(vars_).mean(0), **TOL)
    # with other devices the statistics change: they are the devices' own
    whole = batch_norm_rows(hooks[0][1][0][0], hooks[0][0].norm, [torch.arange(6 * R)])
    assert not torch.allclose(whole, hooks[0][1][0][1])


def test_one_process_shuffle_bn_is_permute_head_unpermute():
    """ShuffleBN over crops in one process ≡ the crops permuted by its π, the (unshuffled) head
    with per-device BN, the outputs permuted back: outputs, gradients and EMA; its devices then
    hold crops of several images."""
    model = crop_model("ghost", {"nbs": 2}, shuffle=True).train()
    reference = copy.deepcopy(model)
    x, y = images(6)
    torch.manual_seed(5)
    out = model(x)
    loss, _ = model.training_loss(out, y)
    loss.backward()
    perm = model.head.last_permutation
    assert sorted(perm.tolist()) == list(range(6 * R))
    assert not torch.equal(perm, torch.arange(6 * R))

    features = reference.backbone.forward_stages(x)[reference.stage - 1]
    crops = crop_features(features, reference.boxes, reference.size)
    shuffled = reference.head.module(crops[perm])  # the head without ShuffleBN, on X[π]
    unshuffled = torch.empty_like(shuffled)
    unshuffled[perm] = shuffled
    ref_out = reference.fc(unshuffled)
    ref_loss = F.cross_entropy(ref_out, y.repeat_interleave(R))
    ref_loss.backward()
    torch.testing.assert_close(out, ref_out, **TOL)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=name)
    images_per_group = [len(set((perm[rows] // R).tolist())) for rows in device_rows(2, 3)]
    assert max(images_per_group) > 2  # a device normalizes crops of more than its 2 images


def test_one_process_syncbn_is_bn_over_all_crops():
    """SyncBN in one process: every head norm ≡ ``F.batch_norm`` over the crops of all devices."""
    model = crop_model("syncbn").train()
    hooks = norm_inputs(model)
    model(images(4)[0])
    for layer, calls in hooks:
        z, out = calls[0]
        torch.testing.assert_close(out, batch_norm_rows(z, layer.norm, [torch.arange(4 * R)]),
                                   **TOL)


def test_inference_is_the_mean_of_the_crops_logits_and_batch_stats_use_one_image():
    """``eval()``: an image's prediction is the mean of its crops' logits; with mini-batch
    statistics of 1 image, each image's crops are normalized with their own statistics, so an
    image's prediction does not depend on the other images of the batch."""
    from bnbench.norm import eval_stats_mode

    model = crop_model("ghost", {"nbs": 1})
    x, _ = images(4)
    model.train()
    model(x)  # EMA statistics that differ from the defaults
    model.eval()
    with torch.no_grad():
        crop_logits = model.crop_logits(x)
        torch.testing.assert_close(model(x), crop_logits.view(4, R, K).mean(1), **TOL)
        with eval_stats_mode(model, "batch", 1):
            together = model(x)
            alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(together, alone, **TOL)
        assert not torch.allclose(together, model(x))  # ≠ population statistics


# -- 2 gloo processes ---------------------------------------------------------------------------


def _ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, broadcast_buffers=False)


def _sgd_steps(model: nn.Module, net: Callable, rows: slice, steps: int) -> dict:
    """``steps`` SGD steps (lr 0.1) of ``net`` (``model``, its DDP wrapper, or a reference
    forward with ``model``'s parameters) on ``rows`` of each step's batch of ``2B`` images: every
    step's crop logits and the last gradients; the final state (EMA averaged over processes, as
    the trainer does before it evaluates)."""
    from bnbench.evaluate import sync_population_stats

    outs = []
    for step in range(steps):
        x, y = images(2 * B, seed=10 + step)
        out = net(x[rows])
        loss, _ = model.training_loss(out, y[rows])
        model.zero_grad()
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
        outs.append(out.detach())
    sync_population_stats(model, "average")
    return {"out": outs, "grads": grads, "state": copy.deepcopy(model.state_dict())}


def per_device_worker(rank: int, world: int) -> dict:
    """Per-process BN (``norm=bn``: one device per process), B images per process, DDP."""
    model = crop_model("bn").train()
    return _sgd_steps(model, _ddp(model), slice(rank * B, (rank + 1) * B), steps=2)


def shuffle_worker(rank: int, world: int) -> dict:
    """ShuffleBN over the crops of both processes, per-process BN, DDP, one step."""
    model = crop_model("bn", shuffle=True).train()
    torch.manual_seed(20 + rank)  # rank 0's permutation is the one used
    out = _sgd_steps(model, _ddp(model), slice(rank * B, (rank + 1) * B), steps=1)
    return {**out, "perm": model.head.last_permutation}


def syncbn_worker(rank: int, world: int) -> dict:
    model = crop_model("syncbn").train()
    return _sgd_steps(model, _ddp(model), slice(rank * B, (rank + 1) * B), steps=2)


def _assert_matches(outs: list[dict], ref: dict, steps: int) -> None:
    """Each rank's crop logits are the reference's rows of its images; gradients (DDP's mean),
    weights and averaged EMA equal the reference's."""
    for rank, out in enumerate(outs):
        rows = slice(rank * B * R, (rank + 1) * B * R)
        for step in range(steps):
            torch.testing.assert_close(out["out"][step], ref["out"][step][rows], **TOL)
        assert len(out["grads"]) == len(ref["grads"])  # (in order: ShuffleBN's names differ)
        for (key, grad), got in zip(ref["grads"].items(), out["grads"].values()):
            torch.testing.assert_close(got, grad, **TOL, msg=key)
        assert len(out["state"]) == len(ref["state"])
        for (key, value), got in zip(ref["state"].items(), out["state"].values()):
            torch.testing.assert_close(got, value, **TOL, msg=key)


def _explicit_shuffle(model: nn.Module, perm: torch.Tensor) -> Callable:
    """The forward of one process that shuffles by hand: the crops of all images permuted by
    ``π``, the head (GhostBN: a device per rank's slice), the outputs permuted back."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        features = model.backbone.forward_stages(x)[model.stage - 1]
        shuffled = model.head(crop_features(features, model.boxes, model.size)[perm])
        unshuffled = torch.empty_like(shuffled)
        unshuffled[perm] = shuffled
        return model.fc(unshuffled)

    return forward


def test_two_gloo_processes_equal_one_process_references():
    """2 processes × B images (DDP, float64) ≡ one process × 2B images:

    * per-process BN ≡ ``norm.nbs=B`` (two simulated devices of B images and their crops), over
      two SGD steps: outputs, gradients, weights, averaged EMA;
    * ShuffleBN across the processes ≡ the explicit shuffle by the ranks' common ``π``;
    * SyncBN ≡ BN over all crops.

    (One set of workers for the three: starting processes is what costs.)"""
    runs = run_jobs([("device", per_device_worker, ()), ("shuffle", shuffle_worker, ()),
                     ("sync", syncbn_worker, ())])
    for out in runs.values():
        if isinstance(out, Exception):
            raise out
    ref = _sgd_steps(model := crop_model("ghost", {"nbs": B}).train(), model, slice(None), 2)
    _assert_matches(runs["device"], ref, steps=2)

    perm = runs["shuffle"][0]["perm"]
    assert torch.equal(runs["shuffle"][1]["perm"], perm)
    assert sorted(perm.tolist()) == list(range(2 * B * R))
    model = crop_model("ghost", {"nbs": B}).train()  # the same weights, no ShuffleBN
    _assert_matches(runs["shuffle"], _sgd_steps(model, _explicit_shuffle(model, perm),
                                                slice(None), 1), steps=1)

    ref = _sgd_steps(model := crop_model("bn").train(), model, slice(None), 2)
    _assert_matches(runs["sync"], ref, steps=2)


# -- the command line ---------------------------------------------------------------------------


TINY = ["model.head=crops", "dataset.num_train=64", "dataset.num_val=16", "dataset.resolution=8",
        "model.width=0.125", "model.crops.stage=2", "model.crops.num=3", "model.crops.size=2",
        "trainer.threads=1", "trainer.epochs=1", "precise.num_samples=16", "precise.batch_size=8",
        "eval.batch_size=16", "dataset.workers=0", "trainer.progress=false"]


@pytest.mark.slow
def test_self_launched_two_process_shuffle_bn_run_and_its_evaluations(tmp_path):
    """``dist.nproc=2`` (gloo) with ShuffleBN over the crops trains, and ``bnbench eval``
    evaluates its checkpoint with population and one image's mini-batch statistics."""
    env = {**os.environ, "BNBENCH_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "bnbench", "train", *TINY, "dist.nproc=2", "trainer.batch_size=8",
         "norm=ghost", "norm.nbs=2", "model.crops.shuffle=true", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert ("SGD 16 (8 × 2 processes), normalization 2 samples (crop head, ShuffleBN: a sample "
            "is 3 crops drawn at random across the devices)") in log
    for stats in (["stats=ema"], ["stats=batch", "batch.nbs=1"]):
        assert cli.main(["eval", f"run={run}", *stats, "threads=1"]) == 0
    records = (run / "evals.jsonl").read_text().splitlines()
    assert len(records) == 2 and '"stats": "batch"' in records[1] and '"batch.nbs": 1' in records[1]


def test_plan_of_the_crop_head():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from bnbench.config import register
    from bnbench.plan import batch_plan

    register()
    GlobalHydra.instance().clear()
    with initialize_config_module("bnbench.configs", version_base="1.3"):
        cfg = compose("train", overrides=["model.head=crops", "norm=ghost", "norm.nbs=2",
                                          "model.crops.shuffle=true"])
        pool = compose("train", overrides=["norm=ghost", "norm.nbs=2"])
    GlobalHydra.instance().clear()
    plan = batch_plan(cfg, 1)
    assert (plan.normalization, plan.crops, plan.shuffle_crops) == (2, 8, True)
    assert plan.layer_options() == {"nbs": 2}  # images: the head's BN samples are images
    assert "normalization 2 samples (crop head, ShuffleBN: a sample is 8 crops drawn" in (
        plan.describe())
    assert (batch_plan(pool, 1).crops, batch_plan(pool, 1).shuffle_crops) == (0, False)
    cfg.norm.nbs = 3  # 64 images are not 3-image devices
    with pytest.raises(BnbenchError, match="norm.nbs=3: the crop head"):
        batch_plan(cfg, 1)


@pytest.mark.parametrize("args,needle", [
    (["norm=ghost", "norm.nbs=3", "trainer.batch_size=8"],
     "norm.nbs=3: the crop head (model.head=crops) simulates devices of nbs images each"),
    (["model.crops.num=0"], "model.crops.num=0: must be positive"),
    (["model.crops.num=-2"], "model.crops.num=-2: must be positive"),
    (["model.crops.stage=5"], "model.crops.stage=5: a backbone stage, 1 … 4"),
    (["model.crops.min_side=0.9", "model.crops.max_side=0.5"],
     "model.crops.min_side=0.9 exceeds model.crops.max_side=0.5"),
    (["model.crops.backbone_norm=bn"], "model.crops.backbone_norm=bn: choose one of gn, ln, in"),
    (["norm=gn", "model.crops.shuffle=true"], "model.crops.shuffle=true: the head has no batch"),
    (["model.crops.normalize=false"], "model.crops.normalize=false: the head has no norm"),
    (["model.head=crop"], "model.head=crop: choose one of pool, fpn, crops"),
    (["norm=cbn"], "norm=cbn with model.head=crops: not supported"),
    (["norm=naive_cbn"], "norm=naive_cbn with model.head=crops: not supported"),
])
def test_bad_crop_head_inputs_are_one_line(args, needle, capsys, tmp_path):
    """Refused at config time: exit 2, one ``bnbench: error:`` line, no run dir."""
    argv = ["train", "model.head=crops", *args, f"hydra.run.dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnbench: error: "), err
    assert needle in err[0]
    assert not (tmp_path / "run").exists()
