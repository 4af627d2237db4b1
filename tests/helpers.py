"""Shared test helpers: a tiny random Llama, left-padded prompts, a verbose tensor equality, a fake-quantized
DynamicCache oracle, real English text, checkpoints."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
from hf_fp8cache.kernels.reference import (
    decode_fp8_ref,
    dequantize_token_head_ref,
    encode_fp8_ref,
    quantize_append_token_head_ref,
)
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from hf_fp8cache.formats import resolve_format


def tiny_llama(seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=heads * head_dim, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _odd_pads(row: int) -> int:
    return 2 * row + 1 if row else 0


def left_padded_prompts(
    batch: int = 3,
    length: int = 11,
    *,
    pads: Callable[[int], int] = _odd_pads,
    pad_id: int | None = 0,
    seed: int = 0,
    vocab: int = 256,
    device: str | torch.device = "cpu",
):
    """Random ids ``[batch, length]`` (from ``[3, vocab)``) and their attention mask, left-padded.

    Args:
        pads: the number of pad positions of each row, ``pads(row)``; by default none in row 0 and 2r + 1 in row r.
        pad_id: the id written at the pad positions, or None to leave random ids there (only the mask hides them).
        seed: of the generator drawing the ids (the same for every ``pads``, ``pad_id`` and ``device``).
        vocab: one past the largest id drawn.
        device: where both tensors are returned.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : pads(row)] = 0
    if pad_id is not None:
        ids = ids.masked_fill(mask == 0, pad_id)
    return ids.to(device), mask.to(device)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """``assert torch.equal(actual, expected)`` (same shape, equal values; NaN equals nothing), saying on failure how
    many elements differ, the first index where they do and both values there (and shapes and dtypes if they differ).
    """
    if torch.equal(actual, expected):
        return
    name = f"{what}: " if what else ""
    kinds = f"actual {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}shapes differ: {kinds}")
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    differ = (actual != expected).flatten()
    count, first = int(differ.sum()), int(differ.nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), actual.shape))
    dtypes = f" ({kinds})" if actual.dtype != expected.dtype else ""
    raise AssertionError(
        f"{name}{count} of {actual.numel()} elements differ{dtypes}; the first at {index}: "
        f"actual {_show(actual.flatten()[first])}, expected {_show(expected.flatten()[first])}"
    )


def record_keyword(monkeypatch, owner, name: str, keyword: str) -> list:
    """Wrap the function ``owner.name`` for the test: each call still runs it, and appends the value it was given for
    ``keyword`` to the returned list."""
    function, seen = getattr(owner, name), []

    def recording(*args, **kwargs):
        seen.append(kwargs[keyword])
        return function(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return seen


def _show(value: torch.Tensor) -> str:
    """One element; fp8 codes and bit patterns (integers narrower than 64 bits) in hex too."""
    number = value.item()
    if value.dtype in (torch.uint8, torch.int16, torch.int32):
        bits = 8 * value.element_size()
        return f"{number} (0x{number & (1 << bits) - 1:0{bits // 4}x})"
    return repr(number)


def fake_quant(x: torch.Tensor, fmt, scale: torch.Tensor) -> torch.Tensor:
    """What the FP8 cache hands back for x: decode(encode(x / scale)) * scale, in x's dtype."""
    s = scale.float().to(x.device).reshape(1, -1, 1, 1)
    return (decode_fp8_ref(encode_fp8_ref(x.float() * (1.0 / s), fmt), fmt) * s).to(x.dtype)


def fake_quant_token_head(x: torch.Tensor, fmt) -> torch.Tensor:
    """What a cache with per-token-head scales (``strategy="token_head"``) hands back for x: the twins' codes and bf16
    scales of every (token, head), read back in x's dtype."""
    codes = [torch.empty(x.shape, dtype=torch.uint8, device=x.device) for _ in "kv"]
    scales = [torch.empty(x.shape[:3], dtype=torch.bfloat16, device=x.device) for _ in "kv"]
    quantize_append_token_head_ref(x, x, *codes, *scales, 0, fmt)
    out = [torch.empty_like(x) for _ in "kv"]
    dequantize_token_head_ref(*codes, *scales, x.shape[2], fmt, *out)
    return out[0]


class FakeQuantLayer(DynamicLayer):
    """A DynamicLayer storing fake-quantized K/V with fixed scales: the oracle for the FP8 cache's semantics.

    With ``residual_length`` R it also keeps exact K/V (side by side with the fake-quantized ones along the last dim,
    so DynamicLayer's crop and batch operations move both) and hands back exact values for the positions not yet
    pushed out of the window: position p is exact while p >= the largest length - R seen so far (a crop does not
    bring evicted positions back).
    """

    def __init__(self, fmt, key_scale, value_scale, exact_prefill=True, residual_length=0):
        super().__init__()
        self.fmt, self.key_scale, self.value_scale, self.exact_prefill = fmt, key_scale, value_scale, exact_prefill
        self.residual_length = residual_length
        self.evicted_below = 0

    def update(self, key_states, value_states, *args, **kwargs):
        first = self.get_seq_length() == 0
        D = key_states.shape[-1]
        keys, values = super().update(
            torch.cat([self.stored(key_states, self.key_scale), key_states], -1),
            torch.cat([self.stored(value_states, self.value_scale), value_states], -1),
        )
        length = keys.shape[2]
        self.evicted_below = length if self.residual_length == 0 else (
            max(0 if first else self.evicted_below, length - self.residual_length))  # fmt: skip
        exact = (torch.arange(length) >= self.evicted_below).view(1, 1, -1, 1).to(keys.device)
        if first and self.exact_prefill:
            return key_states, value_states
        return torch.where(exact, keys[..., D:], keys[..., :D]), torch.where(exact, values[..., D:], values[..., :D])

    def stored(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """What the cache reads back for ``x``: its fake-quantized values."""
        return fake_quant(x, self.fmt, scale)


class FakeQuantTokenHeadLayer(FakeQuantLayer):
    """``FakeQuantLayer`` with a scale per (token, head) computed from each token (``strategy="token_head"``)."""

    def stored(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return fake_quant_token_head(x, self.fmt)


def fake_quant_cache(config, kv_cache_dtype="fp8", key_scale=1.0, value_scale=1.0, exact_prefill=True,
                     residual_length=0, token_head=False):  # fmt: skip
    """A DynamicCache of ``FakeQuantLayer`` (``FakeQuantTokenHeadLayer`` with ``token_head``: the scales are unused)."""
    fmt = resolve_format(kv_cache_dtype)
    k, v = torch.as_tensor(key_scale).float().flatten(), torch.as_tensor(value_scale).float().flatten()
    kind = FakeQuantTokenHeadLayer if token_head else FakeQuantLayer
    layers = [kind(fmt, k, v, exact_prefill, residual_length) for _ in range(config.num_hidden_layers)]
    cache = DynamicCache(config=config)
    cache.layers = layers
    return cache


def english_text(min_chars: int = 20000, start_module: int = 0) -> str:
    """Real English prose offline: docstrings of standard-library modules."""
    import argparse  # noqa: E401
    import collections
    import csv
    import email
    import functools
    import http.client
    import json
    import logging
    import pathlib
    import random
    import re
    import subprocess  # noqa: E401
    import textwrap
    import threading
    import unittest
    import urllib.request
    import zipfile

    modules = [argparse, collections, csv, email, functools, http.client, json, logging, pathlib, random, re,
               subprocess, textwrap, threading, unittest, urllib.request, zipfile]  # fmt: skip
    parts = []
    for module in modules[start_module:] + modules[:start_module]:
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(doc)
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n\n".join(parts)


def write_checkpoint(
    directory,
    layers: int = 4,
    kv_heads: int = 2,
    strategy: str = "tensor",
    dtype=torch.bfloat16,
    layout: str = "compressed-tensors",
    prefix: str = "model.",
    shards: int = 1,
    fp8_weights: bool = False,
    q_scale=None,
    zero_points: float | None = None,
    skip_layers=(),
):
    """A checkpoint of the given layout with random weights and known KV scales; returns (k, v) as written.

    layout: "compressed-tensors" | "modelopt" | "legacy-output" | "legacy-kv" | "none" (no scales at all).
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shape = (1,) if strategy == "tensor" else (kv_heads, 1, 1)
    width = 1 if strategy == "tensor" else kv_heads
    k = [torch.tensor([0.0123 * (i + 1) + 0.001 * h for h in range(width)]).to(dtype) for i in range(layers)]
    v = [torch.tensor([0.0456 * (i + 1) + 0.002 * h for h in range(width)]).to(dtype) for i in range(layers)]
    names = {"compressed-tensors": ("k_scale", "v_scale"), "modelopt": ("k_proj.k_scale", "v_proj.v_scale"),
             "legacy-output": ("k_proj.output_scale", "v_proj.output_scale")}  # fmt: skip
    weights, scales = {}, {}
    weight_dtype = torch.float8_e4m3fn if fp8_weights else dtype
    for i in range(layers):
        base = f"{prefix}layers.{i}.self_attn."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[base + proj + ".weight"] = torch.randn(8, 8).to(weight_dtype)
            if fp8_weights:
                weights[base + proj + ".weight_scale"] = torch.tensor([0.01], dtype=dtype)
        if i in skip_layers or layout == "none":
            continue
        if layout == "legacy-kv":
            scales[base + "kv_scale"] = k[i].reshape(shape)
        else:
            scales[base + names[layout][0]] = k[i].reshape(shape)
            scales[base + names[layout][1]] = v[i].reshape(shape)
        if q_scale is not None:
            scales[base + "q_scale"] = torch.tensor([q_scale], dtype=torch.float32)
        if zero_points is not None:
            scales[base + "k_zero_point"] = torch.full(shape, zero_points, dtype=dtype)
            scales[base + "v_zero_point"] = torch.zeros(shape, dtype=dtype)
    weights[f"{prefix}embed_tokens.weight"] = torch.randn(16, 8).to(dtype)
    config = {"model_type": "llama", "num_hidden_layers": layers, "num_key_value_heads": kv_heads}
    if layout == "compressed-tensors":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized" if fp8_weights else "dense",
            "config_groups": {}, "ignore": [], "quantization_status": "compressed",
            "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
                                "dynamic": False},
        }  # fmt: skip
    if layout == "modelopt":
        (directory / "hf_quant_config.json").write_text(
            json.dumps(
                {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"}}
            )
        )
    if prefix.startswith("model.language_model"):
        config = {
            "model_type": "llava",
            "text_config": config,
            **{k: v for k, v in config.items() if k == "quantization_config"},
        }
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {**weights, **scales}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        # weights in shard 1, scales in shard 2
        save_file(weights, str(directory / "model-00001-of-00002.safetensors"))
        if scales:
            save_file(scales, str(directory / "model-00002-of-00002.safetensors"))
        weight_map = {n: "model-00001-of-00002.safetensors" for n in weights}
        weight_map.update({n: "model-00002-of-00002.safetensors" for n in scales})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return k, v


@contextlib.contextmanager
def quick_cpu():
    """One thread (the test machine's cores are shared: more threads made a tiny decode step 50x slower) and the torch
    reference for the kernels on CPU tensors (the interpreter writes the same bytes, slowly)."""
    from hf_fp8cache.kernels import cpu_backend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cpu_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)
