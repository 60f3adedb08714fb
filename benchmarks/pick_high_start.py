"""Choose the high start N of ``gnmr@10%+high_first@N`` on the tune split, and write the val call.

The rule is fixed before the tune runs are read (session 18, evidence issue):

* score(N) = mean over the regimes of final val(hybrid@N) / final val(always_high), every run
  a ``--tuning`` run (trained and evaluated on the tune split, seed 100);
* N = the smallest start whose score is within ``TOLERANCE`` (relative) of the best score: a
  longer high start costs FLOPs, so it has to earn its place;
* the equal-cost reference is ``high_first@X`` with X = the hybrid's measured share of FLOPs on
  the high path, the largest over the regimes, rounded up to 0.5%.

Then it writes a call spec (one bench per regime, arm and val seed) for ``benchmarks/gpu_call.sh``:
the hybrid at N, high_first@N (unless N is 10%, whose val runs exist) and high_first@X.

    python -m benchmarks.pick_high_start /tmp/gnmr_res --spec benchmarks/calls/s18b.spec
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from gnmr_fx.benchmarks.regime_table import load_runs

TOLERANCE = 0.01
HYBRID = "gnmr@10%+high_first@"
REGIMES = ("a", "e-mxfp4_sr")
VAL_SEEDS = (0, 1, 2)
DONE_HIGH_FIRST = {"10%"}   # high_first@10% has val seeds 0-2 in both regimes (s16a-d, s18a)


def choose(runs: Sequence[dict], regimes: Sequence[str] = REGIMES, tolerance: float = TOLERANCE) -> dict:
    """The high start N and the equal-cost X from the tune runs.

    >>> runs = [dict(variant=g, arm=a, final_val=v, flop_high_pct=f, diverged=False)
    ...         for g in ("a", "e") for a, v, f in (("always_high", 1.0, 100.0),
    ...         ("gnmr@10%+high_first@2.5%", 1.30, 3.1), ("gnmr@10%+high_first@5%", 1.105, 5.7),
    ...         ("gnmr@10%+high_first@10%", 1.10, 10.2))]
    >>> c = choose(runs, regimes=("a", "e"))
    >>> c["start"], c["equal_cost"], [round(s, 3) for s in c["scores"].values()]
    ('5%', '6%', [1.3, 1.105, 1.1])
    """
    ref = {}
    scores: Dict[str, List[float]] = {}
    flops: Dict[str, List[float]] = {}
    for r in runs:
        if r["arm"] == "always_high":
            ref[r["variant"]] = r["final_val"]
    missing = [g for g in regimes if g not in ref]
    if missing:
        raise SystemExit(f"pick_high_start: no tune always_high run for {missing}")
    for r in runs:
        if r["variant"] in regimes and r["arm"].startswith(HYBRID):
            start = r["arm"][len(HYBRID):]
            v = r["final_val"] if not r["diverged"] and math.isfinite(r["final_val"]) else math.inf
            scores.setdefault(start, []).append(v / ref[r["variant"]])
            flops.setdefault(start, []).append(r["flop_high_pct"])
    complete = {s: sum(v) / len(v) for s, v in scores.items() if len(v) == len(regimes)}
    if not complete:
        raise SystemExit(f"pick_high_start: no {HYBRID}N arm has a tune run in every regime {list(regimes)}")
    best = min(complete.values())
    ok = [s for s, v in complete.items() if v <= best * (1 + tolerance)]
    start = min(ok, key=lambda s: float(s.rstrip("%")))
    x = math.ceil(max(flops[start]) * 2) / 2
    return {"start": start, "equal_cost": f"{x:g}%", "scores": dict(sorted(complete.items(), key=lambda kv: float(kv[0].rstrip("%")))),
            "hybrid_flop_high_pct": flops[start]}


def spec_lines(choice: dict, regimes: Sequence[str] = REGIMES, seeds: Sequence[int] = VAL_SEEDS) -> List[str]:
    """One bench per regime, arm and seed (one run each, so the call's deadline cuts whole runs)."""
    n, x = choice["start"], choice["equal_cost"]
    arms = [f"{HYBRID}{n}"] + ([f"high_first@{n}"] if n not in DONE_HIGH_FIRST else []) + [f"high_first@{x}"]
    lines = []
    for g in regimes:
        for arm in dict.fromkeys(arms):
            tag = arm.replace("gnmr@10%+high_first@", "hyb").replace("high_first@", "hf").replace("%", "").replace(".", "-")
            for s in seeds:
                lines.append(f"v-{g}-{tag}-s{s}  --preset gpu --scenarios {g} --lrs 3e-3 --seeds {s} --arms {arm}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pick_high_start", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="folders holding the tune runs' results.json[.gz]")
    p.add_argument("--spec", help="write the val call spec here (default: print it)")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), help="regimes whose tune runs choose N (default: %(default)s)")
    p.add_argument("--val-regimes", nargs="+", default=list(REGIMES), help="regimes of the val benches (default: %(default)s)")
    p.add_argument("--extra", help="a spec file whose benches are appended (runs that do not depend on N)")
    args = p.parse_args(argv)
    choice = choose(load_runs(args.paths, tuning=True), regimes=args.regimes)
    head = [f"# Val call written by benchmarks/pick_high_start.py from the tune runs: scores {choice['scores']}",
            f"# (mean final val / always_high over {args.regimes}); start N = {choice['start']}, equal-cost "
            f"high_first@{choice['equal_cost']} (hybrid's % FLOPs high on tune: {choice['hybrid_flop_high_pct']})"]
    lines = head + spec_lines(choice, regimes=args.val_regimes)
    if args.extra:
        lines += [ln.rstrip("\n") for ln in open(args.extra)]
    text = "\n".join(lines) + "\n"
    if args.spec:
        Path(args.spec).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
