"""Integrations with other libraries (layer 4: they may use the public facade, ``import gnmr_fx``)."""
