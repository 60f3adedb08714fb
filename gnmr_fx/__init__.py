"""gnmr_fx: run-time stability control for low-precision training (GNMR).

Quick start::

    model = gnmr_fx.compile(model, optimizer=opt)

See the README for what GNMR measures and how it decides. This module is
the public facade, for users, the tools (``gnmr_fx.tools``), the benchmarks
and the CLI; the library's own layers import the modules they need. Its
names load on first use (PEP 562), so ``import gnmr_fx.passes`` imports the
passes and what they use, not the whole API.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# Public name -> (module, attribute); None: the module itself.
_EXPORTS: dict[str, tuple[str, Any]] = {
    "GNMRConfig": ("gnmr_fx.config", "GNMRConfig"),
    "GNMRController": ("gnmr_fx.controller", "GNMRController"),
    "Recipe": ("gnmr_fx.backends.recipes", "Recipe"),
    "compile": ("gnmr_fx.api", "compile"),
    "controller": ("gnmr_fx.api", "controller"),
    "runtime": ("gnmr_fx.api", "runtime"),
    "diff": ("gnmr_fx.tools.diff", "diff"),
    "distributed": ("gnmr_fx.distributed", None),
    "export_onnx": ("gnmr_fx.tools.export", "export_onnx"),
    "faults": ("gnmr_fx.faults", None),
    "inspect": ("gnmr_fx.tools.inspect", "inspect"),
    "profile": ("gnmr_fx.tools.profile", "profile"),
    "get_recipe": ("gnmr_fx.backends.recipes", "get_recipe"),
    "recipes": ("gnmr_fx.backends.recipes", "recipe_names"),
    "register_recipe": ("gnmr_fx.backends.recipes", "register_recipe"),
    "generate": ("gnmr_fx.tools.generate", "generate"),
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'gnmr_fx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Facade(types.ModuleType):
    """Keeps the facade's functions ``gnmr_fx.runtime`` and
    ``gnmr_fx.controller`` what they are when their namesake modules
    (``gnmr_fx/runtime.py``, ``gnmr_fx/controller.py``) load: Python's import
    system would otherwise set the package attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        export = _EXPORTS.get(name)
        if export is not None and export[1] is not None and isinstance(value, types.ModuleType):
            return  # the module stays reachable as sys.modules["gnmr_fx." + name]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Facade

__all__ = sorted(_EXPORTS)
