"""The wheel carries the Hydra configs, and the installed command composes them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_configs(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("bnbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")
    }
    assert expected and {f"bnbench/configs/{e}" for e in expected} <= names
    assert "bnbench/configs/norm/cbn.yaml" in names and "bnbench/norm/cbn.py" in names


def test_pyproject_does_not_pin_torch():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=' in text and "torch==" not in text
