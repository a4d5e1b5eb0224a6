"""``bnbench experiment <paper>/<name> [scale=…] [overrides]``: a table or figure, end to end.

An experiment is one config, ``configs/experiment/<paper>/<name>.yaml`` (:class:`Experiment`
lists its keys): its training runs (row label → ``bnbench train`` overrides), its post-hoc
evaluations of every run (column label → ``bnbench eval`` overrides), the trainer's per-epoch
curves it plots, the analyses it runs (``bnbench analyze``), its claims and where the paper's
numbers are. A scale preset (``configs/scale/{smoke,cpu,paper}.yaml``) adds the overrides of every
training job and the sizes the experiment interpolates (``${scale.…}``). Every other override on
the command line (``dataset=…``, ``model=…``, ``dist.nproc=…``, ``+cluster=slurm``,
``hydra/launcher=…``) is passed to every training job, so the same experiment runs on a user's
data and cluster.

A row whose overrides sweep (``trainer.seed=0,1,2``) trains one :class:`Replica` per value, in
``<row>/<values>/``; a column that sweeps (``precise.seed=0,1,2,3,4``) evaluates each; the report
averages them. Each training job is a one-job Hydra multirun of ``bnbench train`` (so Hydra's
launchers apply: submitit for SLURM) in a stable directory ``<root>/<paper>/<name>/<scale>/<row>/``
with ``trainer.resume=true``: run again, a finished job (its ``summary.json``) is skipped and a
killed one resumes from its checkpoint. Every job runs in this process (one interpreter and one
torch import for all of them): training through ``bnbench train``'s own entry point, evaluations
and analyses with the functions of ``bnbench eval``/``bnbench analyze``, each skipped when
recorded already. An analysis whose ``runs`` is empty (``runs: []``, a toy such as
``affine_fusion``) reads no training run: it runs once, recorded in ``<experiment dir>/<label>/``.
A failed job is reported at the end and the others still run.
``tensorboard --logdir <root>/<paper>/<name>/<scale>`` overlays the runs' curves. The report
(:mod:`bnbench.report`) is written at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from bnbench.errors import BnbenchError

log = logging.getLogger("bnbench")

#: What the experiment command reads itself; every other override goes to the training jobs.
OWN_KEYS = ("scale", "root", "results")
#: The row of an analysis that reads no training run (``runs: []``).
NO_RUN = ""


@dataclass(frozen=True)
class Replica:
    """One training run of a row: the row's sweeps (``trainer.seed=0,1,2``) resolved to one
    value each, in its own directory (the row's, or a subdirectory per combination)."""

    run: str  # the row label
    name: str  # the resolved sweep values (``trainer.seed=1``), "" for a row without sweeps
    directory: Path
    overrides: tuple[str, ...]

    @property
    def title(self) -> str:
        return (self.run or "no training run") + (f" [{self.name}]" if self.name else "")


@dataclass(frozen=True)
class Job:
    """One job: a training run, an evaluation of one, or an analysis of one."""

    kind: str  # "train" | "eval" | "analyze"
    replica: Replica
    label: str  # the run's label, the evaluation's column or the analysis's label
    argv: tuple[str, ...]
    options: tuple[str, ...] = ()  # an evaluation's or analysis's overrides
    analysis: str = ""  # an analysis job's registry name

    @property
    def run(self) -> str:
        return self.replica.run

    @property
    def title(self) -> str:
        return f"{self.kind} {self.replica.title}" + (
            f" / {self.label}" if self.kind != "train" else "")


@dataclass
class Outcome:
    job: Job
    status: str  # "done" | "skipped" | "failed" | "not run"
    seconds: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Experiment:
    """A composed experiment config with its scale resolved.

    ``spec`` keys: ``title``, ``reference`` (``<paper>/<entry>`` of ``bnbench/papers``, or null),
    ``metric`` (``error`` | ``top1``), ``runs`` (row → train overrides; a sweep such as
    ``trainer.seed=0,1,2`` makes replicas whose cells are averaged), ``evals`` (column →
    ``bnbench eval`` overrides; a sweep such as ``precise.seed=0,1,2,3,4`` is averaged too),
    ``curves`` (column → the trainer's per-epoch validation ``stats``), ``analyses`` (label →
    ``{name, runs, options}`` of ``bnbench analyze``), ``x`` (``columns`` | ``runs``: the plot's
    x axis), ``grid`` (true: one run whose evaluations ``"A @ B"`` are laid out as cells (A, B))
    and ``claims`` (see :mod:`bnbench.report`).
    """

    name: str
    scale: str
    spec: dict[str, Any]
    scale_spec: dict[str, Any]
    root: Path
    results: Path
    forwarded: tuple[str, ...] = field(default=())

    @property
    def directory(self) -> Path:
        return self.root / self.name / self.scale

    def replicas(self, run: str) -> list[Replica]:
        """The training runs of row ``run`` (one per combination of its sweeps)."""
        return self._replicas[run]

    @cached_property
    def _replicas(self) -> dict[str, list[Replica]]:
        """Every row's replicas. A row that trains exactly what an earlier row trains (the same
        overrides, in any order) shares its run instead of training it again (CBN with window 1
        is BN: the batch sweep's k = 1 cells)."""
        from bnbench.cli import expand_sweeps

        first: dict[frozenset[str], Path] = {}
        out = {}
        for run in self.spec["runs"]:
            combos = expand_sweeps([*self.scale_spec["train"], *self.row(run)["train"]],
                                   multirun=True)
            varying = [o for combo in combos for o in combo if not all(o in c for c in combos)]
            base = self.directory / slug(run)
            out[run] = []
            for combo in combos:
                name = ",".join(o for o in combo if o in varying)
                directory = first.setdefault(frozenset(combo),
                                             base / slug(name) if name else base)
                out[run].append(Replica(run, name, directory, tuple(combo)))
        return out

    def row(self, run: str) -> dict[str, list[str]]:
        """Row ``run``'s ``train`` overrides and the ``eval`` overrides added to each of its
        evaluations (a row is a list of train overrides, or ``{train: […], eval: […]}``, e.g.
        ``eval: [stats=none]`` for a GN row of a BN table)."""
        value = self.spec["runs"][run]
        if isinstance(value, dict):
            return {"train": list(value.get("train") or []), "eval": list(value.get("eval") or [])}
        return {"train": list(value), "eval": []}

    def evaluations(self, run: str) -> dict[str, list[tuple[str, ...]]]:
        """Column → the overrides of row ``run``'s evaluations (several where the column sweeps
        an option)."""
        from bnbench.cli import expand_sweeps

        extra = self.row(run)["eval"]
        return {column: [tuple(capped(job)) for job in expand_sweeps([*overrides, *extra], True)]
                for column, overrides in (self.spec.get("evals") or {}).items()}

    def analyses(self) -> dict[str, dict[str, Any]]:
        """Label → ``{name, runs, options}`` (``runs`` defaults to every row; ``[]``: none, an
        analysis that reads no run, see :meth:`standalone`)."""
        return {label: {"name": a["name"],
                        "runs": list(self.spec["runs"] if a.get("runs") is None else a["runs"]),
                        "options": list(a.get("options") or [])}
                for label, a in (self.spec.get("analyses") or {}).items()}

    def standalone(self, label: str) -> Replica:
        """Where the analysis ``label`` that reads no training run records its result: a
        directory of its own in the experiment's (row :data:`NO_RUN`)."""
        return Replica(NO_RUN, "", self.directory / slug(label), ())


def slug(label: str) -> str:
    """A directory name for a row label (``NBS=32`` → ``NBS_32``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def known() -> list[str]:
    """Every experiment shipped in the package, as ``<paper>/<name>``."""
    base = resources.files("bnbench.configs") / "experiment"
    return sorted(f"{paper.name}/{item.name[:-5]}" for paper in base.iterdir()
                  if paper.is_dir() for item in paper.iterdir() if item.name.endswith(".yaml"))


def load(name: str, overrides: list[str]) -> Experiment:
    """Compose ``configs/experiment/<name>.yaml`` with the scale and own keys of ``overrides``
    (the rest is forwarded to the training jobs)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if name not in known():
        raise BnbenchError(f"experiment {name!r} is unknown; known: {', '.join(known())}")
    own = [o for o in overrides if o.split("=", 1)[0].lstrip("+") in OWN_KEYS]
    forwarded = tuple(o for o in overrides if o not in own)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("bnbench.configs", version_base="1.3"):
            cfg = compose("experiment_app", overrides=[f"+experiment={name}", *own])
    except Exception as err:
        from bnbench.cli import describe

        raise BnbenchError(describe(err)) from err
    finally:
        GlobalHydra.instance().clear()
    container = OmegaConf.to_container(cfg, resolve=True)
    return Experiment(name, container["scale"]["name"], container["experiment"],
                      container["scale"], Path(container["root"]), Path(container["results"]),
                      forwarded)


def capped(overrides: list[str]) -> list[str]:
    """Evaluation overrides with PreciseBN's B capped at its N (``B=N`` columns at any scale)."""
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    n, b = values.get("precise.num_samples"), values.get("precise.batch_size")
    if n is None or b is None or int(b) <= int(n):
        return overrides
    return [f"precise.batch_size={n}" if o.startswith("precise.batch_size=") else o
            for o in overrides]


def jobs(exp: Experiment) -> list[Job]:
    """Every training job, then every evaluation and analysis of every run."""
    bnbench = (sys.executable, "-m", "bnbench")
    replicas = {run: exp.replicas(run) for run in exp.spec["runs"]}
    out = []
    trained = set()  # rows that share a run (same overrides) train it once
    for replica in (r for rs in replicas.values() for r in rs):
        if replica.directory in trained:
            continue
        trained.add(replica.directory)
        argv = (*bnbench, "train", "-m", *replica.overrides, *exp.forwarded,
                f"hydra.sweep.dir={replica.directory.parent}",
                f"hydra.sweep.subdir={replica.directory.name}", "trainer.resume=true")
        out.append(Job("train", replica, replica.run, argv))
    seen = set()  # B=10³ and B=N are one evaluation where N ≤ 10³; shared runs evaluate once
    for replica in (r for rs in replicas.values() for r in rs):
        for column, options_list in exp.evaluations(replica.run).items():
            for options in options_list:
                if (replica.directory, options) not in seen:
                    argv = (*bnbench, "eval", f"run={replica.directory}", *options)
                    out.append(Job("eval", replica, column, argv, options))
                seen.add((replica.directory, options))
    for label, analysis in exp.analyses().items():
        targets = [r for run in analysis["runs"] for r in replicas[run]]
        for replica in targets or [exp.standalone(label)]:
            options = tuple(analysis["options"])
            argv = (*bnbench, "analyze", analysis["name"], f"run={replica.directory}", *options)
            out.append(Job("analyze", replica, label, argv, options, analysis["name"]))
    return out


def _finished(exp: Experiment, job: Job) -> bool:
    """A training run with its ``summary.json``; an evaluation or analysis recorded at the run's
    last iteration (the command would say so too, after starting a process)."""
    if job.kind == "analyze" and job.run == NO_RUN:  # no training run: recorded or not
        return analysis_record(job.replica.directory, job.analysis, list(job.options)) is not None
    summary = job.replica.directory / "summary.json"
    if not summary.exists():
        return False
    if job.kind == "train":
        return True
    iterations = json.loads(summary.read_text())["iterations"]
    if job.kind == "eval":
        record = eval_record(job.replica.directory, job.options)
    else:
        record = analysis_record(job.replica.directory, job.analysis, list(job.options))
    return record is not None and record["iter"] == iterations


def eval_record(run_dir: Path, options: tuple[str, ...]) -> dict[str, Any] | None:
    """The record of the evaluation ``options`` of ``run_dir``'s checkpoint, matched on its
    resolved tag (every option, the ones not given taken from the run, as ``bnbench eval``
    resolves them: a column that leaves ``precise.layerwise`` to the run never takes a
    layerwise record), or ``None`` (no run, no checkpoint, not evaluated)."""
    from bnbench import eval_app

    if not (run_dir / "checkpoints" / "last.pt").exists():
        return None
    try:
        (evaluation,) = eval_app.validate_overrides([f"run={run_dir}", *options])
    except BnbenchError:
        return None
    return eval_app.recorded(evaluation)


def analysis_record(run_dir: Path, name: str, options: list[str]) -> dict[str, Any] | None:
    """The recorded analysis ``name`` of ``run_dir`` if its options include ``options``."""
    from bnbench.analysis import read_analysis
    from bnbench.evaluate import canonical

    record = read_analysis(run_dir, name)
    if record is None:
        return None
    wanted = dict(o.split("=", 1) for o in options if "=" in o)
    stored = record.get("options", {})
    if any(canonical(stored.get(k)) != canonical(v) for k, v in wanted.items()):
        return None
    return record


def run_job(job: Job) -> tuple[bool, str]:
    """Run one job in this process; ``(ok, last error line)``. A training run is ``bnbench train
    -m <overrides>`` (Hydra's launcher runs it: here with the basic launcher, on the cluster with
    submitit's); evaluations and analyses are the functions of ``bnbench eval``/``bnbench
    analyze``. One interpreter for every job: torch, Hydra and the optimizer's compiler stack are
    imported once per experiment instead of once per run."""
    if job.kind == "train":
        return train_here(job)
    try:
        if job.kind == "eval":
            evaluate_here(job)
        else:
            analyze_here(job)
    except BnbenchError as err:
        line = f"bnbench: error: {err}"
        print(line, file=sys.stderr, flush=True)
        return False, line
    return True, ""


class _LastErrorLine(io.TextIOBase):
    """``sys.stderr`` during a training job: passes everything through and keeps the last
    ``bnbench: error:`` line (the job's one-line reason, for the experiment's summary)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.startswith("bnbench: error: "):
                self.last = line
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def train_here(job: Job) -> tuple[bool, str]:
    """``bnbench train -m <overrides>`` in this process; ``(ok, its error line)`` (the run
    printed the line itself).
    The command's global state is restored afterwards: ``sys.argv`` and ``sys.stdout`` (which it
    sets for Hydra), the root logger's handlers (Hydra points them at the run's log) and Hydra's
    global instance. Ctrl-C (the run prints where to resume) stops the experiment."""
    from hydra.core.global_hydra import GlobalHydra

    from bnbench import cli

    errors = _LastErrorLine(sys.stderr)
    argv, stdout, root = sys.argv, sys.stdout, logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with contextlib.redirect_stderr(errors):
            code = cli.main(list(job.argv[job.argv.index("train"):]))
    except SystemExit as stop:  # the job's own exit (Hydra runs it inside its launcher)
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv, sys.stdout = argv, stdout
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        GlobalHydra.instance().clear()
    if code == cli.EXIT_INTERRUPTED:
        raise KeyboardInterrupt
    if code != 0:
        return False, errors.last or f"bnbench train exited with status {code}"
    return True, ""


def evaluate_here(job: Job) -> None:
    """``bnbench eval run=<replica> <options>``, in this process."""
    from bnbench import eval_app

    for evaluation in eval_app.validate_overrides([f"run={job.replica.directory}",
                                                   *job.options]):
        if eval_app.recorded(evaluation) is None:
            record = eval_app.run_eval(evaluation)
            eval_app.append_record(evaluation.run_dir, record)
            print(f"  {evaluation.tag}: top-1 {record['top1']:.2f}%", flush=True)


def analyze_here(job: Job) -> None:
    """``bnbench analyze <name> run=<replica> <options>``, in this process."""
    from bnbench import analysis

    analysis.run_analysis([job.analysis, f"run={job.replica.directory}", *job.options])


def execute(exp: Experiment) -> list[Outcome]:
    """Run every job that is not finished; a failed run's evaluations are not run."""
    todo = jobs(exp)
    outcomes: list[Outcome] = []
    failed_runs: set[Path] = set()  # their directories (rows may share a run)
    durations: list[float] = []
    for index, job in enumerate(todo, 1):
        what = f"[{index}/{len(todo)}] {job.title}"
        if job.replica.directory in failed_runs:
            outcomes.append(Outcome(job, "not run", message="its training run failed"))
            continue
        if _finished(exp, job):
            outcomes.append(Outcome(job, "skipped", message="finished before"))
            print(f"{what}: finished before, skipped", flush=True)
            continue
        remaining = len(todo) - index + 1
        eta = f", ETA {_duration(sum(durations) / len(durations) * remaining)}" if durations else ""
        print(f"{what}{eta}", flush=True)
        start = time.perf_counter()
        ok, message = run_job(job)
        seconds = time.perf_counter() - start
        durations.append(seconds)
        outcomes.append(Outcome(job, "done" if ok else "failed", seconds, "" if ok else message))
        if not ok and job.kind == "train":
            failed_runs.add(job.replica.directory)
    return outcomes


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def record(exp: Experiment, outcomes: list[Outcome], argv: list[str], seconds: float,
           commit: str) -> Path:
    """``experiment.json`` in the experiment directory: what ran, where, how long (the report's
    header); appended to on every invocation. ``commit``: the checkout's when the invocation
    started (the code it imported), not when it ended."""
    exp.directory.mkdir(parents=True, exist_ok=True)
    path = exp.directory / "experiment.json"
    history = json.loads(path.read_text())["invocations"] if path.exists() else []
    history.append({
        "command": shlex.join(["bnbench", "experiment", *argv]),
        "git": commit,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "wall_s": round(seconds, 1),
        "jobs": [{"kind": o.job.kind, "run": o.job.run, "replica": o.job.replica.name,
                  "label": o.job.label,
                  "status": o.status, "seconds": round(o.seconds, 1), "message": o.message}
                 for o in outcomes],
    })
    data = {"name": exp.name, "scale": exp.scale, "spec": exp.spec, "scale_spec": exp.scale_spec,
            "forwarded": list(exp.forwarded), "invocations": history}
    from bnbench.logs import write_json

    return write_json(path, data)


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"


def main(argv: list[str]) -> int:
    """The ``bnbench experiment`` command; returns the exit status."""
    if not argv or argv[0].startswith("-"):
        print("usage: bnbench experiment <paper>/<name> [scale=smoke|cpu|paper] [overrides]\n"
              f"experiments: {', '.join(known())}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, overrides = argv[0], argv[1:]
    exp = load(name, overrides)
    start, commit = time.perf_counter(), git_commit()
    outcomes = execute(exp)
    record(exp, outcomes, argv, time.perf_counter() - start, commit)
    from bnbench.report import write_report

    paths = write_report(exp)
    bad = [o for o in outcomes if o.status in ("failed", "not run")]
    for outcome in bad:
        print(f"bnbench: {outcome.job.title} {outcome.status}: {outcome.message}",
              file=sys.stderr)
    print(f"experiment {name} ({exp.scale}): {len(outcomes) - len(bad)}/{len(outcomes)} jobs ok; "
          f"runs in {exp.directory}; report {paths[0]}", flush=True)
    return 1 if bad else 0
