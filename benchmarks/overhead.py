"""``gnmr-fx bench overhead``: the controller's cost per optimizer step vs number of units.

For each unit count (default 10 .. 1000) it times ``GNMRController.update``
(median of ``--reps`` updates after warm-up) and counts the aten ops one
update dispatches (a ``TorchDispatchMode``; on a GPU each op is at least one
kernel launch). It then fits the growth exponent of the time between the
smallest and largest unit count (1.0 = linear) and compares the update with
a reference training step (TinyGPT, emulated GNMR, eager).

    gnmr-fx bench overhead --units 10,30,100,300,1000 --out overhead.json
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import time
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _norms(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return (1.0 + 0.05 * torch.randn(n, generator=gen)).to(device)


def measure(n: int, reps: int, device: torch.device, warmup: int = 5, compiled: bool = False) -> dict:
    """Time and op count of one controller update over ``n`` units (the
    rule eager, or compiled: ``GNMRConfig.compile_controller``, whose ops
    run inside Inductor's kernels and are not counted)."""
    from gnmr_fx.config import GNMRConfig
    from gnmr_fx.controller import GNMRController

    gen = torch.Generator().manual_seed(n)
    ctl = GNMRController(n, GNMRConfig(warmup_steps=2, max_o=0.1, compile_controller=compiled), device=device)
    norms = [_norms(n, gen, device) for _ in range(reps + warmup)]
    # One spike per update after warm-up, so the trigger/admission path runs.
    for i, v in enumerate(norms):
        v[i % n] *= 10.0
    for v in norms[:warmup]:
        ctl.update(v)
    counter = _CountOps()
    if compiled:  # a dispatch mode cannot run around a compiled function
        ctl.update(norms[warmup])
    else:
        with counter:
            ctl.update(norms[warmup])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for v in norms[warmup + 1:]:
        sync()
        t0 = time.perf_counter()
        ctl.update(v)
        sync()
        times.append(1e6 * (time.perf_counter() - t0))
    if compiled:
        return {"update_us_compiled": statistics.median(times), "update_us_compiled_min": min(times)}
    return {"units": n, "update_us": statistics.median(times), "update_us_min": min(times),
            "ops_per_update": sum(counter.ops.values()), "distinct_ops": len(counter.ops)}


def reference_step_ms(reps: int = 3) -> float:
    """Median step time (forward + backward + SGD) of TinyGPT with emulated GNMR, eager."""
    import gnmr_fx
    from gnmr_fx.config import GNMRConfig
    from gnmr_fx.models import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cm = gnmr_fx.compile(model, GNMRConfig(recipe="fp8_e4m3"), backend="eager", optimizer=opt)
    idx = torch.randint(0, 256, (4, 64))
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        cm(idx, idx).backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def growth_exponent(rows: list[dict]) -> float:
    """Slope of log(time) against log(units) between the extremes (1.0 = linear)."""
    a, b = rows[0], rows[-1]
    if b["units"] == a["units"]:
        return 0.0
    return math.log(b["update_us"] / a["update_us"]) / math.log(b["units"] / a["units"])


def unit_counts(text: str) -> list[int]:
    """``--units``: a comma list of unit counts >= 1, sorted and deduplicated.

    >>> unit_counts("100,10, 30,10")
    [10, 30, 100]
    """
    from gnmr_fx.arguments import InputError

    try:
        units = sorted({int(u) for u in text.split(",") if u.strip()})
    except ValueError:
        units = []
    if not units or units[0] < 1:
        raise InputError(f"expected a comma list of unit counts >= 1 such as 10,100,1000, got {text!r}")
    return units


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gnmr_fx.arguments import output_file, parse_device, positive_int

    p.add_argument("--units", type=unit_counts, default=[10, 30, 100, 300, 1000],
                   help="comma list of unit counts (default 10,30,100,300,1000)")
    p.add_argument("--reps", type=positive_int, default=50, help="timed updates per unit count")
    p.add_argument("--device", type=parse_device, default="cpu")
    p.add_argument("--no-reference", action="store_true", help="skip the reference training step")
    p.add_argument("--compiled", action="store_true",
                   help="also time the rule compiled (GNMRConfig.compile_controller), after the eager one")
    p.add_argument("--out", type=output_file, default="overhead.json", help="JSON results")


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    units = args.units
    device = torch.device(args.device)
    torch.set_num_threads(1)  # the controller's tensors are tiny; threads only add noise
    rows = [measure(n, args.reps, device) for n in units]
    if args.compiled:
        for r in rows:
            r.update(measure(r["units"], args.reps, device, compiled=True))
            r["compiled_vs_eager"] = r["update_us_compiled"] / r["update_us"]
    ref: Optional[float] = None if args.no_reference else reference_step_ms()
    for r in rows:
        r["per_unit_us"] = r["update_us"] / r["units"]
        r["vs_step"] = (r["update_us"] / 1e3) / ref if ref else float("nan")
    expo = growth_exponent(rows)
    constant_ops = len({r["ops_per_update"] for r in rows}) == 1
    head = ["units", "update_us", "update_us_min", "per_unit_us", "ops_per_update", "distinct_ops", "vs_step"]
    if args.compiled:
        head += ["update_us_compiled", "compiled_vs_eager"]
    print(tabulate([[r[h] for h in head] for r in rows], headers=head, floatfmt=".3g"))
    print(f"growth exponent {expo:.2f} (1.0 = linear); ops per update constant: {constant_ops}"
          + (f"; reference step (TinyGPT, emulated GNMR, eager) {ref:.1f} ms" if ref else ""))
    result = {"device": str(device), "torch": torch.__version__, "rows": rows, "growth_exponent": expo,
              "constant_ops": constant_ops, "reference_step_ms": ref, "command": " ".join(sys.argv)}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    # Exit code 1 when the claim this benchmark exists to check fails.
    return 0 if constant_ops and expo <= 1.1 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
