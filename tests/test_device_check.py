"""``scripts/device_check.py`` (the prepared GPU check) runs on the CPU: float32 training steps
against the float64 reference, every row within tolerance, the table written with its command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_passes_on_cpu(tmp_path):
    out = tmp_path / "check.md"
    argv = ["--device", "cpu", "--quick", "--steps", "2", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), *argv],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    text = out.read_text()
    assert text.splitlines()[0] == "$ python scripts/device_check.py " + " ".join(argv)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "variant" not in line]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert {"ghost", "brn", "cbn", "naive_cbn", "domain"} <= set(names)
    assert all(row.endswith("| PASS |") for row in rows), rows
