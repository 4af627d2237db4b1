"""Hooking the FP8 cache into transformers: ``attach(model)`` and the keyword shim for ``generate``.

transformers reuses one cache object for every prompt of a pipeline call, and its ``generate`` cannot be told to
build a third-party cache (``cache_implementation`` accepts only its own strings). ``attach`` therefore wraps the
model's ``generate``: every call that brings no cache of its own gets a fresh ``QuantizedFP8Cache`` -- so
``pipeline(...)`` over many prompts, and plain ``model.generate(...)``, use FP8 without sharing state.

``attach(model, static=True)`` does for the FP8 cache what ``cache_implementation="static"`` does for transformers'
bf16 one: each call gets an ``FP8StaticCache`` sized from the call itself (prompt plus ``max_new_tokens``, or
``max_length``), which ``generate`` compiles on CUDA, so a user who never picks a maximum length still gets the
compiled decode step. The size is rounded up to a bucket (``static_cache_length``: four sizes per doubling, at least
``MIN_STATIC_LENGTH`` tokens) and the cache is kept on the model: the next call of the same batch (times beams /
returned sequences) and bucket resets and reuses it, and with it ``generate``'s compiled graphs (a new cache object
would compile again); another batch or bucket gets a new cache, which replaces the kept one. The rounding costs at
most a quarter more bytes than the call needs (in FP8, at most 0.625 of a bf16 cache of the exact size).
"""

from __future__ import annotations

import functools
import inspect

import torch

from .cache import QuantizedFP8Cache
from .contract import ATTENTION_NAME
from .decode_graphs import DecodeGraphs
from .static_cache import FP8StaticCache

__all__ = ["MIN_STATIC_LENGTH", "attach", "detach", "cache_keyword", "static_cache_length"]

_ORIGINAL = "__hf_fp8cache_original__"  # the attribute of our generate wrapper that holds the model's own generate
MIN_STATIC_LENGTH = 256  # the smallest static cache attach(static=True) makes, in tokens
_BUCKETS_PER_OCTAVE = 4  # static cache sizes between two powers of two: at most 25 % spare, few sizes to compile


def static_cache_length(tokens: int) -> int:
    """The static cache length ``attach(static=True)`` makes for ``tokens``: the next multiple of an eighth of the
    power of two at or above ``tokens`` (so four sizes between two powers of two, at most a quarter spare beyond
    ``tokens`` > 256), at least ``MIN_STATIC_LENGTH``. 4161 tokens (4096 + 65) get 5120; 300 get 320."""
    power = 1 << (max(tokens, MIN_STATIC_LENGTH) - 1).bit_length()
    step = power // (2 * _BUCKETS_PER_OCTAVE)
    return max(MIN_STATIC_LENGTH, -(-tokens // step) * step)


def cache_keyword(model) -> str:
    """The name this transformers version uses for the cache argument: ``cache`` (>= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def attach(model, *, attention: bool = False, static: bool = False, cuda_graphs: bool = False, **cache_kwargs):
    """Make every ``model.generate`` call without an explicit cache use a fresh ``QuantizedFP8Cache`` -- or, with
    ``static=True``, an ``FP8StaticCache`` sized for the call and kept for the next one (see the module docstring).
    With ``cuda_graphs=True`` (and ``static=True``) ``generate`` replays its decode steps as CUDA graphs instead of
    compiling them (``decode_graphs.py``: no compile time, the eager kernels).

    ``cache_kwargs`` go to the cache (``kv_cache_dtype``, ``calculate_kv_scales``, ``strategy``, ``scales``, ...;
    ``max_batch_size`` too with ``static``); the model's config is passed for you. ``attention=True`` also switches
    the model to the attention that reads FP8 directly (``attn_implementation="hf_fp8cache"``). Calls that pass
    their own cache, ``use_cache=False`` or a ``cache_implementation`` are left alone. Returns the model;
    ``detach(model)`` undoes the generate hook (not the attention implementation).
    """
    for name, value in (("static", static), ("cuda_graphs", cuda_graphs)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if cuda_graphs and not static:
        raise ValueError("cuda_graphs=True replays the decode steps of a static cache: pass static=True too")
    if static:  # validate the arguments now, not at the first generate
        FP8StaticCache(model.config, MIN_STATIC_LENGTH, **cache_kwargs)
    else:
        QuantizedFP8Cache(config=model.config, **cache_kwargs)
    if attention:
        model.set_attn_implementation(ATTENTION_NAME)
    detach(model)
    original = model.generate
    keyword = cache_keyword(model)
    kept: dict[tuple[int, int], FP8StaticCache] = {}  # the static cache of the last call, by (batch, length)

    def static_cache(args: tuple, kwargs: dict) -> FP8StaticCache:
        key = _static_cache_key(model, args, kwargs)
        cache = kept.get(key)
        if cache is None:
            kept.clear()  # one kept cache at a time, as transformers keeps one for cache_implementation="static"
            cache = kept[key] = FP8StaticCache(model.config, key[1], **cache_kwargs)
        else:
            cache.reset()
        return cache

    @functools.wraps(original)
    def generate(*args, **kwargs):
        wants_own_cache = (
            kwargs.get("cache") is None
            and kwargs.get("past_key_values") is None
            and kwargs.get("use_cache", True) is not False
            and kwargs.get("cache_implementation") is None
        )
        if wants_own_cache:
            if static:
                kwargs[keyword] = static_cache(args, kwargs)
            else:
                kwargs[keyword] = QuantizedFP8Cache(config=model.config, **cache_kwargs)
        return original(*args, **kwargs)

    setattr(generate, _ORIGINAL, original)
    model.generate = generate
    if cuda_graphs:
        graphs, compiled_call = DecodeGraphs(model), model.get_compiled_call

        def get_compiled_call(compile_config):  # generate's hook for its decode steps
            graphs.fallback = compiled_call(compile_config)
            return graphs

        setattr(get_compiled_call, _ORIGINAL, compiled_call)
        model.get_compiled_call = get_compiled_call
    return model


def _static_cache_key(model, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(batch rows the cache will hold, its length) for one generate call: the prompt's rows times the beams or
    returned sequences ``generate`` expands them to, and the prompt plus ``max_new_tokens`` (else ``max_length``,
    which counts the prompt) rounded up by ``static_cache_length``."""
    config = kwargs.get("generation_config") or model.generation_config

    def setting(name: str):
        value = kwargs.get(name)
        return getattr(config, name, None) if value is None else value

    prompt = args[0] if args else next((kwargs[k] for k in ("input_ids", "inputs") if kwargs.get(k) is not None), None)
    if prompt is None:
        prompt = kwargs.get("inputs_embeds")
    if not isinstance(prompt, torch.Tensor) or prompt.dim() < 2:
        raise ValueError(
            "attach(static=True) sizes the cache from the prompt: pass input_ids (or inputs_embeds) as a [batch, "
            f"tokens] tensor, got {type(prompt).__name__}"
        )
    max_new_tokens = setting("max_new_tokens")
    length = prompt.shape[1] + max_new_tokens if max_new_tokens is not None else setting("max_length")
    if not isinstance(length, int) or length <= prompt.shape[1]:
        raise ValueError(
            f"attach(static=True) needs max_new_tokens >= 1 or max_length above the prompt's {prompt.shape[1]} "
            f"tokens, got max_new_tokens={max_new_tokens!r}, max_length={setting('max_length')!r}"
        )
    rows = prompt.shape[0] * max(setting("num_beams") or 1, setting("num_return_sequences") or 1)
    return rows, static_cache_length(length)


def detach(model):
    """Undo ``attach``: ``model.generate`` is the model's own again. Returns the model."""
    original = getattr(model.generate, _ORIGINAL, None)
    if original is not None:
        del model.generate  # the instance attribute; the class's generate shows through again
    if hasattr(model.__dict__.get("get_compiled_call"), _ORIGINAL):  # attach(cuda_graphs=True)'s hook
        del model.get_compiled_call
    return model
