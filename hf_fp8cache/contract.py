"""The seam between the FP8 cache layers and the attention that reads them (``attn_implementation="hf_fp8cache"``).

A cache layer serving that attention returns from ``update`` tensors that carry the layer (attribute
``LAYER_ATTRIBUTE``): fp8 views of its buffers when attention should read the cache, or the exact K/V of a first
prefill whose FP8 write waits for the padding mask. The attention then asks the layer one question,
``layer.attention_inputs(attention_mask) -> FP8AttentionInputs``, and reads only that bundle; for chunks the decode
kernel does not take it asks ``layer.dequantized()``. It never reads or writes a layer's fields, so every layer
kind (dynamic, static; later sliding, with sinks, on another device) extends the bundle, not the attention.

A leaf module: the caches and the attention both import it, neither imports the other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .formats import FP8Format
from .kernels import RecentWindow

__all__ = ["ATTENTION_NAME", "FP8AttentionInputs"]

ATTENTION_NAME = "hf_fp8cache"
LAYER_ATTRIBUTE = "hf_fp8cache_layer"  # set on the tensors a layer's update returns to this attention


class FP8AttentionInputs(NamedTuple):
    """What the FP8 attention reads from one cache layer for one call.

    ``key_bytes`` / ``value_bytes``: uint8 ``[B, H, capacity, D]`` buffers of fp8 codes, the first ``length``
    positions filled; ``length`` is an int, or a one-element device tensor (the static cache, for CUDA graphs);
    ``kv_start``: int32 ``[B]``, the first attended position of each row (left padding); ``key_scale`` /
    ``value_scale``: float32 ``[1]`` or ``[H]`` dequantization scales; ``recent``: the exact K/V of the most recent
    positions, or None.
    """

    key_bytes: torch.Tensor
    value_bytes: torch.Tensor
    length: int | torch.Tensor
    kv_start: torch.Tensor
    key_scale: torch.Tensor
    value_scale: torch.Tensor
    fmt: FP8Format
    recent: RecentWindow | None


def attended_positions(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The key positions the last query row attends, bool ``[B, kv_length]`` (None without a mask: all of them).
    With left padding and causality that row sees every non-padded position."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, :]  # [B, L] (broadcast over heads)
    return last if last.dtype == torch.bool else last == 0  # an additive float mask is 0 where attended


def kv_start_from_mask(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """First attended position of each row, int32 ``[batch]`` on ``device``, from the last query row of the mask."""
    attended = attended_positions(attention_mask)
    if attended is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    start = attended.int().argmax(-1).to(device=device, dtype=torch.int32)
    return start.expand(batch).contiguous() if start.numel() == 1 else start
