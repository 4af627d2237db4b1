"""QuantizedFP8Cache (``FP8Cache``): a transformers ``Cache`` whose layers keep K and V as FP8 bytes.

With a model config its layers follow the config's layer types as transformers' ``DynamicCache`` builds them:
full-attention layers are ``FP8CacheLayer`` (``cache_layer.py``: storage, read paths, first prefill), sliding-window
and chunked layers ``FP8SlidingWindowLayer`` (``sliding.py``). Layers that keep no K/V are transformers' own:
linear-attention, SSM and conv states (``LinearAttentionLayer``: Qwen3-Next, Qwen3.5, Jamba, Granite 4, LFM2), layers
sharing another layer's K/V or without a cache (``DummyLayer``, Gemma 3n / Gemma 4). Hybrid layers that hold both
(Falcon-H1) are ``FP8HybridLayer``: transformers' linear-attention code for the states, an FP8 layer for K/V
(``hybrid.py``). Without a config, full-attention layers are made as the model updates them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .cache_base import (
    DequantWorkspace,
    RowStarts,
    check_model_scales,
    check_query_quantization_option,
    layer_scales,
    resolve_cache_options,
    shared_kv_layers,
)
from .cache_layer import FP8CacheLayer
from .hybrid import FP8HybridLayer, build_layers, model_checkpoint_scales
from .scales import KVScales
from .sliding import FP8SlidingWindowLayer

__all__ = ["QuantizedFP8Cache", "FP8Cache"]


class QuantizedFP8Cache(Cache):
    """A transformers Cache that stores K and V in FP8 (half the bytes of bf16). Every argument after ``config`` is
    keyword-only.

    Args:
        config: the model's config (optional). With it, layers are created up front as transformers builds them
            (``build_layers``: FP8 for every layer holding K/V, transformers' own for states and shared K/V), and
            ``scales`` are checked against the model (one pair per layer index; only K/V layers read theirs).
            Without it, full-attention layers are created on first use.
        kv_cache_dtype: ``"fp8"`` / ``"fp8_e4m3"`` (e4m3fn, default), ``"fp8_e5m2"``, ``"int8"`` (with
            ``strategy="token_head"`` only), vLLM's ``"fp8_per_token_head"`` / ``"int8_per_token_head"`` (e4m3fn / int8
            and ``strategy="token_head"``), or see ``formats.py``.
        calculate_kv_scales: compute scales from each layer's first prefill (``scales.onthefly_scale``).
        strategy: ``"tensor"`` or ``"attn_head"`` (per KV head). Defaults to the scales' own, else ``"tensor"``.
            ``"token_head"``: one bf16 scale per (token, KV head), computed from each token's own values as it is
            written (no scales given, no ``calculate_kv_scales``); full-attention layers only for now.
        scales: a ``KVScales`` (e.g. from a checkpoint or calibration). Without scales and without
            ``calculate_kv_scales`` every scale is 1.0 (vLLM's default).
        exact_prefill: the first prefill attends over the exact K/V it was given (default) rather than FP8.
        residual_length: also keep the K/V of the most recent ``residual_length`` tokens in the model dtype (a ring
            buffer per layer), and let attention read those exactly; older tokens are read from FP8. Costs
            ``residual_length`` tokens in the model dtype per layer (e.g. 16 tokens: 1.6 % of the FP8 bytes at
            2K tokens). 0 (default) is pure FP8, like vLLM; transformers' ``QuantizedCache`` uses the same name.
        quantize_query: FP8 queries, as vLLM's FlashAttention 3 path: where our attention
            (``attn_implementation="hf_fp8cache"``) reads the cache, Q @ K^T runs on e4m3 operands with fp32
            accumulation (each query row scaled by its own amax / 448); P @ V stays in fp16. Needs e4m3 codes, no
            ``residual_length``, and on CUDA a GPU with FP8 tensor cores (compute capability 8.9+). Other attention
            implementations read the dequantized K/V and are unaffected. With ``exact_prefill=False`` the first
            prefill runs in FP8 too.
    """

    def __init__(
        self,
        config=None,
        *,
        kv_cache_dtype: str | torch.dtype = "fp8",
        calculate_kv_scales: bool = False,
        strategy: str | None = None,
        scales: KVScales | None = None,
        exact_prefill: bool = True,
        residual_length: int = 0,
        quantize_query: bool = False,
    ) -> None:
        self.format, self.strategy = resolve_cache_options(kv_cache_dtype, calculate_kv_scales, strategy, scales)
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")
        check_query_quantization_option(quantize_query, self.format, residual_length)
        self.quantize_query = quantize_query
        self.residual_length = residual_length
        self.scales = scales
        self.calculate_kv_scales = calculate_kv_scales
        self.exact_prefill = exact_prefill
        self._workspace = DequantWorkspace()
        self._row_starts = RowStarts()
        self._attention_config = config
        self._shared_kv_layers = set() if config is None else shared_kv_layers(config)
        self._shared_kv_workspaces: list[DequantWorkspace] = []
        layers = []
        if config is not None:
            check_model_scales(config, scales)
            layers = build_layers(config, lambda i, layer_type, window: self._new_layer(i, window))
        super().__init__(layers=layers)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path,
        config=None,
        *,
        kv_cache_dtype: str | torch.dtype = "fp8",
        missing: str = "error",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir=None,
        local_files_only: bool = False,
        **kwargs,
    ) -> QuantizedFP8Cache:
        """A cache with the KV scales of a checkpoint (local directory or Hub id), checked against ``config``.

        Args:
            name_or_path: a local directory or a Hub repo id (``checkpoint.load_kv_scales``).
            config: the model's config, as for the constructor.
            kv_cache_dtype: the storage format; scales stored as ROCm e4m3fnuz are doubled, as vLLM does
                (``cache_base.checkpoint_scales``).
            missing, revision, token, cache_dir, local_files_only: as for ``checkpoint.load_kv_scales``.
            kwargs: the other constructor arguments (``exact_prefill``, ``residual_length``, ``quantize_query``).
        """
        options = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        fmt, scales = model_checkpoint_scales(name_or_path, config, kv_cache_dtype, missing=missing,
                                              strategy=kwargs.get("strategy"), **options)  # fmt: skip
        return cls(config=config, kv_cache_dtype=fmt, scales=scales, **kwargs)

    def _new_layer(self, layer_idx: int, sliding_window: int | None = None) -> FP8CacheLayer:
        """Layer ``layer_idx``: a full-attention layer, or a sliding-window one (sliding and chunked layers). A layer
        whose K/V later layers read too (KV sharing) dequantizes into a workspace of its own: the shared one is
        overwritten by the next layer's update before those layers read it."""
        workspace = self._workspace
        if layer_idx in self._shared_kv_layers:
            workspace = DequantWorkspace()
            self._shared_kv_workspaces.append(workspace)
        settings = dict(fmt=self.format, strategy=self.strategy, scales=layer_scales(self.scales, layer_idx),
                        calculate_kv_scales=self.calculate_kv_scales, exact_prefill=self.exact_prefill,
                        workspace=workspace, layer_idx=layer_idx, attention_config=self._attention_config,
                        residual_length=self.residual_length, row_starts=self._row_starts,
                        quantize_query=self.quantize_query)  # fmt: skip
        if sliding_window is None:
            return FP8CacheLayer(**settings)
        return FP8SlidingWindowLayer(sliding_window, **settings)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    @property
    def kv_layers(self) -> list:
        """The layers holding FP8 K/V (hybrid layers included); the others keep transformers' states or nothing."""
        return [layer for layer in self.layers if isinstance(layer, (FP8CacheLayer, FP8HybridLayer))]

    @property
    def nbytes(self) -> int:
        """Bytes holding cached tokens in every K/V layer (FP8 K and V, the exact recent windows, scales); the
        linear-attention / SSM states transformers keeps are not counted."""
        return sum(layer.nbytes for layer in self.kv_layers)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of all FP8 buffers including spare capacity, plus the exact recent windows and scales."""
        return sum(layer.allocated_nbytes for layer in self.kv_layers)

    @property
    def workspace_nbytes(self) -> int:
        """Bytes of the dequantization workspaces (one layer's K/V in the model dtype; plus one per layer whose K/V
        other layers share)."""
        return self._workspace.nbytes + sum(workspace.nbytes for workspace in self._shared_kv_workspaces)

    def __repr__(self) -> str:
        return (
            f"QuantizedFP8Cache(format={self.format.name}, strategy={self.strategy!r}, layers={len(self.layers)}, "
            f"tokens={self.get_seq_length()}, nbytes={self.nbytes})"
        )


FP8Cache = QuantizedFP8Cache
