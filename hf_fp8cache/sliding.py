"""FP8SlidingWindowLayer: the dynamic FP8 layer of sliding-window and chunked attention layers (Mistral, Gemma 2/3,
GPT-OSS, Cohere 2, Llama 4's chunked layers), with the semantics of transformers' ``DynamicSlidingWindowLayer``.

It needs the last ``sliding_window - 1`` tokens as FP8 (the window a next token can see besides itself), plus the
tokens of the last update until the next one (its attention may still read them): memory is bounded by the window,
not by the sequence. The buffers hold those and up to 256 older tokens in front of them (``_OLDER_TOKENS``, and no
more than their capacity allows): only when the next write would not fit, or more older tokens are held, do the
needed ones move to the front -- once in about 256 steps, not every step (a 4096-token window at 8 rows moved
4 x 34 MB a layer and step). ``update`` returns the needed tokens plus the new ones (what ``get_mask_sizes``
announces to the mask); ``get_seq_length`` counts every token seen. The first prefill returns its exact K/V
(``exact_prefill``) and stores only its last ``sliding_window - 1`` tokens.

Read paths, as ``FP8CacheLayer``'s: with ``attn_implementation="hf_fp8cache"``, ``update`` returns fp8 views and
``attention_inputs`` hands the decode kernel the buffers with the window (``FP8AttentionInputs.sliding_window``): a
query at buffer position p sees keys p - W < n <= p, the mask's rule in the buffers' positions, and the kernel reads
only the window's key blocks (a chunk's tiles each only their own rows' windows); a decode step's token is written by
that launch, as on full layers. Other attention implementations get the dequantized tokens the mask covers. On-the-fly
scales wait for the padding mask as on full layers (``cache_base``), over the whole first prompt, of which only the
tail is stored. Chunked layers (Llama 4: same-chunk masks, which the
kernel does not compute) always hand over dequantized tokens. The exact recent window (``residual_length``) is
refused on these layers: the window itself is short.

Crop follows transformers: within the window like a full layer; past it only after ``activate_past_recording()``
(assisted decoding does that), which keeps every token until the next ``crop`` trims back to the window.
"""

from __future__ import annotations

import torch

from .cache_layer import FP8CacheLayer
from .contract import FP8AttentionInputs

__all__ = ["FP8SlidingWindowLayer", "is_chunked"]

# older tokens held in front of the window at most (beyond what the capacity allows anyway): the window moves to the
# front once in that many steps, and a long first prompt stored whole (exact_prefill=False) is trimmed at once
_OLDER_TOKENS = 256


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
        self.chunked = is_chunked(self._attention_config, self.layer_idx)
        self._served = 0  # the last tokens of the buffers that the last update returned (what the mask covers)
        self._skip_on_write = 0  # leading tokens of the next write that set scales but are not stored

    def activate_past_recording(self) -> None:
        """Keep every token until the next ``crop`` (transformers' rule for rolling back past the window)."""
        self.record_past = True

    def _serves_fp8_attention(self) -> bool:
        return not self.chunked and super()._serves_fp8_attention()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append K/V ``[B, H, S, D]`` and return the kept window plus them (exact on the first prefill)."""
        first_prefill = not self.is_initialized or self.cumulative_length == 0
        new_tokens = key_states.shape[2]
        kept = self.sliding_window - 1
        if first_prefill and self.exact_prefill and not self.record_past and new_tokens > kept:
            return self._store_prompt_tail(key_states, value_states, kept)
        self._finish_pending_write(None)  # (a prefill whose attention never came) before any bytes move
        if not self.record_past and (self.length + new_tokens > self.capacity or self.length > kept + _OLDER_TOKENS):
            self._keep_last(kept)  # the window's tokens move to the front, older ones go
        # what get_mask_sizes announced, as transformers returns it (set first: the update may dequantize it); the
        # held tokens before it are older ones, or kept while recording the past
        self._served = min(self.length, kept) + new_tokens
        # the served tokens (dequantized, or the first prefill's exact ones), or the fp8 buffers our attention reads
        # through attention_inputs
        keys, values = super().update(key_states, value_states)
        self.cumulative_length += new_tokens
        return keys, values

    def _store_prompt_tail(
        self, key_states: torch.Tensor, value_states: torch.Tensor, kept: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A first prefill longer than the window: only its last ``kept`` tokens are ever read again and stored, the
        on-the-fly scales come from the whole prompt (waiting for the padding mask, as on full layers); the prompt
        attends over its exact K/V."""
        self._begin_update(key_states, value_states)
        self._reserve(kept, key_states)
        self._skip_on_write = key_states.shape[2] - kept
        waits = self._write_or_defer(key_states, value_states, 0)
        self.length = self._served = kept
        self.cumulative_length = key_states.shape[2]
        return self._tagged(key_states, value_states) if waits else (key_states, value_states)

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, valid) -> None:
        """Set on-the-fly scales over the ``valid`` positions of the whole chunk, then quantize into the buffers at
        ``start`` all of it but the leading tokens ``_store_prompt_tail`` leaves out."""
        skip, self._skip_on_write = self._skip_on_write, 0
        self._set_onthefly_scales_from(key_states, value_states, valid)
        super()._write(key_states[:, :, skip:], value_states[:, :, skip:], start, None)

    def attention_inputs(self, attention_mask: torch.Tensor | None) -> FP8AttentionInputs:
        """``FP8CacheLayer.attention_inputs`` with the window; row starts, which the mask gives in the positions of
        what ``update`` returned, moved to buffer positions (they differ when older tokens are held in front)."""
        inputs = super().attention_inputs(attention_mask)
        unserved = self.length - self._served  # buffer positions before what the mask covers
        kv_start = inputs.kv_start + unserved if unserved > 0 else inputs.kv_start
        return inputs._replace(kv_start=kv_start, sliding_window=self.sliding_window)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens the last ``update`` returned, dequantized (``FP8CacheLayer.dequantized``): the older ones held in
        front are not."""
        return self._dequantized_from(self.length - self._served)

    def _keep_last(self, tokens: int) -> None:
        """Drop all but the last ``tokens`` kept tokens (their bytes move to the front of the buffers)."""
        drop = self.length - tokens
        if drop <= 0:
            return
        scales = (self._key_scales, self._value_scales) if self._token_scales else ()  # per token: they move along
        for buffer in (self._key_bytes, self._value_bytes, *scales):
            buffer[:, :, :tokens] = buffer[:, :, drop : self.length].clone()  # the ranges overlap
        self.length = tokens

    @property
    def nbytes(self) -> int:
        """``FP8CacheLayer.nbytes`` of the tokens the layer needs (the window and the last update's tokens; all of
        them while recording the past): the older tokens held in front count as spare room, as spare capacity does
        (``allocated_nbytes``)."""
        if self._key_bytes is None or self.record_past:
            return super().nbytes
        B, H, _, D = self._key_bytes.shape
        unserved = max(self.length - self._served, 0)
        unserved_scales = self._scale_nbytes(unserved) if self._token_scales else 0
        return super().nbytes - 2 * B * H * unserved * D - unserved_scales

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
        self.cumulative_length = self._served = self._skip_on_write = 0

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


def is_chunked(config, layer_idx: int) -> bool:
    """Whether the model's layer ``layer_idx`` is a chunked-attention one (by transformers' own reading of the config's
    layer types); False without a config."""
    if config is None:
        return False
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return layer_idx < len(layer_types) and layer_types[layer_idx] == "chunked_attention"
