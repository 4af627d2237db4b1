"""The step's own K/V, handed to ``decode_attention`` to be written into the FP8 cache by the attention launch itself.

A decode step appends one token to a layer and attends over it: two launches (``quantize_append_kv``, then the
attention). With ``NewTokens`` the attention program that reads the last position quantizes the token's K/V -- the
same encoding, bit for bit -- writes the codes to the cache and attends over them from registers: one launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["NewTokens"]


class NewTokens(NamedTuple):
    """K/V ``[B, H, 1, D]`` (any strides, the query's dtype) of the query's own position ``kv_length - 1``, not yet in
    the cache, and the inverse scales (float32, 1 or H elements, as the cache's scales) they are quantized with. With
    per-token-head scales (the cache's scales ``[B, H, capacity]``) each token's scales come from its own values, as
    ``quantize_append_token_head`` computes them, and are written beside it: the inverse scales are not read."""

    keys: torch.Tensor
    values: torch.Tensor
    key_inv_scale: torch.Tensor
    value_inv_scale: torch.Tensor
