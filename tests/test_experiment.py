"""``bnbench experiment`` and ``bnbench report`` end to end at ``scale=smoke``."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnbench import cli
from bnbench.experiment import known


def _bnbench(cwd: Path, *args: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "BNBENCH_CACHE": str(cwd / "cache")}
    argv = [sys.executable, "-m", "bnbench", *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnbench: error: "), err
    return err[0]


def test_unknown_experiment_lists_the_known_ones(capsys):
    assert cli.main(["experiment", "rethinking/table99"]) == 2
    line = _error_line(capsys)
    assert "rethinking/table99" in line and all(name in line for name in known())


def test_report_without_runs_is_one_line(tmp_path, capsys):
    assert cli.main(["report", "rethinking/table2", "scale=smoke", f"root={tmp_path}"]) == 2
    assert "no runs" in _error_line(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_table2_killed_resumed_rerun_and_reported(tmp_path):
    """Killed after its first training job, rerun: the finished job is not redone, the rest runs
    and the report holds every cell beside the paper's; a third run does nothing; a missing
    run is an empty cell whose claims have no data."""
    args = ["experiment", "rethinking/table2", "scale=smoke", "root=exp", "results=res"]
    exp_dir = tmp_path / "exp" / "rethinking" / "table2" / "smoke"
    first = _bnbench(tmp_path, *args, background=True)
    done = exp_dir / "NBS_32" / "summary.json"
    deadline = time.time() + 300
    while not done.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert done.exists()
    os.killpg(first.pid, signal.SIGKILL)  # the experiment and whatever job it was running
    first.wait()
    summary = done.read_text()

    second = _bnbench(tmp_path, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "train NBS=32: finished before, skipped" in second.stdout
    assert done.read_text() == summary  # not trained again
    md = (tmp_path / "res" / "rethinking" / "table2.md").read_text()
    assert "scale=smoke" in md and "Git commit:" in md and "Command: `bnbench experiment" in md
    rows = list(csv.DictReader((tmp_path / "res" / "rethinking" / "table2.csv").open()))
    ours = [r for r in rows if r["source"] == "bnbench"]
    assert len(ours) == 12 and all(r["error"] for r in ours)  # 2 runs × 6 columns, all measured
    paper = {(r["row"], r["column"]): r["error"] for r in rows if r["source"] == "paper"}
    assert paper[("NBS=2", "EMA")] == "35.5000"  # the published cell, from bnbench/papers
    assert (tmp_path / "res" / "rethinking" / "table2.png").stat().st_size > 0
    assert md.count("✔") + md.count("✗") == 3  # every claim decided

    before = {p: p.read_text() for p in exp_dir.glob("*/*.jsonl")}
    third = _bnbench(tmp_path, *args)
    assert third.returncode == 0, third.stderr[-3000:]
    # 2 runs + 10 evaluations (at N = 128, B=10³ and B=N are the same one)
    assert third.stdout.count("finished before, skipped") == 12
    assert {p: p.read_text() for p in exp_dir.glob("*/*.jsonl")} == before
    invocations = json.loads((exp_dir / "experiment.json").read_text())["invocations"]
    assert len(invocations) == 2  # the killed one never finished

    import shutil

    shutil.rmtree(exp_dir / "NBS_2")
    report = _bnbench(tmp_path, "report", "rethinking/table2", "scale=smoke", "root=exp",
                      "results=res")
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((tmp_path / "res" / "rethinking" / "table2.csv").open()))
    assert all(r["error"] == "" for r in rows if r["source"] == "bnbench" and r["row"] == "NBS=2")
    assert "no data" in (tmp_path / "res" / "rethinking" / "table2.md").read_text()
