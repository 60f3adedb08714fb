"""Rewrite counters: every pass bumps ``counters[pass_name][what]``; tests assert on them."""

import collections

counters: "collections.defaultdict[str, collections.Counter]" = collections.defaultdict(collections.Counter)
