"""The attention implementation that reads the FP8 cache directly: ``attn_implementation="hf_fp8cache"``.

Registered with transformers on import (``AttentionInterface`` plus ``AttentionMaskInterface``, so padded batches
get their mask). Select it with ``from_pretrained(..., attn_implementation="hf_fp8cache")``,
``model.set_attn_implementation("hf_fp8cache")`` or ``attach(model, attention=True)``.

When the model runs with it, ``QuantizedFP8Cache.update`` and ``FP8StaticCache.update`` hand attention the FP8
buffers (fp8 views that carry their cache layer) instead of dequantized copies, and:

- decode (up to ``MAX_DECODE_QUERIES`` new tokens) runs ``kernels.decode_attention``: split-KV attention straight
  from the FP8 bytes, scales folded in (and the exact recent window, with ``residual_length``); no bf16 copy of the
  history ever exists;
- longer chunks over an FP8 history (chunked prefill) dequantize into the cache's workspace and run SDPA;
- the first prefill of an empty cache, and any call without an FP8 cache, is plain SDPA on what it was given.

The decode kernel reads the padding mask as one start position per row (left padding, as ``generate`` builds it)
plus causality; masks with holes in the middle are not representable and take the SDPA route.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels import decode_attention
from .kernels.ops import decode_attention_at

__all__ = ["ATTENTION_NAME", "MAX_DECODE_QUERIES", "fp8_attention_forward"]

ATTENTION_NAME = "hf_fp8cache"
MAX_DECODE_QUERIES = 16  # query tokens per row the decode kernel takes (decode, speculative tokens)


def _kv_start(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """First attended position of each row, from the last query row of the mask; None if the mask has holes."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # additive float mask: 0 where attended
    last = attention_mask[:, 0, -1, :]  # [B, L] (broadcast over heads)
    start = last.int().argmax(-1)
    return start.to(torch.int32).expand(batch).contiguous() if start.numel() == 1 else start.to(torch.int32)


def fp8_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query`` [B, Hq, Sq, D]; returns ([B, Sq, Hq, D], None)."""
    layer = getattr(key, "hf_fp8cache_layer", None)
    if layer is None:  # no FP8 cache (or its first, exact prefill): plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)  # fmt: skip
    unsupported = kwargs.get("softcap") or kwargs.get("sliding_window") or (dropout and module.training)
    if query.shape[2] <= MAX_DECODE_QUERIES and not unsupported:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if layer.is_compileable:  # FP8StaticCache: the filled length is a device tensor, read by the kernel
            # one mask reduction a step, in the cache's first layer; the others read its buffer (8x32768 on the
            # H200: the reduction took ~5.6 us in each of the 32 layers)
            first = layer.first_layer
            if layer is first:
                first.kv_start.copy_(_kv_start(attention_mask, query.shape[0], query.device))
            kv_start = first.kv_start
            out = decode_attention_at(query, layer.key_bytes, layer.value_bytes, layer.cumulative_length, kv_start,
                                      layer.key_scale, layer.value_scale, layer.fmt.name, scale)  # fmt: skip
        else:
            kv_start = _kv_start(attention_mask, query.shape[0], query.device)
            out = decode_attention(query, layer.key_bytes, layer.value_bytes, layer.length, kv_start, layer.key_scale,
                                   layer.value_scale, layer.fmt, scale, recent=layer.recent_window)  # fmt: skip
        return out, None
    key, value = layer.dequantized()
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)  # fmt: skip


AttentionInterface.register(ATTENTION_NAME, fp8_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
