"""Where scales come from when no checkpoint gives them: the on-the-fly rule (first prefill).

On-the-fly (``calculate_kv_scales=True``), per layer, once, from the first prefill after construction or
``reset()``::

    scale = amax(|x|) * headroom / fmax        headroom = 448 / 200 for K, 448 / 100 for V

i.e. exactly vLLM's ``amax / 200`` (K) and ``amax / 100`` (V) for e4m3, carried over to other formats by the
same fraction of their range: later tokens may be 2.24x (K) / 4.48x (V) larger than anything in the prefill
before they saturate. ``amax`` is taken over the whole tensor (strategy ``"tensor"``) or per KV head over
batch, tokens and head dim (``"attn_head"``). An all-zero (or non-finite) amax gives scale 1.0. The scales stay
on the device: no host synchronisation.
"""

from __future__ import annotations

import torch

from .formats import FP8Format

__all__ = ["ONTHEFLY_HEADROOM", "onthefly_scale"]

# vLLM's K_SCALE_CONSTANT = 200 and V_SCALE_CONSTANT = 100, expressed as headroom over e4m3fn's max (448).
ONTHEFLY_HEADROOM = {"key": 448.0 / 200.0, "value": 448.0 / 100.0}


def onthefly_scale(x: torch.Tensor, fmt: FP8Format, strategy: str, headroom: float) -> torch.Tensor:
    """Scale for ``x`` ``[B, H, S, D]``: float32 ``[1]`` (tensor) or ``[H]`` (attn_head), on x's device."""
    amax = x.detach().abs().amax(dim=(0, 2, 3)) if strategy == "attn_head" else x.detach().abs().amax().reshape(1)
    amax = amax.float()
    scale = amax * (headroom / fmt.max)
    usable = torch.isfinite(scale) & (scale > 0)
    return torch.where(usable, scale, torch.ones_like(scale)).contiguous()
