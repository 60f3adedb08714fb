"""``gnmr-fx bench regimes``: the regime-search table from committed GPU results.

Reads every ``results.json.gz`` under the given folders (what
``benchmarks/gpu_stability.sh`` brings back, committed under
``benchmarks/results/gpu/``), and prints, per (scenario variant, LR), the
final validation loss of always_high and always_low per seed, the paired gap
(same seed: low minus high, in % of high); then, for every regime that
counts, one table with every arm that ran there (paired gap, the share of
always_low's gap it closes, divergences, spikes, % unit-steps and % FLOPs
high, wall time) and, with ``--plots``, its quality-vs-cost frontier and
mean validation curves per arm; and, per variant run at several LRs, the
LR-sensitivity table (and, with ``--plots``, its curves).

A regime *counts* (the evidence issue's rule) when always_high is healthy at
that LR (it did not diverge, its final val is within ``--healthy`` % (10) of the best always_high of
the same scenario over the sweep, and its validation loss never rose more than ``--rise`` % (5) above
its lowest value so far: a run that got worse on the way is unstable even where it is the only LR
run) and always_low is clearly worse: a mean paired gap of at least ``--min-gap`` % or a divergence.

    gnmr-fx bench regimes benchmarks/results/gpu/*
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from gnmr_fx.benchmarks.arms import BUDGET_RULE, arm_name, budget_units, parse_arm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", help="folders holding results.json.gz (or results.json)")
    parser.add_argument("--min-gap", type=float, default=3.0, help="%% val-loss gap that makes a regime count")
    parser.add_argument("--healthy", type=float, default=10.0,
                        help="%% above the sweep's best always_high within which always_high is healthy")
    from gnmr_fx.arguments import positive_float

    parser.add_argument("--rise", type=positive_float, default=5.0,
                        help="%% by which always_high's validation loss may rise above its lowest value so far "
                             "and still be healthy")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="FOLDER:VARIANT",
                        help="leave out one scenario variant of one folder (a run known to be broken), "
                             "e.g. search2:e-mxfp8")
    parser.add_argument("--md", default=None, help="also write the tables as markdown to this file")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="write frontier_<variant>_lr<LR>.png (gap vs %% FLOPs high) for every regime that counts")


def load_runs(folders: list[str], exclude: tuple = (), *, tuning: bool = False) -> list[dict]:
    """Every run of every results file, tagged with its source folder and the
    file's date, less the ``folder:variant`` pairs in ``exclude`` and less
    the ``--tuning`` runs (tune split: they choose settings, they are not
    results); ``tuning=True`` gives only those (``pick_high_start``)."""
    runs = []
    for folder in folders:
        # A folder holds one bench's results, or (a device call of
        # benchmarks/gpu_call.sh) one sub-folder per bench: source "call/bench".
        dirs = sorted({p.parent for pat in ("results.json.gz", "results.json") for p in Path(folder).rglob(pat)})
        for d in dirs:
            source = d.relative_to(Path(folder).parent).as_posix()
            for name in ("results.json.gz", "results.json"):
                path = d / name
                if not path.is_file():
                    continue
                opener = gzip.open if name.endswith(".gz") else open
                with opener(path, "rt") as f:
                    doc = json.load(f)
                if str(doc["meta"].get("split", "")).startswith("tune") != tuning:
                    break  # a --tuning run (trained and scored on the tune split) is never reported
                # Runs of another model preset are another variant ("a.gpu-wide"): the
                # same scenario on a different model is not paired with the gpu preset's runs.
                preset = doc["meta"].get("preset", "gpu")
                for sc in doc["scenarios"].values():
                    variant = sc["config"]["key"] + ("" if preset == "gpu" else f".{preset}")
                    if f"{source}:{variant}" in exclude:
                        continue
                    for r in sc["runs"]:
                        runs.append(dict(r, arm=_arm_label(r["arm"], doc["meta"], sc.get("costs")), source=source,
                                         variant=variant, date=doc["meta"]["date_utc"], units=sc.get("units")))
                break
    _check_unique(runs)
    return runs


def _arm_label(arm: str, meta: dict, costs) -> str:
    """The arm's name under today's budget rule (``arms.BUDGET_RULE``): a
    static or random run with a FLOP-fraction budget from a results file
    written before the rule held ``budget_units`` units whatever their FLOPs,
    so it is labelled by that unit count (``static@10%`` holding 12 units is
    ``static@12``, which is what it ran).

    >>> _arm_label("static@10%", {}, [1.0, 1.0, 8.0])
    'static@1'
    >>> _arm_label("static@10%", {"budget_rule": "flops"}, [1.0, 1.0, 8.0])
    'static@10%'
    """
    if meta.get("budget_rule") == BUDGET_RULE or costs is None:
        return arm
    spec = parse_arm(arm)
    if spec.kind in ("static", "random") and isinstance(spec.budget, float):
        return arm_name(spec.kind, budget_units(spec.budget, torch.tensor(costs, dtype=torch.float64)))
    return arm


def _check_unique(runs: list[dict]) -> None:
    """One run per (variant, LR, arm, seed): a repeat would be counted twice."""
    seen: dict = {}
    for r in runs:
        key = (r["variant"], r["lr"], r["arm"], r["seed"])
        if key in seen:
            from gnmr_fx.arguments import InputError

            raise InputError(f"{r['variant']} LR {r['lr']:g} {r['arm']} seed {r['seed']} is in both "
                             f"{seen[key]} and {r['source']}: leave one out with --exclude")
        seen[key] = r["source"]


def val_rise_pct(val: list) -> float:
    """Largest rise of a validation curve above its lowest value so far, in %
    (0 for a curve that only falls; inf where a value is not finite).

    >>> val_rise_pct([[250, 2.0], [500, 1.5], [750, 1.8], [1000, 1.2]])
    20.0
    """
    lowest, rise = math.inf, 0.0
    for _, v in val:
        if v is None or not math.isfinite(v):
            return math.inf
        if math.isfinite(lowest):
            rise = max(rise, 100.0 * (v - lowest) / lowest)
        lowest = min(lowest, v)
    return round(rise, 6)


def regime_rows(runs: list[dict], min_gap: float, healthy: float, rise: float = 5.0) -> list[dict]:
    by_key: dict = {}
    for r in runs:
        by_key.setdefault((r["variant"], r["lr"]), []).append(r)
    best_high: dict = {}
    for (variant, _lr), rs in by_key.items():
        for r in rs:
            v = r["final_val"]
            if r["arm"] == "always_high" and v is not None and math.isfinite(v):
                best_high[variant] = min(best_high.get(variant, math.inf), v)
    rows = []
    for (variant, lr), rs in sorted(by_key.items()):
        high = {r["seed"]: r["final_val"] for r in rs if r["arm"] == "always_high"}
        arms: dict = {}
        for r in rs:
            if r["arm"] == "always_high" or r["seed"] not in high or high[r["seed"]] is None:
                continue
            v = r["final_val"]
            gap = 100.0 * (v - high[r["seed"]]) / high[r["seed"]] if v is not None else math.inf
            arms.setdefault(r["arm"], []).append((r["seed"], gap, r["diverged"], r.get("flop_high_pct", 0.0)))
        finite_high = [v for v in high.values() if v is not None and math.isfinite(v)]
        mean_high = statistics.fmean(finite_high) if finite_high else math.nan
        high_rise = max((val_rise_pct(r.get("val") or []) for r in rs if r["arm"] == "always_high"), default=0.0)
        why = ""
        if not math.isfinite(mean_high) or any(r.get("diverged") for r in rs if r["arm"] == "always_high"):
            why = "diverged"
        elif mean_high > best_high[variant] * (1 + healthy / 100.0):
            why = f"{100.0 * (mean_high / best_high[variant] - 1):+.0f}% vs best LR"
        elif high_rise > rise:
            why = f"val rose {high_rise:.0f}%"
        is_healthy = not why
        low = arms.get("always_low", [])
        finite_low = [g for _, g, _, _ in low if math.isfinite(g)]
        low_gap = statistics.fmean(finite_low) if finite_low else math.inf
        counts = is_healthy and bool(low) and (low_gap >= min_gap or any(d for _, _, d, _ in low))
        rows.append({"variant": variant, "lr": lr, "seeds": sorted(high), "high": mean_high,
                     "healthy": is_healthy, "unhealthy": why, "arms": arms, "low_gap": low_gap, "counts": counts,
                     "sources": sorted({r["source"] for r in rs})})
    return rows


def _fmt_arm(vals: list) -> str:
    gaps = [g for _, g, _, _ in vals if math.isfinite(g)]  # a diverged run has no gap
    if not gaps:
        return f"all {len(vals)} diverged"
    m = statistics.fmean(gaps)
    s = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    flops = statistics.fmean(f for _, _, _, f in vals)
    div = sum(d for _, _, d, _ in vals)
    txt = f"{m:+.1f}" + (f" ± {s:.1f}" if len(gaps) > 1 else "") + f" (n={len(gaps)})"
    if div:
        txt += f", {div} diverged"
    if flops > 0:
        txt += f" @ {flops:.2f}% FLOPs"
    return txt


def format_rows(rows: list[dict]) -> str:
    """The regime-search table: one row per (variant, LR); the other arms'
    numbers are in :func:`format_arm_table` (one table per regime)."""
    from tabulate import tabulate

    head = ["variant", "LR", "seeds", "always_high val", "healthy", "always_low gap %", "counts", "other arms",
            "raw results"]
    table = []
    for r in rows:
        others = sorted(set(r["arms"]) - {"always_low"})
        table.append([r["variant"], f"{r['lr']:g}", ",".join(map(str, r["seeds"])), f"{r['high']:.3f}",
                      "yes" if r["healthy"] else f"no ({r['unhealthy']})",
                      _fmt_arm(r["arms"]["always_low"]) if "always_low" in r["arms"] else "-",
                      "**yes**" if r["counts"] else "no", len(others),
                      ", ".join(sorted({src.split("/")[0] for src in r["sources"]}))])
    return tabulate(table, headers=head, tablefmt="github")


def tail_train_loss(run: dict) -> float:
    """Mean training loss over the last 10% of a run's steps: the loss on the
    path the arm trains on (low-path units included), where the validation
    loss is the all-high eager model's. nan for a run with no finite tail.

    >>> tail_train_loss({"train_loss": [9.0] * 18 + [1.0, 3.0]})
    2.0
    """
    losses = run.get("train_loss") or []
    tail = losses[len(losses) - max(1, len(losses) // 10):] if losses else []
    vals = [v for v in tail if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals and len(vals) == len(tail) else math.nan


def final_path_val(run: dict) -> float:
    """The last ``val_path`` value (``bench stability --val-path``: the val
    windows through the arm's own path), nan where the run has none.

    >>> final_path_val({"val_path": [[250, 2.0], [500, 1.5]]}), final_path_val({})
    (1.5, nan)
    """
    vals = run.get("val_path") or []
    v = vals[-1][1] if vals else None
    return v if v is not None and math.isfinite(v) else math.nan


def arm_stats(runs: list[dict], variant: str, lr: float) -> list[dict]:
    """Per arm of one regime, over the seeds that have an always_high run:
    the paired gap (% of always_high), the share of always_low's gap the arm
    closes (same seed), divergences, spikes, % unit-steps and % FLOPs on
    the high path, wall time; sorted by % FLOPs high."""
    rs = [r for r in runs if r["variant"] == variant and r["lr"] == lr]
    high = {r["seed"]: r["final_val"] for r in rs if r["arm"] == "always_high" and r["final_val"] is not None}
    high_train = {r["seed"]: tail_train_loss(r) for r in rs if r["arm"] == "always_high"}
    high_path = {r["seed"]: final_path_val(r) for r in rs if r["arm"] == "always_high"}
    low = {r["seed"]: r["final_val"] for r in rs if r["arm"] == "always_low" and r["final_val"] is not None}
    out = []
    for arm in sorted({r["arm"] for r in rs}):
        mine = [r for r in rs if r["arm"] == arm and r["seed"] in high]
        if not mine:
            continue
        gaps, closed, train_gaps, path_gaps = [], [], [], []
        for r in mine:
            h = high[r["seed"]]
            t, th = tail_train_loss(r), high_train.get(r["seed"], math.nan)
            if math.isfinite(t) and math.isfinite(th):
                train_gaps.append(100.0 * (t - th) / th)
            v, vh = final_path_val(r), high_path.get(r["seed"], math.nan)
            if math.isfinite(v) and math.isfinite(vh):
                path_gaps.append(100.0 * (v - vh) / vh)
            if r["final_val"] is None or not math.isfinite(r["final_val"]):
                continue
            gaps.append(100.0 * (r["final_val"] - h) / h)
            if r["seed"] in low and low[r["seed"]] > h:
                closed.append(100.0 * (low[r["seed"]] - r["final_val"]) / (low[r["seed"]] - h))
        out.append({
            "arm": arm, "n": len(mine), "seeds": sorted(r["seed"] for r in mine), "gaps": gaps, "closed": closed,
            "train_gaps": train_gaps, "path_gaps": path_gaps,
            "diverged": sum(bool(r["diverged"]) for r in mine),
            "spikes": statistics.fmean(r.get("spikes", 0) or 0 for r in mine),
            "unit_steps_high": statistics.fmean(r.get("high_unit_steps_pct", 0.0) or 0.0 for r in mine),
            "flops_high": statistics.fmean(r.get("flop_high_pct", 0.0) or 0.0 for r in mine),
            "wall_s": statistics.fmean(r.get("wall_s", 0.0) or 0.0 for r in mine),
        })
    out.sort(key=lambda a: (a["flops_high"], a["arm"]))
    return out


def _mean_sd(xs: list) -> str:
    if not xs:
        return "-"
    m = statistics.fmean(xs)
    return f"{m:+.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:+.1f}"


def format_arm_table(stats: list[dict]) -> str:
    from tabulate import tabulate

    head = ["arm", "seeds", "val gap % (mean ± sd)", "closes % of low's gap", "train-path gap %",
            "path val gap %", "diverged", "spikes", "% unit-steps high", "% FLOPs high", "wall s (shared GPU)"]
    table = [[a["arm"], ",".join(map(str, a["seeds"])), _mean_sd(a["gaps"]),
              "-" if a["arm"] in ("always_high", "always_low") else _mean_sd(a["closed"]),
              _mean_sd(a.get("train_gaps", [])), _mean_sd(a.get("path_gaps", [])),
              f"{a['diverged']}/{a['n']}", f"{a['spikes']:.1f}", f"{a['unit_steps_high']:.2f}",
              f"{a['flops_high']:.2f}", f"{a['wall_s']:.0f}"] for a in stats]
    return tabulate(table, headers=head, tablefmt="github")


def _figure():
    """A figure for one plot of this module (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def _save(fig, ax, title: str, xlabel: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _arm_colors(arms: list) -> dict:
    """One colour per arm name, the same in every plot of a run."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20").colors
    return {a: colors[(2 * i) % 20 + (2 * i) // 20 % 2] for i, a in enumerate(sorted(arms))}


def plot_frontier(stats: list[dict], title: str, path: Path) -> None:
    """Quality gap vs high-path FLOPs, one point per arm (mean, sd bars)."""
    fig, ax = _figure()
    colors = _arm_colors([a["arm"] for a in stats])
    for a in stats:
        if not a["gaps"]:
            continue
        m = statistics.fmean(a["gaps"])
        sd = statistics.stdev(a["gaps"]) if len(a["gaps"]) > 1 else 0.0
        x = max(a["flops_high"], 0.1)  # log axis: always_low (0%) drawn at 0.1%
        style = "o" if a["arm"].startswith("gnmr") else "s"
        ax.errorbar([x], [m], yerr=[sd], fmt=style, capsize=3, color=colors[a["arm"]],
                    label=f"{a['arm']} (n={len(a['gaps'])})")
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.5)
    _save(fig, ax, title, "% of the units' FLOPs on the high path (always_low drawn at 0.1)",
          "final val loss gap to always_high, %", path)


def mean_val_curves(runs: list[dict], variant: str, lr: float) -> dict:
    """Per arm of one regime, the validation loss at each eval step, averaged
    over the seeds that reached it: ``{arm: ([steps], [mean loss], n seeds)}``.
    Diverged runs and non-finite points are left out (the tables count them).

    >>> r = lambda arm, seed, val: dict(arm=arm, seed=seed, variant="x", lr=1e-3, val=val, diverged=False)
    >>> mean_val_curves([r("a", 0, [[10, 2.0], [20, 1.0]]), r("a", 1, [[10, 4.0], [20, float("nan")]])], "x", 1e-3)
    {'a': ([10, 20], [3.0, 1.0], 2)}
    """
    out = {}
    rs = [r for r in runs if r["variant"] == variant and r["lr"] == lr and not r["diverged"]]
    for arm in sorted({r["arm"] for r in rs}):
        points: dict = {}
        mine = [r for r in rs if r["arm"] == arm]
        for r in mine:
            for step, loss in r.get("val") or []:
                if loss is not None and math.isfinite(loss):
                    points.setdefault(step, []).append(loss)
        steps = sorted(points)
        out[arm] = (steps, [statistics.fmean(points[s]) for s in steps], len(mine))
    return out


def plot_val_curves(curves: dict, title: str, path: Path) -> None:
    """Validation loss vs step, one line per arm (mean over seeds)."""
    fig, ax = _figure()
    colors = _arm_colors(list(curves))
    for arm, (steps, loss, n) in curves.items():
        if steps:
            style = "-" if arm.startswith("gnmr") or arm.startswith("always") else "--"
            ax.plot(steps, loss, style, color=colors[arm], label=f"{arm} (n={n})", lw=1.4)
    ax.set_yscale("log")
    _save(fig, ax, title, "optimizer step", "val loss (nats / byte, mean over seeds)", path)


def plot_lr_sensitivity(ranges: list[dict], title: str, path: Path) -> None:
    """Final val loss vs LR per arm (Wortsman et al. 2023's LR-sensitivity curves)."""
    fig, ax = _figure()
    colors = _arm_colors([a["arm"] for a in ranges])
    for a in ranges:
        lrs = [lr for lr in sorted(a["cells"]) if math.isfinite(a["cells"][lr][0])]
        if lrs:
            ax.plot(lrs, [a["cells"][lr][0] for lr in lrs], "o-", color=colors[a["arm"]],
                    label=f"{a['arm']} (n={'/'.join(str(a['cells'][lr][1]) for lr in lrs)})")
    ax.set_xscale("log")
    _save(fig, ax, title, "peak learning rate", "final val loss (mean over seeds)", path)


def lr_ranges(runs: list[dict], variant: str, healthy: float) -> list[dict]:
    """LR sensitivity of one scenario variant (Wortsman et al. 2023): per arm,
    the mean final val loss at every LR it ran, and its *stable LR range*:
    the LRs where no seed diverged and the mean final val is within
    ``healthy`` % of the best always_high of the variant over the sweep."""
    rs = [r for r in runs if r["variant"] == variant]
    highs = [r["final_val"] for r in rs if r["arm"] == "always_high" and r["final_val"] is not None
             and math.isfinite(r["final_val"])]
    if not highs:
        return []
    bound = min(highs) * (1 + healthy / 100.0)
    out = []
    for arm in sorted({r["arm"] for r in rs}):
        cells, stable = {}, []
        for lr in sorted({r["lr"] for r in rs if r["arm"] == arm}):
            mine = [r for r in rs if r["arm"] == arm and r["lr"] == lr]
            vals = [r["final_val"] for r in mine if r["final_val"] is not None and math.isfinite(r["final_val"])]
            div = sum(bool(r["diverged"]) or r["final_val"] is None for r in mine)
            mean = statistics.fmean(vals) if vals else math.inf
            cells[lr] = (mean, len(mine), div)
            if not div and mean <= bound:
                stable.append(lr)
        out.append({"arm": arm, "cells": cells, "stable": stable})
    return out


def format_lr_ranges(ranges: list[dict]) -> str:
    from tabulate import tabulate

    lrs = sorted({lr for a in ranges for lr in a["cells"]})
    head = ["arm"] + [f"LR {lr:g}" for lr in lrs] + ["stable LRs"]
    body = []
    for a in ranges:
        row = [a["arm"]]
        for lr in lrs:
            if lr not in a["cells"]:
                row.append("-")
                continue
            mean, n, div = a["cells"][lr]
            row.append((f"{mean:.3f}" if math.isfinite(mean) else "diverged") + f" (n={n}" +
                       (f", {div} diverged)" if div else ")"))
        row.append(", ".join(f"{lr:g}" for lr in a["stable"]) or "none")
        body.append(row)
    return tabulate(body, headers=head, tablefmt="github")


STANDOUT = 5.0
"""A unit "stands out" in a gradient-error profile when its error is at least this many times the median."""


def profile_rows(runs: list[dict]) -> list[dict]:
    """The gradient-error profiles of the ``static_grad`` runs (``gnmr_fx.profile`` on the tune
    split at the starting weights), one row per (variant, LR): the units whose error is at least
    ``STANDOUT`` x the median (with their error and norm-ratio ranges over seeds), the median
    error, every unit's norm-ratio range (what GNMR's statistic sees) and the all-low error."""
    groups: dict = {}
    for r in runs:
        t = r.get("static_tuning") or {}
        if t.get("criterion") == "grad_error":
            groups.setdefault((r["variant"], r["lr"]), {})[r["seed"]] = (t, r.get("units") or [])
    rows = []
    for (variant, lr), by_seed in sorted(groups.items()):
        out, med, ratios, all_low = {}, [], [], []
        for t, units in by_seed.values():
            err, ratio = t["gain_list"], t.get("stat_ratio_list") or []
            m = statistics.median(err)
            med.append(m)
            ratios += ratio
            all_low.append(t["all_low_grad_error"])
            for i, e in enumerate(err):
                if e >= STANDOUT * m:
                    name = units[i] if i < len(units) else str(i)
                    out.setdefault(name, ([], []))[0].append(e)
                    if i < len(ratio):
                        out[name][1].append(ratio[i])
        rows.append({"variant": variant, "lr": lr, "seeds": sorted(by_seed), "standout": out, "median": med,
                     "ratios": ratios, "all_low": all_low})
    return rows


def format_profile_rows(rows: list[dict]) -> str:
    from tabulate import tabulate

    def rng(xs: list, fmt: str = ".3f") -> str:
        return "-" if not xs else (f"{min(xs):{fmt}}" if min(xs) == max(xs) else f"{min(xs):{fmt}}–{max(xs):{fmt}}")

    body = []
    for r in rows:
        units = "; ".join(f"{u} {rng(e)} (norm {rng(q, '.2f')})" for u, (e, q) in
                          sorted(r["standout"].items(), key=lambda kv: -max(kv[1][0]))) or "none"
        body.append([r["variant"], f"{r['lr']:g}", ",".join(map(str, r["seeds"])), units, rng(r["median"]),
                     rng(r["ratios"], ".2f"), rng(r["all_low"])])
    return tabulate(body, headers=["variant", "LR", "seeds", f"units >= {STANDOUT:g}x the median error "
                                   "(error, norm ratio low/high)", "median error", "all units' norm ratios",
                                   "all-low error"], tablefmt="github")


def run(args: argparse.Namespace) -> int:
    runs = load_runs(args.folders, tuple(args.exclude))
    if not runs:
        from gnmr_fx.arguments import InputError

        raise InputError(f"no results.json(.gz) under {' '.join(args.folders)}")
    rows = regime_rows(runs, args.min_gap, args.healthy, args.rise)
    parts = [format_rows(rows)]
    for r in rows:
        # Every regime that counts and ran arms beyond the two references.
        if not r["counts"] or not set(r["arms"]) - {"always_low"}:
            continue
        stats = arm_stats(runs, r["variant"], r["lr"])
        title = f"{r['variant']} at LR {r['lr']:g}"
        parts.append(f"### {title}\n\n{format_arm_table(stats)}")
        if args.plots:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
            png = Path(args.plots) / f"frontier_{r['variant']}_lr{r['lr']:g}.png"
            plot_frontier(stats, title, png)
            curves = Path(args.plots) / f"val_{r['variant']}_lr{r['lr']:g}.png"
            plot_val_curves(mean_val_curves(runs, r["variant"], r["lr"]), f"{title}: validation loss", curves)
            parts[-1] += f"\n\n![{title}]({png.name})\n\n![{title}: validation loss]({curves.name})"
    for variant in sorted({r["variant"] for r in rows}):
        ranges = lr_ranges(runs, variant, args.healthy)
        if len({lr for a in ranges for lr in a["cells"]}) > 1:
            parts.append(f"### LR sensitivity of {variant} (mean final val loss; stable = no divergence and "
                         f"within {args.healthy:g}% of the best always_high)\n\n{format_lr_ranges(ranges)}")
            if args.plots:
                png = Path(args.plots) / f"lr_{variant}.png"
                plot_lr_sensitivity(ranges, f"{variant}: final val loss vs LR", png)
                parts[-1] += f"\n\n![LR sensitivity of {variant}]({png.name})"
    prof = profile_rows(runs)
    if prof:
        parts.append("### Gradient-error profiles of the static_grad runs (`gnmr_fx.profile`, per seed at the "
                     "starting weights; ranges over seeds)\n\n" + format_profile_rows(prof))
    text = "\n\n".join(parts)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
