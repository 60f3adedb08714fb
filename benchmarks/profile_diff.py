"""Group the per-kernel profile of a ``bench perf --profile`` JSON by kernel kind.

    python benchmarks/profile_diff.py benchmarks/results/perf_h100_tensorwise.json --size 70b
    python benchmarks/profile_diff.py <bench emulation --profile JSON, on a GPU>   # no --size

Prints device ms per step and kernel count per kind for each profiled arm,
so the gap between two arms can be attributed to kinds of kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys


def kind(name: str) -> str:
    if name.startswith("triton_poi"):
        return "triton pointwise (casts, fused elementwise)"
    if name.startswith(("triton_red", "triton_per")):
        if "pow_sum" in name and "amax" not in name and "nll" not in name:
            return "triton reduction: sum of squares (GNMR statistics, RMSNorm backward)"
        return "triton reduction (amax, norms, loss)"
    if "nvjet" in name or "gemm" in name.lower() or "cutlass" in name.lower() or "xmma" in name:
        return "GEMM"
    if "flash" in name.lower() or "fmha" in name.lower():
        return "attention"
    if "multi_tensor" in name:
        return "optimizer (foreach)"
    if name.startswith("Memcpy"):
        return name
    if name.startswith("Optimizer."):
        return None  # an annotation spanning the optimizer's kernels: counted there
    if name.startswith("Memset"):
        return "memset"
    return "other small kernels (controller, probe)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--size", help="the size (bench perf JSON); none for a bench emulation JSON")
    args = ap.parse_args(argv)
    prof = json.load(open(args.json))["profiles"]
    if args.size is not None:
        prof = prof[args.size]
    prof = {arm: p for arm, p in prof.items() if "per_kernel_ms" in p}
    if not prof:
        print(f"profile_diff: no per-kernel profile in {args.json} (a GPU run with --profile has one)",
              file=sys.stderr)
        return 2
    table = {}
    for arm, p in prof.items():
        acc = collections.defaultdict(lambda: [0.0, 0])
        for name, (ms, n) in p["per_kernel_ms"].items():
            k = kind(name)
            if k is not None:
                acc[k][0] += ms
                acc[k][1] += n
        table[arm] = acc
    arms = list(table)
    kinds = sorted(set().union(*table.values()))
    print(f"| kind ({args.size or 'emulation'}, device ms / kernels per step) | " + " | ".join(arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    for k in kinds + ["total"]:
        cells = []
        for a in arms:
            ms, n = (sum(v[0] for v in table[a].values()), sum(v[1] for v in table[a].values())) \
                if k == "total" else table[a].get(k, [0.0, 0])
            cells.append(f"{ms:.2f} / {n}")
        print(f"| {k} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
