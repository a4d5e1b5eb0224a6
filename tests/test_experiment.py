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
from omegaconf import OmegaConf

import bnbench
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
    assert len(ours) == 12 and all(r["value"] for r in ours)  # 2 runs × 6 columns, all measured
    assert {r["metric"] for r in rows} == {"error"}
    paper = {(r["row"], r["column"]): r["value"] for r in rows if r["source"] == "paper"}
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
    assert all(r["value"] == "" for r in rows if r["source"] == "bnbench" and r["row"] == "NBS=2")
    assert "no data" in (tmp_path / "res" / "rethinking" / "table2.md").read_text()


# -- the report's arithmetic on hand-written records (no training) ----------------------------


def _spec(**extra) -> dict:
    return {"title": "t", "reference": None, "metric": "error",
            "runs": {"A": ["trainer.seed=0,1,2"], "B": ["norm=gn"]},
            "evals": {"EMA": ["stats=ema"], "P": ["stats=precise", "precise.seed=0,1"]},
            **extra}


def _write_run(directory: Path, ema: float, precise: list[float], curve: list[float]) -> None:
    directory.mkdir(parents=True)
    (directory / "summary.json").write_text(json.dumps({"iterations": 10}))
    rows = [{"tag": "stats=ema", "stats": "ema", "split": "val", "top1": ema, "iter": 10}]
    rows += [{"tag": f"stats=precise,seed={s}", "stats": "precise", "split": "val",
              "precise.seed": s, "top1": t, "iter": 10} for s, t in enumerate(precise)]
    (directory / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [{"epoch": e, "split": "val", "stats": "ema", "top1": t} for e, t in enumerate(curve)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))


@pytest.fixture
def records_by_options(monkeypatch):
    """The hand-written runs have no checkpoint to resolve an evaluation's tag against: match
    their records on the given options (``evaluate.find_record``) instead."""
    from bnbench import experiment
    from bnbench.evaluate import find_record

    monkeypatch.setattr(experiment, "eval_record", lambda run_dir, options: find_record(
        run_dir, dict(o.split("=", 1) for o in options)))


def _experiment(tmp_path: Path, spec: dict):
    from bnbench.experiment import Experiment

    return Experiment("paper/x", "smoke", spec, {"train": []}, tmp_path, tmp_path / "res")


def test_replicas_of_a_swept_row_get_their_own_directories(tmp_path):
    exp = _experiment(tmp_path, _spec())
    a = exp.replicas("A")
    assert [r.name for r in a] == [f"trainer.seed={s}" for s in range(3)]
    assert [r.directory for r in a] == [tmp_path / "paper/x/smoke/A" / f"trainer.seed_{s}"
                                        for s in range(3)]
    (b,) = exp.replicas("B")
    assert b.name == "" and b.directory == tmp_path / "paper/x/smoke/B"
    assert exp.evaluations("A")["P"] == [("stats=precise", "precise.seed=0"),
                                      ("stats=precise", "precise.seed=1")]


def test_rows_with_the_same_overrides_share_one_run(tmp_path):
    """CBN with window 1 is BN: a row that trains exactly an earlier row's overrides (in any
    order) reads that row's run, which is trained and evaluated once."""
    from bnbench.experiment import jobs

    spec = {"runs": {"bn": ["norm=ghost", "norm.nbs=2"], "cbn k=1": ["norm.nbs=2", "norm=ghost"],
                     "cbn": ["norm=cbn", "norm.nbs=2"]},
            "evals": {"EMA": ["stats=ema"]}}
    exp = _experiment(tmp_path, spec)
    (bn,), (alias,), (cbn,) = (exp.replicas(r) for r in spec["runs"])
    assert alias.directory == bn.directory and cbn.directory != bn.directory
    todo = jobs(exp)
    assert [j.replica.directory for j in todo if j.kind == "train"] == [bn.directory,
                                                                         cbn.directory]
    assert len([j for j in todo if j.kind == "eval"]) == 2


def test_cells_average_replicas_and_claims_respect_the_spread(tmp_path, records_by_options):
    import statistics

    from bnbench.report import check_claims, our_cells

    spec = _spec(curves={"curve": "ema"}, claims=[
        {"text": "A beats B (EMA)", "better": ["A", "EMA"], "worse": ["B", "EMA"]},
        {"text": "P beats EMA on A", "better": ["A", "P"], "worse": ["A", "EMA"]},
        {"text": "gap", "larger": [{"diff": [["B", "EMA"], ["A", "EMA"]]}, {"value": 1.0}]},
        {"text": "close", "close": [["A", "curve"], ["B", "curve"]], "margin": 5},
        {"text": "missing", "better": ["A", "EMA"], "worse": ["C", "EMA"]},
    ])
    exp = _experiment(tmp_path, spec)
    base = tmp_path / "paper/x/smoke"
    emas = [80.0, 82.0, 84.0]
    for seed, ema in enumerate(emas):
        _write_run(base / "A" / f"trainer.seed_{seed}", ema, [ema + 1, ema + 3], [50.0, ema])
    _write_run(base / "B", 70.0, [71.0, 71.0], [40.0, 70.0])
    cells = our_cells(exp)
    errors = [100 - e for e in emas]
    assert cells["A"]["EMA"].mean == pytest.approx(statistics.fmean(errors))
    assert cells["A"]["EMA"].std == pytest.approx(statistics.stdev(errors))
    assert cells["A"]["EMA"].n == 3
    precise = [100 - e - d for e in emas for d in (1, 3)]
    assert cells["A"]["P"].mean == pytest.approx(statistics.fmean(precise))
    assert cells["A"]["P"].n == 6
    assert cells["A"]["curve"].mean == pytest.approx(statistics.fmean(errors))  # last epoch
    assert cells["A"]["curve (mean)"].mean == pytest.approx(
        statistics.fmean([statistics.fmean([50.0, e]) for e in errors]))
    claims = {c["text"]: c for c in check_claims(exp, cells)}
    assert claims["A beats B (EMA)"]["holds"] is True  # 18 vs 30: far beyond 2 × std (2)
    # P is 2 points better than EMA on average, but its spread is ±1.5: not resolved
    assert claims["P beats EMA on A"]["holds"] is False
    assert "within 2× the spread" in claims["P beats EMA on A"]["numbers"]
    assert claims["gap"]["holds"] is True  # 30 − 18 = 12 > 1
    assert claims["close"]["holds"] is False  # |18 − 30| > 5
    assert claims["missing"]["holds"] is None


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_every_training_job_of_every_experiment_is_a_valid_config(scale, tmp_path):
    """Each shipped experiment's training jobs compose and pass ``bnbench train``'s checks at
    the scales CI does not run (nothing is trained; every experiment runs end to end at
    ``scale=smoke`` below)."""
    from bnbench.cli import validate_overrides
    from bnbench.experiment import jobs, load

    for name in known():
        exp = load(name, [f"scale={scale}", f"root={tmp_path}"])
        for job in (j for j in jobs(exp) if j.kind == "train"):
            train_args = list(job.argv[job.argv.index("train") + 1:])
            if scale == "paper":  # (ImageNet's root is the user's; the model is ResNet-50)
                train_args.append("dataset=synthetic")
            assert validate_overrides(train_args), (name, job.title)


#: Experiments run end to end by a test of their own: table2 killed, resumed and reported above,
#: a8 in test_affine_fusion.py.
RUN_ELSEWHERE = {"rethinking/table2", "rethinking/a8"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in known() if n not in RUN_ELSEWHERE])
def test_experiment_end_to_end_at_smoke_scale(tmp_path, name, monkeypatch, capsys):
    """Every experiment runs at ``scale=smoke``: its report holds every cell, a figure, and a
    decision for every claim. In this process, as ``bnbench experiment`` runs its jobs (one
    torch import per test worker; the table2 test above runs the command itself)."""
    from bnbench.experiment import load

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNBENCH_CACHE", str(tmp_path / "cache"))
    code = cli.main(["experiment", name, "scale=smoke", "root=exp", "results=res"])
    assert code == 0, capsys.readouterr().err[-3000:]
    paper, name = name.split("/")
    out = tmp_path / "res" / paper
    md = (out / f"{name}.md").read_text()
    assert "scale=smoke" in md and "Git commit:" in md and "Wall time:" in md
    assert (out / f"{name}.png").stat().st_size > 0
    spec = load(f"{paper}/{name}", ["scale=smoke"]).spec
    ours = [r for r in csv.DictReader((out / f"{name}.csv").open()) if r["source"] == "bnbench"]
    if spec.get("pivot"):  # a sweep table: the cells its runs fill ("<row> @ <column>")
        runs = [run.split(" @ ") for run in spec["runs"]]
        columns = {c for _, c in runs if c != "*"}
        filled = {(r, c) for r, col in runs for c in (columns if col == "*" else [col])}
        ours = [r for r in ours if (r["row"], r["column"]) in filled]
        assert len(ours) == len(filled)
    if spec.get("grid"):  # one run's evaluations "A @ B" laid out as cells (A, B)
        filled = {tuple(column.split(" @ ")) for column in spec["evals"]}
        ours = [r for r in ours if (r["row"], r["column"]) in filled]
        assert len(ours) == len(filled)
    assert bool(ours) == bool(spec.get("evals") or spec.get("curves"))
    assert all(r["value"] and r["metric"] == spec["metric"] for r in ours)  # every cell measured
    if spec.get("reference"):  # the paper's cells keep the paper's own metric (a detector's AP)
        book, table = spec["reference"].split("/")
        theirs = OmegaConf.load(Path(bnbench.__file__).parent / "papers" / f"{book}.yaml")[table]
        rows = [r for r in csv.DictReader((out / f"{name}.csv").open()) if r["source"] == "paper"]
        assert {r["metric"] for r in rows} == ({theirs.get("metric", spec["metric"])} if rows
                                               else set())
    decided = [line for line in md.splitlines() if line.startswith(("- ✔", "- ✗"))]
    assert len(decided) == len(spec.get("claims") or [])
    for label in spec.get("analyses") or {}:
        assert f"**{label}:" in md  # the analysis's table


def test_a_single_run_takes_the_scales_measured_seed_spread(tmp_path, records_by_options):
    from bnbench.experiment import Experiment
    from bnbench.report import check_claims, our_cells

    spec = _spec(claims=[{"text": "B beats A", "better": ["B", "EMA"], "worse": ["A", "EMA"]},
                         {"text": "paired", "better": ["B", "P"], "worse": ["B", "EMA"]}])
    spec["runs"] = {"A": [], "B": ["norm=gn"]}
    base = tmp_path / "paper/x/smoke"
    _write_run(base / "A", 80.0, [80.0, 80.0], [80.0])
    _write_run(base / "B", 83.0, [84.0, 84.0], [83.0])  # 3 points better; P 1 better than EMA
    for spread, holds in ((1.0, True), (2.0, False)):  # Δ = 3 vs 2 × spread
        exp = Experiment("paper/x", "smoke", spec, {"train": [], "seed_spread": spread},
                         tmp_path, tmp_path / "res")
        across, paired = check_claims(exp, our_cells(exp))
        assert across["holds"] is holds, across
        assert ("within 2× the spread" in across["numbers"]) is not holds
        assert paired["holds"] is True, paired  # one model evaluated twice: no seed floor
    spec["claims"] = [{"text": "A beats B", "better": ["A", "EMA"], "worse": ["B", "EMA"]}]
    exp = Experiment("paper/x", "smoke", spec, {"train": [], "seed_spread": 1.0}, tmp_path,
                     tmp_path / "res")
    (reverse,) = check_claims(exp, our_cells(exp))  # Δ = −3: the opposite, beyond the noise
    assert reverse["holds"] is False
    assert reverse["numbers"].endswith("; the opposite, beyond 2× the spread of seeds or subsets "
                                       "(2.00)"), reverse


def test_a_sweep_table_pivots_runs_into_rows_and_columns(tmp_path, records_by_options):
    """``pivot``: the run "<row> @ <column>" fills cell (row, column); "@ *" every column; a
    row's ``eval`` overrides reach its evaluations only."""
    from bnbench.report import layout, our_cells

    spec = {"title": "t", "reference": None, "metric": "error", "pivot": "top",
            "runs": {"bn @ 32": [], "bn @ 2": ["norm.nbs=2"],
                     "gn @ *": {"train": ["norm=gn"], "eval": ["stats=none"]}},
            "evals": {"top": ["stats=ema"]}}
    exp = _experiment(tmp_path, spec)
    assert exp.evaluations("gn @ *")["top"] == [("stats=none",)]
    assert layout(exp) == (["bn", "gn"], ["32", "2"])
    base = tmp_path / "paper/x/smoke"
    for run, top1, stats in (("bn_32", 80.0, "ema"), ("bn_2", 60.0, "ema"), ("gn", 70.0, "none")):
        (base / run).mkdir(parents=True)
        (base / run / "evals.jsonl").write_text(json.dumps(
            {"tag": f"stats={stats}", "stats": stats, "split": "val", "top1": top1, "iter": 1})
            + "\n")
    cells = our_cells(exp)
    assert {r: {c: v.mean for c, v in cols.items()} for r, cols in cells.items()} == {
        "bn": {"32": 20.0, "2": 40.0}, "gn": {"32": 30.0, "2": 30.0}}


def test_the_recorded_commit_is_the_one_the_invocation_started_at(tmp_path, monkeypatch):
    """A commit made while a long experiment runs does not relabel it: the invocation ran the
    code it imported at its start."""
    from bnbench import experiment, report

    heads = iter(["aaaaaaa", "bbbbbbb"])
    monkeypatch.setattr(experiment, "git_commit", lambda: next(heads))

    def run_while_a_commit_lands(exp):
        experiment.git_commit()  # HEAD moves on during the run
        return []

    monkeypatch.setattr(experiment, "execute", run_while_a_commit_lands)
    monkeypatch.setattr(report, "write_report", lambda exp: [tmp_path / "r.md"])
    assert experiment.main(["rethinking/table2", "scale=smoke", f"root={tmp_path}"]) == 0
    (path,) = tmp_path.glob("rethinking/table2/smoke/experiment.json")
    assert [i["git"] for i in json.loads(path.read_text())["invocations"]] == ["aaaaaaa"]
