"""The command line: every bad input is one line and exit 2; end-to-end runs through Hydra."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from images import write_png_tree

from bnbench import cli

#: A seconds-long configuration of the main job (tiny synthetic data, narrow model).
TINY = [
    "dataset.num_train=256",
    "dataset.num_val=64",
    "dataset.resolution=8",
    "model.width=0.125",
    "trainer.batch_size=32",
    "precise.num_samples=128",
    "precise.batch_size=64",
    "eval.batch_size=64",
    "trainer.threads=1",
]


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None):
    full_env = {**os.environ, "BNBENCH_CACHE": str(cwd / "cache"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bnbench", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("bnbench: error: ")
    return err[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["trainer.epoch=3"], "unknown key trainer.epoch; valid keys here: epochs"),
        (["trainer.epochs=abc"], "trainer.epochs"),
        (["+norm=nope"], "norm=nope: unknown option; choose one of batch_eval, bn, brn, cbn"),
        (["model=resnet1"], "model=resnet1: unknown option; choose one of"),
        (["trainer.batch_size=0"], "trainer.batch_size=0: must be positive"),
        (["trainer.epochs=-1"], "trainer.epochs=-1: must be positive"),
        (["optim.lr=0"], "optim.lr=0.0: must be positive"),
        (["norm.window=3"], "norm=bn: unknown option window; valid options:"),
        (["+norm=gn", "norm.nbs=2"], "norm=gn: unknown option nbs"),
        (["-m", "+norm=bn,gn", "trainer.batch_size=8,0"], "trainer.batch_size=0"),
        (["optim.schedule=linear"], "optim.schedule=linear: choose one of cosine, step"),
        # the real cause, not the errno of a special file system (/proc answers ENOENT)
        (["hydra.run.dir=/proc/nope/run"], "output dir /proc/nope/run: /proc is on a proc file "
         "system (the kernel's, not storage): directories cannot be created there"),
        (["hydra.run.dir=/sys/nope/run"], "/sys is on a sysfs file system"),
        (["hydra.run.dir=/dev/null/run"], "output dir /dev/null/run: /dev/null is not a directory"),
        (["trainr.epochs=3"], "unknown key trainr.epochs; valid keys here: model, dataset"),
        (["+trainr.epochs=3"], "unknown key trainr; valid keys here: model, dataset"),
        (["+norm=ghost", "norm.nbs=64", "trainer.batch_size=32"],
         "norm.nbs=64 exceeds the per-process batch trainer.batch_size=32"),
        (["norm.freeze_stats=batch"], "norm.freeze_stats=batch: choose one of precise, ema"),
        (["+norm=ghost", "norm.foo=1"], "unknown key norm.foo; norm=ghost takes: eps, eval_nbs, "
         "eval_stats, momentum, nbs, freeze_at_epoch"),
        (["norm.foo=1"], "unknown key norm.foo; norm=bn takes: eps,"),
        (["cluster=slurm"], "cluster: not a default group here; use +cluster=slurm"),
        # both spellings of the norm group, in single runs and sweeps
        (["norm=nope"], "norm=nope: unknown option; choose one of batch_eval, bn, brn, cbn"),
        (["-m", "norm=bn,nope"], "norm=nope: unknown option; choose one of batch_eval, bn, brn"),
        (["-m", "norm=bn,gn", "trainer.batch_size=8,0"], "trainer.batch_size=0"),
        (["norm=gn", "norm.nbs=2"], "norm=gn: unknown option nbs"),
        (["+norm=bn", "+norm=gn"], "bnbench: error: norm: chosen twice (+norm=bn, +norm=gn); "
         "choose one, or sweep over both with -m norm=bn,gn"),
        (["norm=bn", "norm=gn"], "norm: chosen twice (norm=bn, norm=gn)"),
        (["-m", "+norm=bn,gn", "norm=ln"], "norm: chosen twice (+norm=bn,gn, norm=ln)"),
        (["+model=resnet50"], "+model=resnet50: model is in the defaults list already; use "
         "model=resnet50"),
        (["-m", "optim.lr=interval(0,1)"], "optim.lr: Hydra's basic sweeper takes choices"),
        (["-m", "norm=glob(g*)", "norm.groups=5"], "norm=ghost: unknown option groups"),
        # the syntax of every override, Hydra's own included; Hydra's commands one at a time
        (["trainer.epochs=[3"], "trainer.epochs=[3: no viable alternative at input '[3'"),
        (["hydra.launcher.setup=[a b=c]"], "hydra.launcher.setup=[a b=c]: no viable "
         "alternative at input '[a b=' (quote a value with spaces or '=': key='a b')"),
        (["-m", "norm=bn,gn", "--cfg", "job"], "-m and --cfg: choose one of --run, -m, --cfg"),
        (["--resolve"], "--resolve: only with --cfg (or --help)"),
    ],
)
def test_bad_overrides_are_one_line(args, needle, capsys):
    assert cli.main(["train", *args]) == 2
    assert needle in error_line(capsys)


@pytest.mark.parametrize("args,needle", [
    (["+norm=cbn", "norm.window=0"], "norm.window=0: must be positive"),
    (["+norm=bn", "norm.momentum=1.5"], "norm.momentum=1.5: must be in [0, 1]"),
    (["+norm=ghost", "norm.nbs=0"], "norm.nbs=0: must be positive"),
    (["+norm=gn", "norm.groups=32", "model.width=0.125"],
     "norm.groups=32: must divide the 8 channels of every normalized layer"),
    (["+norm=cbn", "norm.burnin_epochs=-1"], "norm.burnin_epochs=-1.0: must be in [0, inf)"),
    (["+norm=brn", "norm.rmax_iters=0"], "norm.rmax_iters=0: must be positive"),
    (["+norm=ghost", "norm.burnin_epochs=1"], "norm.burnin_epochs: norm=ghost has no burn-in"),
])
def test_bad_layer_options_fail_before_the_run_dir_exists(args, needle, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *args, f"hydra.run.dir={run}"]) == 2
    assert needle in error_line(capsys)
    assert not run.exists()


def test_new_run_refuses_a_run_dir_holding_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("old run\n")
    (run / "metrics.jsonl").write_text("{}\n")
    for given in (f"hydra.run.dir={run}", f"++hydra.run.dir={run}", f"hydra.run.dir='{run}'"):
        assert cli.main(["train", given]) != 0
        assert "already holds a run; trainer.resume=true continues it" in error_line(capsys)
    assert (run / ".hydra" / "config.yaml").read_text() == "old run\n"  # untouched
    args = [f"hydra.run.dir={run}", "trainer.resume=true"]
    cli.check_fresh_run_dir(args, cli.validate_overrides(args))  # resuming it is fine


def test_unknown_command_and_usage(capsys):
    assert cli.main(["fly"]) == 2
    assert "unknown command" in error_line(capsys)
    assert cli.main(["--help"]) == 0


@pytest.mark.parametrize(
    "args",
    [
        ["+norm=cbn"],
        ["+norm=ghost", "norm.nbs=2"],
        ["+norm=brn"],
        ["+norm=syncbn"],
        ["+norm=frozen"],
        ["+norm=naive_cbn"],  # a variant with fixed options (rho = 0)
    ],
)
def test_documented_forms_compose(args):
    cli.validate_overrides(args)


def _composed(*args: str) -> list[dict]:
    from omegaconf import OmegaConf

    return [OmegaConf.to_container(cfg) for cfg in cli.validate_overrides(args)]


@pytest.mark.parametrize("name", ["cbn", "gn", "ghost", "bn"])
def test_norm_and_plus_norm_compose_the_same_job(name):
    """``norm=X`` (a choice in the defaults list) and ``+norm=X`` (the older spelling): the same
    config, Hydra's own record of the job included (overrides, choices, sweep subdir name)."""
    (cfg,) = _composed(f"norm={name}", "trainer.epochs=2")
    assert _composed(f"+norm={name}", "trainer.epochs=2") == [cfg]
    assert cfg["norm"]["name"] == name and cfg["hydra"]["runtime"]["choices"]["norm"] == name
    assert cfg["hydra"]["overrides"]["task"] == [f"norm={name}", "trainer.epochs=2"]
    if name == "cbn":  # the group file's values, not the schema's defaults
        assert (cfg["norm"]["window"], cfg["norm"]["burnin_epochs"]) == (4, 1.0)
    if name == "bn":  # the default: choosing it changes nothing but the record of the overrides
        (default,) = _composed("trainer.epochs=2")
        assert default["norm"] == cfg["norm"] and default["trainer"] == cfg["trainer"]


def test_norm_sweeps_in_both_spellings():
    jobs = _composed("-m", "norm=bn,gn", "trainer.batch_size=8,32")
    assert _composed("-m", "+norm=bn,gn", "trainer.batch_size=8,32") == jobs
    assert [(j["norm"]["name"], j["trainer"]["batch_size"]) for j in jobs] == [
        ("bn", 8), ("bn", 32), ("gn", 8), ("gn", 32)]
    # glob() over the group's options (Hydra's basic sweeper does the same)
    assert [j["norm"]["name"] for j in _composed("-m", "norm=glob(g*)")] == ["ghost", "gn"]
    assert [j["trainer"]["epochs"] for j in _composed("-m", "trainer.epochs=range(1,4)")] == [
        1, 2, 3]


def test_info_flags_skip_validation_and_launch(tmp_path, capsys, monkeypatch):
    """--help prints Hydra's help for any command line: no validation (an unwritable run dir),
    no processes started for dist.nproc=2."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "dist.nproc=2", "hydra.run.dir=/proc/nope/run", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr()
    assert "Powered by Hydra" in out.out and "bnbench: error" not in out.err


@pytest.mark.parametrize("spelling", ["norm=gn", "+norm=gn"])
def test_cfg_job_prints_config(spelling, tmp_path):
    out = run_cli("train", spelling, "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: gn" in out.stdout and "epochs: 8" in out.stdout
    assert not (tmp_path / "outputs").exists()


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_gn_run_end_to_end(tmp_path):
    out = run_cli("train", "norm=gn", *TINY, "trainer.epochs=1", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    summary = _summary(run)
    assert set(summary["final_top1"]) == {"none"}  # GN: one accuracy
    assert re.search(r"^final top-1: \d+\.\d\d%  \(", out.stdout, re.M), out.stdout
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {e["stats"] for e in events if e["split"] == "val"} == {"none"}
    assert (run / ".hydra" / "config.yaml").exists() and (run / "checkpoints" / "last.pt").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_bn_run_logs_ema_and_precise(tmp_path):
    out = run_cli("train", *TINY, "trainer.epochs=2", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [e for e in events if e["split"] == "val"]
    assert [(e["epoch"], e["stats"]) for e in val] == [
        (1, "ema"),
        (1, "precise"),
        (2, "ema"),
        (2, "precise"),
    ]
    for e in events:
        assert {"epoch", "iter", "split", "stats", "top1", "loss", "time"} <= set(e)
    summary = _summary(run)
    assert set(summary["final_top1"]) == {"ema", "precise"}
    assert summary["global_batch"] == 32 and summary["normalization_batch"] == 32
    assert "EMA" in out.stdout and "PreciseBN" in out.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "val/top1_ema", "val/top1_precise"} <= set(acc.Tags()["scalars"])


def _norm_in_name(job_dir: str) -> str:
    """The norm override in a sweep job's dir name ``<num>_<override>,<override>,…``."""
    (found,) = re.findall(r"(?:^\d+_|,)(\+*norm=[^,]*)", job_dir)
    return found


def test_multirun_sweep_one_dir_per_job(tmp_path):
    out = run_cli(
        "train",
        "-m",
        "norm=bn,gn",
        "trainer.batch_size=8,32",
        *TINY[:4],
        "trainer.max_iters=2",
        "precise.num_samples=64",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    dirs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert len(dirs) == 4
    seen = {(_summary(d)["norm"]["name"], _summary(d)["batch_per_process"]) for d in dirs}
    assert seen == {("bn", 8), ("bn", 32), ("gn", 8), ("gn", 32)}
    assert {_norm_in_name(d.name) for d in dirs} == {"norm=bn", "norm=gn"}  # job dir names


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    out = run_cli(
        "train",
        *TINY,
        "trainer.epochs=3",
        "optim.lr=1e30",
        "optim.warmup_epochs=0",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("bnbench: error: loss became") and "iteration" in lines[-1]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["trainer.batch_size=512"], "exceeds the 256 training images"),
        (["+norm=ghost", "norm.nbs=1", "model.small_input=false"], "1 value per channel"),
        (["dataset=imagefolder", "dataset.root=/nonexistent"], "/nonexistent"),
        (["+norm=gn", "norm.groups=5"], "norm.groups=5"),
        (["+norm=gn", "norm.groups=0"], "norm.groups=0: must be positive"),
    ],
)
def test_bad_runtime_inputs_are_one_line(args, needle, tmp_path):
    """Found once the data or model is built (Hydra has made the run dir): one line, and the
    run dir is gone (nothing was trained in it)."""
    out = run_cli("train", *TINY, *args, "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("bnbench: error: ") and needle in last, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("in_memory", [True, False])
def test_imagefolder_trains_end_to_end(tmp_path, in_memory):
    write_png_tree(tmp_path / "tree", per_class=8, size=12)
    out = run_cli(
        "train",
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'tree'}",
        f"dataset.in_memory={str(in_memory).lower()}",
        "dataset.crop_size=8",
        "dataset.resize_size=10",
        "dataset.workers=0",
        "model.width=0.125",
        "trainer.batch_size=8",
        "trainer.epochs=2",
        "precise.num_samples=16",
        "precise.batch_size=8",
        "eval.batch_size=8",
        "trainer.threads=1",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    summary = _summary(tmp_path / "run")
    assert summary["dataset"] == "imagefolder" and summary["iterations"] == 2 * 3
    assert set(summary["final_top1"]) == {"ema", "precise"}


def test_every_variant_trains_through_plus_norm(tmp_path):
    """One sweep over every registry entry: each job trains, validates and writes a summary."""
    from bnbench.norm import NORMS

    names = ",".join(NORMS)
    out = run_cli(
        "train",
        "-m",
        f"+norm={names}",
        *TINY,
        "trainer.epochs=2",
        "trainer.max_iters=6",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    summaries = {
        _summary(p.parent)["norm"]["name"]: _summary(p.parent)
        for p in (tmp_path / "sweep").glob("*/summary.json")
    }
    assert set(summaries) == set(NORMS)
    # the job dirs are named as for norm=<name>: the same jobs as `-m norm=...`
    dirs = [p.parent.name for p in (tmp_path / "sweep").glob("*/summary.json")]
    assert {_norm_in_name(d) for d in dirs} == {f"norm={n}" for n in NORMS}, dirs
    for name, summary in summaries.items():
        kinds = set(summary["final_top1"])
        expected = {"none"} if name in ("gn", "ln", "in") else {"ema", "precise"}
        if name == "batch_eval":
            expected = {"ema", "precise", "batch"}
        assert kinds == expected, (name, kinds)


def test_freeze_at_epoch_switches_to_frozen_bn(tmp_path):
    out = run_cli(
        "train",
        *TINY,
        "trainer.epochs=2",
        "norm.freeze_at_epoch=1",
        "precise.enabled=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)["model"]
    tracked = {k: int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert set(tracked.values()) == {8}  # EMA updated in epoch 1 only (8 iterations)


@pytest.mark.parametrize("content", [b"garbage\n", None])
def test_unreadable_checkpoint_is_one_line(tmp_path, content):
    from bnbench import checkpoint

    path = tmp_path / "last.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(cli.BnbenchError) as err:
        checkpoint.load(path, torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    assert ("not a valid checkpoint" if content else "does not exist") in message


# -- how a command ends: closed pipes, Ctrl-C, fast config errors --------------------------------


def _bnbench_with_closed_stdout(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``bnbench <args> | head`` with ``head`` gone before the first write: stdout is a pipe
    whose reading end is closed."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "bnbench", *args],
            cwd=cwd,
            env={**os.environ, "BNBENCH_CACHE": str(cwd / "cache")},
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--help"],
        ["train", "--cfg", "job"],
        ["train", "dist.nproc=2", "--cfg", "job"],
        ["bench", "--help"],
        ["--help"],
    ],
)
def test_printing_into_a_closed_pipe_is_quiet(args, tmp_path):
    out = _bnbench_with_closed_stdout(*args, cwd=tmp_path)
    # as `cat` ends: SIGPIPE (a shell shows 141), or 141 itself, or done; never a traceback
    assert out.returncode in (0, -signal.SIGPIPE, 141), out.stderr
    assert out.stderr == ""


def test_training_into_a_closed_pipe_finishes_the_run(tmp_path):
    """`bnbench train … | head`: the output is dropped once its reader is gone, the run goes on
    (its log is in the run dir) instead of a logging traceback per line and a failed run."""
    out = _bnbench_with_closed_stdout("train", *TINY, "trainer.epochs=1", "hydra.run.dir=run",
                                      cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Logging error" not in out.stderr
    assert (tmp_path / "run" / "summary.json").exists()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared (exit {proc.poll()})"


def test_ctrl_c_is_one_line_naming_checkpoint_and_resume(tmp_path):
    args = ["train", *TINY, "trainer.epochs=100", "hydra.run.dir=run"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnbench", *args],
        cwd=tmp_path,
        env={**os.environ, "BNBENCH_CACHE": str(tmp_path / "cache")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as from a terminal: a test run started in the background (`pytest &`) ignores SIGINT,
        # and a child inherits that (Python then installs no handler)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for(tmp_path / "run" / "checkpoints" / "last.pt", proc)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole process group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    run = tmp_path / "run"
    head, _, command = lines[0].partition("; resume with: ")
    assert head == f"bnbench: interrupted; the last checkpoint is {run}/checkpoints/last.pt"
    assert shlex.split(command) == [
        "bnbench", *args[:-1], "trainer.resume=true", f"hydra.run.dir={run}"]


@pytest.mark.parametrize(
    "args,line",
    [
        (["trainer.epoch=3"], "unknown key trainer.epoch; valid keys here: epochs"),
        (["trainr.epochs=3"], "unknown key trainr.epochs"),
        (["model=resnet1"], "model=resnet1: unknown option"),
        (["hydra.run.dir=/proc/nope/run"], "/proc is on a proc file system"),
        (["trainer.epochs=abc"], "trainer.epochs"),
        (["trainer.epochs=-1"], "trainer.epochs=-1: must be positive"),
        (["dist.timeout_s=0"], "dist.timeout_s=0.0: must be positive"),
    ],
)
def test_config_errors_come_before_torch_is_imported(args, line, tmp_path):
    """A rejected config is reported fast (the issue: ≤ 2.5 s, was 5–7 s): validation does not
    wait for torch, the trainer and torch.distributed to import."""
    probe = ("import sys; from bnbench import cli; code = cli.main(sys.argv[1:]); "
             "print(code, 'torch' in sys.modules)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe, "train", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert out.stdout.split() == ["2", "False"], out.stderr
    assert line in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert elapsed < 2.5, f"{elapsed:.2f} s"


@pytest.mark.parametrize(
    "args,line",
    [
        (["norm=gn", "norm.groups=5"], "norm.groups=5: must divide the 16 channels"),
        (["norm=cbn", "norm.neg_var=abs"], "norm.neg_var=abs: choose one of clamp, drop"),
        (["norm=brn", "norm.ema=x"], "norm.ema=x: choose one of std, var"),
    ],
)
def test_model_config_errors_come_before_dynamo_and_torchvision(args, line, tmp_path):
    """Errors that the layers find (validation builds the model on the meta device) need torch,
    but not torch._dynamo or torchvision (the issue: ≤ 2.5 s; importing those took ~1.5 s)."""
    probe = ("import sys; from bnbench import cli; code = cli.main(sys.argv[1:]); "
             "print(code, *(m in sys.modules for m in ('torch', 'torch._dynamo', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", probe, "train", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["2", "True", "False", "False"], out.stderr
    assert line in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_resume_command_keeps_the_command_line():
    cmd = cli.resume_command(["norm=gn", "--config-dir", "my configs", "trainer.resume=false",
                              "++hydra.run.dir=old", "dist.nproc=2"], "/runs/a b")
    assert shlex.split(cmd) == ["bnbench", "train", "norm=gn", "--config-dir", "my configs",
                                "dist.nproc=2", "trainer.resume=true", "hydra.run.dir=/runs/a b"]


def test_interrupt_lines(tmp_path):
    assert cli.interrupted_line(None, None) == "bnbench: interrupted before the run started"
    line = cli.interrupted_line(tmp_path, "bnbench train x")
    assert line == (f"bnbench: interrupted before the first checkpoint of {tmp_path}; start it "
                    "again there with: bnbench train x")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    assert cli.interrupted_line(tmp_path, "c", signal.SIGTERM) == (
        f"bnbench: stopped by SIGTERM; the last checkpoint is {tmp_path}/checkpoints/last.pt; "
        "resume with: c")
