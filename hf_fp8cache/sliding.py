"""FP8SlidingWindowLayer: the dynamic FP8 layer of sliding-window and chunked attention layers (Mistral, Gemma 2/3,
GPT-OSS, Cohere 2, Llama 4's chunked layers), with the semantics of transformers' ``DynamicSlidingWindowLayer``.

It keeps only the last ``sliding_window - 1`` tokens as FP8 (the window a next token can see besides itself): memory
is bounded by the window, not by the sequence. ``update`` returns the kept tokens plus the new ones (what
``get_mask_sizes`` announces to the mask), dequantized; ``get_seq_length`` counts every token seen. The first
prefill returns its exact K/V (``exact_prefill``) and stores only its last ``sliding_window - 1`` tokens.

Read path: always the dequantized window, whatever the attention implementation -- the decode kernel reads no
window yet, so ``attn_implementation="hf_fp8cache"`` runs SDPA over it with the model's sliding mask. Hence
on-the-fly scales here cannot leave padding out (see ``cache_base``). The exact recent window (``residual_length``)
is refused on these layers: the window itself is short.

Crop follows transformers: within the window like a full layer; past it only after ``activate_past_recording()``
(assisted decoding does that), which keeps every token until the next ``crop`` trims back to the window.
"""

from __future__ import annotations

import torch

from .cache_layer import FP8CacheLayer

__all__ = ["FP8SlidingWindowLayer"]


class FP8SlidingWindowLayer(FP8CacheLayer):
    """One sliding-window (or chunked) attention layer's FP8 K/V (see the module docstring)."""

    is_sliding = True

    def __init__(self, sliding_window: int, **layer_kwargs) -> None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be an int >= 1, got {sliding_window!r}")
        if layer_kwargs.get("residual_length"):
            raise ValueError(
                f"layer {layer_kwargs.get('layer_idx')}: residual_length is not supported on sliding-window layers "
                f"(window {sliding_window}); use it on models with full-attention layers only"
            )
        super().__init__(**layer_kwargs)
        self.sliding_window = sliding_window
        self.cumulative_length = 0  # every token seen; ``length`` counts the kept ones
        self.record_past = False

    def activate_past_recording(self) -> None:
        """Keep every token until the next ``crop`` (transformers' rule for rolling back past the window)."""
        self.record_past = True

    def _serves_fp8_attention(self) -> bool:
        return False  # the decode kernel has no window yet: always hand over the dequantized window

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append K/V ``[B, H, S, D]`` and return the kept window plus them (exact on the first prefill)."""
        first_prefill = not self.is_initialized or self.cumulative_length == 0
        new_tokens = key_states.shape[2]
        kept = self.sliding_window - 1
        if first_prefill and self.exact_prefill and not self.record_past and new_tokens > kept:
            # only the last ``kept`` tokens are ever read again; the scales still come from the whole prompt
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._warn_padding_counts(key_states)
            self._set_onthefly_scales_from(key_states, value_states, None)
            tail = slice(new_tokens - kept, new_tokens)
            super().update(key_states[:, :, tail], value_states[:, :, tail])
            self.cumulative_length = new_tokens
            return key_states, value_states
        keys, values = super().update(key_states, value_states)
        self.cumulative_length += new_tokens
        if self.record_past:
            visible = kept + new_tokens  # what get_mask_sizes announces, as transformers returns it
            return keys[:, :, -visible:], values[:, :, -visible:]
        self._keep_last(kept)
        return keys, values

    def _keep_last(self, tokens: int) -> None:
        """Drop all but the last ``tokens`` kept tokens (their bytes move to the front of the buffers)."""
        drop = self.length - tokens
        if drop <= 0:
            return
        for buffer in (self._key_bytes, self._value_bytes):
            buffer[:, :, :tokens] = buffer[:, :, drop : self.length].clone()  # the ranges overlap
        self.length = tokens

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        seen = min(self.cumulative_length, self.sliding_window - 1)
        return seen + query_length, offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """As transformers' sliding layer: a full layer's crop within the window; past it, only after
        ``activate_past_recording()`` and only by a negative count (0 trims back to the window)."""
        if self.cumulative_length < self.sliding_window:
            super().crop(tokens_to_remove)
            self.cumulative_length = self.length
            return
        if not self.record_past:
            raise RuntimeError(
                f"layer {self.layer_idx}: crop past the sliding window ({self.sliding_window} tokens) needs "
                "activate_past_recording() before the tokens to drop were added"
            )
        if tokens_to_remove > 0:
            raise RuntimeError(
                f"layer {self.layer_idx}: past the sliding window, crop takes a negative count of tokens to "
                f"remove, got {tokens_to_remove}"
            )
        removed = min(-tokens_to_remove, self.length)
        self.length -= removed
        self.cumulative_length -= removed
        self._keep_last(self.sliding_window - 1)
