"""The cluster path: a smoke experiment through submitit (``hydra/launcher=submitit_local``, the
launcher and requeue machinery that ``+cluster=slurm`` uses), with one training job preempted
after its first checkpoint, requeued by submitit and resumed from ``checkpoints/last.pt``.

The preemption is what SLURM does to a job: submitit's preemption signal (``SIGUSR2``, the one
it asks SLURM for with ``--signal``) sent to the job's task. submitit's handler in the task calls
the Hydra launcher's ``checkpoint()`` (a resubmission of the same job: same overrides, same run
dir) and exits with the requeue status; the local executor's controller starts the job again, as
``scontrol requeue`` does on SLURM. To send it at a deterministic point, a Hydra callback
(:class:`HoldAfterFirstCheckpoint`, forwarded to the training jobs as an override) holds the
first job that writes a non-final checkpoint until the signal comes. (The local executor sends
the same signal itself 30 s before ``hydra.launcher.timeout_min``, whole minutes; submitit_local
takes no ``signal_delay_s``, so a timeout would hold a job ≥ 30 s for the same handler path.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hydra.experimental.callback import Callback

TESTS = Path(__file__).resolve().parent
SMOKE = ["scale=smoke", "trainer.epochs=2"]  # two epochs: a checkpoint before the last one


class HoldAfterFirstCheckpoint(Callback):
    """Runs in the job's process (Hydra calls ``on_job_start`` there). After the first
    checkpoint that is not the run's last, the first job to get there writes ``marker`` (its
    pid, epoch and run dir) and sleeps until the preemption signal ends it; a requeued job (the
    marker exists) is not held again."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from bnbench import train

        original, marker = train.Trainer._checkpoint, self.marker

        def checkpoint(trainer: train.Trainer) -> None:
            original(trainer)
            if marker.exists() or trainer.state.epoch >= trainer.cfg.trainer.epochs:
                return
            tmp = marker.with_name(f".{marker.name}.tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "epoch": trainer.state.epoch,
                                       "run_dir": str(trainer.run_dir)}))
            tmp.replace(marker)
            time.sleep(600)  # submitit's signal handler exits the process from here

        train.Trainer._checkpoint = checkpoint


def _submitit_logs(exp_dir: Path) -> dict[Path, str]:
    """The jobs' stdout logs (submitit's log lines and the job's own)."""
    return {p: p.read_text() for p in exp_dir.glob("**/.submitit/*/*_0_log.out")}


def _wait_for_log(exp_dir: Path, text: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while (not any(text in log for log in _submitit_logs(exp_dir).values())
           and proc.poll() is None and time.time() < deadline):
        time.sleep(0.1)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_experiment_through_submitit_with_a_preempted_job_requeued_and_resumed(tmp_path):
    marker = tmp_path / "held.json"
    hold = f"{Path(__file__).stem}.{HoldAfterFirstCheckpoint.__name__}"  # from PYTHONPATH=tests
    args = ["experiment", "rethinking/table2", *SMOKE, f"root={tmp_path / 'exp'}",
            f"results={tmp_path / 'res'}", "hydra/launcher=submitit_local",
            f"+hydra.callbacks.hold._target_={hold}", f"+hydra.callbacks.hold.marker={marker}"]
    path = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "BNBENCH_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(path)}
    exp_dir = tmp_path / "exp" / "rethinking" / "table2" / "smoke"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "bnbench", *args], cwd=tmp_path, env=env,
                                stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"no job held after a checkpoint: {err.read_text()[-3000:]}"
        held = json.loads(marker.read_text())
        # a preemption as submitit's SlurmJob._interrupt() makes one: SIGTERM (which submitit's
        # handler logs and ignores), then the preemption signal
        os.kill(held["pid"], signal.SIGTERM)
        _wait_for_log(exp_dir, "Bypassing signal SIGTERM", proc)
        os.kill(held["pid"], signal.SIGUSR2)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the experiment, its job and the job's task
            proc.wait()
    assert proc.returncode == 0, err.read_text()[-3000:]

    run_dir = exp_dir / "NBS_32"  # the first training job is the one held
    assert held["run_dir"] == str(run_dir) and held["epoch"] == 1

    # submitit: the task caught the signal, called the launcher's checkpoint() (a resubmission
    # of the same job) and exited to be requeued; the controller started it again
    logs = _submitit_logs(exp_dir)
    requeued = [p for p, text in logs.items() if "Requeued job" in text]
    assert len(requeued) == 1, {str(p): text[-2000:] for p, text in logs.items()}
    log = logs[requeued[0]]
    assert "Bypassing signal SIGTERM" in log
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log
    assert "Calling checkpoint method" in log and log.count("Starting with JobEnvironment") == 2
    assert "Job completed successfully" in log

    # the requeued job resumed in the same run dir from the checkpoint of epoch 1
    train_log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at epoch 1" in train_log
    assert train_log.count("epoch 1/2  train loss") == 1  # epoch 1 was not trained again
    assert train_log.count("epoch 2/2  train loss") == 1
    rows = _rows(run_dir)
    keys = Counter((r["epoch"], r["split"], r["stats"]) for r in rows)
    assert set(keys.values()) == {1}, keys  # every epoch's rows exactly once
    assert {epoch for epoch, _, _ in keys} == {1, 2}
    assert keys == Counter((r["epoch"], r["split"], r["stats"]) for r in _rows(exp_dir / "NBS_2"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["iterations"] == max(r["iter"] for r in rows)

    # the experiment went on: every job done, the report written
    record = json.loads((exp_dir / "experiment.json").read_text())
    assert all(job["status"] == "done" for job in record["invocations"][-1]["jobs"]), record
    assert (tmp_path / "res" / "rethinking" / "table2.md").exists()
