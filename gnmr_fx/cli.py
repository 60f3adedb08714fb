"""``gnmr-fx``: the command line.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
Modules are imported only when their subcommand runs.

Errors: bad input is one line on stderr, ``gnmr-fx <sub>: error: ...``, and
exit code 2. Bad input is what argparse rejects, a
:class:`gnmr_fx.arguments.InputError` (raised where a subcommand checks a
flag, a SPEC or a file), or a missing / unreadable / unwritable file the
user named. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Optional, Sequence

from gnmr_fx.arguments import InputError

SUBCOMMANDS = {
    "demo": ("gnmr_fx.benchmarks.demo", "train a tiny GPT on offline text: always_high vs always_low vs gnmr"),
    "inspect": ("gnmr_fx.tools.inspect", "list the recoverable units of a model"),
    "diff": ("gnmr_fx.tools.diff", "diff a graph before/after the GNMR pass, or under two configs"),
    "report": ("gnmr_fx.tools.report", "summarize a telemetry file and plot it"),
}
BENCHMARKS = {
    "perf": ("gnmr_fx.benchmarks.perf", "throughput of bf16 / fp8 / fp8+GNMR (GPU)"),
    "stability": ("gnmr_fx.benchmarks.stability", "does GNMR keep low-precision training on track"),
    "overhead": ("gnmr_fx.benchmarks.overhead", "controller cost per step vs number of units (CPU)"),
    "emulation": ("gnmr_fx.benchmarks.emulation", "step time of emulated recipes under GNMR vs plain and fake-quant models"),
    "regimes": ("gnmr_fx.benchmarks.regime_table", "regime-search table from committed GPU stability results"),
    "triggers": ("gnmr_fx.benchmarks.trigger_report", "when and where GNMR triggered in stability runs, and the spikes"),
}
# OS errors about a path the user gave (a missing input, an unwritable --out):
# the user's to fix, so one line. Other OS errors are left to show a traceback.
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class _ArgumentsRejected(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors end in :func:`main`'s one-line report
    (argparse would print the usage block and exit from inside parsing)."""

    def error(self, message: str) -> NoReturn:
        raise _ArgumentsRejected(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gnmr-fx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module, _prog=p.prog)
        _add_args(module, p)
    bench = sub.add_parser("bench", help="run a benchmark (perf, stability, overhead, emulation, regimes)")
    bsub = bench.add_subparsers(dest="benchmark", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        p = bsub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module, _prog=p.prog)
        _add_args(module, p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``gnmr-fx``; returns the exit code (2 for bad input, one line on stderr).

    >>> main(["demo", "--steps", "0"])
    2
    """
    parser = build_parser()
    prog = parser.prog
    try:
        args, extra = parser.parse_known_args(argv)
        prog = args._prog
        if extra:
            raise _ArgumentsRejected(prog, f"unrecognized arguments: {' '.join(extra)}")
        try:
            mod = importlib.import_module(args._module)
        except ModuleNotFoundError as e:
            if not e.name or e.name.split(".")[0] == "gnmr_fx":
                raise  # our own module is missing: a broken install, not the user's input
            raise InputError(f"needs the package {e.name!r}, which is not installed") from e
        return int(mod.run(args) or 0)
    except _ArgumentsRejected as e:
        return _fail(e.prog, str(e))
    except InputError as e:
        return _fail(prog, str(e))
    except _PATH_ERRORS as e:
        if e.filename is None:
            raise
        return _fail(prog, f"{e.strerror}: {e.filename}")


def _fail(prog: str, message: str) -> int:
    # One line whatever the message: wrapped library messages are joined.
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2


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
