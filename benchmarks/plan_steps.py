"""How often a GNMR run's plan has any unit high: the share of steps that
``GNMRConfig(low_graph=True)`` cannot run on its all-low graph copy (one
graph per model, as for TinyGPT).

    python -m benchmarks.plan_steps benchmarks/results/gpu/*/

Reads every stability result under the folders (``regime_table.load_runs``, one folder at a time)
and prints, per GNMR run (arms ``gnmr@...`` without a high start or pins),
the % of steps with a unit high next to its % of unit-steps high, then the
median and range over the runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.regime_table import load_runs


def steps_with_a_high_unit(run: dict) -> float:
    """% of the run's steps whose plan holds at least one unit high."""
    plans = run["plans"]
    return 100.0 * sum(1 for p in plans if len(p) > 0) / len(plans)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    args = p.parse_args(argv)
    # One folder at a time: the same arm and seed may be in two calls (a rerun), both counted.
    runs = [r for folder in args.folders for r in load_runs([folder])
            if r["arm"].startswith("gnmr@") and "high_first" not in r["arm"] and "pin" not in r["arm"]]
    if not runs:
        print("plan_steps: no GNMR run under the folders given", file=sys.stderr)
        return 2
    shares = []
    for r in sorted(runs, key=steps_with_a_high_unit):
        s = steps_with_a_high_unit(r)
        shares.append(s)
        print(f"{s:5.1f}% of steps, {r['high_unit_steps_pct']:5.2f}% of unit-steps: {r['source']} {r['variant']} "
              f"lr {r['lr']} {r['arm']} seed {r['seed']}")
    print(f"{len(shares)} GNMR runs: steps with a unit high, median {statistics.median(shares):.1f}%, "
          f"range {min(shares):.1f}-{max(shares):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
