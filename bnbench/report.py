"""``bnbench report <paper>/<name> [scale=…]``: an experiment's table beside the paper's.

Reads the experiment's runs (``<root>/<paper>/<name>/<scale>/``: each run's evaluation records,
per-epoch ``metrics.jsonl``, analyses and ``experiment.json``) and writes
``<results>/<paper>/<name>.md`` and ``.csv`` (our cells beside the paper's, each labelled with its
scale) and ``.png`` (the figure), and checks the experiment's claims: ✔ or ✗ with the numbers
behind them, or "no data". Nothing is written that the runs do not support: a missing run or
evaluation is an empty cell, never a guess. The paper's numbers are data
(``bnbench/papers/<paper>.yaml``), cited by table and section.

A cell averages its replicas — the training runs of a row's sweep (seeds) times the evaluations
of a column's sweep (PreciseBN subsets) — and shows ``mean ± std`` (sample std) when there are
several. A claim compares cells (or analysis scalars, or differences of them):

* ``better``/``worse``: ``better`` has the better metric (lower error, higher top-1) by more
  than ``margin``;
* ``larger``/``smaller``: the first is larger (smaller) than the second by more than ``margin``;
* ``close``: the two differ by at most ``margin``.

An operand is ``[row, column]`` (a cell), ``{analysis: label, run: row, scalar: name}``,
``{diff: [a, b]}`` (a − b), ``{std: [row, column]}`` (a cell's spread) or ``{value: x}``.
Where the operands have a seed spread, a difference that is not larger than twice it is ✗
("within 2× the spread"): more seeds are needed to call it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bnbench.errors import BnbenchError
from bnbench.experiment import NO_RUN, Experiment, Replica, load
from bnbench.logs import write_text


@dataclass(frozen=True)
class Stat:
    """A cell: the mean of its replicas, their sample std (0 for one) and how many."""

    mean: float
    std: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Stat | None:
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return Stat(statistics.fmean(values), std, len(values))


Cells = dict[str, dict[str, "Stat | None"]]
Curves = dict[str, dict[str, list[tuple[int, float]]]]


def paper_entry(reference: str | None) -> dict[str, Any]:
    """The paper's entry ``<paper>/<table>``: ``cells``, ``source``, ``metric`` (the paper's
    own: a detector's box AP is not our error) and an optional ``note``."""
    if not reference:
        return {"cells": {}, "source": "no published numbers for this figure", "note": None,
                "metric": None}
    paper, table = reference.split("/", 1)
    text = (resources.files("bnbench.papers") / f"{paper}.yaml").read_text(encoding="utf-8")
    entry = OmegaConf.to_container(OmegaConf.create(text))[table]
    return {"cells": entry.get("cells") or {}, "source": entry["source"],
            "note": entry.get("note"), "metric": entry.get("metric")}


def paper_cells(entry: dict[str, Any]) -> Cells:
    """The entry's cells as :class:`Stat` (one published number each)."""
    return {row: {col: None if v is None else Stat(float(v), 0.0, 1) for col, v in cols.items()}
            for row, cols in entry["cells"].items()}


def _metric(top1: float, metric: str) -> float:
    return 100.0 - top1 if metric == "error" else top1


def our_cells(exp: Experiment) -> Cells:
    """Our metric per (row, column): the evaluations' columns, and for each curve its final
    value and its mean over the epochs; ``None`` where nothing was measured."""
    from bnbench.experiment import eval_record

    cells: Cells = {}
    curves = our_curves(exp)
    for run in exp.spec["runs"]:
        row = cells.setdefault(run, {})
        replicas = exp.replicas(run)
        for column, options_list in exp.evaluations(run).items():
            values = []
            for replica in replicas:
                for options in options_list:
                    rec = eval_record(replica.directory, options)
                    if rec is not None:
                        values.append(_metric(rec["top1"], exp.spec["metric"]))
            row[column] = Stat.of(values)
        for label in exp.spec.get("curves") or {}:
            points = curves.get(run, {}).get(label, [])
            row[label] = Stat.of([points[-1][1]] if points else [])
            row[f"{label} (mean)"] = Stat.of([statistics.fmean(v for _, v in points)]
                                             if points else [])
    if exp.spec.get("grid"):
        return gridded(exp, cells)
    return pivoted(exp, cells) if exp.spec.get("pivot") else cells


#: A sweep table's run label: ``"<row> @ <column>"`` (``"<row> @ *"``: the same run in every
#: column, e.g. GN at a fixed SGD batch, whose result does not depend on the devices' batch).
PIVOT_SEP = " @ "


def pivoted(exp: Experiment, cells: Cells) -> Cells:
    """The cells of a sweep table (``pivot: <evaluation column>``): the run ``"A @ B"``'s value
    of that evaluation becomes cell (A, B)."""
    _, columns = layout(exp)
    out: Cells = {}
    for run, row in cells.items():
        name, _, column = run.partition(PIVOT_SEP)
        for target in (columns if column == "*" else [column]):
            out.setdefault(name, {})[target] = row.get(exp.spec["pivot"])
    return out


def gridded(exp: Experiment, cells: Cells) -> Cells:
    """The cells of an evaluation grid (``grid: true``): the one run's evaluation
    ``"A @ B"`` becomes cell (A, B) — one model evaluated under two factors (Rethinking Table 4:
    the evaluated domain × the domain of the statistics)."""
    layout(exp)  # (checks the labels)
    out: Cells = {}
    for label, value in next(iter(cells.values()), {}).items():
        row, _, column = label.partition(PIVOT_SEP)
        out.setdefault(row, {})[column] = value
    return out


def layout(exp: Experiment) -> tuple[list[str], list[str]]:
    """The report table's rows and columns: the runs and the evaluations (and curves), or for
    a sweep table the two halves of the run labels, or for an evaluation grid those of the
    evaluation labels."""
    if exp.spec.get("grid"):
        halves = [column.partition(PIVOT_SEP) for column in columns_of(exp)]
        if len(exp.spec["runs"]) != 1 or any(not sep for _, sep, _ in halves):
            raise BnbenchError(f"experiment {exp.name}: with grid, one run and every evaluation "
                               f"labelled '<row>{PIVOT_SEP}<column>'")
        return (list(dict.fromkeys(a for a, _, _ in halves)),
                list(dict.fromkeys(b for _, _, b in halves)))
    if not exp.spec.get("pivot"):
        return list(exp.spec["runs"]), columns_of(exp)
    halves = [run.partition(PIVOT_SEP) for run in exp.spec["runs"]]
    if any(not sep for _, sep, _ in halves):
        raise BnbenchError(f"experiment {exp.name}: with pivot, every run is labelled "
                           f"'<row>{PIVOT_SEP}<column>'")
    rows = list(dict.fromkeys(a for a, _, _ in halves))
    columns = list(dict.fromkeys(b for _, _, b in halves if b != "*"))
    return rows, columns


def columns_of(exp: Experiment) -> list[str]:
    curve_columns = [c for label in exp.spec.get("curves") or {} for c in (label,
                     f"{label} (mean)")]
    return [*(exp.spec.get("evals") or {}), *curve_columns]


def _epoch_metrics(replica: Replica, stats: str, metric: str) -> dict[int, float]:
    """The trainer's validation rows of one kind: epoch → metric (the last row per epoch)."""
    path = replica.directory / "metrics.jsonl"
    out: dict[int, float] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("split") == "val" and row.get("stats") == stats:
            out[int(row["epoch"])] = _metric(row["top1"], metric)
    return out


def our_curves(exp: Experiment) -> Curves:
    """Row → curve label → [(epoch, metric)], averaged over the row's replicas (epochs that
    every finished replica has)."""
    out: Curves = {}
    for run in exp.spec["runs"]:
        for label, stats in (exp.spec.get("curves") or {}).items():
            per_replica = [_epoch_metrics(r, stats, exp.spec["metric"])
                           for r in exp.replicas(run)]
            per_replica = [m for m in per_replica if m]
            if not per_replica:
                continue
            epochs = sorted(set.intersection(*(set(m) for m in per_replica)))
            out.setdefault(run, {})[label] = [
                (e, statistics.fmean(m[e] for m in per_replica)) for e in epochs]
    return out


def our_analyses(exp: Experiment) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Analysis label → row → the recorded results of its replicas."""
    from bnbench.experiment import analysis_record

    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for label, analysis in exp.analyses().items():
        for run in analysis["runs"] or [NO_RUN]:  # (none: an analysis that reads no run)
            results = []
            for replica in exp.replicas(run) if run != NO_RUN else [exp.standalone(label)]:
                rec = analysis_record(replica.directory, analysis["name"], analysis["options"])
                if rec is not None:
                    results.append(rec["result"])
            out.setdefault(label, {})[run] = results
    return out


class Operands:
    """Resolves a claim's operands against our cells and analyses. When a claim compares
    different training runs (rows), a cell of one run has no spread of its own: it takes
    ``seed_spread``, the scale's measured seed-to-seed std of the baseline
    (``scale.seed_spread``, metric points), so that a difference within twice that noise is not
    called. Two evaluations of the same run (a paired comparison: the seed is common) keep
    only their own spread."""

    def __init__(self, cells: Cells, analyses: dict[str, dict[str, list[dict[str, Any]]]],
                 seed_spread: float = 0.0):
        self.cells, self.analyses, self.seed_spread = cells, analyses, seed_spread

    def value(self, operand: Any, across_runs: bool = False) -> tuple[Stat | None, str]:
        """The operand's value and how it reads (``across_runs``: the claim compares rows)."""
        if isinstance(operand, dict) and "diff" in operand:
            across = across_runs or len(rows_of(operand)) > 1
            (a, na), (b, nb) = (self.value(o, across) for o in operand["diff"])
            name = f"({na} − {nb})"
            if a is None or b is None:
                return None, name
            return Stat(a.mean - b.mean, math.hypot(a.std, b.std), min(a.n, b.n)), name
        if isinstance(operand, dict) and "value" in operand:
            return Stat(float(operand["value"]), 0.0, 1), f"{operand['value']:g}"
        if isinstance(operand, dict) and "std" in operand:
            cell, name = self.value(operand["std"])  # (its own spread, never the floor)
            return (None if cell is None else Stat(cell.std, 0.0, 1)), f"std of {name}"
        if isinstance(operand, dict):
            run = operand.get("run", NO_RUN)  # (no run: an analysis that reads none)
            results = self.analyses.get(operand["analysis"], {}).get(run, [])
            values = [r["scalars"][operand["scalar"]] for r in results
                      if r.get("scalars", {}).get(operand["scalar"]) is not None]
            return Stat.of(values), f"{run} {operand['scalar']}".strip()
        row, column = operand
        cell = self.cells.get(row, {}).get(column)
        if across_runs and cell is not None and cell.n == 1 and self.seed_spread:
            cell = Stat(cell.mean, self.seed_spread, 1)
        return cell, f"{row} {column}"


def rows_of(operand: Any) -> set[str]:
    """The rows (training runs) an operand reads."""
    if isinstance(operand, dict) and "diff" in operand:
        return set().union(*(rows_of(o) for o in operand["diff"]))
    if isinstance(operand, dict):
        return {operand["run"]} if "run" in operand else (
            rows_of(operand["std"]) if "std" in operand else set())
    return {operand[0]}


def check_claims(exp: Experiment, cells: Cells,
                 analyses: dict[str, dict[str, list[dict[str, Any]]]] | None = None
                 ) -> list[dict[str, Any]]:
    """Each claim ✔/✗ (``holds`` True/False) or ``None`` (no data), with its numbers."""
    operands = Operands(cells, analyses or {}, float(exp.scale_spec.get("seed_spread") or 0.0))
    lower_is_better = exp.spec["metric"] == "error"
    out = []
    for claim in exp.spec.get("claims") or []:
        margin = float(claim.get("margin", 0.0))
        if "close" in claim:
            (a, na), (b, nb) = (operands.value(o) for o in claim["close"])
            holds = None if a is None or b is None else abs(a.mean - b.mean) <= margin
            numbers = f"{na} {_fmt(a)} vs {nb} {_fmt(b)} (|Δ| ≤ {margin:g}?)"
            out.append({"text": claim["text"], "holds": holds, "numbers": numbers})
            continue
        if "better" in claim:
            first, second = claim["better"], claim["worse"]
            sign = -1.0 if lower_is_better else 1.0
        elif "larger" in claim:
            first, second = claim["larger"]
            sign = 1.0
        else:
            first, second = claim["smaller"]
            sign = -1.0
        across = len(rows_of(first) | rows_of(second)) > 1
        (a, na), (b, nb) = operands.value(first, across), operands.value(second, across)
        numbers = f"{na} {_fmt(a)} vs {nb} {_fmt(b)}"
        holds = None
        if a is not None and b is not None:
            delta = sign * (a.mean - b.mean)  # > 0: the claim's direction
            spread = 2 * max(a.std, b.std)
            holds = delta > margin and delta > spread
            delta = round(delta, 9) + 0.0  # (no "-0.00" from rounding noise)
            numbers += f"; Δ = {'+' if delta > 0 else ''}{_num(delta)}" + (
                f" (margin {margin:g})" if margin else "")
            if spread and abs(delta) <= spread:
                numbers += f"; within 2× the spread of seeds or subsets ({_num(spread)})"
            elif spread and delta < 0:
                numbers += ("; the opposite, beyond 2× the spread of seeds or subsets "
                            f"({_num(spread)})")
        out.append({"text": claim["text"], "holds": holds, "numbers": numbers})
    return out


def _num(x: float) -> str:
    """Two decimals for percentages; three significant digits for small quantities."""
    return f"{x:.2f}" if x == 0 or abs(x) >= 1 else f"{x:.3g}"


def _fmt(value: Stat | None) -> str:
    if value is None:
        return "—"
    return _num(value.mean) + (f" ± {_num(value.std)}" if value.n > 1 else "")


def _table(title: str, cells: Cells, rows: list[str], columns: list[str]) -> list[str]:
    lines = [f"**{title}**", "", "| | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        values = [_fmt(cells.get(row, {}).get(c)) if cells.get(row, {}).get(c) is not None
                  else "" for c in columns]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return [*lines, ""]


def _plain_table(table: dict[str, dict[str, Any]]) -> list[str]:
    """An analysis's ``{row: {column: value}}`` as markdown."""
    columns = list(dict.fromkeys(c for cols in table.values() for c in cols))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, cols in table.items():
        values = ["" if cols.get(c) is None else
                  (f"{cols[c]:.4g}" if isinstance(cols[c], (int, float)) else str(cols[c]))
                  for c in columns]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return [*lines, ""]


def _replica_note(exp: Experiment) -> list[str]:
    counts = {run: len(exp.replicas(run)) for run in exp.spec["runs"]}
    sweeps = {c: len(o) for run in exp.spec["runs"] for c, o in exp.evaluations(run).items()
              if len(o) > 1}
    notes = []
    if any(n > 1 for n in counts.values()):
        notes.append("training runs per row: " + ", ".join(f"{r} {n}" for r, n in counts.items()))
    if sweeps:
        notes.append("evaluations per cell: " + ", ".join(f"{c} {n}" for c, n in sweeps.items()))
    return [f"Cells are mean ± sample std over replicas ({'; '.join(notes)}).", ""] if notes else []


def render(exp: Experiment, ours: Cells, paper: dict[str, Any], claims: list[dict[str, Any]],
           curves: Curves | None = None,
           analyses: dict[str, dict[str, list[dict[str, Any]]]] | None = None
           ) -> tuple[str, str]:
    """The markdown and the CSV of the report."""
    rows, columns = layout(exp)
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
    if exp.spec.get("description"):
        md += [exp.spec["description"].strip(), ""]
    if columns:
        md += [f"Metric: {metric}. Empty cells: no run or evaluation (never estimated).", ""]
        md += _replica_note(exp)
        md += _table(f"Ours, scale={exp.scale} ({_scale_words(exp.scale)})", ours, rows,
                     columns)
        p_cells = paper_cells(paper)
        if p_cells:
            theirs = paper.get("metric") or exp.spec["metric"]
            label = "" if theirs == exp.spec["metric"] else f" (metric: {theirs}, not ours)"
            md += _table(f"Paper{label}: {paper['source']}", p_cells, rows, columns)
        else:
            md += [f"Paper: {paper['source']}.", ""]
        if paper.get("note"):
            md += [f"Paper note: {paper['note']}", ""]
    for run, by_label in (curves or {}).items():
        epochs = sorted({e for points in by_label.values() for e, _ in points})
        md += [f"**Per-epoch {metric}, {run}**", "",
               "| epoch | " + " | ".join(str(e) for e in epochs) + " |",
               "|---" * (len(epochs) + 1) + "|"]
        for label, points in by_label.items():
            values = dict(points)
            md.append(f"| {label} | " + " | ".join(
                f"{values[e]:.2f}" if e in values else "" for e in epochs) + " |")
        md.append("")
    for label, by_run in (analyses or {}).items():
        for run, results in by_run.items():
            where = run or "no training run"
            md += [f"**{label}: {where}**" + (f" (replica 1 of {len(results)})"
                                              if len(results) > 1 else ""), ""]
            md += _plain_table(results[0]["table"]) if results else ["(not run)", ""]
    md += ["## Claims", ""]
    for claim in claims:
        mark = {True: "✔", False: "✗", None: "no data"}[claim["holds"]]
        md.append(f"- {mark} {claim['text']} — {claim['numbers']}")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "column", "source", "scale", "metric", "value", "std", "n"])
    for source_name, cells, scale, metric_name in (
            ("bnbench", ours, exp.scale, exp.spec["metric"]),
            ("paper", paper_cells(paper), "paper",
             paper.get("metric") or exp.spec["metric"])):
        for row in rows:
            for column in columns:
                value = cells.get(row, {}).get(column)
                writer.writerow([row, column, source_name, scale, metric_name,
                                 "" if value is None else f"{value.mean:.4f}",
                                 "" if value is None else f"{value.std:.4f}",
                                 "" if value is None else value.n])
    return "\n".join(md) + "\n", buffer.getvalue()


def _scale_words(scale: str) -> str:
    return {"smoke": "a CI smoke run: tiny data, one epoch; shows nothing about the paper",
            "cpu": "embedded synthetic data, 1/4-width ResNet-18, 2-core CPU; not ImageNet",
            "paper": "the paper's recipe"}.get(scale, scale)


def _invocations(exp: Experiment) -> list[dict[str, Any]]:
    path = exp.directory / "experiment.json"
    return json.loads(path.read_text())["invocations"] if path.exists() else []


def _plot_cells(ax: Any, exp: Experiment, cells: Cells, title: str, metric: str) -> None:
    """The metric: x = the columns, a line per row (``x: columns``) or the other way round."""
    rows, columns = layout(exp)
    by_runs = exp.spec.get("x") == "runs"
    xs, lines = (rows, columns) if by_runs else (columns, rows)
    for line in lines:
        stats = [cells.get(x, {}).get(line) if by_runs else cells.get(line, {}).get(x)
                 for x in xs]
        ys = [float("nan") if s is None else s.mean for s in stats]
        errs = [0.0 if s is None else s.std for s in stats]
        ax.errorbar(range(len(xs)), ys, yerr=errs, marker="o", capsize=3, label=line)
    ax.set_xticks(range(len(xs)), xs, rotation=30)
    ax.set_title(title)
    ax.set_ylabel(metric + " (%)")
    ax.legend(fontsize=7)


def plot(exp: Experiment, ours: Cells, paper: dict[str, Any], curves: Curves,
         analyses: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    """The figure: our cells (and the paper's entry's, in its own metric), the curves per
    row, every analysis panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[Any] = []
    if exp.spec.get("evals"):
        panels.append(lambda ax: _plot_cells(ax, exp, ours, f"bnbench, scale={exp.scale}",
                                             exp.spec["metric"]))
        if paper["cells"]:
            panels.append(lambda ax: _plot_cells(ax, exp, paper_cells(paper), "paper",
                                                 paper["metric"] or exp.spec["metric"]))
    for run, by_label in curves.items():
        def draw(ax: Any, run: str = run, by_label: dict = by_label) -> None:
            for label, points in by_label.items():
                ax.plot([e for e, _ in points], [v for _, v in points], marker=".",
                        label=label)
            ax.set_title(run)
            ax.set_xlabel("epoch")
            ax.set_ylabel(exp.spec["metric"] + " (%)")
            ax.legend(fontsize=7)
        panels.append(draw)
    for label, by_run in analyses.items():
        from bnbench.analysis import ANALYSES

        name = exp.analyses()[label]["name"]
        for run, results in by_run.items():
            if results:
                def draw(ax: Any, result: dict = results[0],
                         title: str = f"{label}: {run}" if run else label,
                         plot_fn: Any = ANALYSES[name].plot) -> None:
                    plot_fn(result, ax)
                    ax.set_title(title)
                panels.append(draw)
    if not panels:
        panels.append(lambda ax: ax.text(0.5, 0.5, "no data", ha="center"))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels):
        draw(ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{exp.spec['title']} (scale={exp.scale})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(exp: Experiment) -> list[Path]:
    """Write the report files; returns their paths (markdown first)."""
    ours = our_cells(exp)
    curves = our_curves(exp)
    analyses = our_analyses(exp)
    paper = paper_entry(exp.spec.get("reference"))
    claims = check_claims(exp, ours, analyses)
    md, table = render(exp, ours, paper, claims, curves, analyses)
    out = exp.results / exp.name
    paths = [out.with_suffix(".md"), out.with_suffix(".csv"), out.with_suffix(".png")]
    for path, text in zip(paths[:2], (md, table)):
        write_text(path, text)
    tmp_png = paths[2].with_name(f".{paths[2].stem}.tmp.png")
    plot(exp, ours, paper, curves, analyses, tmp_png)
    tmp_png.replace(paths[2])
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
