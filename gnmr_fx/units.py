"""The unit table: one name per unit, stable across graphs and recompiles.

A *unit* is one call site of a matmul-family op (``passes.discover_units``
finds them as ``UnitSite`` s). The same site can appear in several captured
graphs (a recompile, a graph break, a module instance Dynamo reuses a graph
for); its ``key`` (module path, parameter name, source line) says it is the
same unit, so it gets the same name and the same controller row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.discover_units import UnitSite


@dataclass
class Unit:
    """A unit of the model (one call site of a matmul-family op)."""

    id: int
    name: str
    op: Any
    op_name: str
    weight: Optional[str]
    flops: int
    where: str
    included: bool
    a_shape: tuple
    b_shape: tuple


class UnitTable:
    """Every unit of one model, by key and by name; ``units`` in order of discovery."""

    def __init__(self, config: GNMRConfig) -> None:
        self.config = config
        self.units: list[Unit] = []
        self._by_key: dict[tuple, int] = {}
        self._by_name: dict[str, int] = {}

    def name_sites(self, sites: list[UnitSite]) -> list[Unit]:
        """Give each site its unit's name and id, creating units for new keys;
        returns the units of ``sites`` in graph order."""
        out = []
        for site in sites:
            uid = self._by_key.get(site.key)
            if uid is None:
                name = self._unique_name(site)
                uid = len(self.units)
                self.units.append(Unit(uid, name, site.op, site.spec.name, site.weight, site.flops, site.where,
                                       self.config.includes(name, site.op), site.a_shape, site.b_shape))
                self._by_key[site.key] = uid
                self._by_name[name] = uid
            unit = self.units[uid]
            site.name, site.unit_id = unit.name, uid
            out.append(unit)
        return out

    def _unique_name(self, site: UnitSite) -> str:
        # Weightless units are numbered within their module and op
        # (attn.matmul, attn.matmul_1, ...); a weight used by several call
        # sites gets the same suffixes.
        name, k = site.base, 0
        while name in self._by_name:
            k += 1
            name = f"{site.base}_{k}"
        return name

    def check_filter(self) -> None:
        """Raise if a unit-filter pattern (or a filter callable) matched nothing."""
        cfg = self.config
        names = [u.name for u in self.units]
        if cfg.unit_filter is None or not names:
            return
        missing = cfg.unmatched_patterns(names)
        if missing:
            raise ValueError(
                f"GNMRConfig.unit_filter pattern(s) {missing} match no unit; "
                f"units are: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
            )
        if not any(u.included for u in self.units):
            raise ValueError(
                f"GNMRConfig.unit_filter {cfg.unit_filter!r} excludes every unit; units are: {', '.join(names[:20])}"
            )
