"""The attention implementation that reads the FP8 cache directly: ``attn_implementation="hf_fp8cache"``.

Registered with transformers on import (``AttentionInterface`` plus ``AttentionMaskInterface``, so padded batches
get their mask). Select it with ``from_pretrained(..., attn_implementation="hf_fp8cache")``,
``model.set_attn_implementation("hf_fp8cache")`` or ``attach(model, attention=True)``.

When the model runs with it, the FP8 caches' ``update`` hands attention tensors that carry their cache layer
(``contract.py``). Attention asks that layer for ``attention_inputs(mask)`` -- buffers, filled length, row starts,
scales, format, exact recent window, sliding window -- and:

- every call over fp8 views -- a decode step, speculative tokens, and chunks of any length over an FP8 history (the
  second turn of a chat, a prompt fed in chunks, a first prefill with ``exact_prefill=False``) -- runs
  ``kernels.decode_attention``: attention straight from the FP8 bytes, scales folded in, split over the keys for
  short chunks and in causal 128-row tiles for long ones; no bf16 copy of the history ever exists. A dynamic full
  layer leaves a decode step's one token unwritten (``FP8AttentionInputs.new_tokens``): the kernel claims it and
  writes it as it attends, one launch for both. A length held on the device (the static cache) goes through the
  compileable operator. The layer's sliding window and exact recent window, and the module's learned sinks
  (``s_aux``, GPT-OSS), logit softcapping (``softcap``, Gemma 2) and ``scaling`` (Gemma's ``query_pre_attn_scalar``)
  go to the kernel;
- calls the kernel cannot serve exactly (a window the model asks for that the layer does not hold, dropout in
  training, a mask with padding inside a row -- a batch's next turn left-padded after its history) ask the layer
  for its dequantized K/V and run with the model's mask;
- the first prefill of an empty cache (exact K/V), and any call without an FP8 cache, run on what they were given.

Everything not served by the kernel runs SDPA: with learned sinks, SDPA with each sink as one more key
(``_sdpa_with_sinks``: no L x L tensor); with a softcap, which SDPA lacks, the model family's own eager attention
(its module's ``eager_attention_forward``) with the mask made additive.

The kernel reads the padding mask as one start position per row (left padding, as ``generate`` builds it) plus
causality and the layer's window; a mask with padding in the middle of a row (a batch whose rows' new chunks were
padded apart after the history) is found on the masks of several queries that bring it (``RowStarts.inner_padding``;
decode steps reuse the answer) and such calls run the model's attention over the dequantized K/V (the dynamic cache;
the static cache refuses such a mask).
"""

from __future__ import annotations

import sys

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .contract import ATTENTION_NAME, FP8AttentionInputs, layer_of
from .kernels import decode_attention, ops

__all__ = ["fp8_attention_forward"]


def _kernel_attention(query: torch.Tensor, inputs: FP8AttentionInputs, scale: float, sinks, softcap) -> torch.Tensor:
    """The kernel over ``inputs`` (any number of queries), with the module's sinks (any float dtype, ``[Hq]``) and
    softcap: ``[B, Sq, Hq, D]``."""
    sinks = None if sinks is None else sinks.detach().float().contiguous()  # no copy when already float32
    options = dict(sliding_window=inputs.sliding_window, sinks=sinks, softcap=softcap)
    if isinstance(inputs.length, torch.Tensor):  # read on the device: the operator torch.compile captures
        return ops.decode_attention(query, inputs.key_bytes, inputs.value_bytes, inputs.length, inputs.kv_start,
                                    inputs.key_scale, inputs.value_scale, inputs.fmt.name, scale, ring=inputs.ring,
                                    quantize_query=inputs.quantize_query, **options)  # fmt: skip
    new = None if inputs.new_tokens is None else inputs.new_tokens.claim()  # the launch writes the step's token
    return decode_attention(query, inputs.key_bytes, inputs.value_bytes, inputs.length, inputs.kv_start,
                            inputs.key_scale, inputs.value_scale, inputs.fmt, scale, recent=inputs.recent,
                            memo=inputs.launches, new=new, quantize_query=inputs.quantize_query,
                            **options)  # fmt: skip


def _kernel_serves(module, inputs: FP8AttentionInputs, dropout: float, kwargs: dict) -> bool:
    """Whether the kernel computes exactly what the model asks: no dropout, the model's sliding window
    (``sliding_window=`` of the call, None for full attention) the one the layer holds, and no row with padding inside
    it (the kernel reads a row's padding as one start: a batch's next turn left-padded after its history takes the
    model's attention with the mask)."""
    training_dropout = dropout and getattr(module, "training", False)
    same_window = kwargs.get("sliding_window") == inputs.sliding_window
    return same_window and not training_dropout and not inputs.inner_padding


_SINK_DIMS = 8  # head dims added to carry the sink logit (SDPA's fused kernels take head dims in multiples of 8)


def _sdpa_with_sinks(module, query, key, value, attention_mask, scaling=None, dropout=0.0, s_aux=None, **kwargs):
    """SDPA with learned attention sinks (GPT-OSS): each query head's sink ``s_aux[h]`` joins the softmax as one more
    key, placed first, whose value is zero. The query carries the sink -- one more head dim set to ``s_aux[h] /
    scale``, where the sink key holds a 1 and every other key a 0 -- so K and V keep their KV heads (GQA) and, without
    a padding mask, causality is ``causal_lower_right`` (nothing of size L x L is built, unlike eager attention)."""
    B, Hq, Sq, D = query.shape
    scale = scaling if scaling is not None else D**-0.5
    sink_dims = query.new_zeros(B, Hq, Sq, _SINK_DIMS)
    sink_dims[..., 0] = (s_aux.float() / scale).to(query.dtype)[None, :, None]
    sink_key = key.new_zeros(B, key.shape[1], 1, D + _SINK_DIMS)
    sink_key[..., D] = 1
    key = torch.cat([sink_key, torch.cat([key, key.new_zeros(*key.shape[:3], _SINK_DIMS)], -1)], 2)
    value = torch.cat([value, value.new_zeros(*value.shape[:3], _SINK_DIMS)], -1)
    value = torch.cat([value.new_zeros(B, value.shape[1], 1, D + _SINK_DIMS), value], 2)
    if attention_mask is not None:  # the sink column is always attended
        sink_column = (
            torch.ones_like(attention_mask[..., :1])
            if attention_mask.dtype == torch.bool
            else torch.zeros_like(attention_mask[..., :1])
        )
        attention_mask = torch.cat([sink_column.expand(*attention_mask.shape[:-1], 1), attention_mask], -1)
    elif Sq > 1 and getattr(module, "is_causal", True):
        attention_mask = causal_lower_right(Sq, key.shape[2])
    out = torch.nn.functional.scaled_dot_product_attention(
        torch.cat([query, sink_dims], -1), key, value, attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0, scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out[..., :D].transpose(1, 2).contiguous(), None


def _model_attention(module, kwargs: dict):
    """The attention that runs what the kernel does not: SDPA; with learned sinks, SDPA with the sinks as one more
    key (``_sdpa_with_sinks``); with a softcap, which SDPA lacks, the eager attention of the module's model family,
    on an additive mask."""
    if kwargs.get("softcap") is None:
        return sdpa_attention_forward if kwargs.get("s_aux") is None else _sdpa_with_sinks
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__} passes a logit softcap, which only its own eager attention computes, and its "
            f"module has no eager_attention_forward; load the model with attn_implementation='eager'"
        )

    def attend(module, query, key, value, attention_mask, **arguments):
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager adds the mask to the logits
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
        return eager(module, query, key, value, attention_mask, **arguments)

    return attend


def fp8_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query`` [B, Hq, Sq, D]; returns ([B, Sq, Hq, D], weights or None)."""
    layer = layer_of(key)
    if layer is not None:
        inputs = layer.attention_inputs(attention_mask)
        if key.dtype == inputs.fmt.dtype:  # fp8 views: attention reads the cache
            if _kernel_serves(module, inputs, dropout, kwargs):
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                return _kernel_attention(query, inputs, scale, kwargs.get("s_aux"), kwargs.get("softcap")), None
            key, value = layer.dequantized()
    return _model_attention(module, kwargs)(module, query, key, value, attention_mask, scaling=scaling,
                                            dropout=dropout, **kwargs)  # fmt: skip


AttentionInterface.register(ATTENTION_NAME, fp8_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
