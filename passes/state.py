"""The names of the GNMR tensors the passes add to a graph, in one place.

A rewritten graph owns up to three tensors, as attributes of the
``GraphModule``:

* ``_gnmr_plan`` (:data:`PLAN`): bool buffer, one entry per slot, on the
  units' device; ``plan[slot]`` True runs the unit's high path. The runtime
  writes it in place once per optimizer step.
* ``_gnmr_probe`` (:data:`PROBE`): float32 parameter, one entry per slot. It
  is never read in forward: the grad-stats nodes send each unit's squared
  gradient norm into ``probe.grad[slot]``.
* ``_gnmr_plan_host`` (:data:`PLAN_HOST`): the plan's copy on the CPU, read
  by units with real low-precision kernels and by emulated units on a GPU
  under ``dispatch="host"`` (emulated CPU units read ``_gnmr_plan`` itself).

A unit's *slot* is its position in its graph's plan and probe (set by
``assign_slots``). Inspect, diff and export read these attributes; the
compile backend lifts them into trailing graph inputs.
"""

PLAN = "_gnmr_plan"
PROBE = "_gnmr_probe"
PLAN_HOST = "_gnmr_plan_host"
GNMR_STATE = (PROBE, PLAN, PLAN_HOST)
"""Every tensor a pass may add to a graph, in the order the backend lifts them."""

SLOTS = "gnmr_slots"
"""``gm.meta`` key: the number of slots ``assign_slots`` gave the graph's units."""
