"""Appendix A.8's toy (affine fusion before fine-tuning) and an experiment's analysis that reads
no training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnbench.analysis import compute_affine_fusion, gradient_descent, parse_command
from bnbench.errors import BnbenchError


@pytest.mark.parametrize("scale,lr,init", [(0.5, 1.0, 1.0), (0.5, 1.0, 3.0), (2.0, 0.1, 0.7),
                                           (0.3, 0.4, 1.0)])
def test_trajectories_are_the_closed_forms(scale, lr, init):
    """GD on J = (λx)² multiplies x by 1 − 2·lr·λ² per step (dJ/dx = 2λ²x); on the fused
    J = w² from w_0 = λx_0, w by 1 − 2·lr."""
    steps = 12
    result = compute_affine_fusion(Path("."), {"scale": scale, "lr": lr, "init": init,
                                               "steps": steps})
    for t in range(steps + 1):
        assert result["unfused"][t] == pytest.approx(init * (1 - 2 * lr * scale**2) ** t,
                                                     rel=1e-12, abs=1e-300)
        assert result["fused"][t] == pytest.approx(scale * init * (1 - 2 * lr) ** t,
                                                   rel=1e-12, abs=1e-300)
    s = result["scalars"]
    assert s["unfused_step_ratio"] == pytest.approx(1 - 2 * lr * scale**2, rel=1e-12)
    assert s["fused_step_ratio"] == pytest.approx(1 - 2 * lr, rel=1e-12)
    assert s["step_size_factor"] == pytest.approx(1 / scale**2, rel=1e-9)
    assert s["initial_loss"] == pytest.approx((scale * init) ** 2, rel=1e-12)


def test_the_papers_numbers():
    """λ = 0.5, step 1: x ← x − x/2 converges to 0 (the fixed point of x ← x/2); the fused
    w ← −w has period 2 and never moves its loss."""
    result = compute_affine_fusion(Path("."), {"scale": 0.5, "lr": 1.0, "init": 1.0,
                                               "steps": 10})
    assert result["unfused"] == [0.5**t for t in range(11)]  # (exact in binary)
    assert result["fused"] == [0.5 * (-1) ** t for t in range(11)]
    assert result["fused_loss"] == [0.25] * 11
    assert result["scalars"]["unfused_final_loss"] == 0.25 * 0.25**10


def test_gradient_descent_takes_the_gradient_of_the_loss():
    # J = (x − 3)²: x ← x − 0.25 · 2(x − 3), so x − 3 halves each step
    path = gradient_descent(lambda x: (x - 3.0) ** 2, 1.0, 0.25, 5)
    assert path == pytest.approx([3.0 - 2.0 * 0.5**t for t in range(6)], rel=1e-15)


@pytest.mark.parametrize("argv,message", [
    (["affine_fusion", "run=RUN", "scale=0"], "scale=0: must be a positive number"),
    (["affine_fusion", "run=RUN", "steps=1.5"], "steps=1.5: must be a positive integer"),
    (["affine_fusion", "run=FILE"], "not a directory"),
    (["affine_fusion", "run=RUN", "layer=x"], "unknown option layer of affine_fusion"),
])
def test_bad_options_are_refused(tmp_path, argv, message):
    (tmp_path / "file").write_text("")
    argv = [a.replace("RUN", str(tmp_path / "new")).replace("FILE", str(tmp_path / "file"))
            for a in argv]
    with pytest.raises(BnbenchError, match=message):
        parse_command(argv)
    assert not (tmp_path / "new").exists()


def test_a_toy_needs_no_checkpoint(tmp_path):
    job = parse_command(["affine_fusion", f"run={tmp_path / 'out'}", "lr=null"])
    assert job.options == {"scale": 0.5, "lr": 1.0, "init": 1.0, "steps": 10}


def _bnbench(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BNBENCH_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "bnbench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a8_experiment_runs_its_toy_once_without_a_training_run(tmp_path):
    """``runs: []``: the analysis runs once, recorded in the experiment's directory; a second
    invocation skips it; the report holds its table, its figure and every claim ✔."""
    args = ("experiment", "rethinking/a8", "scale=smoke", "root=exp", "results=res")
    first = _bnbench(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-2000:]
    record = tmp_path / "exp" / "rethinking" / "a8" / "smoke" / "A.8" / "analyses"
    saved = json.loads((record / "affine_fusion.json").read_text())
    assert saved["options"] == {"scale": 0.5, "lr": 1, "init": 1, "steps": 10}
    assert saved["result"]["scalars"]["fused_step_ratio"] == -1.0
    second = _bnbench(tmp_path, *args)
    assert second.returncode == 0 and "finished before, skipped" in second.stdout
    md = (tmp_path / "res" / "rethinking" / "a8.md").read_text()
    assert "**A.8: no training run**" in md and "| step 10 |" in md
    claims = [line for line in md.splitlines() if line.startswith("- ")]
    marks = [line for line in claims if line.startswith(("- ✔", "- ✗", "- no data"))]
    assert len(marks) == 5 and all(line.startswith("- ✔") for line in marks), marks
    assert (tmp_path / "res" / "rethinking" / "a8.png").stat().st_size > 0
