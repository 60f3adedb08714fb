"""``gnmr-fx bench triggers``: when and where the controller triggered in
committed stability runs, and how the loss spikes line up with plan changes.

Reads the same folders as ``gnmr-fx bench regimes`` (``results.json.gz``
under ``benchmarks/results/gpu/``) and prints, for every run of one scenario
variant (and LR), one row per (seed, arm):

* triggers, and the first step with one (every arm's controller observes,
  also where a plan driver or the policy decides the plan);
* the share of the triggers, and of the unit-steps on the high path, per
  *unit kind*: the unit's name with its block index taken out
  (``blocks.3.attn.matmul`` -> ``blocks.attn.matmul``);
* loss spikes (``stability.spike_steps``), how many fall on a step whose
  plan had just changed (that step or the one before), and that share of
  all steps from the first trigger on (the base rate);
* the mean training loss per ``--window`` steps, and the validation loss at
  every eval (the all-high eager model's; and on the arm's own path where the
  run has ``val_path``).

    gnmr-fx bench triggers benchmarks/results/gpu/s19a --variant d-mxfp4_sr --arms gnmr@10% always_low
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
from typing import Optional, Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", help="folders holding results.json(.gz), as for bench regimes")
    parser.add_argument("--variant", required=True, help="scenario variant, e.g. d-mxfp4_sr or a.gpu-wide")
    parser.add_argument("--lr", type=float, default=None, help="only the runs at this LR (default: every LR)")
    parser.add_argument("--arms", nargs="*", default=None, help="only these arms (default: every arm)")
    from gnmr_fx.arguments import positive_int

    parser.add_argument("--window", type=positive_int, default=250, help="steps per mean-training-loss window")
    parser.add_argument("--top", type=positive_int, default=3, help="unit kinds listed per run")


def unit_kind(name: str) -> str:
    """The unit's name without its block index.

    >>> unit_kind("blocks.3.attn.matmul_1"), unit_kind("head"), unit_kind("model.layers.12.mlp.down_proj")
    ('blocks.attn.matmul_1', 'head', 'model.layers.mlp.down_proj')
    """
    return re.sub(r"\.\d+(?=\.|$)", "", name)


def plan_change_steps(plans: Sequence[Sequence[int]]) -> set:
    """Steps whose plan differs from the step before.

    >>> sorted(plan_change_steps([[], [], [1], [1], []]))
    [2, 4]
    """
    return {i for i in range(1, len(plans)) if set(plans[i]) != set(plans[i - 1])}


def run_report(run: dict, window: int) -> dict:
    from gnmr_fx.benchmarks.stability import spike_steps

    units = run.get("units") or []
    trig = run.get("trigger_list") or []
    plans = run.get("plans") or []
    kind_of = [unit_kind(u) for u in units]
    trig_kinds = collections.Counter(kind_of[u] for _, u in trig) if kind_of else collections.Counter()
    high_kinds = collections.Counter(kind_of[u] for p in plans for u in p) if kind_of else collections.Counter()
    first = min((s for s, _ in trig), default=None)
    spikes = spike_steps(run.get("train_loss") or [])
    changed = plan_change_steps(plans)
    near = {i for c in changed for i in (c, c + 1)}  # the change's step and the one after it
    start = first if first is not None else 0
    steps_after = range(start, len(plans))
    base = sum(1 for i in steps_after if i in near) / len(steps_after) if len(steps_after) else float("nan")
    losses = run.get("train_loss") or []
    means = [statistics.fmean(losses[i:i + window]) for i in range(0, len(losses), window)]
    return {"seed": run["seed"], "arm": run["arm"], "triggers": len(trig), "first_trigger": first,
            "trigger_share": {k: c / len(trig) for k, c in trig_kinds.most_common()} if trig else {},
            "high_share": {k: c / sum(high_kinds.values()) for k, c in high_kinds.most_common()}
            if high_kinds else {},
            "spikes": len(spikes), "spikes_at_plan_change": sum(1 for i in spikes if i in near),
            "plan_change_base_rate": base, "train_loss_windows": means,
            "val": [v for _, v in run.get("val") or []], "val_path": [v for _, v in run.get("val_path") or []]}


def format_reports(reports: list, top: int) -> str:
    from tabulate import tabulate

    def shares(d: dict) -> str:
        return ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(d.items())[:top]) or "-"

    head = ["seed", "arm", "triggers", "first trigger", "top unit kinds by triggers", "top kinds by high unit-steps",
            "spikes", "at a plan change", "base rate"]
    rows = [[r["seed"], r["arm"], r["triggers"], "-" if r["first_trigger"] is None else r["first_trigger"],
             shares(r["trigger_share"]), shares(r["high_share"]), r["spikes"], r["spikes_at_plan_change"],
             f"{100 * r['plan_change_base_rate']:.0f}%"] for r in reports]
    def series(vals: list) -> str:
        return " ".join(f"{v:.3f}" for v in vals) or "-"

    loss_rows = [[r["seed"], r["arm"], series(r["train_loss_windows"])] for r in reports]
    val_rows = [[r["seed"], r["arm"], series(r["val"]), series(r["val_path"])] for r in reports]
    return (tabulate(rows, headers=head, tablefmt="github") + "\n\nmean training loss per window:\n\n"
            + tabulate(loss_rows, headers=["seed", "arm", "windows"], tablefmt="github")
            + "\n\nvalidation loss at every eval:\n\n"
            + tabulate(val_rows, headers=["seed", "arm", "val (all-high eager model)", "val on its own path"],
                       tablefmt="github"))


def select_runs(runs: list, variant: str, lr: Optional[float], arms: Optional[Sequence[str]]) -> list:
    from gnmr_fx.arguments import InputError

    mine = [r for r in runs if r["variant"] == variant and (lr is None or r["lr"] == lr)
            and (not arms or r["arm"] in arms)]
    if not mine:
        have = sorted({r["variant"] for r in runs})
        raise InputError(f"no run of variant {variant!r}" + (f" at LR {lr:g}" if lr is not None else "")
                         + (f" with arms {' '.join(arms)}" if arms else "") + f"; variants here: {', '.join(have)}")
    return sorted(mine, key=lambda r: (r["lr"], r["seed"], r["arm"]))


def run(args: argparse.Namespace) -> int:
    from gnmr_fx.arguments import InputError
    from gnmr_fx.benchmarks.regime_table import load_runs

    runs = load_runs(args.folders)
    if not runs:
        raise InputError(f"no results.json(.gz) under {' '.join(args.folders)}")
    reports = [run_report(r, args.window) for r in select_runs(runs, args.variant, args.lr, args.arms)]
    print(format_reports(reports, args.top))
    return 0


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    raise SystemExit(run(ap.parse_args()))
