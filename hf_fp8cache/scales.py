"""KVScales: per-layer K and V (and optional Q) dequantization scales, validated once.

Convention (vLLM, compressed-tensors, ModelOpt): ``x_fp8 = saturate(x / scale)`` and ``x ~= x_fp8 * scale``.
``strategy`` uses llm-compressor's words: ``"tensor"`` (one scale per layer, stored as shape ``[1]``) or
``"attn_head"`` (one per KV head, stored as shape ``[H_kv]``; checkpoints write ``[H_kv, 1, 1]``, also accepted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["KVScales", "STRATEGIES", "check_strategy"]

STRATEGIES = ("tensor", "attn_head")

ScaleLike = float | int | torch.Tensor


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(repr(s) for s in STRATEGIES)}")
    return strategy


def _as_scale(value: ScaleLike, name: str, strategy: str) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float32).flatten()
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty")
    if strategy == "tensor" and tensor.numel() != 1:
        raise ValueError(f"{name} has {tensor.numel()} elements; strategy 'tensor' needs exactly one")
    bad = ~torch.isfinite(tensor) | (tensor <= 0)
    if bad.any():
        raise ValueError(f"{name} must be finite and positive, got {tensor[bad][0].item()!r}")
    return tensor.contiguous()


@dataclass(frozen=True)
class KVScales:
    """Dequantization scales for every attention layer of a model.

    ``key[i]`` / ``value[i]`` are float32 tensors of shape ``[1]`` (strategy ``"tensor"``) or ``[H_kv]``
    (``"attn_head"``); ``query`` is optional (``None``, or one tensor or ``None`` per layer).
    Construct with floats, 0-d/1-d tensors or ``[H, 1, 1]`` tensors; everything is checked to be finite and positive.
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
        return KVScales([k * factor for k in self.key], [v * factor for v in self.value], self.strategy, query)

    def save_pretrained(self, directory, prefix: str = "model.") -> None:
        """Write the scales in the compressed-tensors layout vLLM reads (see ``checkpoint.save_kv_scales``)."""
        from .checkpoint import save_kv_scales

        save_kv_scales(self, directory, prefix)

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
