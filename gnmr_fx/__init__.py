"""gnmr_fx: run-time stability control for low-precision training (GNMR).

Quick start::

    model = gnmr_fx.compile(model, optimizer=opt)

See the README for what GNMR measures and how it decides.
"""

from gnmr_fx import distributed
from gnmr_fx.api import compile, controller, runtime
from gnmr_fx.backends.recipes import Recipe, get_recipe, recipe_names as recipes, register_recipe
from gnmr_fx.config import GNMRConfig
from gnmr_fx.controller import GNMRController

__version__ = "0.1.0"

# Tools with heavier or optional dependencies load on first use.
_LAZY = {
    "inspect": ("gnmr_fx.inspection", "inspect"),
    "diff": ("gnmr_fx.diffing", "diff"),
    "export_onnx": ("gnmr_fx.onnx_export", "export_onnx"),
    "generate": ("gnmr_fx.generation", "generate"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'gnmr_fx' has no attribute {name!r}")


__all__ = [
    "GNMRConfig",
    "GNMRController",
    "Recipe",
    "compile",
    "controller",
    "diff",
    "distributed",
    "export_onnx",
    "generate",
    "inspect",
    "get_recipe",
    "recipes",
    "register_recipe",
    "runtime",
]
