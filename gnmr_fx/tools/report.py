"""``gnmr-fx report RUN.jsonl``: read a telemetry file, summarize it, plot it.

The file format is written by ``gnmr_fx.telemetry`` (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gnmr_fx.arguments import InputError, positive_int
from gnmr_fx.telemetry import MASKS, VECTORS


def _from_json(v: Any) -> float:
    if v is None:
        return math.nan
    return float(v)


# --------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------


@dataclass
class Run:
    """A telemetry file as arrays: ``[steps, units]`` matrices in header order."""

    units: list[str]
    steps: np.ndarray
    norm: np.ndarray
    gnmr: np.ndarray
    delta_gnmr: np.ndarray
    plan: np.ndarray  # bool
    triggered: np.ndarray  # bool
    denied: np.ndarray  # bool
    budget_used: np.ndarray
    budget: np.ndarray
    metrics: dict[str, np.ndarray]
    header: dict
    extra: dict = field(default_factory=dict)

    @property
    def n_triggers(self) -> np.ndarray:
        return self.triggered.sum(axis=0)

    def top_units(self, k: int = 5) -> list[int]:
        """Indices of the units that triggered most (ties: more high steps, then name order)."""
        key = [(-int(self.n_triggers[i]), -int(self.plan[:, i].sum()), i) for i in range(len(self.units))]
        return [i for *_, i in sorted(key) if self.n_triggers[i] > 0][:k]


def load_run(path: str) -> Run:
    """Parse a telemetry file.

    A file appended to by several runs keeps only the last one, unless the
    later run resumes the step count (a restart from a checkpoint): a run
    that starts at step ``s`` replaces the lines from step ``s`` on.

    A line that is not complete JSON (a run that stopped mid-write leaves
    one, and a restart appends to it) is dropped and its number kept in
    ``run.extra["dropped_lines"]``; a complete line that a restart appended
    to such a fragment is still read. A JSON line that is not telemetry, or
    a file with no complete step line, raises
    :class:`~gnmr_fx.arguments.InputError` (a ``ValueError``).

    >>> import os, tempfile, torch
    >>> from gnmr_fx.telemetry import TelemetryWriter
    >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    >>> w = TelemetryWriter(path, log_every=2)
    >>> w.set_header({"header": True, "units": ["a", "b"], "budget": 1.0, "max_o": 1})
    >>> for step in (1, 2):
    ...     hot = torch.tensor([step == 2, False])
    ...     w.append(step, {"norm": torch.ones(2), "gnmr": torch.ones(2), "delta_gnmr": torch.zeros(2),
    ...                     "plan": hot, "triggered": hot, "denied": torch.zeros(2, dtype=torch.bool),
    ...                     "lock": hot.long() * 10, "budget_used": hot.sum().float()}, {"loss": torch.tensor(0.5)})
    >>> run = load_run(path)
    >>> w.transfers, run.plan.tolist(), run.metrics["loss"].tolist()
    (1, [[False, False], [True, False]], [0.5, 0.5])
    """
    headers: list[dict] = []
    rows: list[tuple[dict, dict]] = []
    dropped: list[int] = []
    # errors="replace": a write cut inside a character must not hide the lines before it.
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            obj, whole = _complete_json(line)
            if not whole:
                dropped.append(n)  # the fragment of a write that stopped
                if obj is None:
                    continue
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: not a telemetry line (a JSON {type(obj).__name__}, "
                                 "expected an object)")
            if obj.get("header"):
                _check_header(obj, path, n)
                headers.append(obj)
                continue
            if not headers:
                raise InputError(f"{path}:{n}: step line before any header line")
            _check_step(obj, headers[-1], path, n)
            if rows and obj["step"] <= rows[-1][1]["step"]:
                # A later run appended to the same file replaces the steps it
                # redoes: all of them for a fresh run, those after its
                # checkpoint for a restart.
                rows = [r for r in rows if r[1]["step"] < obj["step"]]
            rows.append((headers[-1], obj))
    if not rows:
        cut = f" ({len(dropped)} line(s) not complete JSON)" if dropped else ""
        raise InputError(f"{path}: no complete step line{cut} (is it a telemetry file? did the run flush? "
                         "call gnmr_fx.runtime(model).flush())")
    # Every unit of the rows' headers, in order of appearance (units join
    # mid-run; a restart may bring other ones).
    units = list(dict.fromkeys(u for hdr in {id(h): h for h, _ in rows}.values() for u in hdr["units"]))
    index = {u: i for i, u in enumerate(units)}
    s, n = len(rows), len(units)
    mats = {k: np.full((s, n), np.nan) for k in VECTORS}
    masks = {k: np.zeros((s, n), dtype=bool) for k in MASKS}
    metric_names = sorted({k for _, r in rows for k in r} - {"step", "budget", "budget_used", "lock", *VECTORS, *MASKS})
    metrics = {k: np.full(s, np.nan) for k in metric_names}
    for j, (hdr, r) in enumerate(rows):
        cols = [index[u] for u in hdr["units"]]
        for k in VECTORS:
            mats[k][j, cols] = [_from_json(v) for v in r[k]]
        for k in MASKS:
            masks[k][j, [index[u] for u in r[k]]] = True
        for k in metric_names:
            if r.get(k) is not None:
                metrics[k][j] = _from_json(r[k])
    return Run(
        units=units, steps=np.array([r["step"] for _, r in rows]), **mats, **masks,
        budget_used=np.array([r["budget_used"] for _, r in rows], dtype=float),
        budget=np.array([r["budget"] for _, r in rows], dtype=float),
        metrics=metrics, header=rows[-1][0], extra={"dropped_lines": dropped},
    )


def _complete_json(line: str) -> tuple[Any, bool]:
    """``(value, True)`` for a JSON line; ``(value, False)`` for the complete
    line a restart appended to a fragment (``{"step": 41, "no{"header": ...}``);
    ``(None, False)`` for a fragment alone."""
    try:
        return json.loads(line), True
    except json.JSONDecodeError:
        pass
    # Telemetry lines are flat objects: a "{" after the first starts a new line.
    start = line.find("{", 1)
    while start != -1:
        try:
            return json.loads(line[start:]), False
        except json.JSONDecodeError:
            start = line.find("{", start + 1)
    return None, False


def _is_number(v: Any) -> bool:
    # What gnmr_fx.telemetry.json_float writes: a number, null (did not run) or a non-finite string.
    return v is None or v in ("inf", "-inf", "nan") or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _check_header(obj: dict, path: str, n: int) -> None:
    units = obj.get("units")
    if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
        raise InputError(f"{path}:{n}: header line without a list of unit names")


def _check_step(obj: dict, header: dict, path: str, n: int) -> None:
    units = header["units"]
    problem = None
    missing = [k for k in ("step", "budget_used", "budget", *VECTORS, *MASKS) if k not in obj]
    if missing:
        problem = f"has no {', '.join(missing)}"
    elif not isinstance(obj["step"], int):
        problem = f"has step {obj['step']!r}, not an integer"
    elif any(not isinstance(obj[k], list) or len(obj[k]) != len(units) for k in VECTORS):
        problem = f"does not have one {'/'.join(VECTORS)} value per unit of its header ({len(units)})"
    elif not all(_is_number(v) for k in VECTORS for v in obj[k]) or not all(
            _is_number(obj[k]) and obj[k] is not None for k in ("budget", "budget_used")):
        problem = "has a value that is not a number"
    elif any(not isinstance(obj[k], list) or not all(isinstance(u, str) and u in units for u in obj[k])
             for k in MASKS):
        problem = f"names units in {'/'.join(MASKS)} that its header does not have"
    if problem:
        raise InputError(f"{path}:{n}: step line {problem}")


def summarize(run: Run, top: int = 10) -> str:
    """The report's text: run totals, then a table of the most-triggered units."""
    from tabulate import tabulate

    h = run.header
    trig = run.n_triggers
    lines = [
        f"steps {int(run.steps[0])}..{int(run.steps[-1])} ({len(run.steps)} lines), {len(run.units)} units, "
        f"recipe {h.get('recipe')}, policy {h.get('policy')}, budget max_o={h.get('max_o')} "
        f"(= {run.budget[-1]:g} {'FLOP-weighted' if isinstance(h.get('max_o'), float) else 'units'})",
        f"triggers {int(trig.sum())}, denied {int(run.denied.sum())}, unit-steps on the high path "
        f"{int(run.plan.sum())}, peak budget use {np.nanmax(run.budget_used):g} / {run.budget[-1]:g}"
        f"{'  (EXCEEDED)' if np.any(run.budget_used > run.budget * (1 + 1e-6)) else ''}",
    ]
    for k, v in run.metrics.items():
        ok = v[np.isfinite(v)]
        if ok.size:
            lines.append(f"{k}: first {ok[0]:.4g}, last {ok[-1]:.4g}, min {ok.min():.4g}, max {ok.max():.4g}")
    order = run.top_units(top)
    if order:
        lines.append(f"most triggered unit: {run.units[order[0]]} ({int(trig[order[0]])} triggers, first at step "
                     f"{int(run.steps[run.triggered[:, order[0]].argmax()])})")
        rows = []
        for i in order:
            first = int(run.steps[run.triggered[:, i].argmax()])
            g = run.gnmr[:, i]
            g = g[np.isfinite(g)]
            rows.append([run.units[i], int(trig[i]), int(run.denied[:, i].sum()), int(run.plan[:, i].sum()), first,
                         f"{g.max():.3g}" if g.size else "-"])
        lines.append(tabulate(rows, headers=["unit", "triggers", "denied", "high steps", "first trigger", "max GNMR"],
                              disable_numparse=True))
    else:
        lines.append("no unit triggered")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def plot(run: Run, out_dir: str, top: int = 4) -> list[str]:
    """Write the report's PNGs into ``out_dir``; returns their paths.

    * ``plan_heatmap.png``: unit x step, dark where the unit ran on the high
      path, red ticks where it triggered; the bar beside it counts triggers
      per unit, the most-triggered unit in red and named in the title;
    * ``gnmr_traces.png``: GNMR and Delta-GNMR of the most-triggered units
      against their thresholds;
    * ``budget.png``: budget use per step against the budget;
    * ``loss.png``: every logged scalar (e.g. loss), when there is one.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise InputError("plots need matplotlib (pip install 'gnmr-fx[plot]'), or pass --no-plots") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    steps = run.steps
    order = run.top_units(top)
    hot = order[0] if order else None
    n = len(run.units)
    extent = (steps[0] - 0.5, steps[-1] + 0.5, n - 0.5, -0.5)

    # 1. plan heatmap + trigger counts
    fig, (ax, axb) = plt.subplots(1, 2, figsize=(12, 0.32 * n + 2.2), sharey=True,
                                  gridspec_kw={"width_ratios": [5, 1]})
    ax.imshow(run.plan.T.astype(float), aspect="auto", cmap="Blues", vmin=0, vmax=1.25,
              interpolation="nearest", extent=extent)
    ty, tx = np.nonzero(run.triggered.T)
    ax.scatter(steps[tx], ty, marker="|", s=60, color="crimson", label="triggered")
    dy, dx = np.nonzero(run.denied.T)
    if dy.size:
        ax.scatter(steps[dx], dy, marker="x", s=25, color="darkorange", label="denied (budget full)")
    ax.set_yticks(range(n))
    ax.set_yticklabels(run.units, fontsize=8)
    if hot is not None:
        ax.get_yticklabels()[hot].set_color("crimson")
        ax.get_yticklabels()[hot].set_fontweight("bold")
    ax.set_xlabel("optimizer step")
    ax.set_title("plan: dark = high path (locked), | = trigger")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    trig = run.n_triggers
    colors = ["crimson" if i == hot else "steelblue" for i in range(n)]
    axb.barh(range(n), trig, color=colors)
    axb.set_xlabel("triggers")
    axb.set_title("triggers per unit")
    title = "GNMR plan per unit"
    if hot is not None:
        first = int(steps[run.triggered[:, hot].argmax()])
        title += f": most triggered = {run.units[hot]} ({int(trig[hot])} triggers, first at step {first})"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "plan_heatmap.png"))

    # 2. GNMR traces of the top units (all units faintly for context)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    # Non-finite values (a NaN gradient, "no history yet") cannot be drawn;
    # a first-step Delta-GNMR of -inf would flatten the whole axis.
    gn = np.where(np.isfinite(run.gnmr) & (run.gnmr > 0), run.gnmr, np.nan)
    dthr = run.header.get("delta_threshold") or 1.0
    dg = np.where(np.isfinite(run.delta_gnmr), np.maximum(run.delta_gnmr, -2.0 * dthr), np.nan)
    for i in range(n):
        if i not in order:
            ax1.plot(steps, gn[:, i], color="0.8", lw=0.7)
            ax2.plot(steps, dg[:, i], color="0.8", lw=0.7)
    palette = ["crimson", "tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:olive"]
    for rank, i in enumerate(order):
        c = palette[rank % len(palette)]
        lbl = f"{run.units[i]} ({int(trig[i])} triggers)"
        ax1.plot(steps, gn[:, i], color=c, lw=2.0 if rank == 0 else 1.2, label=lbl)
        ax2.plot(steps, dg[:, i], color=c, lw=2.0 if rank == 0 else 1.2, label=lbl)
    thr = run.header.get("threshold")
    if thr is not None:
        ax1.axhline(thr, color="k", ls="--", lw=1, label=f"threshold {thr:g}")
    ax2.axhline(dthr, color="k", ls="--", lw=1, label=f"delta threshold {dthr:g}")
    ax1.set_yscale("log")
    ax1.set_ylabel("GNMR = g / mu (log)")
    ax2.set_ylabel("Delta-GNMR (floored at -2x threshold)")
    ax2.set_xlabel("optimizer step")
    ax1.set_title("GNMR of the most-triggered units (grey: all other units)")
    ax1.legend(fontsize=8, loc="upper left")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "gnmr_traces.png"))

    # 3. budget use
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.step(steps, run.budget_used, where="mid", color="tab:blue", label="budget used (high path)")
    ax.plot(steps, run.budget, color="crimson", ls="--", label="budget (max_o)")
    ax.fill_between(steps, 0, run.budget_used, step="mid", alpha=0.25)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("FLOP-weighted" if isinstance(run.header.get("max_o"), float) else "units")
    # Headroom above the budget line keeps the legend off it.
    ax.set_ylim(0, max(float(np.nanmax(run.budget)), float(np.nanmax(run.budget_used))) * 1.45 + 1e-9)
    ax.set_title("budget use over time")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "budget.png"))

    # 4. logged scalars
    if run.metrics:
        fig, axes = plt.subplots(len(run.metrics), 1, figsize=(11, 2.8 * len(run.metrics)), squeeze=False)
        for ax, (k, v) in zip(axes[:, 0], run.metrics.items()):
            ax.plot(steps, v, color="tab:blue", lw=1.2)
            high = run.plan.any(axis=1)
            if high.any():
                lo, hi = np.nanmin(v), np.nanmax(v)
                ax.fill_between(steps, lo, hi, where=high, color="crimson", alpha=0.12, step="mid",
                                label="a unit on the high path")
                ax.legend(fontsize=8, loc="upper right")
            ax.set_ylabel(k)
            ax.set_xlabel("optimizer step")
            ax.set_title(f"{k} (logged with runtime.log_metrics)")
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "loss.png"))
    return paths


def _save(fig: Any, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_file", metavar="RUN.jsonl", help="telemetry file written by gnmr_fx.compile(..., log=PATH)")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs (default: RUN_report/)")
    parser.add_argument("--top", type=positive_int, default=10, help="units in the summary table")
    parser.add_argument("--no-plots", action="store_true", help="print the summary only")


def run(args: argparse.Namespace) -> int:
    # Bad input (a missing file, a line that is not telemetry) raises an
    # InputError or a file error, which gnmr-fx prints as one line (exit 2).
    r = load_run(args.run_file)
    dropped = r.extra["dropped_lines"]
    if dropped:
        where = ", ".join(map(str, dropped[:5])) + (" ..." if len(dropped) > 5 else "")
        print(f"gnmr-fx report: warning: dropped {len(dropped)} incomplete line(s) of {args.run_file} "
              f"(line {where}: not complete JSON, as a run that stopped mid-write leaves)", file=sys.stderr)
    print(summarize(r, top=args.top))
    if not args.no_plots:
        out = args.out or os.path.splitext(args.run_file)[0] + "_report"
        for p in plot(r, out):
            print(f"wrote {p}")
    return 0
