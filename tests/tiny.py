"""A tiny training run made by the command line, for tests that evaluate or analyse one, and
the composed training config of a command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def train_tiny(cwd: Path, overrides: list[str]) -> Path:
    """``bnbench train <overrides> hydra.run.dir=run`` in ``cwd`` (its data cache there too);
    returns the run dir."""
    env = {**os.environ, "BNBENCH_CACHE": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, "-m", "bnbench", "train", *overrides,
                           "hydra.run.dir=run"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd / "run"


def fresh_copy(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the run ``trained`` (``train_tiny``'s) to work on: the data cache is the trained
    run's, ``sys.argv`` is restored afterwards (``main()`` sets it for Hydra) and the cwd is an
    empty folder (nothing may land there)."""
    monkeypatch.setenv("BNBENCH_CACHE", str(trained.parent / "cache"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return copy


def compose_train(*overrides: str):
    """The training config that ``bnbench train <overrides>`` composes (not validated)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from bnbench.config import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_module("bnbench.configs", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg
