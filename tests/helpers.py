"""Shared test helpers: a tiny random Llama, a fake-quantized DynamicCache oracle, real English text."""

from __future__ import annotations

import inspect

import torch
from hf_fp8cache.kernels.reference import decode_fp8_ref, encode_fp8_ref
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


def fake_quant(x: torch.Tensor, fmt, scale: torch.Tensor) -> torch.Tensor:
    """What the FP8 cache hands back for x: decode(encode(x / scale)) * scale, in x's dtype."""
    s = scale.float().to(x.device).reshape(1, -1, 1, 1)
    return (decode_fp8_ref(encode_fp8_ref(x.float() * (1.0 / s), fmt), fmt) * s).to(x.dtype)


class FakeQuantLayer(DynamicLayer):
    """A DynamicLayer storing fake-quantized K/V with fixed scales: the oracle for the FP8 cache's semantics."""

    def __init__(self, fmt, key_scale, value_scale, exact_prefill=True):
        super().__init__()
        self.fmt, self.key_scale, self.value_scale, self.exact_prefill = fmt, key_scale, value_scale, exact_prefill

    def update(self, key_states, value_states, *args, **kwargs):
        first = self.get_seq_length() == 0
        keys, values = super().update(
            fake_quant(key_states, self.fmt, self.key_scale), fake_quant(value_states, self.fmt, self.value_scale)
        )
        return (key_states, value_states) if first and self.exact_prefill else (keys, values)


def fake_quant_cache(config, kv_cache_dtype="fp8", key_scale=1.0, value_scale=1.0, exact_prefill=True):
    fmt = resolve_format(kv_cache_dtype)
    k, v = torch.as_tensor(key_scale).float().flatten(), torch.as_tensor(value_scale).float().flatten()
    layers = [FakeQuantLayer(fmt, k, v, exact_prefill) for _ in range(config.num_hidden_layers)]
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
