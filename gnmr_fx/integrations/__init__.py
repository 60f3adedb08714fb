"""Glue between gnmr_fx and the tools users train with (layer 4: may use the public facade,
``import gnmr_fx``).

Each module imports its library on import and is never imported by the rest
of gnmr_fx, so the library stays an optional extra:

* :mod:`gnmr_fx.integrations.transformers`: ``GNMRCallback`` for Hugging
  Face ``transformers.Trainer`` (``pip install "gnmr-fx[hf]"``).
"""
