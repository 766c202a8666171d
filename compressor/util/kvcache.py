"""transformers' KV cache across the versions compressor supports (5.17 to 5.25).

transformers 5.24 renamed the forward's `past_key_values=` to `cache=` (the old name warns) and the
output's `past_key_values` to `cache`; 5.17 knows only the old names. These helpers read the model's
signature and the output's fields, so every caller works on both without a warning.
"""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """The keyword this model's forward takes the KV cache under: "cache" or "past_key_values"."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(outputs):
    """The KV cache a forward returned, under either name."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


def new_cache(config):
    """An empty DynamicCache for the model's config (older transformers take no config)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older signature without config
        return DynamicCache()
