"""gnmr_fx: run-time stability control for low-precision training (GNMR).

Quick start::

    model = gnmr_fx.compile(model, optimizer=opt)

See the README for what GNMR measures and how it decides.
"""

from gnmr_fx.api import compile, controller, runtime
from gnmr_fx.backends.recipes import Recipe, get_recipe, recipe_names as recipes, register_recipe
from gnmr_fx.config import GNMRConfig
from gnmr_fx.controller import GNMRController

__version__ = "0.1.0"

__all__ = [
    "GNMRConfig",
    "GNMRController",
    "Recipe",
    "compile",
    "controller",
    "get_recipe",
    "recipes",
    "register_recipe",
    "runtime",
]
