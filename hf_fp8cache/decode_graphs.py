"""Decode steps of ``generate`` replayed as CUDA graphs, without torch.compile: ``attach(model, static=True,
cuda_graphs=True)``.

``generate`` runs each decode step through ``model.get_compiled_call(compile_config)`` when its cache is compileable
(an ``FP8StaticCache``) and the model is on a GPU, and the prefill through the model itself. ``attach`` replaces that
hook on the model with ``DecodeGraphs``: the model's decode forward, captured once per input signature as a CUDA
graph and replayed at every later step. An eager decode step spends 20-25 ms of host time (Python, dispatch and one
launch per kernel) on an 8B model whose kernels take far less; a replay is one graph launch plus a copy of each input
into the graph's buffers. Unlike ``torch.compile`` nothing is traced or generated: a capture costs one forward's
host time, where a compile takes tens of seconds per cache size; the kernels are the eager ones (no fusion).

What a graph bakes in, and why it stays valid:

- the cache's buffers, scales, lengths and row starts: ``FP8StaticCache`` keeps them at fixed addresses for its
  life (``reset()`` keeps them; they are written in place), and the graphs belong to one cache object (a new cache
  drops them);
- the model's weights (changed in place they are seen; the embeddings' addresses are part of the signature, so a
  model moved away and back captures anew; after replacing other modules, ``attach`` again), and the attention
  implementation (part of the signature);
- the inputs (``input_ids``, ``position_ids``, the 4D masks ``generate`` builds outside the forward for a
  compileable cache): copied into the graph's own tensors before each replay; their shapes, dtypes and devices, and
  every other argument's value, form the signature;
- the output: a fresh copy of the logits each step (the graph's own are overwritten by the next replay).

The first decode step of a signature runs eagerly (Triton compiles its kernels and the libraries make their
workspaces outside the capture); the second captures and replays. Anything else goes where ``generate`` would send
it, the model's own compiled call (``eager_reason``): caches with layers other than ``FP8StaticLayer`` and the
sliding-window rings our attention reads in place (hybrid states, rings handed to another attention, transformers'
static cache), models off the GPU or over several devices (``device_map``,
tensor parallelism), requests for attentions or hidden states (``generate`` keeps them across steps), arguments that
are neither tensors nor plain values. A capture that fails warns and leaves that signature eager.

A replay runs no Python: what a step's ``update`` changes on the host must be advanced by hand. Full static layers
change nothing there; a sliding ring counts its tokens on the host (transformers' mask sizes are ints), so each
replay but the one right after the capture (whose forward ran the update once) calls the ring's ``advance`` with
the step's token count.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from .static_cache import FP8StaticCache, FP8StaticLayer
from .static_sliding import FP8StaticSlidingLayer

__all__ = ["DecodeGraphs", "eager_reason"]

_CACHE_NAMES = ("past_key_values", "cache")  # the cache argument's name before / from transformers 5.24
_PLAIN = (bool, int, float, str, type(None))
_EAGER_FLAGS = ("output_attentions", "output_hidden_states")  # outputs generate accumulates over steps


def _argument_signature(value: Any) -> Any:
    """What a graph depends on in one argument: a tensor's shape, dtype and device, a plain value itself, a dict's
    items; None (not hashable into a signature) for anything else."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.stride())
    if isinstance(value, _PLAIN):
        return ("value", value)
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        items = tuple((key, _argument_signature(item)) for key, item in sorted(value.items()))
        return None if any(sig is None for _, sig in items) else ("dict", items)
    return None


def eager_reason(model, cache: Any, kwargs: dict[str, Any]) -> str | None:
    """Why a decode step cannot be replayed from a graph, or None when it can. A capture records the kernels of the
    current device's stream only: work on another GPU (``device_map`` over several, tensor parallelism's
    collectives) would run once during the capture and never again, so those models are left alone."""
    if not isinstance(cache, FP8StaticCache) or not all(_replayable(layer) for layer in cache.layers):
        return "not a static cache of full-attention layers and rings read in place"
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        return "the model is spread over several devices"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "torch.distributed is initialized (tensor parallelism)"
    if model.device.type != "cuda":
        return "the model is not on a GPU"
    if any(kwargs.get(flag) for flag in _EAGER_FLAGS):
        return "attentions or hidden states are asked for"
    return None


def _replayable(layer) -> bool:
    """A static full-attention layer, or a sliding ring our attention reads in place (``is_compileable``): the
    layers whose decode step has no host state a replay would miss but the ring's token count (``advance``)."""
    return type(layer) is FP8StaticLayer or (type(layer) is FP8StaticSlidingLayer and layer.is_compileable)


def _copy_into(static: Any, value: Any) -> None:
    """Copy an argument into the graph's tensors of the same structure."""
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, dict):
        for key, item in static.items():
            _copy_into(item, value[key])


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _cloned(item) for key, item in value.items()}
    return value


class _Graph:
    """One captured decode forward: its input tensors, the graph, and the output it fills."""

    def __init__(self, model, kwargs: dict[str, Any], cache_name: str, pool) -> None:
        self.inputs = {name: _cloned(value) for name, value in kwargs.items() if name != cache_name}
        cache = kwargs[cache_name]
        self.rings = [layer for layer in cache.layers if isinstance(layer, FP8StaticSlidingLayer)]
        embedded = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        self.tokens = 1 if embedded is None else embedded.shape[1]  # a step's new tokens (its signature fixes them)
        self.captured = True  # the capture ran the step's update on the host; later replays do not
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = model(**self.inputs, **{cache_name: cache})

    def replay(self, kwargs: dict[str, Any]):
        for name, static in self.inputs.items():
            _copy_into(static, kwargs[name])
        if not self.captured:
            for ring in self.rings:
                ring.advance(self.tokens)
        self.captured = False
        self.graph.replay()
        output = self.output
        return type(output)(**{**output, "logits": output.logits.clone()})


class DecodeGraphs:
    """``generate``'s decode-step callable for one model (see the module docstring): ``graphs(**model_inputs)``
    returns what ``model(**model_inputs)`` returns. ``fallback`` runs the steps no graph takes (the model's own
    ``get_compiled_call`` result); ``captures`` and ``replays`` count what it did."""

    def __init__(self, model) -> None:
        self._model = weakref.ref(model)  # the model holds this object (its get_compiled_call)
        self.fallback = model.__call__
        self._cache: weakref.ref | None = None  # the cache the graphs were captured with
        self._graphs: dict[tuple, _Graph | None] = {}  # by signature; None: that signature runs eagerly
        self._warmed: set[tuple] = set()  # signatures whose first step ran eagerly
        self._pool: Any = None  # the memory pool the graphs of one cache share, made at its first capture
        self.captures = 0
        self.replays = 0

    def __call__(self, **kwargs):
        model = self._model()
        cache_name = next((name for name in _CACHE_NAMES if kwargs.get(name) is not None), None)
        cache = kwargs.get(cache_name) if cache_name else None
        signature = self._signature(model, kwargs, cache_name, cache)
        if signature is None:
            return self.fallback(**kwargs)
        if self._cache is None or self._cache() is not cache:  # another cache: other buffers, other graphs
            # and a new memory pool: torch cannot capture into a pool whose graphs were all freed (an allocator
            # assert, seen on the H200 when a second batch replaced the first cache)
            self._graphs, self._warmed, self._cache, self._pool = {}, set(), weakref.ref(cache), None
        if signature not in self._graphs:
            if signature not in self._warmed:
                self._warmed.add(signature)  # lazy initialization (Triton compiles, library workspaces) runs eagerly
                return model(**kwargs)
            self._graphs[signature] = self._capture(model, kwargs, cache_name)
        graph = self._graphs[signature]
        if graph is None:
            return model(**kwargs)
        self.replays += 1
        return graph.replay(kwargs)

    def _signature(self, model, kwargs: dict[str, Any], cache_name: str | None, cache) -> tuple | None:
        """The signature of a decode step a graph can replay, or None for one that goes to ``fallback``."""
        if eager_reason(model, cache, kwargs) is not None:
            return None
        arguments = sorted((name, value) for name, value in kwargs.items() if name != cache_name)
        items = tuple((name, _argument_signature(value)) for name, value in arguments)
        if any(sig is None for _, sig in items):
            return None
        # the embeddings' addresses: a model moved off the GPU and back (new addresses) captures anew
        embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
        weights = tuple(module.weight.data_ptr() for module in embeddings if module is not None)
        return (model.config._attn_implementation, weights, items)

    def _capture(self, model, kwargs: dict[str, Any], cache_name: str) -> _Graph | None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            graph = _Graph(model, kwargs, cache_name, self._pool)
        except Exception as error:  # noqa: BLE001 -- e.g. an op that synchronizes; that signature stays eager
            warnings.warn(
                f"hf_fp8cache: the decode step could not be captured as a CUDA graph ({type(error).__name__}: "
                f"{error}); it runs eagerly",
                stacklevel=3,
            )
            return None
        self.captures += 1
        return graph
