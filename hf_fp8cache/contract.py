"""The seam between the FP8 cache layers and the attention that reads them (``attn_implementation="hf_fp8cache"``).

A cache layer serving that attention returns from ``update`` tensors that carry the layer (attribute
``LAYER_ATTRIBUTE``): fp8 views of its buffers when attention should read the cache, or the exact K/V of a first prefill
whose FP8 write waits for the padding mask. The attention then asks the layer one question,
``layer.attention_inputs(attention_mask) -> FP8AttentionInputs``, and reads only that bundle; for the calls its kernel
cannot serve (a window the layer does not hold, dropout in training) it asks ``layer.dequantized()``. It never reads or
writes a layer's fields, so every layer kind (dynamic, static; full, sliding; on another device) extends the bundle, not
the attention. A bundle may offer K/V the layer has not written yet (``new_tokens``, a ``PendingWrite``): the decode
kernel ``claim()``s them and writes them in its launch; otherwise the layer writes them before anything reads its
buffers (``dequantized()``, the next update). What the bundle holds comes from the cache side (the layer's window); what
comes from the model's attention module (learned sinks, logit softcapping, the scaling) arrives as that attention call's
arguments.

A leaf module: the caches and the attention both import it, neither imports the other.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from .formats import FP8Format
from .kernels import LaunchMemo, NewTokens, RecentWindow

__all__ = ["ATTENTION_NAME", "FP8AttentionInputs", "PendingWrite", "layer_of"]

ATTENTION_NAME = "hf_fp8cache"
LAYER_ATTRIBUTE = "hf_fp8cache_layer"  # set on the tensors a layer's update returns to this attention


def layer_of(tensor: torch.Tensor):
    """The cache layer ``tensor`` (a K or V an FP8 layer's ``update`` returned) names, or None: held directly, or
    through a weak reference (``weakref.ref``) by the layers whose views outlive one step."""
    layer = getattr(tensor, LAYER_ATTRIBUTE, None)
    return layer() if type(layer) is weakref.ref else layer


class PendingWrite:
    """K/V a layer's ``update`` kept back, to be written at position ``start``: by the decode kernel as it attends
    (the attention ``claim()``s them from ``FP8AttentionInputs.new_tokens`` and hands them to the kernel: one launch
    writes and attends), otherwise by the layer before anything reads its buffers. Only ``claimable`` writes (a
    decode step's one token) are offered to the attention; the others (a first prefill waiting for the padding mask
    to set its scales) the layer writes itself."""

    __slots__ = ("tokens", "start", "claimable", "claimed")

    def __init__(self, tokens: NewTokens, start, *, claimable: bool) -> None:
        self.tokens, self.start, self.claimable, self.claimed = tokens, start, claimable, False

    def claim(self) -> NewTokens:
        """The K/V for ``decode_attention(new=...)``, whose launch writes them; the layer will not write them again."""
        self.claimed = True
        return self.tokens


class FP8AttentionInputs(NamedTuple):
    """What the FP8 attention reads from one cache layer for one call.

    ``key_bytes`` / ``value_bytes``: uint8 ``[B, H, capacity, D]`` buffers of fp8 codes, the first ``length``
    positions filled; ``length`` is an int, or a one-element device tensor (the static cache, for CUDA graphs);
    ``kv_start``: int32 ``[B]``, the first attended position of each row (left padding); ``key_scale`` /
    ``value_scale``: float32 ``[1]`` or ``[H]`` dequantization scales; ``recent``: the exact K/V of the most recent
    positions, or None; ``sliding_window``: the layer's window W (a query at position p sees keys p - W < n <= p, in
    the buffers' positions), None for a full-attention layer.
    """

    key_bytes: torch.Tensor
    value_bytes: torch.Tensor
    length: int | torch.Tensor
    kv_start: torch.Tensor
    key_scale: torch.Tensor
    value_scale: torch.Tensor
    fmt: FP8Format
    recent: RecentWindow | None
    sliding_window: int | None = None
    launches: LaunchMemo | None = None  # the layer's kernel launches, relaunched step after step (kernels/launch.py)
    new_tokens: PendingWrite | None = None  # the step's K/V, not yet written: the decode kernel claims and writes them
    ring: bool = False  # the buffers are a ring of capacity slots, position p at slot p % capacity (static sliding)
    inner_padding: bool = False  # some row's mask skips positions inside it: the kernel cannot serve the call
    quantize_query: bool = False  # the kernel's products on e4m3 operands, queries quantized per row (issue 17)


def attended_positions(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The key positions some query row attends, bool ``[B, kv_length]`` (None without a mask: all of them).

    For causal masks with left padding and their sliding-window and chunked variants, these are the keys the first
    query row sees, those the last row sees, and each query's own position (a query attends itself unless it is
    padding): any earlier key a later row sees, the first row sees too. Reading three ``[B, kv_length]`` slices
    instead of all rows keeps this cheap for a prefill's ``[B, 1, S, S]`` mask. With a full causal mask it is the
    last row's keys (every non-padded position up to the last query)."""
    if attention_mask is None:
        return None
    rows = attention_mask[:, 0]  # [B, Sq, L] (broadcast over heads)
    queries, keys = rows.shape[-2:]
    own = _attends(rows.diagonal(offset=keys - queries, dim1=-2, dim2=-1))  # [B, Sq]: query i at keys - Sq + i
    attended = _attends(rows[:, 0]) | _attends(rows[:, -1])
    return torch.cat([attended[:, : keys - queries], attended[:, keys - queries :] | own], dim=-1)


def _attends(mask: torch.Tensor) -> torch.Tensor:
    """A slice of a boolean mask as is; of an additive float mask, where it is 0."""
    return mask if mask.dtype == torch.bool else mask == 0


def rows_with_inner_padding(attention_mask: torch.Tensor | None) -> list[int]:
    """The batch rows whose attended positions (``attended_positions``) skip one between their first and their last:
    padding inside a row, as a batch's next turn left-padded after its history gives. The decode kernel reads a row's
    padding as one start position, so it cannot serve such a mask. One host sync (a mask is given)."""
    attended = attended_positions(attention_mask)
    if attended is None:
        return []
    length = attended.shape[-1]
    positions = torch.arange(length, device=attended.device)
    first = torch.where(attended, positions, length).amin(-1)
    last = torch.where(attended, positions, -1).amax(-1)
    inner = attended.sum(-1) < (last - first + 1).clamp(min=0)
    return inner.nonzero().flatten().tolist()


def kv_start_from_mask(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """First position some query row attends (``attended_positions``), int32 ``[batch]`` on ``device``."""
    attended = attended_positions(attention_mask)
    if attended is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    start = attended.int().argmax(-1).to(device=device, dtype=torch.int32)
    return start.expand(batch).contiguous() if start.numel() == 1 else start
