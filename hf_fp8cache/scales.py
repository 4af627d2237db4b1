"""KV scales: the ``KVScales`` a checkpoint or calibration gives, their bounds, and the on-the-fly rule.

Convention (vLLM, compressed-tensors, ModelOpt): ``x_fp8 = saturate(x / scale)`` and ``x ~= x_fp8 * scale``.
``strategy`` uses llm-compressor's words: ``"tensor"`` (one scale per layer, stored as shape ``[1]``) or
``"attn_head"`` (one per KV head, stored as shape ``[H_kv]``; checkpoints write ``[H_kv, 1, 1]``, also accepted).

Bounds. A scale is refused unless ``SMALLEST_SCALE <= scale <= LARGEST_SCALE``: below, its float32 reciprocal
(what the write multiplies by) overflows and exact zeros become NaN; above, ``code * scale`` overflows float32 in
the widest format (e5m2). ``unusable_scales`` is that test (non-finite, non-positive or out of bounds), the one
every scale goes through: ``KVScales`` (``check_scale``), checkpoint tensors, the on-the-fly rule and the CLI's
table. A cache warns (``check_scale_range``) when a scale's whole storable range misses ``PLAUSIBLE_KV_RANGE``, the
magnitudes K/V entries of real models take: then every entry saturates or rounds to 0.

On-the-fly (``calculate_kv_scales=True``), per layer, once, from the first prefill after construction or
``reset()``::

    scale = amax(|x|) * headroom / fmax        headroom = 448 / 200 for K, 448 / 100 for V

i.e. exactly vLLM's ``amax / 200`` (K) and ``amax / 100`` (V) for e4m3, carried over to other formats by the
same fraction of their range: later tokens may be 2.24x (K) / 4.48x (V) larger than anything in the prefill
before they saturate. ``amax`` is taken over the whole tensor (strategy ``"tensor"``) or per KV head over
batch, tokens and head dim (``"attn_head"``), over the unpadded positions only when the padding is known. An
amax that gives no usable scale (all zero, non-finite, or out of bounds) gives scale 1.0. One outlier decides the
whole tensor's scale (vLLM's rule): ``outlier_warning`` says so when most values of the prefill then fall below the
format's smallest normal number; ``"attn_head"`` confines an outlier to its head.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .formats import FP8Format

__all__ = ["KVScales", "STRATEGIES", "check_scale", "check_strategy", "onthefly_scale", "unusable_scales"]

STRATEGIES = ("tensor", "attn_head")

SMALLEST_SCALE = torch.finfo(torch.float32).tiny  # 2**-126 ~ 1.2e-38: 1 / scale is still finite
LARGEST_SCALE = torch.finfo(torch.float32).max / torch.finfo(torch.float8_e5m2).max  # ~5.9e33: e5m2 max * scale finite
# Magnitudes of K/V entries in real models: SmolLM2-135M keys reach ~20, values ~3 (amax over 16 x 512 tokens of
# English); Llama-class 8B keys reach tens. A scale whose format stores nothing in this band is surely a mistake.
PLAUSIBLE_KV_RANGE = (1e-3, 1e3)
MOSTLY_SUBNORMAL = 0.5  # warn when more than this fraction of a prefill's values fall below the smallest normal

# vLLM's K_SCALE_CONSTANT = 200 and V_SCALE_CONSTANT = 100, expressed as headroom over e4m3fn's max (448).
ONTHEFLY_HEADROOM = {"key": 448.0 / 200.0, "value": 448.0 / 100.0}

ScaleLike = float | int | torch.Tensor


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(repr(s) for s in STRATEGIES)}")
    return strategy


def unusable_scales(values: torch.Tensor, low: float = SMALLEST_SCALE, high: float = LARGEST_SCALE) -> torch.Tensor:
    """Bool mask of the entries of ``values`` that are no usable scale: non-finite, or outside ``[low, high]`` (by
    default ``[SMALLEST_SCALE, LARGEST_SCALE]``, which also refuses zero and negatives). Element-wise on the values'
    device, no host sync: the one test every scale of the library goes through."""
    return ~torch.isfinite(values) | (values < low) | (values > high)


def check_scale(value: ScaleLike, name: str) -> torch.Tensor:
    """``value`` as a flat float32 CPU tensor, refused with a ``ValueError`` naming ``name`` and the first bad entry
    unless every entry is finite, positive and within ``[SMALLEST_SCALE, LARGEST_SCALE]``."""
    tensor = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float32).flatten()
    bad = unusable_scales(tensor)
    if not bad.any():
        return tensor.contiguous()
    first = tensor[bad][0].item()
    if not math.isfinite(first) or first <= 0:
        raise ValueError(f"{name} must be finite and positive, got {first!r}")
    raise ValueError(
        f"{name} = {first!r} is outside [{SMALLEST_SCALE:.3g}, {LARGEST_SCALE:.3g}]: its reciprocal or the "
        "dequantized values would overflow float32"
    )


def _as_scale(value: ScaleLike, name: str, strategy: str) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().flatten()
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty")
    if strategy == "tensor" and tensor.numel() != 1:
        raise ValueError(f"{name} has {tensor.numel()} elements; strategy 'tensor' needs exactly one")
    return check_scale(tensor, name)


def check_scale_range(scales: KVScales, fmt: FP8Format) -> None:
    """Warn when a scale leaves ``fmt`` nothing to store in ``PLAUSIBLE_KV_RANGE``: every K/V entry of a real model
    would saturate (largest storable value below the band) or round to zero (smallest step above it)."""
    low, high = PLAUSIBLE_KV_RANGE
    finfo = torch.finfo(fmt.dtype)
    smallest_step = finfo.tiny * finfo.eps  # the smallest subnormal: 2**-9 for e4m3fn
    for kind, per_layer in (("k_scale", scales.key), ("v_scale", scales.value)):
        for i, scale in enumerate(per_layer):
            largest, step = scale.max().item() * fmt.max, scale.min().item() * smallest_step
            if largest < low or step > high:
                warnings.warn(
                    f"{kind} of layer {i} ({scale.min().item():.3g}..{scale.max().item():.3g}) stores {fmt.name} "
                    f"values from {step:.3g} to {largest:.3g}, outside the magnitudes of real K/V ({low:g} to "
                    f"{high:g}): every entry will saturate or round to zero. Check the checkpoint's scale "
                    "convention (scale = amax / fmax, the dequantization multiplier)",
                    stacklevel=3,
                )
                return


def onthefly_scale(
    x: torch.Tensor, fmt: FP8Format, strategy: str, headroom: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The on-the-fly scale of ``x`` (see the module docstring): float32 ``[1]`` (tensor) or ``[H]`` (attn_head), on
    x's device, without a host sync.

    Args:
        x: K or V of one prefill, ``[B, H, S, D]``.
        fmt: the storage format (its ``max``).
        strategy: ``"tensor"`` or ``"attn_head"``.
        headroom: ``ONTHEFLY_HEADROOM["key"]`` or ``ONTHEFLY_HEADROOM["value"]``.
        valid: bool ``[B, S]``, True where a position is a real token; padded positions stay out of the amax.
            None: every position counts.
    """
    magnitude = x.detach().abs()
    if valid is not None:
        magnitude = magnitude.masked_fill(~valid[:, None, :, None], 0)
    amax = magnitude.amax(dim=(0, 2, 3)) if strategy == "attn_head" else magnitude.amax().reshape(1)
    scale = amax.float() * (headroom / fmt.max)
    return torch.where(unusable_scales(scale), torch.ones_like(scale), scale).contiguous()


def outlier_warning(
    x: torch.Tensor, scale: torch.Tensor, fmt: FP8Format, valid: torch.Tensor | None, what: str
) -> str | None:
    """A message when most valid nonzero values of ``x`` ``[B, H, S, D]`` that share a scale (the whole tensor, or
    one head) fall below the format's smallest normal number under it -- one huge value set the scale -- else None.
    Reads two numbers back from the device."""
    scaled = x.detach().abs().float() / scale.reshape(1, -1, 1, 1)
    tiny = (scaled < torch.finfo(fmt.dtype).tiny).to(torch.float32)
    weight = (scaled > 0).to(torch.float32)  # exact zeros are stored exactly
    if valid is not None:
        weight = weight * valid[:, None, :, None]
    dims = (0, 2, 3) if scale.numel() > 1 else (0, 1, 2, 3)
    fraction = (tiny * weight).sum(dims).reshape(-1) / weight.sum(dims).reshape(-1).clamp(min=1)
    largest, index = fraction.max(0)
    worst, group = largest.item(), int(index)
    if worst <= MOSTLY_SUBNORMAL:
        return None
    where = f"head {group} of " if scale.numel() > 1 else ""
    return (
        f"{what}: {worst:.0%} of {where}the first prefill's values fall below {fmt.name}'s smallest normal number "
        f"under its on-the-fly scale ({scale.reshape(-1)[group].item():.3g}): a few outliers set the scale and the "
        "rest lose their precision or become zero. strategy='attn_head' confines an outlier to its head; "
        "calibrated or checkpoint scales avoid the first-prefill guess"
    )


@dataclass(frozen=True)
class KVScales:
    """Dequantization scales for every attention layer of a model.

    ``key[i]`` / ``value[i]`` are float32 tensors of shape ``[1]`` (strategy ``"tensor"``) or ``[H_kv]``
    (``"attn_head"``); ``query`` is optional (``None``, or one tensor or ``None`` per layer).
    Construct with floats, 0-d/1-d tensors or ``[H, 1, 1]`` tensors; every scale is checked to be finite, positive and
    within ``[SMALLEST_SCALE, LARGEST_SCALE]`` (``check_scale``).
    """

    key: tuple[torch.Tensor, ...]
    value: tuple[torch.Tensor, ...]
    strategy: str = "tensor"
    query: tuple[torch.Tensor | None, ...] | None = None

    def __init__(
        self,
        key: Sequence[ScaleLike],
        value: Sequence[ScaleLike],
        strategy: str = "tensor",
        *,
        query: Sequence[ScaleLike | None] | None = None,
    ) -> None:
        check_strategy(strategy)
        if len(key) != len(value):
            raise ValueError(f"got {len(key)} key scales but {len(value)} value scales; need one of each per layer")
        if len(key) == 0:
            raise ValueError("KVScales needs at least one layer")
        keys = tuple(_as_scale(s, f"k_scale of layer {i}", strategy) for i, s in enumerate(key))
        values = tuple(_as_scale(s, f"v_scale of layer {i}", strategy) for i, s in enumerate(value))
        for i, (k, v) in enumerate(zip(keys, values)):
            if k.numel() != v.numel():
                raise ValueError(f"layer {i}: k_scale has {k.numel()} elements but v_scale has {v.numel()}")
        if len({k.numel() for k in keys}) > 1:
            raise ValueError(
                f"per-head scales must have the same head count in every layer, got {[k.numel() for k in keys]}"
            )
        queries = None
        if query is not None:
            if len(query) != len(keys):
                raise ValueError(f"got {len(query)} query scales for {len(keys)} layers")
            queries = tuple(
                None if q is None else _as_scale(q, f"q_scale of layer {i}", "attn_head") for i, q in enumerate(query)
            )
        object.__setattr__(self, "key", keys)
        object.__setattr__(self, "value", values)
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "query", queries)

    @property
    def num_layers(self) -> int:
        return len(self.key)

    @property
    def num_heads(self) -> int | None:
        """KV heads the scales are for (None for per-tensor scales, which fit any head count)."""
        return self.key[0].numel() if self.strategy == "attn_head" else None

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise if these scales do not fit a model with ``num_layers`` attention layers of ``num_kv_heads``."""
        if num_layers != self.num_layers:
            raise ValueError(f"scales are for {self.num_layers} layers but the model has {num_layers}")
        if self.num_heads is not None and self.num_heads != num_kv_heads:
            raise ValueError(f"per-head scales are for {self.num_heads} KV heads but the model has {num_kv_heads}")

    def scaled(self, factor: float) -> KVScales:
        """The same scales multiplied by ``factor`` (e.g. 2 for e4m3fn scales stored as ROCm e4m3fnuz)."""
        query = None if self.query is None else [None if q is None else q * factor for q in self.query]
        return KVScales([k * factor for k in self.key], [v * factor for v in self.value], self.strategy, query=query)

    def save_pretrained(self, directory: str | os.PathLike, *, prefix: str = "model.") -> None:
        """Write the scales in the compressed-tensors layout vLLM reads (see ``checkpoint.save_kv_scales``)."""
        from .checkpoint import save_kv_scales

        save_kv_scales(self, directory, prefix=prefix)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KVScales):
            return NotImplemented
        same = lambda a, b: len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        return self.strategy == other.strategy and same(self.key, other.key) and same(self.value, other.value)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        span = lambda ts: f"{min(t.min().item() for t in ts):.4g}..{max(t.max().item() for t in ts):.4g}"
        return (
            f"KVScales(layers={self.num_layers}, strategy={self.strategy!r}, k={span(self.key)}, v={span(self.value)})"
        )
