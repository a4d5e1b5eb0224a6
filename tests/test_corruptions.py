"""ImageNet-C's corruptions against their published definitions, and the evaluation options of
Rethinking Table 4 (statistics re-estimated on held-out images of a domain, error on the rest)
against a second computation of the same numbers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from images import write_png_tree
from omegaconf import OmegaConf
from PIL import Image
from tiny import fresh_copy, train_tiny
from torch import nn

from bnbench import cli, eval_app
from bnbench.config import DatasetConfig, TrainConfig
from bnbench.data import build_dataset
from bnbench.data.corruptions import Corruption, check_corruption
from bnbench.data.datasets import DataSource, TensorSplit
from bnbench.data.loaders import derive_seed, normalize
from bnbench.errors import BnbenchError
from bnbench.evaluate import (
    Reader,
    StatsSpec,
    evaluate,
    evaluate_stats,
    held_out_indices,
    precise_batches,
)
from bnbench.plan import batch_plan
from bnbench.population import update_population_stats

#: ImageNet-C's constants (Hendrycks & Dietterich, make_imagenet_c.py) at severities 1–5.
IMAGENET_C = {
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
    "jpeg_compression": [25, 18, 15, 10, 7],
}


def _images(n: int = 6, size: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def _stored(y: np.ndarray) -> np.ndarray:
    """ImageNet-C's 8-bit storage of values in [0, 1]: numpy's uint8 cast of ``y * 255``."""
    return np.uint8(y * 255)


def _equal_but_ties(got: np.ndarray, y: np.ndarray) -> bool:
    """``got`` is ``_stored(y)``, except by one level where ``255·y`` is an integer up to
    rounding: there the truncation depends on the last bit of a float sum (the order in which a
    mean is summed), which neither ImageNet-C's numpy nor torch fixes."""
    scaled = y * 255
    tie = np.abs(scaled - np.round(scaled)) < 1e-9
    diff = np.abs(got.astype(int) - _stored(y).astype(int))
    return bool((diff == 0).all() or ((diff <= 1) & ((diff == 0) | tie)).all())


# -- the corruptions against their definitions ---------------------------------------------


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_contrast_is_imagenet_cs_formula(severity):
    images = _images()
    out = Corruption("contrast", severity)(images, torch.arange(len(images)))
    c = IMAGENET_C["contrast"][severity - 1]
    x = images.permute(0, 2, 3, 1).numpy() / 255.0  # HWC, as ImageNet-C reads a PIL image
    means = x.mean(axis=(1, 2), keepdims=True)
    assert _equal_but_ties(out.permute(0, 2, 3, 1).numpy(), np.clip((x - means) * c + means, 0, 1))
    # a real change: the spread of each channel shrinks by c
    spread = images.double().std(dim=(2, 3))
    assert torch.allclose(out.double().std(dim=(2, 3)), c * spread, atol=1.0)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_is_imagenet_cs_formula_with_noise_seeded_per_image(severity):
    images = _images()
    ids = torch.tensor([5, 0, 17, 3, 9, 11])
    corruption = Corruption("gaussian_noise", severity, seed=4, split="val")
    out = corruption(images, ids)
    c = IMAGENET_C["gaussian_noise"][severity - 1]
    for b, index in enumerate(ids.tolist()):  # image `index`'s draws from its own generator
        gen = torch.Generator().manual_seed(derive_seed(4, "val", index))
        z = torch.randn(images.shape[1:], generator=gen, dtype=torch.float64).numpy()
        expected = _stored(np.clip(images[b].numpy() / 255.0 + c * z, 0, 1))
        assert np.array_equal(out[b].numpy(), expected)


def test_gaussian_noise_draws_are_standard_normal_and_fixed_per_image():
    corruption = Corruption("gaussian_noise", 3, seed=1, split="train")
    z = corruption.noise((3, 64, 64), torch.arange(4))
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    assert not torch.equal(z[0], z[1])  # each image its own draws
    images = _images(n=4)
    whole = corruption(images, torch.arange(4))
    # the same image gives the same corrupted image in any batch, order or subset ...
    assert torch.equal(corruption(images[[2, 0]], torch.tensor([2, 0])), whole[[2, 0]])
    # ... and another one in another split or dataset
    for other in (Corruption("gaussian_noise", 3, seed=1, split="val"),
                  Corruption("gaussian_noise", 3, seed=2, split="train")):
        assert not torch.equal(other(images, torch.arange(4)), whole)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_jpeg_compression_is_pils_encoder_round_trip(severity):
    images = _images(n=3, size=16)
    out = Corruption("jpeg_compression", severity)(images, torch.arange(3))
    quality = IMAGENET_C["jpeg_compression"][severity - 1]
    for image, got in zip(images, out):
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer).convert("RGB"))
        assert np.array_equal(got.permute(1, 2, 0).numpy(), decoded)
        assert not torch.equal(got, image)


@pytest.mark.parametrize("name,severity,needle", [
    ("fog", 3, "dataset.corruption=fog: unknown; choose one of none, contrast, gaussian_noise, "
     "jpeg_compression"),
    ("contrast", 0, "dataset.severity=0: must be one of ImageNet-C's severities 1–5"),
    ("contrast", 6, "dataset.severity=6: must be one of"),
])
def test_unknown_corruption_or_severity_is_one_line(name, severity, needle, capsys, tmp_path):
    with pytest.raises(BnbenchError, match=needle.split(":")[0]):
        check_corruption("dataset", name, severity)
    with pytest.raises(BnbenchError, match="dataset.corruption|dataset.severity"):
        build_dataset(DatasetConfig(num_train=64, num_val=16, corruption=name, severity=severity))
    run = tmp_path / "run"
    assert cli.main(["train", f"dataset.corruption={name}", f"dataset.severity={severity}",
                     f"hydra.run.dir={run}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bnbench: error: ") and needle in line
    assert not run.exists()


def test_image_folders_are_corrupted_after_their_crop(tmp_path):
    write_png_tree(tmp_path / "tree", per_class=2, size=20)
    cfg = DatasetConfig(name="imagefolder", root=str(tmp_path / "tree"), crop_size=16,
                        resize_size=16, workers=0)
    clean = build_dataset(cfg)
    noisy = build_dataset(DatasetConfig(**{**vars(cfg), "corruption": "gaussian_noise"}))
    plain = dict(augment=False, shuffle=False, drop_last=False)
    (x, _), = clean.loader("val", 6, **plain)
    (y, _), = noisy.loader("val", 6, **plain)
    uint8 = (x * torch.tensor(clean.std).view(1, 3, 1, 1)
             + torch.tensor(clean.mean).view(1, 3, 1, 1)).mul(255).round().to(torch.uint8)
    expected = Corruption("gaussian_noise", 3, seed=0, split="val")(uint8, torch.arange(6))
    assert torch.allclose(y, normalize(expected, torch.tensor(noisy.mean).view(1, 3, 1, 1),
                                       torch.tensor(noisy.std).view(1, 3, 1, 1)))


# -- the held-out split --------------------------------------------------------------------


def test_held_out_images_and_the_rest_partition_the_split():
    held, rest = held_out_indices(100, 30)
    assert len(held) == 30 and len(rest) == 70
    assert set(held.tolist()).isdisjoint(rest.tolist())
    assert sorted(held.tolist() + rest.tolist()) == list(range(100))
    # one fixed order: the same for every call, and a larger holdout holds these out too
    assert torch.equal(held_out_indices(100, 30)[0], held)
    assert set(held.tolist()) <= set(held_out_indices(100, 50)[0].tolist())
    assert held.tolist() != list(range(30))  # random, not the (maybe class-sorted) first images
    for n in (0, 100):
        with pytest.raises(BnbenchError, match=f"holdout={n}: must be less than"):
            held_out_indices(100, n)


class _Recorder(nn.Module):
    """Records the index of every image it sees (coded in pixel (0, 0, 0)), in order."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, classes)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += (x[:, 0, 0, 0] * 255).round().long().tolist()
        return self.fc(self.bn(x).mean((2, 3)))


def _indexed_source(n: int, classes: int = 4) -> DataSource:
    images = torch.full((n, 3, 4, 4), 128, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # image i says i
    split = TensorSplit(images, torch.arange(n) % classes)
    return DataSource("indexed", classes, 4, split, split, (0.0,) * 3, (1.0,) * 3)


@pytest.mark.parametrize("stats", ["precise", "ema"])
def test_precise_reads_exactly_the_held_out_images_and_the_error_the_rest(stats):
    n, holdout = 200, 50
    cfg = OmegaConf.structured(TrainConfig)
    cfg.precise.num_samples, cfg.precise.batch_size, cfg.eval.batch_size = holdout, 25, 64
    model = _Recorder(4)
    spec = (StatsSpec("precise", num_samples=holdout, batch_size=25, data="heldout",
                      augment=False, seed=3) if stats == "precise" else StatsSpec("ema"))
    evaluate_stats(model, Reader(_indexed_source(n)), spec, batch_plan(cfg, 1), epoch=0,
                   holdout=holdout)
    held, rest = held_out_indices(n, holdout)
    first = holdout if stats == "precise" else 0  # PreciseBN forwards before the evaluation
    assert sorted(model.seen[:first]) == (held.tolist() if stats == "precise" else [])
    assert sorted(model.seen[first:]) == rest.tolist()
    with pytest.raises(BnbenchError, match="precise.data=heldout: .* set holdout=<n>"):
        evaluate_stats(model, Reader(_indexed_source(n)), StatsSpec(
            "precise", num_samples=holdout, batch_size=25, data="heldout"),
            batch_plan(cfg, 1), epoch=0)


def test_a_subset_of_a_corrupted_split_is_corrupted_as_the_whole_split():
    source = _indexed_source(40).corrupted("gaussian_noise", 2)
    plain = dict(augment=False, shuffle=False, drop_last=False)
    (whole, _), = source.loader("val", 40, **plain)
    picked = torch.tensor([31, 4, 17])
    (part, _), = source.subset("val", picked).loader("val", 40, **plain)
    assert torch.equal(part, whole[picked])


# -- `bnbench eval`'s options on a trained run ------------------------------------------------

TINY = ["dataset.num_train=256", "dataset.num_val=64", "dataset.resolution=8", "model.width=0.125",
        "trainer.batch_size=32", "precise.num_samples=128", "precise.batch_size=64",
        "eval.batch_size=64", "trainer.threads=1", "trainer.epochs=1", "dataset.workers=0",
        "trainer.max_iters=2", "trainer.float64=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("trained"), TINY)


@pytest.fixture
def run(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained run; the cwd an empty folder."""
    return fresh_copy(trained, tmp_path, monkeypatch)


def _by_hand(images: torch.Tensor, name: str, ids: torch.Tensor) -> torch.Tensor:
    """``images`` (uint8) under ImageNet-C's ``name`` at severity 3 from the formulas, in
    float64 with torch's mean (so that ties truncate alike: see :func:`_equal_but_ties`); the
    noise drawn per image as the dataset (seed 0) draws it for the validation split."""
    x = images.double() / 255.0
    if name == "none":
        return images
    if name == "contrast":
        means = x.mean(dim=(2, 3), keepdim=True)
        y = ((x - means) * 0.2 + means).clamp(0, 1)
    else:
        z = torch.stack([torch.randn(images.shape[1:], dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(
                                         derive_seed(0, "val", i))) for i in ids.tolist()])
        y = (x + 0.18 * z).clamp(0, 1)
    return torch.from_numpy(_stored(y.numpy()))


@pytest.mark.slow
@pytest.mark.parametrize("evaluated,options,stats_domain", [
    ("contrast", ["precise.data=heldout"], "contrast"),  # Table 4: the evaluated domain's
    ("none", ["precise.data=heldout", "precise.corruption=gaussian_noise"], "gaussian_noise"),
    ("contrast", ["precise.corruption=none", "precise.num_samples=32"], "train"),  # training's
])
def test_statistics_of_a_domain_equal_precise_bn_on_those_images_by_hand(
        run, evaluated, options, stats_domain):
    args = [f"run={run}", f"dataset.corruption={evaluated}", "holdout=32", "stats=precise",
            "precise.batch_size=32", *options]
    (job,) = eval_app.validate_overrides(args)
    record = eval_app.run_eval(job)
    # by hand: the images corrupted by the formulas, PreciseBN on the held-out ones in one batch
    # (or, for the training domain, on the trainer's clean training subset), the rest evaluated
    loaded = eval_app.load_run(job.cfg, job.checkpoint)
    data, model = loaded.parts.data, loaded.parts.model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.mean, data.std))
    images, labels = data.val.images, data.val.labels
    held, rest = held_out_indices(64, 32)

    def inputs(idx: torch.Tensor, name: str) -> torch.Tensor:
        return normalize(_by_hand(images[idx], name, idx), mean, std).double()

    if stats_domain == "train":
        clean = eval_app.load_run(eval_app.validate_overrides([f"run={run}"])[0].cfg,
                                  job.checkpoint)
        spec = StatsSpec("precise", num_samples=32, batch_size=32, seed=job.spec.seed)
        batches = precise_batches(clean.reader, spec, loaded.parts.plan, epoch=0)
    else:
        def batches():
            return [inputs(held, stats_domain)]
    update_population_stats(model, batches)
    expected = evaluate(model, [(inputs(rest, evaluated), labels[rest])])
    assert record["top1"] == expected["top1"]
    assert record["loss"] == pytest.approx(expected["loss"], rel=1e-9)
    assert record["precise.samples"] == 32 and record["holdout"] == 32


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["precise.corruption=fog"], "precise.corruption=fog: unknown; choose one of none, contrast"),
    (["precise.severity=9"], "precise.severity=9: must be one of ImageNet-C's severities 1–5"),
    (["dataset.corruption=blur"], "dataset.corruption=blur: unknown; choose one of"),
    (["dataset.severity=0"], "dataset.severity=0: must be one of ImageNet-C's severities"),
    (["stats=precise", "precise.data=val"], "precise.data=val: choose one of train, heldout"),
    (["stats=precise", "precise.data=heldout"], "precise.data=heldout: PreciseBN reads the "
     "images an evaluation holds out; set holdout=<n>"),
    (["stats=precise", "precise.data=heldout", "holdout=32", "precise.num_samples=16"],
     "precise.num_samples=16: with precise.data=heldout PreciseBN reads the holdout=32"),
    (["holdout=64"], "holdout=64: must be less than the split's 64 images"),
    (["holdout=0"], "holdout=0: must be positive"),
])
def test_bad_domain_options_are_one_line_and_write_nothing(run, args, needle, capsys):
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert eval_app.main([f"run={run}", *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bnbench: error: ") and needle in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert not list(Path.cwd().iterdir())


def test_an_evaluation_grid_lays_one_runs_columns_out_as_rows_and_columns(tmp_path):
    from bnbench.experiment import Experiment
    from bnbench.report import Stat, gridded, layout

    spec = {"runs": {"BN": []}, "evals": {"a @ x": [], "a @ y": [], "b @ x": []}, "grid": True,
            "metric": "error"}
    exp = Experiment("p/t", "smoke", spec, {}, tmp_path, tmp_path)
    assert layout(exp) == (["a", "b"], ["x", "y"])
    one, two, three = Stat(1.0, 0.0, 1), Stat(2.0, 0.0, 1), Stat(3.0, 0.0, 1)
    assert gridded(exp, {"BN": {"a @ x": one, "a @ y": two, "b @ x": three}}) == {
        "a": {"x": one, "y": two}, "b": {"x": three}}
    for runs, evals in (({"BN": [], "GN": []}, spec["evals"]), (spec["runs"], {"a": []})):
        other = Experiment("p/t", "smoke", {**spec, "runs": runs, "evals": evals}, {}, tmp_path,
                           tmp_path)
        with pytest.raises(BnbenchError, match="with grid, one run and every evaluation"):
            layout(other)
