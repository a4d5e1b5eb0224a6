"""``bnbench eval``: the trainer's own evaluation path, on a trained run's checkpoint.

A tiny run is trained once (``python -m bnbench train``); each test evaluates a copy of it through
:func:`bnbench.eval_app.main`, the function behind ``bnbench eval``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from tiny import fresh_copy, train_tiny

from bnbench import eval_app
from bnbench.config import register
from bnbench.evaluate import (
    EVALS_FILE,
    PRECISE_SEED_OFFSET,
    Reader,
    StatsSpec,
    find_record,
    precise_batches,
)
from bnbench.norm import bn_layers
from bnbench.population import update_population_stats

TINY = ["dataset.num_train=256", "dataset.num_val=64", "dataset.resolution=8", "model.width=0.125",
        "trainer.batch_size=32", "precise.num_samples=128", "precise.batch_size=64",
        "eval.batch_size=64", "trainer.threads=1", "trainer.epochs=1", "dataset.workers=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run trained by the command line (its end-of-run validation in metrics.jsonl)."""
    return train_tiny(tmp_path_factory.mktemp("trained"), TINY)


@pytest.fixture
def run(trained, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the trained run; the cwd is an empty folder (nothing may land there)."""
    return fresh_copy(trained, tmp_path, monkeypatch)


def _eval(run: Path, *args: str) -> int:
    return eval_app.main([f"run={run}", *args])


def _records(run: Path) -> list[dict]:
    path = run / EVALS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _trainer_row(run: Path, stats: str) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "val" and r["stats"] == stats][-1]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_ema_and_precise_agree_with_the_trainers_last_validation(run):
    """The run's options by default: the trainer's PreciseBN (N, B, its subset) on the same
    checkpoint gives the same numbers as its own end-of-run validation."""
    assert _eval(run, "stats=ema") == 0
    assert _eval(run, "stats=precise") == 0
    ema, precise = _records(run)
    for record, stats in ((ema, "ema"), (precise, "precise")):
        row = _trainer_row(run, stats)
        for key in ("top1", "top5", "loss"):
            assert record[key] == pytest.approx(row[key], abs=1e-6), (stats, key)
        assert (record["epoch"], record["iter"]) == (row["epoch"], row["iter"])
        assert record["checkpoint"] == "checkpoints/last.pt"
    assert ema["tag"] == "stats=ema,split=val"
    seed = PRECISE_SEED_OFFSET  # trainer.seed=0
    assert precise["tag"] == (f"stats=precise,N=128,B=64,estimator=population,seed={seed},"
                              "layerwise=false,augment=true,split=val")
    assert precise["precise.samples"] == 128 and precise["precise.batch_size"] == 64
    # the same evaluation spelled out is the same tag: already there
    assert _eval(run, "stats=precise", "precise.num_samples=128", "precise.batch_size=64",
                 f"precise.seed={seed}", "precise.estimator=population") == 0
    assert len(_records(run)) == 2
    # Hydra's files stay inside the run
    assert not list(Path.cwd().iterdir())
    assert len(list((run / "evals").glob("*/.hydra/config.yaml"))) == 2


def test_second_identical_eval_is_a_noop_unless_forced(run, capsys):
    assert _eval(run, "stats=precise", "precise.batch_size=32") == 0
    first = _records(run)
    evals_dirs = sorted((run / "evals").iterdir())
    capsys.readouterr()
    assert _eval(run, "stats=precise", "precise.batch_size=32") == 0
    out = capsys.readouterr().out
    assert "evaluated already" in out and f"top-1 {first[0]['top1']:.2f}%" in out
    assert _records(run) == first and sorted((run / "evals").iterdir()) == evals_dirs
    assert _eval(run, "stats=precise", "precise.batch_size=32", "force=true") == 0
    again = _records(run)
    assert len(again) == 2 and again[1]["tag"] == again[0]["tag"]
    assert again[1]["loss"] == again[0]["loss"]  # deterministic: the same subset, the same model


def test_multirun_sweep_over_b_appends_one_record_per_b(run):
    assert _eval(run, "-m", "stats=precise", "precise.batch_size=16,32,64") == 0
    records = _records(run)
    assert [r["precise.batch_size"] for r in records] == [16, 32, 64]
    assert all(r["precise.samples"] == 128 for r in records)
    assert len({r["loss"] for r in records}) == 3  # B changes the statistics (Table 2)
    assert not list(Path.cwd().iterdir())
    (sweep,) = (run / "evals").iterdir()
    assert len(list(sweep.glob("*/.hydra/config.yaml"))) == 3
    # and again: every job recorded already, nothing runs and nothing is written
    assert _eval(run, "-m", "stats=precise", "precise.batch_size=16,32,64") == 0
    assert _records(run) == records and len(list((run / "evals").iterdir())) == 1


def _model_of(run: Path):
    """The run's model with its checkpoint loaded, and what evaluate_stats needs beside it."""
    from omegaconf import OmegaConf

    from bnbench.train import build_run

    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    cfg = OmegaConf.create(saved["config"])
    parts = build_run(cfg)
    parts.model.load_state_dict(saved["model"])
    return parts, Reader(parts.data, seed=cfg.trainer.seed)


def test_precise_seed_picks_another_subset(run):
    """Another seed forwards other training images, so other statistics; the same seed, the same
    statistics (a sweep over 5 seeds gives Table 1's mean ± std)."""
    parts, reader = _model_of(run)

    def stats(seed: int) -> list[torch.Tensor]:
        spec = StatsSpec("precise", num_samples=128, batch_size=64, seed=seed)
        update_population_stats(parts.model, precise_batches(reader, spec, parts.plan, 0))
        return [m.running_mean.clone() for m in bn_layers(parts.model)]

    one, two, one_again = stats(1), stats(2), stats(1)
    assert all(torch.equal(a, b) for a, b in zip(one, one_again))
    assert not any(torch.allclose(a, b) for a, b in zip(one, two))
    assert _eval(run, "-m", "stats=precise", "precise.seed=1,2") == 0
    first, second = _records(run)
    assert (first["precise.seed"], second["precise.seed"]) == (1, 2)
    assert first["loss"] != second["loss"]


def test_batch_statistics_train_subsets_and_other_datasets(run):
    assert _eval(run, "stats=batch", "batch.nbs=8") == 0
    assert _eval(run, "stats=batch") == 0  # default: the training normalization batch (32)
    assert _eval(run, "stats=ema", "split=train", "train_subset=50") == 0
    assert _eval(run, "stats=ema", "dataset.seed=1") == 0
    nbs8, nbs32, train, other = _records(run)
    assert nbs8["tag"] == "stats=batch,nbs=8,eval_batch=64,split=val"
    assert nbs32["batch.nbs"] == 32 and nbs8["loss"] != nbs32["loss"]
    assert train["tag"] == "stats=ema,split=train,train_subset=50"
    assert train["top1"] * 50 / 100 == pytest.approx(round(train["top1"] / 2))  # 50 images
    assert other["tag"] == "stats=ema,split=val,dataset.seed=1"
    assert other["loss"] != _trainer_row(run, "ema")["loss"]
    # find_record (the report's lookup): the validation set of the run's dataset by default
    assert find_record(run, {"stats": "ema"}) is None  # only train-split/other-dataset ones
    assert find_record(run, {"stats": "ema", "dataset.seed": "1"}) == other
    assert find_record(run, {"stats": "batch", "batch.nbs": "8"}) == nbs8
    assert find_record(run, {"stats": "batch"}) == nbs32  # the latest


@pytest.mark.parametrize("args,needle", [
    (["stats=precise", "precise.batch_size=256"],
     "precise.batch_size=256 exceeds precise.num_samples=128: B is at most N"),
    (["-m", "stats=precise", "precise.batch_size=64,256"], "precise.batch_size=256 exceeds"),
    (["stats=precise", "precise.num_samples=16"], "precise.batch_size=64 exceeds "
     "precise.num_samples=16"),
    (["stats=median"], "stats=median: choose one of ema, precise, batch, none"),
    (["stats=batch", "batch.nbs=0"], "batch.nbs=0: must be positive"),
    (["stats=none"], "stats=none: norm=bn has batch statistics"),
    (["stats=precise", "precise.estimator=mean"], "precise.estimator=mean: choose one of"),
    (["split=test"], "split=test: choose one of val, train"),
    (["train_subset=10"], "train_subset=10: a subset of the training set needs split=train"),
    (["stat=ema"], "unknown key stat; valid keys here: run, checkpoint, stats"),
    (["precise.batch_size=x"], "precise.batch_size: Value 'x' of type 'str' could not be"),
    (["dataset=nope"], "dataset=nope: unknown option; choose one of"),
    (["dataset.num_classes=10"], "10 classes, but the checkpoint's model has 15 outputs"),
    (["stats=ema,precise"], "stats=ema,precise: a sweep; add -m"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, args, needle, capsys):
    before = _tree(run)
    assert _eval(run, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnbench: error: "), err
    assert needle in err[0]
    assert _tree(run) == before and not list(Path.cwd().iterdir())


def test_a_directory_without_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    for target, needle in (("empty", "run=empty: no checkpoint empty/checkpoints/last.pt"),
                           ("nowhere", "run=nowhere: no such directory")):
        assert eval_app.main([f"run={target}"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("bnbench: error: ") and needle in line
    assert eval_app.main([]) == 2
    assert "run: missing" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
    assert not list((tmp_path / "empty").iterdir())


def _train_in_process(run_dir: Path, *overrides: str) -> None:
    from bnbench.train import train

    register()
    GlobalHydra.instance().clear()
    with initialize_config_module("bnbench.configs", version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *overrides])
    GlobalHydra.instance().clear()
    train(cfg, run_dir)


@pytest.mark.parametrize("overrides,stats", [
    (["norm=batch_eval"], ["ema", "precise", "batch"]),  # validated with batch statistics too
    (["norm.freeze_at_epoch=0"], ["ema", "precise"]),  # FrozenBN: PreciseBN leaves it alone
])
def test_other_runs_agree_with_their_trainer(overrides, stats, tmp_path, monkeypatch, trained):
    monkeypatch.setenv("BNBENCH_CACHE", str(trained.parent / "cache"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    _train_in_process(run, *overrides)
    for kind in stats:
        assert _eval(run, f"stats={kind}") == 0
    for record, kind in zip(_records(run), stats, strict=True):
        row = _trainer_row(run, kind)
        assert (record["top1"], record["loss"]) == pytest.approx((row["top1"], row["loss"]),
                                                                abs=1e-6), kind
