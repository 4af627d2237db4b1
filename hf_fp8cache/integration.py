"""Hooking the FP8 cache into transformers: ``attach(model)`` and the keyword shim for ``generate``.

transformers reuses one cache object for every prompt of a pipeline call, and its ``generate`` cannot be told to
build a third-party cache (``cache_implementation`` accepts only its own strings). ``attach`` therefore wraps the
model's ``generate``: every call that brings no cache of its own gets a fresh ``QuantizedFP8Cache`` -- so
``pipeline(...)`` over many prompts, and plain ``model.generate(...)``, use FP8 without sharing state.
"""

from __future__ import annotations

import functools
import inspect

from .cache import QuantizedFP8Cache
from .contract import ATTENTION_NAME

__all__ = ["attach", "detach", "cache_keyword"]

_ORIGINAL = "__hf_fp8cache_original__"  # the attribute of our generate wrapper that holds the model's own generate


def cache_keyword(model) -> str:
    """The name this transformers version uses for the cache argument: ``cache`` (>= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def attach(model, *, attention: bool = False, **cache_kwargs):
    """Make every ``model.generate`` call without an explicit cache use a fresh ``QuantizedFP8Cache``.

    ``cache_kwargs`` go to ``QuantizedFP8Cache`` (``kv_cache_dtype``, ``calculate_kv_scales``, ``strategy``,
    ``scales``, ...); the model's config is passed for you. ``attention=True`` also switches the model to the
    attention that reads FP8 directly (``attn_implementation="hf_fp8cache"``). Calls that pass their own cache,
    ``use_cache=False`` or a ``cache_implementation`` are left alone. Returns the model; ``detach(model)`` undoes
    the generate hook (not the attention implementation).
    """
    QuantizedFP8Cache(config=model.config, **cache_kwargs)  # validate the arguments now, not at the first generate
    if attention:
        model.set_attn_implementation(ATTENTION_NAME)
    detach(model)
    original = model.generate
    keyword = cache_keyword(model)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        wants_own_cache = (
            kwargs.get("cache") is None
            and kwargs.get("past_key_values") is None
            and kwargs.get("use_cache", True) is not False
            and kwargs.get("cache_implementation") is None
        )
        if wants_own_cache:
            kwargs[keyword] = QuantizedFP8Cache(config=model.config, **cache_kwargs)
        return original(*args, **kwargs)

    setattr(generate, _ORIGINAL, original)
    model.generate = generate
    return model


def detach(model):
    """Undo ``attach``: ``model.generate`` is the model's own again. Returns the model."""
    original = getattr(model.generate, _ORIGINAL, None)
    if original is not None:
        del model.generate  # the instance attribute; the class's generate shows through again
    return model
