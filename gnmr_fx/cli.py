"""``gnmr-fx``: the command line.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
Modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

SUBCOMMANDS = {
    "demo": ("gnmr_fx.demo", "train a tiny GPT on offline text: always_high vs always_low vs gnmr"),
    "inspect": ("gnmr_fx.inspection", "list the recoverable units of a model"),
    "diff": ("gnmr_fx.diffing", "diff a graph before/after the GNMR pass, or under two configs"),
    "report": ("gnmr_fx.telemetry", "summarize a telemetry file and plot it"),
}
BENCHMARKS = {
    "perf": ("gnmr_fx.benchmarks.perf", "throughput of bf16 / fp8 / fp8+GNMR (GPU)"),
    "stability": ("gnmr_fx.benchmarks.stability", "does GNMR keep low-precision training on track"),
    "overhead": ("gnmr_fx.benchmarks.overhead", "controller cost per step vs number of units (CPU)"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gnmr-fx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        _add_args(module, p)
    bench = sub.add_parser("bench", help="run a benchmark (perf, stability, overhead)")
    bsub = bench.add_subparsers(dest="benchmark", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        p = bsub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        _add_args(module, p)
    args = parser.parse_args(argv)
    mod = importlib.import_module(args._module)
    return int(mod.run(args) or 0)


def _add_args(module: str, parser: argparse.ArgumentParser) -> None:
    # Subcommand arguments are declared by their module; a module that is not
    # importable (missing optional extra) still gets a parser, and fails with
    # its import error only when that subcommand runs.
    try:
        mod = importlib.import_module(module)
    except ImportError:
        parser.add_argument("rest", nargs=argparse.REMAINDER)
        return
    mod.add_arguments(parser)


if __name__ == "__main__":
    sys.exit(main())
