"""``bnbench report <paper>/<name> [scale=…]``: an experiment's table beside the paper's.

Reads the experiment's runs (``<root>/<paper>/<name>/<scale>/``: each run's evaluation records and
``experiment.json``) and writes ``<results>/<paper>/<name>.md`` and ``.csv`` (our cells beside the
paper's, each labelled with its scale) and ``.png`` (the metric per column, one line per run), and
checks the experiment's claims: ✔ or ✗ with the numbers behind them, or "no data". Nothing is
written that the runs do not support: a missing run or evaluation is an empty cell, never a
guess. The paper's numbers are data (``bnbench/papers/<paper>.yaml``), cited by table and section.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bnbench.errors import BnbenchError
from bnbench.experiment import Experiment, load

Cells = dict[str, dict[str, float | None]]


def paper_cells(reference: str) -> tuple[Cells, str]:
    """The paper's cells of ``<paper>/<table>`` and their citation."""
    paper, table = reference.split("/", 1)
    text = (resources.files("bnbench.papers") / f"{paper}.yaml").read_text(encoding="utf-8")
    entry = OmegaConf.to_container(OmegaConf.create(text))[table]
    return entry["cells"], entry["source"]


def eval_options(overrides: list[str]) -> dict[str, str]:
    """``key=value`` overrides of an evaluation as a dict (what its record is matched on)."""
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def lookup(run_dir: Path, options: dict[str, str]) -> dict[str, Any] | None:
    """The latest evaluation record of ``run_dir`` whose options include ``options``."""
    from bnbench.evaluate import find_record

    return find_record(run_dir, options)


def our_cells(exp: Experiment) -> Cells:
    """Our metric per (run, evaluation); ``None`` where the run or evaluation is missing."""
    from bnbench.experiment import capped

    cells: Cells = {}
    for run in exp.spec["runs"]:
        row = cells.setdefault(run, {})
        for column, overrides in exp.spec.get("evals", {}).items():
            rec = lookup(exp.run_dir(run), eval_options(capped(list(overrides))))
            row[column] = None if rec is None else _metric(rec["top1"], exp.spec["metric"])
    return cells


def _metric(top1: float, metric: str) -> float:
    return 100.0 - top1 if metric == "error" else top1


def check_claims(exp: Experiment, cells: Cells) -> list[dict[str, Any]]:
    """Each claim ✔/✗ from our cells (lower is better for error, higher for top-1)."""
    lower_is_better = exp.spec["metric"] == "error"
    out = []
    for claim in exp.spec.get("claims", []):
        margin = float(claim.get("margin", 0.0))
        if "close" in claim:
            (r1, c1), (r2, c2) = claim["close"]
            a, b = cells.get(r1, {}).get(c1), cells.get(r2, {}).get(c2)
            ok = None if a is None or b is None else abs(a - b) <= margin
            numbers = f"{r1} {c1} {_fmt(a)} vs {r2} {c2} {_fmt(b)} (|Δ| ≤ {margin:g}?)"
        else:
            (rb, cb), (rw, cw) = claim["better"], claim["worse"]
            good, bad = cells.get(rb, {}).get(cb), cells.get(rw, {}).get(cw)
            if good is None or bad is None:
                ok = None
            else:
                ok = good < bad - margin if lower_is_better else good > bad + margin
            numbers = f"{rb} {cb} {_fmt(good)} vs {rw} {cw} {_fmt(bad)}"
        out.append({"text": claim["text"], "holds": ok, "numbers": numbers})
    return out


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _table(title: str, cells: Cells, rows: list[str], columns: list[str]) -> list[str]:
    lines = [f"**{title}**", "", "| | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        values = [_fmt(cells.get(row, {}).get(c)) if cells.get(row, {}).get(c) is not None else ""
                  for c in columns]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return [*lines, ""]


def render(exp: Experiment, ours: Cells, paper: Cells, source: str,
           claims: list[dict[str, Any]]) -> tuple[str, str]:
    """The markdown and the CSV of the report."""
    rows, columns = list(exp.spec["runs"]), list(exp.spec.get("evals", {}))
    metric = "validation error (%)" if exp.spec["metric"] == "error" else "top-1 (%)"
    info = _invocations(exp)
    md = [f"# {exp.spec['title']} — scale={exp.scale}", ""]
    if info:
        last = info[-1]
        md += [f"- Command: `{last['command']}`", f"- Git commit: {last['git']}",
               f"- Machine: {last['machine']}", f"- Date: {last['date']}",
               f"- Wall time: {sum(i['wall_s'] for i in info):.0f} s over {len(info)} "
               "invocation(s)", ""]
    else:
        md += ["- No run of this experiment at this scale was found.", ""]
    md += [f"Metric: {metric}. Empty cells: no run or evaluation (never estimated).", ""]
    md += _table(f"Ours, scale={exp.scale} ({_scale_words(exp.scale)})", ours, rows, columns)
    md += _table(f"Paper: {source}", paper, rows, columns)
    md += ["## Claims", ""]
    for claim in claims:
        mark = {True: "✔", False: "✗", None: "no data"}[claim["holds"]]
        md.append(f"- {mark} {claim['text']} — {claim['numbers']}")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "column", "source", "scale", exp.spec["metric"]])
    for source_name, cells, scale in (("bnbench", ours, exp.scale), ("paper", paper, "paper")):
        for row in rows:
            for column in columns:
                value = cells.get(row, {}).get(column)
                writer.writerow([row, column, source_name, scale,
                                 "" if value is None else f"{value:.4f}"])
    return "\n".join(md) + "\n", buffer.getvalue()


def _scale_words(scale: str) -> str:
    return {"smoke": "a CI smoke run: tiny data, one epoch; shows nothing about the paper",
            "cpu": "embedded synthetic data, 1/4-width ResNet-18, 2-core CPU; not ImageNet",
            "paper": "the paper's recipe"}.get(scale, scale)


def _invocations(exp: Experiment) -> list[dict[str, Any]]:
    path = exp.directory / "experiment.json"
    return json.loads(path.read_text())["invocations"] if path.exists() else []


def plot(exp: Experiment, ours: Cells, paper: Cells, path: Path) -> None:
    """The metric per column, one line per run (ours solid, the paper's dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(exp.spec.get("evals", {}))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, cells, title in ((axes[0], ours, f"bnbench, scale={exp.scale}"),
                             (axes[1], paper, "paper")):
        for run in exp.spec["runs"]:
            ys = [cells.get(run, {}).get(c) for c in columns]
            ax.plot(range(len(columns)), [float("nan") if y is None else y for y in ys],
                    marker="o", label=run)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_title(title)
        ax.set_ylabel(exp.spec["metric"] + " (%)")
        ax.legend()
    fig.suptitle(exp.spec["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(exp: Experiment) -> list[Path]:
    """Write the report files; returns their paths (markdown first)."""
    ours = our_cells(exp)
    paper, source = paper_cells(exp.spec["reference"])
    claims = check_claims(exp, ours)
    md, table = render(exp, ours, paper, source, claims)
    out = exp.results / exp.name
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".md"), out.with_suffix(".csv"), out.with_suffix(".png")]
    for path, text in zip(paths[:2], (md, table)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    plot(exp, ours, paper, paths[2])
    return paths


def main(argv: list[str]) -> int:
    """The ``bnbench report`` command."""
    if not argv or argv[0].startswith("-"):
        print("usage: bnbench report <paper>/<name> [scale=smoke|cpu|paper]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    exp = load(argv[0], argv[1:])
    if not (exp.directory / "experiment.json").exists():
        raise BnbenchError(f"report {argv[0]} (scale={exp.scale}): no runs in {exp.directory}; "
                           f"run 'bnbench experiment {argv[0]} scale={exp.scale}' first")
    paths = write_report(exp)
    print(f"report: {', '.join(str(p) for p in paths)}")
    return 0
