"""The batch plan (one place for every batch size) and the config's range checks."""

from __future__ import annotations

import json
import math

import pytest
from tiny import compose_train as _cfg

from bnbench import cli
from bnbench.config import RANGES, validate
from bnbench.errors import BnbenchError
from bnbench.plan import batch_plan, expected_processes


@pytest.mark.parametrize("overrides,processes,want", [
    # (normalization, remainder, sync processes, evaluation)
    (["norm=bn"], 1, (64, 0, 1, None)),
    (["norm=ghost", "norm.nbs=4"], 2, (4, 0, 1, None)),
    (["norm=ghost", "norm.nbs=5"], 1, (5, 4, 1, None)),  # 64 = 12·5 + 4
    (["norm=syncbn"], 4, (256, 0, 4, None)),
    (["norm=syncbn", "norm.group_size=2"], 4, (128, 0, 2, None)),
    (["norm=batch_eval"], 1, (64, 0, 1, 64)),  # inference NBS: the training one
    (["norm=batch_eval", "norm.nbs=8"], 1, (8, 0, 1, 8)),
    (["norm=batch_eval", "norm.eval_nbs=16"], 1, (64, 0, 1, 16)),
    (["norm=gn"], 2, (None, 0, 1, None)),
    (["norm=cbn"], 1, (64, 0, 1, None)),
    (["norm=cbn", "norm.nbs=8"], 2, (8, 0, 1, None)),  # 8 simulated devices per process
    (["norm=brn", "norm.nbs=16"], 1, (16, 0, 1, None)),
])
def test_plan_of_each_variant(overrides, processes, want):
    plan = batch_plan(_cfg(*overrides), processes)
    assert (plan.normalization, plan.remainder, plan.sync_processes, plan.evaluation) == want
    assert plan.global_batch == 64 * processes and plan.per_process == 64


@pytest.mark.parametrize("num_samples,batch,processes,train_size", [
    (10000, 256, 1, None), (10000, 256, 3, None), (100, 256, 2, None), (4096, 64, 1, 1000),
])
def test_precise_batches_cover_n_in_whole_batches(num_samples, batch, processes, train_size):
    """PreciseBN: ``B`` per process (at most its share of N), whole batches, at least one, never
    more than a process's share of the training set."""
    cfg = _cfg(f"precise.num_samples={num_samples}", f"precise.batch_size={batch}",
               "trainer.batch_size=8")
    plan = batch_plan(cfg, processes, train_size)
    share = math.ceil(num_samples / processes)
    assert plan.precise_batch == min(batch, share)
    limit = share if train_size is None else min(share, train_size // processes)
    assert plan.precise_steps == max(1, limit // plan.precise_batch)
    assert plan.precise_samples == plan.precise_batch * plan.precise_steps * processes


def test_layer_options_carry_the_normalization_batches():
    assert batch_plan(_cfg("norm=ghost", "norm.nbs=4"), 1).layer_options() == {"nbs": 4}
    assert batch_plan(_cfg("norm=batch_eval"), 1).layer_options() == {"eval_nbs": 64}
    assert batch_plan(_cfg("norm=syncbn"), 2).layer_options() == {}
    assert batch_plan(_cfg("norm=naive_cbn", "norm.nbs=16"), 1).layer_options() == {"nbs": 16}
    assert batch_plan(_cfg("norm=cbn", "norm.nbs=64"), 1).layer_options() == {}  # one device


@pytest.mark.parametrize("overrides,processes,needle", [
    (["norm=syncbn", "norm.group_size=3"], 1, "norm.group_size=3: SyncBN groups must divide"),
    (["norm=syncbn", "norm.group_size=3"], 4, "norm.group_size=3"),
    (["norm=ghost", "norm.nbs=65"], 1, "norm.nbs=65 exceeds the per-process batch"),
    (["norm=cbn", "norm.nbs=65"], 1, "norm.nbs=65 exceeds the per-process batch"),
    *[([f"norm={name}", "norm.nbs=5"], 2, f"norm.nbs=5: norm={name} simulates devices of nbs "
       "samples each, so nbs must divide the per-process batch trainer.batch_size=64")
      for name in ("brn", "cbn", "naive_cbn")],
])
def test_plans_that_cannot_run_are_refused(overrides, processes, needle):
    with pytest.raises(BnbenchError, match=needle):
        batch_plan(_cfg(*overrides), processes)


@pytest.mark.parametrize("overrides,needle", [
    (["norm=cbn", "norm.nbs=5"], "norm.nbs=5: norm=cbn simulates devices"),
    (["norm=cbn", "norm.nbs=128"], "norm.nbs=128 exceeds the per-process batch"),
    (["norm=cbn", "norm.nbs=8", "norm.window=0"], "norm.window=0: must be positive"),
])
def test_per_device_cbn_config_errors_are_one_line(overrides, needle, capsys, tmp_path):
    """Refused at config time (exit 2, one line, nothing written)."""
    assert cli.main(["train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    assert needle in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_per_device_nbs_passes_the_config_checks():
    """``nbs`` dividing the batch: the layers take it (the model is built on the meta device)."""
    for name in ("brn", "cbn", "naive_cbn"):
        validate(_cfg(f"norm={name}", "norm.nbs=8"))


def test_global_batch_larger_than_the_data_is_refused():
    with pytest.raises(BnbenchError, match="global batch 128 exceeds the 100 training images"):
        batch_plan(_cfg(), 2, train_size=100)


def test_expected_processes():
    assert expected_processes(4, {}) == 4
    assert expected_processes(1, {"WORLD_SIZE": "8"}) == 8
    assert expected_processes(1, {"SLURM_PROCID": "3", "SLURM_NTASKS": "16"}) == 16
    assert expected_processes(1, {"SLURM_NTASKS": "16"}) == 1  # an allocation, not a task
    assert expected_processes(1, {}) == 1


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnbench: error: "), err
    return err[0]


_BAD = {"(0, inf)": [0, -1], "[0, inf)": [-1], "[0, 1]": [-0.5, 1.5], "[1, inf)": [0.5],
        "(0, 1]": [0, 2], "[0, 1)": [1], "[2, inf)": [1]}


@pytest.mark.parametrize("key,value", [(k, v) for k, interval in RANGES.items()
                                       for v in _BAD[interval]])
def test_every_numeric_key_is_range_checked(key, value, capsys, tmp_path):
    """One line, exit 2, nothing written, for an out-of-range value of any numeric key."""
    args = ["train", f"{key}={value}", f"hydra.run.dir={tmp_path / 'run'}"]
    if key.startswith("norm."):  # a variant that takes the option (so only the range is wrong)
        variant = {"nbs": "ghost", "eval_nbs": "batch_eval", "group_size": "syncbn",
                   "groups": "gn", "window": "cbn", "burnin": "cbn", "burnin_epochs": "cbn",
                   "num_domains": "domain"}.get(key.split(".")[1], "brn")
        args.insert(1, f"norm={variant}")
    assert cli.main(args) == 2
    assert f"{key}=" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_summary_holds_the_plan(tmp_path):
    """A short run logs the plan and writes it to summary.json, as :func:`batch_plan` says."""
    tiny = ["dataset.num_train=128", "dataset.num_val=32", "dataset.resolution=8",
            "model.width=0.125", "trainer.batch_size=32", "precise.num_samples=64",
            "precise.batch_size=16", "eval.batch_size=32", "trainer.threads=1",
            "trainer.epochs=1", "norm=ghost", "norm.nbs=8"]
    assert cli.main(["train", *tiny, f"hydra.run.dir={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    plan = batch_plan(_cfg(*tiny), 1, train_size=128)
    assert summary["batch_plan"] == json.loads(json.dumps(plan.as_dict()))
    assert summary["normalization_batch"] == 8
    assert "batch plan: SGD 32 (32 × 1 processes), normalization 8 samples" in (
        tmp_path / "train.log").read_text()
