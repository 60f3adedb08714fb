"""The layer rule, read from the source: a module imports only from its own layer or lower.

Layers, lowest first (each folder's README states its rule):

0. ``backends/``: recipes, quantizers, real-kernel and dual-path ops (torch only);
1. ``gnmr_fx/config.py``, ``gnmr_fx/arguments.py``;
2. ``passes/``: the graph rewrites;
3. ``gnmr_fx/`` core: controller, runtime, backend, checkpoint, telemetry, distributed, ...;
4. ``gnmr_fx/tools/`` (and ``gnmr_fx/integrations/``): capture, inspect, diff, export, report;
5. ``benchmarks/``: perf, stability, demo, fault run, ...;
6. entry points: ``gnmr_fx/cli.py`` and the facade ``gnmr_fx/__init__.py``.

Every ``import`` and ``from ... import`` counts, at module level or inside a
function. ``import gnmr_fx`` (or ``from gnmr_fx import compile``) is the
public facade: layers 4 and up may use it, as users do; the library's own
layers import the modules they need.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Package folder -> the package name it installs as (pyproject.toml's package-dir).
FOLDERS = {"gnmr_fx": "gnmr_fx", "passes": "gnmr_fx.passes", "backends": "gnmr_fx.backends",
           "benchmarks": "gnmr_fx.benchmarks"}
FACADE = 6
NAMES = {0: "backends", 1: "config", 2: "passes", 3: "core", 4: "tools", 5: "benchmarks", 6: "entry points"}


def layer_of(module: str) -> int:
    """The layer of a gnmr_fx module, by its dotted name."""
    parts = module.split(".")
    if module == "gnmr_fx" or module == "gnmr_fx.cli":
        return FACADE
    sub = parts[1]
    if sub == "backends":
        return 0
    if sub in ("config", "arguments"):
        return 1
    if sub == "passes":
        return 2
    if sub in ("tools", "integrations"):
        return 4
    if sub == "benchmarks":
        return 5
    return 3


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imported(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, gnmr_fx module) of every import in the tree, resolved to a module name."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "gnmr_fx"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}:{node.lineno}: relative import"
            base = node.module or ""
            if base.split(".")[0] != "gnmr_fx":
                continue
            for a in node.names:
                # `from pkg import sub` imports a module when pkg.sub is one;
                # otherwise it is a name of pkg itself.
                full = f"{base}.{a.name}"
                out.append((node.lineno, full if full in MODULES else base))
    return out


def violations() -> list[str]:
    bad = []
    for module, path in MODULES.items():
        own = layer_of(module)
        for line, target in _imported(ast.parse(path.read_text(), str(path)), module):
            if target not in MODULES:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target}, which is not a module here")
                continue
            theirs = layer_of(target)
            allowed = theirs <= own or (target == "gnmr_fx" and own >= 4)
            if not allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line}: layer {own} ({NAMES[own]}) imports {target}, "
                           f"layer {theirs} ({NAMES[theirs]})")
    return bad


def test_imports_follow_the_layers():
    assert violations() == []


@pytest.mark.parametrize("module, layer", [
    ("gnmr_fx.backends.recipes", 0), ("gnmr_fx.config", 1), ("gnmr_fx.arguments", 1),
    ("gnmr_fx.passes.discover_units", 2), ("gnmr_fx.runtime", 3), ("gnmr_fx.backend", 3),
    ("gnmr_fx.tools.inspect", 4), ("gnmr_fx.benchmarks.perf", 5), ("gnmr_fx.cli", 6), ("gnmr_fx", 6),
])
def test_layer_of(module, layer):
    assert module in MODULES and layer_of(module) == layer


def test_the_check_finds_an_upward_import():
    # Negative case: a pass importing the runtime is reported with its line.
    tree = ast.parse("import torch\n\ndef f():\n    from gnmr_fx.runtime import GNMRRuntime\n")
    found = [(line, target) for line, target in _imported(tree, "gnmr_fx.passes.x")
             if layer_of(target) > layer_of("gnmr_fx.passes.x")]
    assert found == [(4, "gnmr_fx.runtime")]
    facade = _imported(ast.parse("import gnmr_fx\nfrom gnmr_fx import compile\n"), "gnmr_fx.runtime")
    assert facade == [(1, "gnmr_fx"), (2, "gnmr_fx")]


def test_importing_the_passes_leaves_the_api_unloaded():
    import subprocess
    import sys

    code = ("import sys, gnmr_fx.passes; "
            "print(sorted(m for m in sys.modules if m.startswith('gnmr_fx.') and m.split('.')[1] not in "
            "('passes', 'backends', 'config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
