"""kill -9 at the worst moments, then ``trainer.resume=true``: the run ends exactly as an
uninterrupted one (metrics.jsonl line by line, timing fields aside; the final weights), with no
partial file left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.num_train=256", "dataset.num_val=64", "dataset.resolution=8", "model.width=0.125",
        "trainer.batch_size=32", "precise.num_samples=128", "precise.batch_size=64",
        "eval.batch_size=64", "trainer.threads=1", "trainer.epochs=3", "dataset.workers=0"]
TIMING = {"time", "images_per_s"}


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BNBENCH_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("whole")
    proc = _run(cwd, "-m", "bnbench", "train", *TINY, "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd / "run"


@pytest.mark.slow
@pytest.mark.parametrize("where,count", [
    ("validation", 4),  # epoch 2, during the PreciseBN evaluation (its train row is written)
    ("checkpoint", 2),  # epoch 2's checkpoint half written: a partial temporary file
    ("checkpoint", 1),  # the first checkpoint half written: no checkpoint to resume from
])
def test_resume_after_kill_equals_the_uninterrupted_run(where, count, uninterrupted, tmp_path):
    killed = _run(tmp_path, str(ROOT / "tests" / "kill_entry.py"), where, str(count), "train",
                  *TINY, "hydra.run.dir=run")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "run"
    if where == "checkpoint":
        assert list((run / "checkpoints").glob(".last.pt.*.tmp"))  # the kill left one
    resumed = _run(tmp_path, "-m", "bnbench", "train", *TINY, "hydra.run.dir=run",
                   "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _rows(run) == _rows(uninterrupted)
    assert not list(run.glob("**/.*.tmp"))
    want = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=False)["model"]
    got = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert "run dir" in resumed.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_resume_refuses_a_finished_run_without_checkpoint(tmp_path):
    args = ("-m", "bnbench", "train", *TINY, "trainer.epochs=1", "trainer.checkpoint=false",
            "hydra.run.dir=run")
    assert _run(tmp_path, *args).returncode == 0
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = _run(tmp_path, *args, "trainer.resume=true")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("bnbench: error: trainer.resume:")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == rows  # nothing appended


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    """A run dir holding another config's checkpoint (e.g. an experiment rerun after its
    dataset preset changed) is refused in one line instead of silently continued."""
    args = ("-m", "bnbench", "train", *TINY, "trainer.epochs=1", "hydra.run.dir=run")
    assert _run(tmp_path, *args).returncode == 0
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = _run(tmp_path, *args, "dataset.seed=1", "trainer.threads=2", "trainer.resume=true")
    assert again.returncode == 2, again.stderr[-2000:]
    line = again.stderr.strip().splitlines()[-1]
    assert line.startswith("bnbench: error: trainer.resume:") and "dataset.seed: 0 → 1" in line
    assert "threads" not in line  # how a run executes may change
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == rows
    same = _run(tmp_path, *args, "trainer.threads=2", "trainer.resume=true")
    assert same.returncode == 0, same.stderr[-2000:]
