"""``gnmr-fx bench regimes``: the regime-search table from committed GPU results.

Reads every ``results.json.gz`` under the given folders (what
``benchmarks/gpu_stability.sh`` brings back, committed under
``benchmarks/results/gpu/``), and prints, per (scenario variant, LR), the
final validation loss of always_high and always_low per seed, the paired gap
(same seed: low minus high, in % of high), and every other arm that ran.

A regime *counts* (the evidence issue's rule) when always_high is healthy at
that LR (it did not diverge and its final val is within ``--healthy`` % (10) of the best always_high of
the same scenario over the sweep) and always_low is clearly worse: a mean
paired gap of at least ``--min-gap`` % or a divergence.

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", help="folders holding results.json.gz (or results.json)")
    parser.add_argument("--min-gap", type=float, default=3.0, help="%% val-loss gap that makes a regime count")
    parser.add_argument("--healthy", type=float, default=10.0,
                        help="%% above the sweep's best always_high within which always_high is healthy")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="FOLDER:VARIANT",
                        help="leave out one scenario variant of one folder (a run known to be broken), "
                             "e.g. search2:e-mxfp8")
    parser.add_argument("--md", default=None, help="also write the table as markdown to this file")


def load_runs(folders: list[str], exclude: tuple = ()) -> list[dict]:
    """Every run of every results file, tagged with its source folder and the
    file's date, less the ``folder:variant`` pairs in ``exclude``."""
    runs = []
    for folder in folders:
        for name in ("results.json.gz", "results.json"):
            path = Path(folder) / name
            if not path.is_file():
                continue
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt") as f:
                doc = json.load(f)
            for sc in doc["scenarios"].values():
                if f"{Path(folder).name}:{sc['config']['key']}" in exclude:
                    continue
                for r in sc["runs"]:
                    runs.append(dict(r, source=Path(folder).name, variant=sc["config"]["key"],
                                     date=doc["meta"]["date_utc"]))
            break
    return runs


def regime_rows(runs: list[dict], min_gap: float, healthy: float) -> list[dict]:
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
        is_healthy = math.isfinite(mean_high) and mean_high <= best_high[variant] * (1 + healthy / 100.0)
        low = arms.get("always_low", [])
        finite_low = [g for _, g, _, _ in low if math.isfinite(g)]
        low_gap = statistics.fmean(finite_low) if finite_low else math.inf
        counts = is_healthy and bool(low) and (low_gap >= min_gap or any(d for _, _, d, _ in low))
        rows.append({"variant": variant, "lr": lr, "seeds": sorted(high), "high": mean_high,
                     "healthy": is_healthy, "arms": arms, "low_gap": low_gap, "counts": counts,
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
    from tabulate import tabulate

    arm_names = sorted({a for r in rows for a in r["arms"]} - {"always_low"})
    head = ["variant", "LR", "seeds", "always_high val", "healthy", "always_low gap %", "counts"] + \
        [f"{a} gap %" for a in arm_names] + ["raw results"]
    table = []
    for r in rows:
        table.append([r["variant"], f"{r['lr']:g}", ",".join(map(str, r["seeds"])), f"{r['high']:.3f}",
                      "yes" if r["healthy"] else "no",
                      _fmt_arm(r["arms"]["always_low"]) if "always_low" in r["arms"] else "-",
                      "**yes**" if r["counts"] else "no"]
                     + [_fmt_arm(r["arms"][a]) if a in r["arms"] else "-" for a in arm_names]
                     + [", ".join(r["sources"])])
    return tabulate(table, headers=head, tablefmt="github")


def run(args: argparse.Namespace) -> int:
    runs = load_runs(args.folders, tuple(args.exclude))
    if not runs:
        from gnmr_fx.arguments import InputError

        raise InputError(f"no results.json(.gz) under {' '.join(args.folders)}")
    text = format_rows(regime_rows(runs, args.min_gap, args.healthy))
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
