"""``gnmr-fx demo``: a tiny GPT on the CPython stdlib, three arms, one table.

Arms (identical model init, data order and seed):
  always_high  every unit on the high path (the quality reference)
  always_low   every unit on the int4 stress recipe
  gnmr         the int4 recipe, with GNMR moving units to the high path under a budget

About two minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
from tabulate import tabulate

import gnmr_fx
from gnmr_fx.arguments import output_file, parse_max_o, positive_float, positive_int, recipe_name
from gnmr_fx.config import GNMRConfig
from gnmr_fx.benchmarks.data import fixed_windows, load_corpus, random_batch
from gnmr_fx.models import GPTConfig, TinyGPT

ARMS = ("always_high", "always_low", "gnmr")


@dataclass(frozen=True)
class DemoConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 6e-3  # aggressive on purpose: low precision must be stressed
    recipe: str = "int4"
    max_o: Union[int, float] = 0.1  # as GNMRConfig.max_o: units (0 = every unit low) or a FLOP fraction
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    model: GPTConfig = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be an int >= 1 (got {value!r})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"DemoConfig.lr must be a finite number > 0 (got {self.lr!r})")
        # recipe and max_o: GNMRConfig's own checks, before any training starts.
        GNMRConfig(recipe=self.recipe, max_o=self.max_o)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimizer steps per arm (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--recipe", type=recipe_name, default=d.recipe, help=f"low-path recipe (default {d.recipe})")
    p.add_argument("--max-o", type=parse_max_o, default=d.max_o,
                   help=f"GNMR budget: an integer is a count of units (0: every unit low), a decimal or "
                        f"percentage a fraction of the FLOPs (0.05 or 5%%; default {d.max_o})")
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--json", type=output_file, default=None, help="also write the results to this JSON file")
    p.add_argument("--log", type=output_file, default=None,
                   help="telemetry JSONL of the gnmr arm (see gnmr-fx report)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The demo's config from parsed ``gnmr-fx demo`` flags.

    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> config_from_args(parser.parse_args(["--max-o", "0"])).max_o  # 0: every unit low
    0
    """
    return DemoConfig(steps=args.steps, seed=args.seed, recipe=args.recipe, max_o=args.max_o, lr=args.lr)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    results = run_demo(cfg, log=args.log)
    print(format_results(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


def run_demo(cfg: DemoConfig, log: Optional[str] = None, stream=sys.stderr) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = load_corpus({"train": 2_000_000, "tune": 10_000, "val": 300_000})
    vx, vy = fixed_windows(corpus.val, cfg.eval_batches * cfg.batch_size, cfg.model.block_size)
    val_batches = list(zip(vx.split(cfg.batch_size), vy.split(cfg.batch_size)))
    train = corpus.train
    out = {"config": {"steps": cfg.steps, "lr": cfg.lr, "recipe": cfg.recipe, "max_o": cfg.max_o,
                      "seed": cfg.seed, "batch_size": cfg.batch_size, "model": vars(cfg.model)},
           "arms": {}}
    for arm in ARMS:
        out["arms"][arm] = _train_arm(arm, cfg, train, val_batches, log if arm == "gnmr" else None, stream)
    return out


def _train_arm(arm, cfg, train, val_batches, log, stream) -> dict:
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    gcfg = GNMRConfig(recipe=cfg.recipe, policy=arm, max_o=cfg.max_o, log=log)
    m = gnmr_fx.compile(model, gcfg, backend="eager", optimizer=opt)
    gen = torch.Generator().manual_seed(cfg.seed)  # same batch order in every arm
    curve, val_curve = [], []
    high_unit_steps = 0
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx, tgt = random_batch(train, cfg.batch_size, cfg.model.block_size, gen)
        loss = m(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctl = gnmr_fx.controller(m)
        high_unit_steps += int(ctl.plan.sum())  # CPU: reading the plan is free here
        curve.append(float(loss.detach()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_curve.append((step, _evaluate(m, val_batches)))
        _progress(stream, arm, step, cfg.steps, curve[-1], val_curve[-1][1] if val_curve else None, t0)
    if getattr(stream, "isatty", lambda: False)():
        stream.write("\n")
    ctl = gnmr_fx.controller(m)
    gnmr_fx.runtime(m).flush()
    n_units = ctl.num_units
    top = sorted(range(n_units), key=lambda i: (-int(ctl.n_high_steps[i]), i))[:5]
    return {
        "final_val_loss": val_curve[-1][1],
        "best_val_loss": min(v for _, v in val_curve),
        "val_curve": val_curve,
        "train_loss": curve,
        "diverged": not math.isfinite(curve[-1]),
        "pct_unit_steps_high": 100.0 * high_unit_steps / max(1, n_units * cfg.steps),
        "units": n_units,
        "wall_s": time.perf_counter() - t0,
        "top_units": [
            {"unit": ctl.names[i], "high_steps": int(ctl.n_high_steps[i]),
             "triggers": int(ctl.n_triggers[i]), "denied": int(ctl.n_denied[i])}
            for i in top if int(ctl.n_high_steps[i]) > 0
        ],
    }


@torch.no_grad()
def _evaluate(model, batches) -> float:
    losses = [float(model(idx, tgt)) for idx, tgt in batches]
    return sum(losses) / len(losses)


def _progress(stream, arm, step, total, loss, val, t0) -> None:
    # Redraw in place on a terminal; when piped, print ~10 lines per arm.
    tty = getattr(stream, "isatty", lambda: False)()
    every = 1 if tty else max(1, total // 10)
    if step % every and step != total:
        return
    width = 30
    done = int(width * step / total)
    rate = step / max(1e-9, time.perf_counter() - t0)
    v = f" val {val:.3f}" if val is not None else ""
    start, end = ("\r", "") if tty else ("", "\n")
    stream.write(f"{start}{arm:<12} [{'#' * done}{'.' * (width - done)}] {step}/{total} "
                 f"loss {loss:.3f}{v} {rate:.1f} it/s{end}")
    stream.flush()


def format_results(results: dict) -> str:
    arms = results["arms"]
    ref = arms["always_high"]["final_val_loss"]
    rows = []
    for name, r in arms.items():
        gap = 100.0 * (r["final_val_loss"] - ref) / ref
        rows.append([name, f"{r['final_val_loss']:.4f}", f"{r['best_val_loss']:.4f}", f"{gap:+.2f}%",
                     f"{r['pct_unit_steps_high']:.1f}%", "yes" if r["diverged"] else "no", f"{r['wall_s']:.0f}s"])
    c = results["config"]
    text = (f"\nGNMR demo: TinyGPT {c['model']['n_layer']}x{c['model']['n_embd']} on CPython stdlib bytes, "
            f"{c['steps']} steps, recipe {c['recipe']}, max_o {c['max_o']}, lr {c['lr']}, seed {c['seed']}\n")
    text += tabulate(rows, headers=["arm", "val loss", "best val", "gap vs high", "unit-steps high",
                                    "diverged", "wall"]) + "\n"
    top = arms["gnmr"]["top_units"]
    if top:
        text += "\nUnits GNMR put on the high path most (gnmr arm):\n"
        text += tabulate([[t["unit"], t["high_steps"], t["triggers"], t["denied"]] for t in top],
                         headers=["unit", "steps on high path", "triggers", "denied"]) + "\n"
    else:
        text += "\nGNMR put no unit on the high path in this run.\n"
    return text
