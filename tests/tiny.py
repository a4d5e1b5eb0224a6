"""A tiny training run made by the command line, for tests that evaluate or analyse one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def train_tiny(cwd: Path, overrides: list[str]) -> Path:
    """``bnbench train <overrides> hydra.run.dir=run`` in ``cwd`` (its data cache there too);
    returns the run dir."""
    env = {**os.environ, "BNBENCH_CACHE": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, "-m", "bnbench", "train", *overrides,
                           "hydra.run.dir=run"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd / "run"
