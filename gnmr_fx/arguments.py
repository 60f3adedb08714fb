"""What a user types: the error that marks bad input, and the argument types
the ``gnmr-fx`` subcommands share.

``gnmr-fx`` (``gnmr_fx/cli.py``) turns an :class:`InputError` into one line,
``gnmr-fx <sub>: error: <message>``, and exit code 2. Any other exception is
a bug and keeps its traceback, so code raises ``InputError`` only where it
checks what the user gave: a flag, a SPEC, a file. Checks that can run on
the flag alone run at parse time, as ``argparse`` ``type=`` functions.

>>> parse_max_o("2"), parse_max_o("0"), parse_max_o("0.05"), parse_max_o("5%")
(2, 0, 0.05, 0.05)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from typing import Iterator, Union

import torch


class InputError(ValueError, argparse.ArgumentTypeError):
    """Bad user input (a flag, a SPEC, a file), said in one sentence.

    A ``ValueError``, so library callers that catch ``ValueError`` still
    do. Also an ``argparse.ArgumentTypeError``, so a ``type=`` function that
    raises it gets its message printed as is (argparse replaces a plain
    ``ValueError``'s message with ``invalid <type> value``).

    >>> parse_max_o("1.5")
    Traceback (most recent call last):
    ...
    gnmr_fx.arguments.InputError: max_o '1.5' is neither a unit count (an integer such as 2) nor a FLOP fraction in (0, 1) (such as 0.05 or 5%)
    """


@contextlib.contextmanager
def user_input(what: str = "") -> Iterator[None]:
    """Treat a ``ValueError`` / ``TypeError`` raised inside as the user's input error.

    Wrap only code that validates what the user gave (e.g. building a
    ``GNMRConfig`` from flags), never code that does the work: a bug there
    must keep its traceback.

    >>> from gnmr_fx.config import GNMRConfig
    >>> with user_input("--recipe"):
    ...     GNMRConfig(recipe="fp7")
    Traceback (most recent call last):
    ...
    gnmr_fx.arguments.InputError: --recipe: unknown recipe 'fp7'; registered recipes: ...
    """
    try:
        yield
    except InputError:
        raise
    except (ValueError, TypeError) as e:
        raise InputError(f"{what}: {e}" if what else str(e)) from e


MaxO = Union[int, float]


def parse_max_o(text: str) -> MaxO:
    """The budget ``max_o`` from its command-line spelling, as ``GNMRConfig.max_o`` takes it.

    An integer is a count of units (``"2"``; ``"0"`` keeps every unit on the low path); a
    decimal or a percentage is a fraction of the units' forward FLOPs
    (``"0.05"`` and ``"5%"`` are the same budget). ``"2.0"`` is not a count:
    a budget in units is written as an integer.
    """
    s = str(text).strip()
    kind = "count"
    try:
        if s.endswith("%"):
            kind, value = "fraction", float(s[:-1]) / 100.0
        else:
            try:
                value = int(s)
            except ValueError:
                kind, value = "fraction", float(s)
    except ValueError:
        value = None
    ok = value is not None and (value >= 0 if kind == "count" else 0.0 < value < 1.0)
    if not ok:
        raise InputError(
            f"max_o {text!r} is neither a unit count (an integer such as 2) nor a FLOP fraction "
            "in (0, 1) (such as 0.05 or 5%)"
        )
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, repetitions, workers)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"expected an integer >= 1, got {text!r}")
    return n


def positive_float(text: str) -> float:
    """A finite float > 0 (a learning rate)."""
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise InputError(f"expected a finite number > 0, got {text!r}")
    return x


def recipe_name(text: str) -> str:
    """A registered low-path recipe (``gnmr_fx.recipes()`` lists them)."""
    from gnmr_fx.backends.recipes import get_recipe

    with user_input():
        get_recipe(text)
    return text


def parse_device(text: str) -> str:
    """A device this machine has (``cpu``, ``cuda``, ``cuda:1`` ...), returned as given.

    A string, not a ``torch.device``, so it can go into JSON results and to
    worker processes as is.
    """
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {text!r} (e.g. cpu, cuda, cuda:1)") from None
    module = getattr(torch, dev.type, None)
    available = getattr(module, "is_available", None)
    if dev.type != "cpu" and available is not None and not available():
        raise InputError(f"device {text!r}: this machine has no {dev.type} device (torch {torch.__version__})")
    count = getattr(module, "device_count", None)
    if dev.index is not None and count is not None and dev.type != "cpu" and dev.index >= count():
        raise InputError(f"device {text!r}: this machine has {count()} {dev.type} device(s)")
    return text


def output_file(text: str) -> str:
    """A file path to write later: its folder must exist now, not after the run."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {text!r}: folder {folder!r} does not exist")
    if os.path.isdir(text):
        raise InputError(f"cannot write {text!r}: it is a folder")
    return text
