"""``gnmr-fx bench stability``: does GNMR keep low-precision training on track?

A small byte-level GPT (``gnmr_fx.models.TinyGPT``) trains on the CPython
standard library's own sources (offline, fixed per-file split, see
``benchmarks/data.py``) under four scenarios:

a  activation-quantization stress: int4 per-tensor activations at an aggressive LR
b  DeepSeek-V3-style fine-grained fp8 on every linear of the blocks; embeddings,
   norms, softmax, the attention matmuls and the head stay high (unit_filter)
c  injected faults (``gnmr_fx.faults``): outlier bursts and corrupted backward
   passes on known units at known steps, scored for detection
d  fine-tuning: a checkpoint of an always_high run continues in nvfp4

and compares the arms of ``benchmarks/arms.py`` on identical model, data and
seeds. Within one (scenario, seed) task the model is compiled once and every
arm reuses that compiled structure: an arm loads the seed's initial weights,
gets a fresh optimizer and a fresh controller, and only differs in the plan
and the gradient treatment.

Outputs (``--out``): ``results.json``, ``tables.md``, ``loss_<scenario>.png``
and ``frontier.png``; the tables are also printed.

    gnmr-fx bench stability --quick                 # CPU, all scenarios, seeds 0 1 2
    gnmr-fx bench stability --scenarios a --arms always_high gnmr@2 --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import queue
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from gnmr_fx.benchmarks.arms import (
    BUDGET_RULE,
    GlobalClip,
    HighFirst,
    RandomPlan,
    StaticPlan,
    ZClip,
    first_last_plan,
    high_first_steps,
    named_units_plan,
    parse_arm,
    pick_by_gain,
    uses_grad_profile,
)
from gnmr_fx.benchmarks.data import fixed_windows, load_corpus, random_batch
from gnmr_fx.models import GPTConfig

DEFAULT_ARMS = (
    "always_high", "always_low", "low+clip", "low+zclip", "static@2", "random@2",
    "gnmr@0", "gnmr@1", "gnmr@2", "gnmr@5%", "gnmr@10%",
)
SPIKE_FACTOR = 1.5  # a step is a loss spike when loss > 1.5x the running median
SPIKE_WINDOW = 20  # ... of the previous 20 steps
DETECT_TOLERANCE = 1  # a fault counts as detected if its unit triggers within 1 step


@dataclass(frozen=True)
class Scenario:
    key: str
    name: str
    recipe: str
    lr: float
    description: str
    unit_filter: Optional[tuple] = None
    faults: bool = False
    finetune: bool = False
    pretrain_lr: float = 1e-3
    threshold: float = 3.0  # GNMRConfig.threshold of every arm's controller (the library default)
    delta_threshold: float = 1.5  # GNMRConfig.delta_threshold (the library default)


SCENARIOS = {
    "a": Scenario("a", "activation_stress", "int4", 3e-2,
                  "int4 per-tensor activations (int8 per-channel weights) at an aggressive LR"),
    "b": Scenario("b", "deepseek_fp8", "fp8_blockwise", 3e-3,
                  "DeepSeek-V3 fp8 (1x128 tiles, 128x128 weight blocks) on the block linears; "
                  "embeddings, norms, softmax, attention matmuls and head high",
                  unit_filter=("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.fc", "blocks.*.out")),
    "c": Scenario("c", "faults", "fp8_e4m3", 3e-3,
                  "fp8 e4m3 per-tensor with injected outlier bursts and corrupted backward passes",
                  # delta_threshold 3 (library default 1.5) was chosen by `--tuning` runs on the tune
                  # split, seeds 100-101 (benchmarks/RESULTS.md): same recall, fewer false positives.
                  faults=True, delta_threshold=3.0),
    "d": Scenario("d", "finetune_nvfp4", "nvfp4", 1e-3,
                  "fine-tune an always_high checkpoint in NVFP4", finetune=True, pretrain_lr=3e-3),
    # The GPU regime search (issue: evidence). Override the recipe with --set, e.g.
    # --set e.recipe=mxfp4 or e.recipe=mxfp8, and sweep the LR with --lrs.
    "e": Scenario("e", "block_linears_lowp", "nvfp4", 3e-3,
                  "every linear of the blocks on the recipe (forward operands, and gradients where the "
                  "recipe rounds them); embeddings, norms, attention matmuls and head high",
                  unit_filter=("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.fc", "blocks.*.out")),
    "f": Scenario("f", "attention_logits", "fp8_e4m3", 1e-2,
                  "attention-logit growth: no QK-norm, the two attention matmuls of every block "
                  "(weightless units: q@k^T and att@v) on the recipe, everything else high",
                  unit_filter=("blocks.*.attn.matmul", "blocks.*.attn.matmul_1")),
}


@dataclass(frozen=True)
class Preset:
    model: GPTConfig
    batch: int
    steps: int
    pretrain_steps: int  # scenario d: the always_high run that makes the checkpoint
    eval_every: int
    eval_seqs: int
    corpus_bytes: dict
    backend: str
    jobs: int
    warmup_lr: int = 10
    fault_every: int = 15
    fault_start: int = 30  # after the controller's 20-step warm-up
    precision: str = "fp32"  # "bf16": forward under bf16 autocast (fp32 master weights), as users train


PRESETS = {
    "quick": Preset(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64), batch=16, steps=120,
                    pretrain_steps=100, eval_every=20, eval_seqs=64,
                    corpus_bytes={"train": 2_000_000, "tune": 200_000, "val": 200_000},
                    backend="eager", jobs=2),
    "full": Preset(GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384), batch=32, steps=2000,
                   pretrain_steps=2000, eval_every=100, eval_seqs=256,
                   corpus_bytes={"train": 40_000_000, "tune": 2_000_000, "val": 2_000_000},
                   backend="inductor", jobs=1, warmup_lr=100, fault_every=50, fault_start=100),
    # The lent H200: bf16 autocast, inductor, several worker processes sharing the GPU.
    "gpu": Preset(GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384), batch=32, steps=2000,
                  pretrain_steps=2000, eval_every=250, eval_seqs=256,
                  corpus_bytes={"train": 40_000_000, "tune": 2_000_000, "val": 2_000_000},
                  backend="inductor", jobs=4, warmup_lr=100, fault_every=50, fault_start=100,
                  precision="bf16"),
    # The outlier setting of the evidence issue: a wider, deeper model trained longer (39M
    # parameters in the blocks), where per-tensor activation scales meet growing outlier features.
    "gpu-wide": Preset(GPTConfig(block_size=256, n_layer=8, n_head=10, n_embd=640), batch=32, steps=3000,
                       pretrain_steps=2000, eval_every=250, eval_seqs=256,
                       corpus_bytes={"train": 40_000_000, "tune": 2_000_000, "val": 2_000_000},
                       backend="inductor", jobs=4, warmup_lr=100, fault_every=50, fault_start=100,
                       precision="bf16"),
    "smoke": Preset(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16), batch=4, steps=6,
                    pretrain_steps=4, eval_every=3, eval_seqs=8,
                    corpus_bytes={"train": 50_000, "tune": 5_000, "val": 5_000},
                    backend="eager", jobs=1, warmup_lr=2, fault_every=2, fault_start=2),
}


# --------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Flags are checked here, at parse time: a bad one is one line and exit 2
    # before any worker starts.
    from gnmr_fx.arguments import parse_device, positive_float, positive_int
    from gnmr_fx.benchmarks.arms import arm_argument

    parser.add_argument("--quick", action="store_true", help="the CPU preset (same as --preset quick)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model/steps preset (default: full, or quick with --quick)")
    parser.add_argument("--scenarios", nargs="+", default=list("abcd"), type=_scenario_arg, metavar="S[-RECIPE]",
                        help=f"scenarios ({', '.join(SCENARIOS)}); S-RECIPE runs scenario S with another recipe, "
                             "e.g. e-mxfp4 (several variants of one scenario can run in one call)")
    parser.add_argument("--arms", nargs="+", type=arm_argument, default=list(DEFAULT_ARMS),
                        help="arm names (always_high, always_low, low+clip, low+zclip, static@K, static=REGEX, static_tuned@K, "
                             "static_grad@K, static_grad@K+high_first@N, random@K, high_first@N, gnmr@K / gnmr@P%%, "
                             "gnmr@M+pin_grad@K, +high_first@N, +lock@N and +lag after a gnmr form)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=positive_float, default=None,
                        help="learning-rate sweep: one task per (scenario, seed, LR) instead of the scenario's LR")
    parser.add_argument("--deadline", type=positive_float, default=None,
                        help="seconds: start no task that cannot finish by then (estimated from finished "
                             "ones), stop running ones at the deadline, and report what finished")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="fp32, or bf16 autocast for the forward (default: the preset's)")
    parser.add_argument("--dispatch", choices=["host", "select"], default="host",
                        help="GNMRConfig.dispatch of every arm: host (one branch runs, the library default) "
                             "or select (both branches, torch.where)")
    parser.add_argument("--steps", type=positive_int, default=None, help="override the preset's steps per run")
    parser.add_argument("--jobs", type=positive_int, default=None, help="worker processes (default: the preset's)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker")
    parser.add_argument("--device", type=parse_device, default=None,
                        help="cpu / cuda (default: cuda for full if available)")
    parser.add_argument("--backend", default=None, choices=["eager", "aot_eager", "inductor"])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="S.FIELD=VALUE",
                        help="override a scenario field, e.g. a.lr=3e-3 a.recipe=nvfp4")
    parser.add_argument("--tuning", action="store_true",
                        help="train and evaluate on the tune split (for choosing thresholds; never report these)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/out/stability-<preset>)")
    parser.add_argument("--val-path", action="store_true",
                        help="also score the validation windows through the compiled model on the arm's current "
                             "plan (the path it trains on: low-path units quantized), as val_path beside val "
                             "(the eager all-high model); costs one more compile per task")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels in every worker (torch.use_deterministic_algorithms, Inductor's "
                             "deterministic mode, a fixed cuBLAS workspace): a seed's GPU runs repeat bitwise across "
                             "calls, so fine-tuning arms split over calls share one checkpoint (slower; ops without "
                             "a deterministic kernel warn)")
    parser.add_argument("--per-arm", action="store_true",
                        help="one task (worker process) per arm instead of one per (scenario, seed, LR): with "
                             "--jobs N, N arms train side by side (one GPU shared under CUDA MPS); scenario d's "
                             "arms of a seed then share one pretraining (--pretrain-cache, default OUT/pretrain)")
    parser.add_argument("--pretrain-cache", default=None, metavar="DIR",
                        help="scenario d: share the always_high pretraining checkpoint of a seed through DIR "
                             "(keyed by model, preset, pretraining LR and steps, precision, split and seed; a "
                             "file lock makes concurrent benches wait for the first one's run instead of "
                             "pretraining again), so fine-tuning arms split over several benches start from "
                             "the same weights")
    parser.add_argument("--no-plots", action="store_true")


def run(args: argparse.Namespace) -> int:
    preset_name = args.preset or ("quick" if args.quick else "full")
    preset = PRESETS[preset_name]
    if args.steps is not None:
        preset = dataclasses.replace(preset, steps=args.steps, pretrain_steps=min(preset.pretrain_steps, args.steps))
    if args.precision is not None:
        preset = dataclasses.replace(preset, precision=args.precision)
    gpu_preset = preset_name in ("full", "gpu", "gpu-wide")
    device = args.device or ("cuda" if gpu_preset and torch.cuda.is_available() else "cpu")
    backend = args.backend or (preset.backend if device != "cpu" or preset.backend != "inductor" else "eager")
    scenarios = _apply_overrides(_select_scenarios(args.scenarios), args.overrides)
    arms = [parse_arm(a) for a in args.arms]
    if "always_high" not in [a.name for a in arms]:
        # Arms of one (scenario, seed) can be split over several commands (a
        # device call's time limit); `gnmr-fx bench regimes` pairs them with
        # the always_high run of the same seed from any folder.
        print("note: no always_high arm: the gap columns stay empty here; `gnmr-fx bench regimes` "
              "computes them from an always_high run of the same scenario, LR and seed elsewhere",
              file=sys.stderr)
    out = Path(args.out or f"benchmarks/out/stability-{preset_name}")
    out.mkdir(parents=True, exist_ok=True)
    jobs = max(1, args.jobs if args.jobs is not None else preset.jobs)
    pretrain_cache = args.pretrain_cache
    if args.per_arm and pretrain_cache is None and any(s.finetune for s in scenarios.values()):
        pretrain_cache = str(out / "pretrain")
    arm_groups = [[a.name] for a in arms] if args.per_arm else [[a.name for a in arms]]
    tasks = [dict(scenario=dataclasses.asdict(s), seed=seed, lr=lr if lr is not None else s.lr,
                  preset=preset_name, preset_obj=_preset_dict(preset), arms=group,
                  device=device, backend=backend, threads=args.threads, out=str(out), dispatch=args.dispatch,
                  split="tune" if args.tuning else "val", pretrain_cache=pretrain_cache, val_path=args.val_path,
                  deterministic=args.deterministic)
             for seed in args.seeds for s in scenarios.values() for lr in (args.lrs or [None])
             for group in arm_groups]
    # Seed-major, so a deadline cuts whole later seeds rather than whole
    # scenarios; within a seed the longest first (d also pretrains).
    tasks.sort(key=lambda t: (args.seeds.index(t["seed"]), -int(t["scenario"]["finetune"])))
    t0 = time.time()
    results, unfinished = run_tasks(tasks, jobs, args.deadline)
    wall = time.time() - t0
    corpus = _corpus(tuple(sorted(preset.corpus_bytes.items())))
    doc = {
        "meta": {
            "command": "gnmr-fx bench stability " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "stability"] else sys.argv[1:]),
            "preset": preset_name, "preset_config": _preset_dict(preset), "seeds": list(args.seeds),
            "lrs": args.lrs, "per_arm": args.per_arm, "val_path": args.val_path, "deterministic": args.deterministic, "dispatch": args.dispatch, "arms": [a.name for a in arms], "budget_rule": BUDGET_RULE, "device": device, "backend": backend, "jobs": jobs,
            "threads_per_job": args.threads, "split": "tune (tuning run)" if args.tuning else "train / val",
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(), "wall_s": round(wall, 1), "corpus": corpus.describe(),
            "definitions": DEFINITIONS,
            "unfinished_tasks": [_task_label(t) for t in unfinished],
        },
        "scenarios": {},
    }
    for key, s in scenarios.items():
        done = [res for res in results if res["scenario"] == key]
        if not done:
            continue
        for lr in sorted({res["lr"] for res in done}):
            group = [res for res in done if res["lr"] == lr]
            runs = [r for res in group for r in res["runs"]]
            cfg = dict(dataclasses.asdict(s), lr=lr)
            doc["scenarios"][_group_key(key, lr, args.lrs)] = {
                "config": cfg, "units": group[0]["units"], "costs": group[0]["costs"],
                # One record per seed (--per-arm: every arm task of a seed carries the shared one).
                "pretrain": list({res["seed"]: res["pretrain"] for res in group if res["pretrain"]}.values()),
                "runs": runs, "summary": summarize(runs, [a.name for a in arms], s.faults),
            }
    (out / "results.json").write_text(json.dumps(_finite_json(doc), indent=1, default=_json_default))
    tables = format_tables(doc)
    print(tables["terminal"])
    (out / "tables.md").write_text(tables["markdown"])
    if not args.no_plots and doc["scenarios"]:
        plot(doc, out)
    if unfinished:
        print(f"deadline: {len(unfinished)} task(s) not run or not finished: "
              f"{', '.join(_task_label(t) for t in unfinished)}", file=sys.stderr)
    print(f"\nwrote {out}/results.json, tables.md{'' if args.no_plots else ', loss_*.png, frontier.png'} "
          f"in {wall:.0f} s ({jobs} job(s))", file=sys.stderr)
    return 0


def _task_label(t: dict) -> str:
    """``e seed 0 lr 0.003 (always_high, gnmr@2)``: what a task trains."""
    return f"{t['scenario']['key']} seed {t['seed']} lr {t['lr']:g} ({', '.join(t['arms'])})"


def _group_key(key: str, lr: float, lrs: Optional[Sequence[float]]) -> str:
    """Scenario key of a result group: ``e`` alone, ``e_lr0.003`` in a sweep
    (it names files, so letters, digits, ``.``, ``_`` and ``-`` only)."""
    return f"{key}_lr{lr:g}" if lrs else key


def run_tasks(tasks: list, jobs: int, deadline: Optional[float]) -> tuple[list, list]:
    """Run tasks in ``jobs`` worker processes; returns (results, unfinished tasks).

    With a deadline (seconds from now), a task is started only while it can
    still finish (:func:`may_start`), and workers still running at the
    deadline are terminated: what finished is reported, what did not is
    listed, nothing is half-counted.
    """
    if jobs == 1 and deadline is None:
        return [run_task(t) for t in tasks], []
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    t0 = time.time()
    pending = list(enumerate(tasks))
    running: dict = {}  # index -> (process, start time)
    results: dict = {}
    durations: list = []
    while pending or running:
        left = (deadline - (time.time() - t0)) if deadline is not None else math.inf
        while pending and len(running) < jobs and may_start(left, durations):
            i, task = pending.pop(0)
            proc = ctx.Process(target=_worker, args=(i, task, results_q), daemon=True)
            proc.start()
            running[i] = (proc, time.time())
        try:
            i, res, err = results_q.get(timeout=1.0)
        except queue.Empty:
            i = None
        if i is not None:
            proc, start = running.pop(i)
            proc.join()
            if err is not None:
                for p, _ in running.values():
                    p.terminate()
                raise RuntimeError(f"task {_task_label(tasks[i])} failed:\n{err}")
            results[i] = res
            durations.append(time.time() - start)
        for j, (proc, _start) in list(running.items()):
            if not proc.is_alive() and proc.exitcode not in (0, None):
                raise RuntimeError(f"task {_task_label(tasks[j])}: worker died with exit code {proc.exitcode}")
        if deadline is not None and time.time() - t0 > deadline:
            for proc, _ in running.values():
                proc.terminate()
            break
        if deadline is not None and not running and pending and not may_start(deadline - (time.time() - t0), durations):
            break
    done = [results[i] for i in sorted(results)]
    unfinished = [t for i, t in enumerate(tasks) if i not in results]
    return done, unfinished


def may_start(left: float, durations: list) -> bool:
    """Whether a task may start with ``left`` seconds to the deadline, given
    the durations of the tasks finished so far: always before any finished,
    then while ``left`` exceeds the shortest of them. Later tasks tend to be
    faster than the first (warm compile caches, fewer runs sharing the GPU:
    in device call s16b second seeds trained in 62-73 s against 109-111 s);
    the earlier rule (1.1x the longest) ended calls s16a and s16c with
    200-260 s of their deadline unused. A task that overruns is terminated
    at the deadline and reported as not finished, so optimism costs no
    wrong result, only GPU time the call had left anyway.

    >>> may_start(100.0, []), may_start(100.0, [90.0, 240.0]), may_start(80.0, [90.0, 240.0])
    (True, True, False)
    """
    return not durations or left > min(durations)


def _worker(i: int, task: dict, q: Any) -> None:
    import traceback

    try:
        q.put((i, run_task(task), None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        q.put((i, None, traceback.format_exc()))


DEFINITIONS = {
    "val_loss": "mean next-byte cross-entropy (nats) on fixed windows of the eval split, computed by the "
                "eager model (every matmul high), so arms differ only by what training did to the weights",
    "val_path": "(with --val-path) the same windows through the compiled model on the arm's plan at that step "
                "(its low-path units quantized): the loss on the path the arm trains and could serve on",
    "gap_pct": "100 * (final_val(arm) - final_val(always_high)) / final_val(always_high), per seed, then mean/std",
    "spikes": f"steps whose training loss > {SPIKE_FACTOR}x the median of the previous {SPIKE_WINDOW} losses",
    "diverged": "a non-finite training loss, or a final val loss >= ln(256) (no better than uniform bytes)",
    "high_unit_steps_pct": "100 * (unit-steps whose plan was high) / (units * steps), from the plan "
                           "read out of the compiled graphs' plan buffers before every forward",
    "flop_high_pct": "the same, each unit weighted by its FLOPs (controller.costs)",
    "units": "the units GNMR controls (in scenario b the filter leaves attention matmuls and head out; "
             "they are always high in every arm and not counted)",
    "recall": f"fraction of faults whose unit triggered (controller.triggered) within {DETECT_TOLERANCE} step "
              "of the fault step (the step's own update counts as latency 0)",
    "fp_per_1k": "triggers not explained by a fault, per 1000 unit-steps after the controller warm-up. "
                 "Explained = inside a fault's detection window (its step and the next), on the faulted "
                 "unit or a unit the fault reaches through the chain rule: for grad_blowup the faulted unit "
                 "and every unit before it in forward order (the blown-up gradient flows there), for "
                 "outlier the faulted unit and every unit after it (its perturbed output feeds them)",
    "fp_strict_per_1k": "the same but only the faulted unit itself is explained",
    "fp_clean_per_1k": "triggers on steps outside every fault window, per 1000 such unit-steps "
                       "(false alarms on clean steps)",
    "latency": "mean steps from the fault to the first trigger of its unit, over detected faults",
}


# ------------------------------------------------------------------- tasks
@functools.lru_cache(maxsize=2)
def _corpus(bytes_items: tuple):
    return load_corpus(dict(bytes_items))


def run_task(task: dict) -> dict:
    """Train every arm of one (scenario, seed) on one compiled model."""
    import gnmr_fx
    from gnmr_fx.faults import FaultInjector
    from gnmr_fx.models import TinyGPT

    torch.set_num_threads(task["threads"])
    if task.get("deterministic"):
        use_deterministic_kernels()
    s = Scenario(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in task["scenario"].items()})
    p = _preset_from_dict(task["preset_obj"])
    seed, device = task["seed"], torch.device(task["device"])
    label = f"{s.key} s{seed}"
    corpus = _corpus(tuple(sorted(p.corpus_bytes.items())))
    # A tuning run trains and evaluates on the tune split only, so nothing
    # chosen from it has seen the train stream or the validation split.
    train = corpus.tune if task["split"] == "tune" else corpus.train
    vx, vy = fixed_windows(corpus.split(task["split"]), p.eval_seqs, p.model.block_size)
    vx, vy = vx.to(device), vy.to(device)

    torch.manual_seed(seed)
    model = TinyGPT(p.model).to(device)
    injector = None
    if s.faults:
        injector = FaultInjector(model, fault_schedule(model, p, seed))
    base = gnmr_fx.GNMRConfig(recipe=s.recipe, unit_filter=s.unit_filter, threshold=s.threshold,
                              delta_threshold=s.delta_threshold, dispatch=task.get("dispatch", "host"))
    ex = random_batch(train, p.batch, p.model.block_size, torch.Generator().manual_seed(0))
    # bf16: the forward runs under autocast with fp32 master weights (how users
    # train); the high path is then the bf16 matmul, the low path the recipe.
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                 enabled=p.precision == "bf16")
    with autocast():
        cm = gnmr_fx.compile(model, base, backend=task["backend"],
                             example_inputs=tuple(t.to(device) for t in ex))
    rt = gnmr_fx.runtime(cm)
    names = list(rt.controller.names)
    costs = rt.controller.costs.detach().cpu().clone()
    if injector is not None:
        injector.check_units(names)
    init = _weights(model)
    user_callbacks = list(rt.callbacks)  # kept for every arm; the arm's own are appended

    # gnmr_fx.compile compiles model.forward in place; the class's own forward
    # is the eager model, every matmul high (the val_loss definition).
    eager_forward = functools.partial(type(model).forward, model)

    def evaluate() -> float:
        with torch.no_grad(), autocast():
            tot = torch.zeros((), device=device)
            for i in range(0, vx.shape[0], 32):
                tot += eager_forward(vx[i:i + 32], vy[i:i + 32]).float() * vx[i:i + 32].shape[0]
        return float(tot) / vx.shape[0]

    def evaluate_path() -> float:
        """The same windows through the compiled model on the current plan
        (no gradients: the controller sees nothing of it)."""
        with torch.no_grad(), autocast():
            tot = torch.zeros((), device=device)
            for i in range(0, vx.shape[0], 32):
                tot += cm(vx[i:i + 32], vy[i:i + 32]).float() * vx[i:i + 32].shape[0]
        return float(tot) / vx.shape[0]

    def train_arm(arm_label: str, arm, steps: int, lr: float, data_seed: int, init_sd: dict,
                  validate: bool = True) -> dict:
        model.load_state_dict(init_sd)
        gnmr_start = arm.high_start if arm.kind == "gnmr" else 0  # a static_grad high start is its driver's
        cfg = base.replace(policy=arm.policy, max_o=arm.budget if arm.kind == "gnmr" else 0,
                           high_start_steps=high_first_steps(gnmr_start, steps) if gnmr_start else 0,
                           plan_lag=arm.plan_lag)
        if arm.lock_steps:
            cfg = cfg.replace(lock_steps=arm.lock_steps,
                              max_lock_steps=max(base.max_lock_steps, 5 * arm.lock_steps))
        ctl = rt.reset_controller(cfg)  # a fresh controller per arm on the shared compiled graphs
        if arm.pins:
            # The product's pin_profile: the profile's units held high through every update (they
            # count against max_o; pin() warns when they leave GNMR no room).
            rt.pin(pick_by_gain(grad_profile["gain"], costs, arm.pins))
        driver = None
        if arm.kind == "static":
            driver = StaticPlan(len(names), plan=first_last_plan(costs, arm.budget))
        elif arm.kind == "static_named":
            driver = StaticPlan(len(names), plan=named_units_plan(arm.units, names))
        elif arm.kind == "static_tuned":
            driver = StaticPlan(len(names), plan=pick_by_gain(tuned["gain"], costs, arm.budget))
        elif arm.kind == "static_grad" and arm.high_start:
            driver = HighFirst(len(names), high_first_steps(arm.high_start, steps),
                               then=pick_by_gain(grad_profile["gain"], costs, arm.budget))
        elif arm.kind == "static_grad":
            driver = StaticPlan(len(names), plan=pick_by_gain(grad_profile["gain"], costs, arm.budget))
        elif arm.kind == "high_first":
            driver = HighFirst(len(names), high_first_steps(arm.budget, steps))
        elif arm.kind == "random":
            driver = RandomPlan(len(names), arm.budget, cfg.lock_steps, seed, costs)
        # Per-step records stay on the device; the host reads them at eval
        # points only, so the loop adds no device-to-host sync per step.
        rec_loss = torch.full((steps,), float("nan"), device=device)
        rec_plan = torch.zeros(steps, len(names), dtype=torch.bool, device=device)
        rec_trig = torch.zeros(steps, len(names), dtype=torch.bool, device=device)
        cursor = [0]
        rt.callbacks = user_callbacks + [lambda r: rec_trig[cursor[0]].copy_(r.controller.triggered)]
        if driver is not None:
            rt.callbacks.append(driver)
        rt.set_plan(driver.plan if driver is not None else ctl.plan)
        clip = GlobalClip(1.0) if arm.kind == "clip" else ZClip() if arm.kind == "zclip" else None
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        gen = torch.Generator().manual_seed(data_seed)
        vals = []
        vals_path: list = []
        diverged = False
        bar = ProgressBar(f"{label} {arm_label}", steps)
        t0 = time.perf_counter()
        done = 0
        for step in range(steps):
            cursor[0] = step
            for g in opt.param_groups:
                g["lr"] = lr * _lr_factor(step, steps, p.warmup_lr)
            if injector is not None:
                injector.set_step(step)
            _record_plan(rt, rec_plan[step])
            x, y = random_batch(train, p.batch, p.model.block_size, gen)
            with autocast():
                loss = cm(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            loss.backward()  # runtime.step() runs at the end of backward: next plan
            if clip is not None:
                clip(model.parameters())
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec_loss[step] = loss.detach().float()
            done = step + 1
            if injector is not None:
                injector.clear()
            if done % p.eval_every == 0 or done == steps:
                if not bool(torch.isfinite(rec_loss[:done]).all()):
                    diverged = True
                    vals.append((done, float("nan")))
                    if validate and task.get("val_path"):
                        vals_path.append((done, float("nan")))  # a diverged run has no path val either
                    break
                vals.append((done, evaluate() if validate else float("nan")))
                if validate and task.get("val_path"):
                    vals_path.append((done, evaluate_path()))
                bar.update(done, float(rec_loss[step]))
        losses = rec_loss[:done].tolist()
        if diverged:
            # Cut the record at the first non-finite loss, as a per-step check would.
            bad = next(i for i, v in enumerate(losses) if not math.isfinite(v))
            losses, done = losses[:bad + 1], bad + 1
            vals[-1] = (done, float("nan"))
            if vals_path:
                vals_path[-1] = (done, float("nan"))
        wall = time.perf_counter() - t0
        bar.close(wall)
        plan_t = rec_plan[:done].cpu()
        trig_t = rec_trig[:done].cpu()
        rec = {
            "scenario": s.key, "arm": arm_label, "seed": seed, "steps": len(losses), "lr": lr,
            "train_loss": losses, "val": vals, "wall_s": wall,
            **({"val_path": vals_path} if task.get("val_path") else {}),
            "plans": [torch.nonzero(r).flatten().tolist() for r in plan_t],
            "n_clipped": getattr(clip, "n_clipped", None),
            # What the arm's controller ran with (read back from the runtime, not the arm's name).
            "plan_lag": rt.plan_lag, "high_start_steps": ctl.config.high_start_steps,
            "lock_steps": ctl.config.lock_steps, "max_lock_steps": ctl.config.max_lock_steps,
        }
        rec.update(run_metrics(losses, vals, plan_t, costs, diverged))
        rec["triggers"] = int(trig_t.sum())
        rec["trigger_list"] = torch.nonzero(trig_t).tolist()  # [step, unit index] pairs
        if injector is not None:
            rec["detection"] = detection_metrics(injector.events(), trig_t, names, cfg.warmup_steps)
        return rec

    pretrain = None
    lr = task.get("lr", s.lr)
    data_seed = 1000 * seed + 1
    if s.finetune:
        # The earlier high-precision run; its checkpoint (weights only) is
        # what every fine-tuning arm starts from.
        def pretrain_run() -> dict:
            pre = train_arm("pretrain", parse_arm("always_high"), p.pretrain_steps, s.pretrain_lr, data_seed, init)
            return {k: pre[k] for k in ("seed", "steps", "final_val", "best_val", "wall_s", "val")}

        if task.get("pretrain_cache"):
            ckpt, pretrain = cached_pretrain(Path(task["pretrain_cache"]), pretrain_key(task, s), pretrain_run,
                                             lambda path: torch.save(_weights(model), path))
        else:
            pretrain = pretrain_run()
            ckpt = Path(task["out"]) / f"ckpt_{s.key}_seed{seed}.pt"
            torch.save(_weights(model), ckpt)
        init = torch.load(ckpt, weights_only=True, map_location=device)
        pretrain["checkpoint"] = str(ckpt)
        pretrain["weights_sha256"] = weights_digest(init)
        data_seed += 1  # fine-tune on fresh batches
    tuned: dict = {}
    if any(parse_arm(a).kind == "static_tuned" for a in task["arms"]):
        tuned = tune_static_set(model, cm, rt, p, corpus.tune, seed, lr, autocast,
                                lambda *a, **k: train_arm(*a, **k), checkpoint=init if s.finetune else None)
    grad_profile: dict = {}
    if any(uses_grad_profile(parse_arm(a)) for a in task["arms"]):
        grad_profile = profile_grad_error(model, cm, p, corpus.tune, seed, autocast, init,
                                          "checkpoint" if s.finetune else "initial weights")
    runs = [train_arm(a, parse_arm(a), p.steps, lr, data_seed, init) for a in task["arms"]]
    for r in runs:
        spec = parse_arm(r["arm"])
        if spec.kind in ("static_tuned", "static_grad") or spec.pins:
            prof = tuned if spec.kind == "static_tuned" else grad_profile
            chosen = [names[i] for i in torch.nonzero(pick_by_gain(
                prof["gain"], costs, spec.pins or spec.budget)).flatten().tolist()]
            r["pinned_set" if spec.pins else "static_set"] = chosen
            # What the set was chosen from (per-unit gains, the profiled model) goes with the run.
            r["static_tuning"] = {k: v for k, v in prof.items() if k != "gain"}
    return {"scenario": s.key, "seed": seed, "lr": lr, "units": names, "costs": costs.tolist(),
            "runs": runs, "pretrain": pretrain}


def pretrain_key(task: dict, s: "Scenario") -> str:
    """What decides a pretraining run's weights: the model and preset, the
    pretraining LR and steps, the split, the seed and where it runs (the
    recipe does not: the pretraining is always_high, every unit on the high
    path)."""
    import hashlib
    what = {"preset": task["preset_obj"], "pretrain_lr": s.pretrain_lr, "split": task["split"],
            "seed": task["seed"], "device": task["device"], "backend": task["backend"],
            "dispatch": task.get("dispatch", "host"),
            **({"deterministic": True} if task.get("deterministic") else {})}
    digest = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"pretrain_seed{task['seed']}_{digest}"


def cached_pretrain(cache: Path, key: str, run, save) -> tuple:
    """(checkpoint path, pretraining record) for ``key`` in ``cache``: the
    first caller runs ``run()`` and ``save(path)`` under an exclusive file
    lock; callers that come while it runs wait on the lock, then read its
    checkpoint. A record is written only after its checkpoint, so a bench
    killed mid-pretraining leaves nothing a later one would trust."""
    import fcntl
    cache.mkdir(parents=True, exist_ok=True)
    ckpt, meta = cache / f"{key}.pt", cache / f"{key}.json"
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if meta.exists() and ckpt.exists():
                record = json.loads(meta.read_text())
                record["shared"] = True  # this bench did not run it
                return ckpt, record
            record = run()
            tmp = cache / f"{key}.pt.tmp"
            save(tmp)
            os.replace(tmp, ckpt)
            meta.write_text(json.dumps(record))
            return ckpt, dict(record, shared=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tune_static_set(model, cm, rt, p: Preset, tune: torch.Tensor, seed: int, lr: float, autocast,
                    train_arm, checkpoint: Optional[dict] = None) -> dict:
    """Per-unit gain of keeping the unit high, measured on the *tune* split.

    A trained model is profiled: in pretraining, an always_high run with its
    own initial weights and batch order (seed ``100 + seed``, never a
    reported seed; trained on the train split and never evaluated on val);
    in fine-tuning (``checkpoint``: the weights every arm starts from), the
    checkpoint itself, as a practitioner would profile the model before
    fine-tuning it. On fixed windows of the tune split, the loss with every
    unit low is compared with the loss with every unit low but one: the
    drop is that unit's gain. The static_tuned arms keep the units of
    largest gain high (``arms.pick_by_gain``). The validation split is never
    read.
    """
    from gnmr_fx.models import TinyGPT

    if checkpoint is None:
        torch.manual_seed(100 + seed)
        tune_init = {k: v.to(next(model.parameters()).device)
                     for k, v in _weights(TinyGPT(p.model)).items()}
        run = train_arm("tune_high", parse_arm("always_high"), p.steps, lr, 100_000 + seed, tune_init,
                        validate=False)
        profiled = "tune run"
    else:
        model.load_state_dict(checkpoint)
        run = {"final_train": None, "steps": 0}
        profiled = "checkpoint"
    device = next(model.parameters()).device
    tx, ty = fixed_windows(tune, min(p.eval_seqs, 128), p.model.block_size)
    tx, ty = tx.to(device), ty.to(device)
    n = rt.controller.num_units

    def tune_loss(plan: torch.Tensor) -> float:
        rt.set_plan(plan)
        tot = torch.zeros((), device=device)
        for i in range(0, tx.shape[0], 32):
            # Grad mode as in training: the compiled graphs are reused as they are.
            with autocast():
                tot += cm(tx[i:i + 32], ty[i:i + 32]).detach().float() * tx[i:i + 32].shape[0]
        return float(tot) / tx.shape[0]

    low = torch.zeros(n, dtype=torch.bool)
    base = tune_loss(low)
    gain = torch.zeros(n)
    for u in range(n):
        plan = low.clone()
        plan[u] = True
        gain[u] = base - tune_loss(plan)
    return {"gain": gain, "gain_list": gain.tolist(), "all_low_tune_loss": base, "profiled": profiled,
            "tune_run_final_train": run["final_train"], "tune_run_steps": run["steps"]}


GRAD_PROFILE_BATCHES = 4
"""Batches of ``Preset.batch`` tune windows each that ``profile_grad_error`` sums gradients over."""


def profile_grad_error(model, cm, p: Preset, tune: torch.Tensor, seed: int, autocast, weights: dict,
                       profiled: str) -> dict:
    """Per unit, how far the whole model's gradient moves when that unit
    alone runs on the low path (``gnmr_fx.profile``), measured on
    ``GRAD_PROFILE_BATCHES`` fixed batches of *tune* windows at ``weights``
    (the checkpoint a fine-tuning starts from, or a pretraining's initial
    weights: what a practitioner can profile before training). The
    static_grad arms keep the units of largest error high. It sees what the
    gradient-norm statistic cannot: a unit whose low path leaves its own
    gradient's norm as it is but bends every other unit's gradient (the LM
    head under FP4 output gradients, which every backward starts from). The
    profile leaves the plan, the controller, the gradients and the RNG as
    they were; the validation split is never read.
    """
    import gnmr_fx

    device = next(model.parameters()).device
    tx, ty = fixed_windows(tune, GRAD_PROFILE_BATCHES * p.batch, p.model.block_size)
    batches = [(tx[i:i + p.batch].to(device), ty[i:i + p.batch].to(device)) for i in range(0, tx.shape[0], p.batch)]
    model.load_state_dict(weights)

    def loss_fn(m, batch):
        with autocast():
            return m(*batch)

    prof = gnmr_fx.profile(cm, batches, loss_fn=loss_fn, seed=200_000 + seed)
    return {"gain": prof.grad_error, "gain_list": prof.grad_error.tolist(), "all_low_grad_error": prof.all_low_error,
            "profiled": profiled, "criterion": "grad_error", "batches": prof.batches,
            # What GNMR sees of the same passes: each unit's gradient norm with every unit low,
            # over its norm with every unit high (GNMR compares a unit with its own history, so a
            # low path that bends the gradient without changing these norms is invisible to it).
            "stat_ratio_list": prof.stat_ratio.tolist()}


def fault_schedule(model: torch.nn.Module, p: Preset, seed: int) -> list:
    """Faults every ``fault_every`` steps from ``fault_start``, alternating
    outlier / grad_blowup, on linear units drawn in a seeded order."""
    from gnmr_fx.faults import Fault

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    order = torch.randperm(len(linears), generator=torch.Generator().manual_seed(500 + seed)).tolist()
    faults = []
    for i, step in enumerate(range(p.fault_start, p.steps - DETECT_TOLERANCE, p.fault_every)):
        unit = linears[order[i % len(linears)]]
        if i % 2 == 0:
            # Four input channels, the way a few outlier features dominate LLM activations.
            faults.append(Fault(unit, "outlier", steps=(step,), factor=30.0, channels=(0, 1, 2, 3)))
        else:
            faults.append(Fault(unit, "grad_blowup", steps=(step,), factor=30.0))
    return faults


# ------------------------------------------------------------------ metrics
def _record_plan(rt, row: torch.Tensor) -> None:
    """Write the plan the next forward will run, read out of the compiled
    graphs' plan buffers, into ``row`` (on the device: no host sync)."""
    for rec in rt.records:
        if rec.plan is not None:
            row.index_copy_(0, rec.unit_ids.to(row.device), rec.plan.detach().to(row.device))


def run_metrics(losses: Sequence[float], vals: Sequence, plans: torch.Tensor, costs: torch.Tensor,
                diverged: bool) -> dict:
    """Per-run metrics; the cost columns come from ``plans`` ([steps, units] bool)."""
    v = [x[1] for x in vals]
    final = v[-1] if v else float("nan")
    finite = [x for x in v if math.isfinite(x)]
    diverged = diverged or not math.isfinite(final) or final >= math.log(256)
    return {
        "final_val": final,
        "best_val": min(finite) if finite else float("nan"),
        "final_train": statistics.fmean(losses[-10:]) if losses else float("nan"),
        "spikes": count_spikes(losses),
        "diverged": bool(diverged),
        **plan_costs(plans, costs),
    }


def plan_costs(plans: torch.Tensor, costs: torch.Tensor) -> dict:
    """% unit-steps high and FLOP-weighted high share of a [steps, units] plan history.

    >>> plan_costs(torch.tensor([[True, False], [False, False]]), torch.tensor([3.0, 1.0]))
    {'high_unit_steps_pct': 25.0, 'flop_high_pct': 37.5}
    """
    p = plans.float()
    if p.numel() == 0:
        return {"high_unit_steps_pct": 0.0, "flop_high_pct": 0.0}
    return {
        "high_unit_steps_pct": float(p.mean()) * 100.0,
        "flop_high_pct": float((p @ costs.float()).sum() / (p.shape[0] * costs.float().sum())) * 100.0,
    }


def spike_steps(losses: Sequence[float]) -> list:
    """Steps whose loss exceeds SPIKE_FACTOR x the median of the previous
    SPIKE_WINDOW (or is not finite).

    >>> spike_steps([1.0] * 25 + [2.0, 1.0])
    [25]
    """
    return [i for i in range(SPIKE_WINDOW, len(losses))
            if not math.isfinite(losses[i]) or losses[i] > SPIKE_FACTOR * statistics.median(losses[i - SPIKE_WINDOW:i])]


def count_spikes(losses: Sequence[float]) -> int:
    """How many :func:`spike_steps`.

    >>> count_spikes([1.0] * 25 + [2.0, 1.0])
    1
    """
    return len(spike_steps(losses))


def chain_rule_units(unit: str, kind: str, names: Sequence[str]) -> set:
    """Units whose gradient a fault on ``unit`` changes through the chain rule.

    ``names`` is in forward (graph) order; in this model every unit reads the
    residual stream that all earlier units wrote, so order is dependency:

    * ``grad_blowup``: the blown-up gradient flows from ``unit`` to every
      earlier unit; later units' gradients are computed before it and are
      untouched -> ``unit`` and everything before it.
    * ``outlier``: the perturbed output of ``unit`` feeds every later unit
      -> ``unit`` and everything after it. (Earlier units still see a
      perturbed loss; their triggers count as false positives.)

    >>> sorted(chain_rule_units("b", "grad_blowup", ["a", "b", "c"])), sorted(chain_rule_units("b", "outlier", ["a", "b", "c"]))
    (['a', 'b'], ['b', 'c'])
    """
    i = list(names).index(unit)
    return set(names[: i + 1]) if kind == "grad_blowup" else set(names[i:])


def detection_metrics(events: Sequence, trig: torch.Tensor, names: Sequence[str], warmup: int) -> dict:
    """Recall / false positives / latency of the controller's triggers against ground truth.

    ``trig`` is [steps, units]: row t is the trigger vector of the update that
    used step t's gradients, so a fault at step s detected in row s has latency 0.
    """
    steps = trig.shape[0]
    index = {n: i for i, n in enumerate(names)}
    explained = torch.zeros_like(trig)  # chain-rule set of a fault, inside its window
    strict = torch.zeros_like(trig)  # only the faulted unit, inside its window
    window = torch.zeros(steps, dtype=torch.bool)  # steps inside any fault's window
    per_event = []
    for s, unit, kind in events:
        if s >= steps:
            continue
        u = index[unit]
        hi = min(steps, s + DETECT_TOLERANCE + 1)
        hit = torch.nonzero(trig[s:hi, u]).flatten()
        per_event.append({"step": s, "unit": unit, "kind": kind,
                          "latency": int(hit[0]) if hit.numel() else None})
        strict[s:hi, u] = True
        window[s:hi] = True
        for v in chain_rule_units(unit, kind, names):
            explained[s:hi, index[v]] = True
    counted = torch.arange(steps) >= warmup
    unit_steps = len(names) * max(int(counted.sum()), 1)
    clean = counted & ~window
    clean_unit_steps = len(names) * max(int(clean.sum()), 1)
    detected = [e for e in per_event if e["latency"] is not None]
    fp = int((trig & ~explained).sum())
    fp_strict = int((trig & ~strict).sum())
    fp_clean = int(trig[clean].sum())
    by_kind = {}
    for kind in ("outlier", "grad_blowup"):
        ev = [e for e in per_event if e["kind"] == kind]
        by_kind[kind] = (sum(e["latency"] is not None for e in ev) / len(ev)) if ev else None
    return {
        "faults": len(per_event),
        "detected": len(detected),
        "recall": len(detected) / len(per_event) if per_event else float("nan"),
        "recall_by_kind": by_kind,
        "latency": statistics.fmean(e["latency"] for e in detected) if detected else float("nan"),
        "false_positives": fp,
        "fp_per_1k": 1000.0 * fp / unit_steps,
        "fp_strict_per_1k": 1000.0 * fp_strict / unit_steps,
        "fp_clean_per_1k": 1000.0 * fp_clean / clean_unit_steps,
        "unit_steps": unit_steps,
        "events": per_event,
    }


def summarize(runs: list, arms: Sequence[str], faults: bool) -> list:
    """Mean and std over seeds per arm; gaps are per seed against that seed's always_high."""
    high = {r["seed"]: r["final_val"] for r in runs if r["arm"] == "always_high"}
    out = []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        gaps = [100.0 * (r["final_val"] - high[r["seed"]]) / high[r["seed"]] for r in rs if r["seed"] in high]
        row = {"arm": arm, "seeds": len(rs)}
        for key, vals in (
            ("final_val", [r["final_val"] for r in rs]),
            ("best_val", [r["best_val"] for r in rs]),
            ("gap_pct", gaps),
            ("spikes", [r["spikes"] for r in rs]),
            ("high_unit_steps_pct", [r["high_unit_steps_pct"] for r in rs]),
            ("flop_high_pct", [r["flop_high_pct"] for r in rs]),
            ("wall_s", [r["wall_s"] for r in rs]),
        ):
            row[key] = _mean_std(vals)
        row["diverged"] = sum(r["diverged"] for r in rs)
        if faults and "detection" in rs[0]:
            d = [r["detection"] for r in rs]
            tot = sum(x["faults"] for x in d)
            row["recall"] = sum(x["detected"] for x in d) / tot if tot else float("nan")
            row["faults"] = tot
            row["fp_per_1k"] = _mean_std([x["fp_per_1k"] for x in d])
            row["fp_strict_per_1k"] = _mean_std([x["fp_strict_per_1k"] for x in d])
            row["fp_clean_per_1k"] = _mean_std([x["fp_clean_per_1k"] for x in d])
            lat = [e["latency"] for x in d for e in x["events"] if e["latency"] is not None]
            row["latency"] = statistics.fmean(lat) if lat else float("nan")
        out.append(row)
    return out


def _mean_std(vals: Sequence[float]) -> list:
    vals = [float(v) for v in vals]
    if not vals:
        return [float("nan"), float("nan")]
    if any(not math.isfinite(v) for v in vals):
        return [float("nan"), float("nan")]
    return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]


# ------------------------------------------------------------------ output
def format_tables(doc: dict) -> dict:
    from tabulate import tabulate

    term, md = [], []
    for key, sc in doc["scenarios"].items():
        cfg = sc["config"]
        title = (f"Scenario ({key}) {cfg['name']}: recipe {cfg['recipe']}, lr {cfg['lr']:g}, "
                 f"{len(sc['units'])} units, GNMR thresholds {cfg['threshold']:g} / {cfg['delta_threshold']:g}, "
                 f"seeds {doc['meta']['seeds']}")
        faults = cfg["faults"]
        head = ["arm", "final val", "best val", "gap %", "spikes", "diverged", "% unit-steps high",
                "% FLOPs high", "wall s"]
        if faults:
            head += ["recall (<=1 step)", "FP/1k (chain rule)", "FP/1k (strict)", "FP/1k (clean steps)", "latency"]
        rows = []
        for r in sc["summary"]:
            row = [r["arm"], _pm(r["final_val"], 3), _pm(r["best_val"], 3), _pm(r["gap_pct"], 2),
                   _pm(r["spikes"], 1), f"{r['diverged']}/{r['seeds']}", _pm(r["high_unit_steps_pct"], 2),
                   _pm(r["flop_high_pct"], 2), _pm(r["wall_s"], 1)]
            if faults:
                if r["arm"].startswith("gnmr"):
                    row += [f"{r['recall'] * 100:.0f}% of {r['faults']}", _pm(r["fp_per_1k"], 2),
                            _pm(r["fp_strict_per_1k"], 2), _pm(r["fp_clean_per_1k"], 2), f"{r['latency']:.2f}"]
                else:
                    row += ["-", "-", "-", "-", "-"]
            rows.append(row)
        term.append(title + "\n" + tabulate(rows, headers=head, tablefmt="simple"))
        md.append(f"**{title}**\n\n" + tabulate(rows, headers=head, tablefmt="github"))
        if sc["pretrain"]:
            pv = ", ".join(f"seed {x['seed']}: {x['final_val']:.3f}" for x in sc["pretrain"])
            note = f"checkpoint (always_high, {sc['pretrain'][0]['steps']} steps) val loss: {pv}"
            term.append(note)
            md.append(note)
    return {"terminal": "\n\n".join(term), "markdown": "\n\n".join(md) + "\n"}


def _pm(ms: Sequence[float], nd: int) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "nan"
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def plot(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(doc["scenarios"])
    for key in keys:
        sc = doc["scenarios"][key]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        for arm in doc["meta"]["arms"]:
            rs = [r for r in sc["runs"] if r["arm"] == arm]
            if not rs:
                continue
            n = min(len(r["train_loss"]) for r in rs)
            mean = torch.tensor([r["train_loss"][:n] for r in rs]).mean(0)
            ax1.plot(_ema(mean.tolist(), 0.9), label=arm, lw=1.6 if arm.startswith("gnmr") else 1.0,
                     ls="-" if arm.startswith(("gnmr", "always")) else "--")
            steps = [s for s, _ in rs[0]["val"]]
            m = min(len(r["val"]) for r in rs)
            vmean = torch.tensor([[v for _, v in r["val"][:m]] for r in rs]).mean(0)
            ax2.plot(steps[:m], vmean.tolist(), marker="o", ms=3, label=arm)
        ax1.set(title=f"({key}) {sc['config']['name']}: training loss (EMA 0.9, mean of seeds)",
                xlabel="step", ylabel="loss (nats/byte)")
        ax2.set(title="validation loss (mean of seeds)", xlabel="step", ylabel="loss (nats/byte)")
        ax2.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"loss_{key}.png", dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sc = doc["scenarios"][key]
        for r in sc["summary"]:
            x, xs = r["flop_high_pct"]
            y, ys = r["gap_pct"]
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            ax.errorbar(x, y, xerr=xs, yerr=ys, fmt="o" if r["arm"].startswith("gnmr") else "s", ms=4, capsize=2)
            ax.annotate(r["arm"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0.0, color="gray", lw=0.6)
        ax.set(title=f"({key}) {sc['config']['name']}", xlabel="% FLOPs on the high path",
               ylabel="val-loss gap to always_high (%)")
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    plt.close(fig)
    if doc["meta"].get("lrs"):
        plot_lr_sweep(doc, out)


def lr_sweep_table(doc: dict) -> dict:
    """{base scenario: {arm: [(lr, mean final val, diverged runs, runs)]}} of an LR sweep."""
    table: dict = {}
    for sc in doc["scenarios"].values():
        base, lr = sc["config"]["key"], sc["config"]["lr"]
        for r in sc["summary"]:
            vals = [x["final_val"] for x in sc["runs"] if x["arm"] == r["arm"]]
            finite = [v for v in vals if v is not None and math.isfinite(v) and v < math.log(256)]
            mean = statistics.fmean(finite) if finite else float("nan")
            table.setdefault(base, {}).setdefault(r["arm"], []).append((lr, mean, r["diverged"], r["seeds"]))
    for arms in table.values():
        for rows in arms.values():
            rows.sort()
    return table


def plot_lr_sweep(doc: dict, out: Path) -> None:
    """Final val loss against LR per arm (Wortsman et al. 2023's LR sensitivity);
    an x marks an LR where some seed diverged."""
    import matplotlib.pyplot as plt

    table = lr_sweep_table(doc)
    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4), squeeze=False)
    for ax, (base, arms) in zip(axes[0], table.items()):
        for arm, rows in arms.items():
            lrs = [r[0] for r in rows]
            ax.plot(lrs, [r[1] for r in rows], marker="o", ms=3, label=arm)
            bad = [(r[0], r[1]) for r in rows if r[2]]
            if bad:
                ax.scatter([b[0] for b in bad], [b[1] if math.isfinite(b[1]) else math.log(256) for b in bad],
                           marker="x", color="red", zorder=5)
        ax.set_xscale("log")
        ax.set(title=f"({base}) LR sweep: final val loss", xlabel="peak LR", ylabel="val loss (nats/byte)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lr_sweep.png", dpi=110)
    plt.close(fig)


def _ema(xs: Sequence[float], beta: float) -> list:
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


class ProgressBar:
    """A one-line stderr progress bar (redrawn in place on a terminal, else
    printed at every 25%)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, max(total, 1)
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self._last_quarter = -1

    def update(self, n: int, loss: float) -> None:
        frac = n / self.total
        if self.tty:
            filled = int(24 * frac)
            sys.stderr.write(f"\r{self.label:<24} |{'#' * filled}{'.' * (24 - filled)}| {n}/{self.total} "
                             f"loss {loss:.3f} {time.perf_counter() - self.t0:.0f}s")
            sys.stderr.flush()
        elif int(frac * 4) > self._last_quarter:
            self._last_quarter = int(frac * 4)
            print(f"{self.label:<24} {n}/{self.total} loss {loss:.3f} {time.perf_counter() - self.t0:.0f}s",
                  file=sys.stderr, flush=True)

    def close(self, wall: float) -> None:
        if self.tty:
            sys.stderr.write(f"  done {wall:.1f}s\n")
            sys.stderr.flush()


# ----------------------------------------------------------------- helpers
def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% (nanoGPT's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def use_deterministic_kernels() -> None:
    """What ``--deterministic`` sets in a worker before anything compiles."""
    import torch._inductor.config as inductor_config

    from gnmr_fx.arguments import InputError

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if not hasattr(inductor_config, "deterministic"):
        raise InputError(f"--deterministic: this torch ({torch.__version__}) has no Inductor deterministic mode; "
                         "run without --deterministic")
    inductor_config.deterministic = True


def weights_digest(weights: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes: equal digests
    are bitwise-equal checkpoints (what tells two calls' pretraining apart)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(weights):
        t = weights[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _weights(model: torch.nn.Module) -> dict:
    """The model's own tensors (no ``_gnmr.*`` controller keys), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("_gnmr.")}


def _scenario_arg(text: str) -> str:
    """``e`` or ``e-mxfp4`` (scenario e with recipe mxfp4), checked for argparse."""
    from gnmr_fx.backends.recipes import get_recipe

    key, _, recipe = text.partition("-")
    if key not in SCENARIOS:
        raise argparse.ArgumentTypeError(f"unknown scenario {key!r} (choose from {', '.join(SCENARIOS)})")
    if recipe:
        try:
            get_recipe(recipe)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _select_scenarios(names: Sequence[str]) -> dict:
    """Scenario key -> Scenario; ``e-mxfp4`` is scenario e under its own key with recipe mxfp4."""
    out = {}
    for name in names:
        key, _, recipe = name.partition("-")
        s = SCENARIOS[key]
        out[name] = dataclasses.replace(s, key=name, recipe=recipe) if recipe else s
    return out


def _apply_overrides(scenarios: dict, overrides: Sequence[str]) -> dict:
    """Scenarios with ``--set S.FIELD=VALUE`` applied; a bad item raises InputError.

    >>> _apply_overrides({"a": SCENARIOS["a"]}, ["a.lr=1e-3", "a.recipe=nvfp4"])["a"].lr
    0.001
    """
    from gnmr_fx.arguments import InputError, positive_float, recipe_name, user_input
    from gnmr_fx.config import GNMRConfig

    fields = ("recipe", "lr", "pretrain_lr", "threshold", "delta_threshold")
    for item in overrides:
        try:
            lhs, value = item.split("=", 1)
            key, name = lhs.split(".", 1)
        except ValueError:
            raise InputError(f"--set expects S.FIELD=VALUE, e.g. a.lr=3e-3 (got {item!r})") from None
        if key not in scenarios:
            raise InputError(f"--set {item!r}: scenario {key!r} is not selected ({sorted(scenarios)})")
        if name not in fields:
            raise InputError(f"--set {item!r}: only {', '.join(fields)} can be overridden")
        with user_input(f"--set {item!r}"):
            if name == "recipe":
                v: Any = recipe_name(value)
            elif name in ("lr", "pretrain_lr"):
                v = positive_float(value)
            else:  # thresholds: GNMRConfig says what range it takes
                v = float(value)
                GNMRConfig(**{name: v})
        scenarios[key] = dataclasses.replace(scenarios[key], **{name: v})
    return scenarios


def _preset_dict(p: Preset) -> dict:
    d = dataclasses.asdict(p)
    d["model"] = dataclasses.asdict(p.model)
    return d


def _preset_from_dict(d: dict) -> Preset:
    d = dict(d)
    d["model"] = GPTConfig(**d["model"])
    return Preset(**d)


def _machine() -> dict:
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _finite_json(o: Any) -> Any:
    """JSON has no NaN / inf: they become null (a missing or undefined value)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_json(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
