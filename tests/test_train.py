"""The trainer's schedules, in process: the FrozenBN switch of Rethinking Fig. 6."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from bnbench.config import register
from bnbench.norm import bn_layers
from bnbench.population import update_population_stats
from bnbench.train import Trainer, lr_at

TINY = ["dataset.num_train=128", "dataset.num_val=32", "dataset.resolution=8",
        "model.width=0.125", "trainer.batch_size=32", "precise.num_samples=64",
        "precise.batch_size=32", "eval.batch_size=32", "trainer.threads=1", "trainer.epochs=2",
        "dataset.workers=0"]


def _cfg(*overrides: str):
    register()
    GlobalHydra.instance().clear()
    with initialize_config_module("bnbench.configs", version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *overrides])
    GlobalHydra.instance().clear()
    return cfg


def test_learning_rate_warms_up_again_after_the_frozen_bn_switch():
    """§4.3: "we start with a linear warmup of one epoch" after switching to FrozenBN."""
    plain = _cfg("optim.warmup_epochs=0", "optim.schedule=step", "trainer.epochs=4")
    frozen = _cfg("optim.warmup_epochs=0", "optim.schedule=step", "trainer.epochs=4",
                  "norm.freeze_at_epoch=2", "norm.freeze_warmup_epochs=1")
    ipe, batch, f = 10, 256, frozen.optim.warmup_factor
    for it in range(40):
        factor = lr_at(frozen, it, ipe, batch) / lr_at(plain, it, ipe, batch)
        expected = f + (1 - f) * (it - 20) / 10 if 20 <= it < 30 else 1.0
        assert factor == pytest.approx(expected), it


@pytest.mark.parametrize("stats", ["precise", "ema"])
def test_frozen_bn_switch_freezes_precise_or_ema_statistics(tmp_path, monkeypatch, stats):
    """At the switch the layers freeze PreciseBN's statistics of the model of that moment (the
    paper's population statistics) or its EMA, and keep them through the rest of training."""
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("norm.freeze_at_epoch=1", f"norm.freeze_stats={stats}")
    trainer = Trainer(cfg, None)
    trainer._train_epoch(0)
    trainer.state.epoch = 1
    model = trainer.model
    reference = copy.deepcopy(model)
    ema = [(m.running_mean.clone(), m.running_var.clone()) for m in bn_layers(model)]
    if stats == "precise":
        update_population_stats(reference, trainer._precise_batches())
    expected = [(m.running_mean.clone(), m.running_var.clone()) for m in bn_layers(reference)]
    trainer._train_epoch(1)
    layers = bn_layers(model)
    assert all(m.frozen for m in layers)
    for m, (mean, var), (ema_mean, _) in zip(layers, expected, ema, strict=True):
        torch.testing.assert_close(m.running_mean, mean)
        torch.testing.assert_close(m.running_var, var)
        if stats == "precise":
            assert not torch.allclose(m.running_mean, ema_mean)


def test_bf16_on_cpu_runs_the_convolutions_in_bf16(tmp_path, monkeypatch):
    """``trainer.bf16=true`` is CPU autocast too (it was silently ignored there): the convs of a
    training step compute in bf16, the loss stays finite, the weights stay fp32."""
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(_cfg("trainer.bf16=true", "trainer.max_iters=1", "trainer.device=cpu"),
                      None)
    dtypes = []
    trainer.model.conv1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    metrics = trainer._train_epoch(0)
    assert dtypes == [torch.bfloat16]
    assert metrics["loss"] == metrics["loss"] and trainer.model.conv1.weight.dtype == torch.float32


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path, monkeypatch):
    """``trainer.compile=true`` (whole-model ``torch.compile``, Inductor) on GhostBN: the same
    losses over two steps as the eager model, to float32 fusion rounding."""
    monkeypatch.chdir(tmp_path)
    losses = []
    for compiled in ("false", "true"):
        trainer = Trainer(_cfg("norm=ghost", "norm.nbs=8", f"trainer.compile={compiled}",
                               "trainer.max_iters=2", "trainer.device=cpu"), None)
        losses.append(trainer._train_epoch(0)["loss"])
        assert (trainer.net is not trainer.model) == (compiled == "true")
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_resume_compares_configs_with_an_older_checkpoints_missing_keys_as_defaults():
    """A checkpoint saved before a key existed had the key's default in effect: resuming with
    the default is no change, resuming with another value is (named)."""
    from omegaconf import OmegaConf

    from bnbench.config import TrainConfig
    from bnbench.train import config_changes

    current = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    saved = {**current, "model": {k: v for k, v in current["model"].items() if k != "head"},
             "optim": {**current["optim"], "lr": 0.1}}
    assert config_changes(saved, current) == [("optim.lr", 0.1, current["optim"]["lr"])]
    current["model"]["head"] = "fpn"
    assert ("model.head", "pool", "fpn") in config_changes(saved, current)
