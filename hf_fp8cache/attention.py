"""The attention implementation that reads the FP8 cache directly: ``attn_implementation="hf_fp8cache"``.

Registered with transformers on import (``AttentionInterface`` plus ``AttentionMaskInterface``, so padded batches
get their mask). Select it with ``from_pretrained(..., attn_implementation="hf_fp8cache")``,
``model.set_attn_implementation("hf_fp8cache")`` or ``attach(model, attention=True)``.

When the model runs with it, the FP8 caches' ``update`` hands attention tensors that carry their cache layer
(``contract.py``). Attention asks that layer for ``attention_inputs(mask)`` -- buffers, filled length, row starts,
scales, format, exact recent window -- and:

- decode (up to ``MAX_DECODE_QUERIES`` new tokens over fp8 views) runs ``kernels.decode_attention``: split-KV
  attention straight from the FP8 bytes, scales folded in; no bf16 copy of the history ever exists. A length held
  on the device (the static cache) goes through the compileable operator;
- longer chunks over an FP8 history (chunked prefill) ask the layer for its dequantized K/V and run SDPA;
- the first prefill of an empty cache (exact K/V), and any call without an FP8 cache, is plain SDPA on what it was
  given.

The decode kernel reads the padding mask as one start position per row (left padding, as ``generate`` builds it)
plus causality.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .contract import ATTENTION_NAME, LAYER_ATTRIBUTE, FP8AttentionInputs
from .kernels import decode_attention, ops

__all__ = ["MAX_DECODE_QUERIES", "fp8_attention_forward"]

MAX_DECODE_QUERIES = 16  # query tokens per row the decode kernel takes (decode, speculative tokens)


def _decode(query: torch.Tensor, inputs: FP8AttentionInputs, scale: float) -> torch.Tensor:
    """The decode kernel over ``inputs``: ``[B, Sq, Hq, D]``."""
    if isinstance(inputs.length, torch.Tensor):  # read on the device: the operator torch.compile captures
        return ops.decode_attention(query, inputs.key_bytes, inputs.value_bytes, inputs.length, inputs.kv_start,
                                   inputs.key_scale, inputs.value_scale, inputs.fmt.name, scale)  # fmt: skip
    return decode_attention(query, inputs.key_bytes, inputs.value_bytes, inputs.length, inputs.kv_start,
                            inputs.key_scale, inputs.value_scale, inputs.fmt, scale, recent=inputs.recent)  # fmt: skip


def fp8_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query`` [B, Hq, Sq, D]; returns ([B, Sq, Hq, D], None)."""
    if kwargs.get("s_aux") is not None:  # SDPA would silently drop them
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} does not support learned attention sinks (s_aux, GPT-OSS) yet; "
            "load the model with attn_implementation='eager': the FP8 caches then hand it dequantized K/V"
        )
    layer = getattr(key, LAYER_ATTRIBUTE, None)
    if layer is not None:
        inputs = layer.attention_inputs(attention_mask)
        if key.dtype == inputs.fmt.dtype:  # fp8 views: attention reads the cache
            unsupported = kwargs.get("softcap") or kwargs.get("sliding_window") or (dropout and module.training)
            if query.shape[2] <= MAX_DECODE_QUERIES and not unsupported:
                return _decode(query, inputs, scaling if scaling is not None else query.shape[-1] ** -0.5), None
            key, value = layer.dequantized()
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)  # fmt: skip


AttentionInterface.register(ATTENTION_NAME, fp8_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
