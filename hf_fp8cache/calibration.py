"""Dataset calibration: K/V (and Q) scales from a model run over real text (``calibrate``), with observers that
see only unpadded positions. The on-the-fly rule of the first prefill lives beside ``KVScales`` (``scales.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .formats import FP8Format, resolve_fp8_format
from .scales import KVScales, check_strategy
from .sharding import gather_observation

__all__ = ["DATASET_SUFFIXES", "OBSERVERS", "Observation", "Observer", "calibrate", "observe"]

OBSERVERS = ("amax", "mse")
# Local dataset files: .txt is split into paragraphs here; the others are read by ``datasets`` with this loader.
_DATASET_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
DATASET_SUFFIXES = (".txt", *_DATASET_LOADERS)  # the local files ``calibrate``'s ``dataset`` may name
# MSE search: candidate scales alpha * amax / fmax; alpha > 1 leaves headroom, alpha < 1 clips the largest values.
_MSE_ALPHAS = tuple(round(0.5 + 0.05 * i, 2) for i in range(31))  # 0.50 .. 2.00
_MSE_SAMPLES_PER_HEAD = 1 << 16  # bounded memory: a uniform sample of the values seen, per head


class Observer:
    """Running statistics of one tensor kind (K, V or Q) of one layer, per head: the running amax and a bounded
    uniform sample of the values seen (for the MSE search). Memory does not grow with the amount of data."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        self.kind = kind
        self.amax: torch.Tensor | None = None  # [H]
        self.samples: torch.Tensor | None = None  # [H, <= _MSE_SAMPLES_PER_HEAD]
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        """``x``: [N, H, D] valid (unpadded) rows of one batch, any device."""
        x = x.detach().float().cpu()
        amax = x.abs().amax(dim=(0, 2))
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        values = x.transpose(0, 1).reshape(x.shape[1], -1)  # [H, N * D]
        pool = values if self.samples is None else torch.cat([self.samples, values], dim=1)
        if pool.shape[1] > _MSE_SAMPLES_PER_HEAD:  # keep a uniform subset of everything seen so far
            pool = pool[:, torch.randperm(pool.shape[1], generator=self._generator)[:_MSE_SAMPLES_PER_HEAD]]
        self.samples = pool

    def scale(self, fmt: FP8Format, strategy: str, observer: str) -> torch.Tensor:
        """``"amax"``: amax / fmax. ``"mse"``: the candidate ``alpha * amax / fmax`` (alpha 0.5..2) with the lowest
        mean squared FP8 round-trip error over the sample (per head, or over all heads for ``"tensor"``)."""
        if self.amax is None or self.samples is None:
            raise ValueError(f"no {self.kind} values were observed")
        amax = self.amax.amax().reshape(1) if strategy == "tensor" else self.amax
        base = torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax))
        if observer == "amax":
            return base
        samples = self.samples.reshape(1, -1) if strategy == "tensor" else self.samples
        best, best_error = base, torch.full_like(amax, float("inf"))
        for alpha in _MSE_ALPHAS:
            candidate = (base * alpha)[:, None]
            error = (samples / candidate).clamp(-fmt.max, fmt.max).to(fmt.dtype).float() * candidate - samples
            error = error.pow(2).mean(dim=1)
            better = error < best_error
            best, best_error = torch.where(better, candidate[:, 0], best), torch.where(better, error, best_error)
        return best


def _check_observer(name: str) -> str:
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; use one of {', '.join(repr(o) for o in OBSERVERS)}")
    return name


class _ObservingLayer(CacheLayerMixin):
    """A cache layer that stores nothing: it shows each update's K and V to observers and hands them back."""

    is_compileable = False
    is_sliding = False

    def __init__(self, session: Observation, layer_idx: int) -> None:
        self.session, self.layer_idx = session, layer_idx
        self.keys = self.values = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.session.observe("k", self.layer_idx, key_states)
        self.session.observe("v", self.layer_idx, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class _ObservingCache(Cache):
    """Observing layers where the model keeps K/V; with ``config``, every other layer as transformers builds it
    (linear-attention / SSM states, KV sharing: ``hybrid.build_layers``), so hybrid models run as usual."""

    def __init__(self, session: Observation, config=None) -> None:
        from .hybrid import build_layers

        self.session = session
        layers = [] if config is None else build_layers(config, lambda i, _type, _window: _ObservingLayer(session, i))
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(_ObservingLayer(self.session, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)


class Observation:
    """Observers for every (kind, layer) of one pass over calibration text; turns them into ``KVScales``."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.observers: dict[tuple[str, int], Observer] = {}
        self.valid: torch.Tensor | None = None  # [B, S] bool, True for real tokens
        # (decoder layers, those holding K/V) of the model observed; None: every observed layer holds K/V
        self.model_layers: tuple[int, list[int]] | None = None

    def observe(self, kind: str, layer_idx: int, states: torch.Tensor) -> None:
        rows = states.transpose(1, 2)  # [B, S, H, D]
        rows = rows[self.valid.to(rows.device)] if self.valid is not None else rows.reshape(-1, *rows.shape[2:])
        key = (kind, layer_idx)
        if key not in self.observers:
            self.observers[key] = Observer(kind, self.seed + len(self.observers))
        self.observers[key].update(rows)

    def scales(
        self, fmt: FP8Format, strategy: str = "tensor", *, observer: str = "mse", query: bool = False
    ) -> KVScales:
        """Scales for ``fmt`` by ``observer`` (see ``calibrate``); with ``query``, the observed Q scales too."""
        check_strategy(strategy)
        _check_observer(observer)
        layers = sorted({layer for kind, layer in self.observers if kind == "k"})
        if not layers:
            raise ValueError("no attention layer wrote to the cache during calibration; is this a decoder model?")
        count, expected = self.model_layers or (len(layers), list(range(len(layers))))
        if layers != expected:
            raise ValueError(f"observed layers {layers} are not the model's K/V layers {expected}")
        width = 1 if strategy == "tensor" else self.observers[("k", layers[0])].amax.numel()  # type: ignore[union-attr]

        def scale(kind: str, i: int) -> torch.Tensor:
            """Indexed by decoder layer, as checkpoints are: a layer without K/V (linear attention, SSM) gets 1.0,
            never read."""
            if i not in layers:
                return torch.ones(width)
            return self.observers[(kind, i)].scale(fmt, strategy, observer)

        queries = [scale("q", i) if ("q", i) in self.observers else None for i in range(count)] if query else None
        return KVScales([scale("k", i) for i in range(count)], [scale("v", i) for i in range(count)], strategy,
                        query=queries)  # fmt: skip


_OBSERVE_ATTENTION = "hf_fp8cache_calibration"


def _observing_attention(session: Observation):
    """An attention function that shows the post-RoPE queries to the session, then runs SDPA."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        session.observe("q", module.layer_idx, query)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    return attention


def _texts(dataset, tokenizer, split: str | None, text_column: str | None, num_samples: int, seed: int) -> list[str]:
    """Turn the ``dataset`` argument of ``calibrate`` into at most ``num_samples`` texts."""
    if dataset is None:
        from .corpus import documents

        return list(documents("calibration"))[:num_samples]
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(t, str) for t in dataset):
            raise TypeError("a dataset given as a list must hold strings")
        return list(dataset)[:num_samples]
    if isinstance(dataset, (str, os.PathLike)):
        import datasets

        path = Path(dataset)
        if path.is_file() and path.suffix == ".txt":
            paragraphs = [p.strip() for p in path.read_text().split("\n\n")]
            return [p for p in paragraphs if p][:num_samples]
        if path.is_file():
            if path.suffix not in _DATASET_LOADERS:
                raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(DATASET_SUFFIXES)}")
            dataset = datasets.load_dataset(_DATASET_LOADERS[path.suffix], data_files=str(path), split="train")
        else:
            default_split = "train_sft" if "ultrachat" in str(dataset) else "train"
            dataset = datasets.load_dataset(str(dataset), split=split or default_split)
    if len(dataset) == 0:
        raise ValueError("the calibration dataset is empty")
    dataset = dataset.shuffle(seed=seed).select(range(min(num_samples, len(dataset))))
    columns = dataset.column_names
    if text_column is None:
        text_column = next((c for c in ("messages", "text", "content", "prompt") if c in columns), None)
    if text_column not in columns:
        raise ValueError(f"no text column among {columns}; pass text_column=")
    if text_column == "messages":
        return [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in dataset]
    return [row[text_column] for row in dataset]


def _model_layers(config) -> tuple[int, list[int]]:
    """The model's decoder layer count and the indices of its layers holding K/V (``cache_base.kv_layer_indices``)."""
    from .cache_base import kv_layer_indices

    return config.get_text_config(decoder=True).num_hidden_layers, kv_layer_indices(config)


@torch.no_grad()
def observe(
    model,
    tokenizer,
    dataset=None,
    *,
    num_samples: int = 512,
    max_seq_len: int = 2048,
    batch_size: int = 1,
    include_query: bool = False,
    split: str | None = None,
    text_column: str | None = None,
    seed: int = 42,
    progress: bool = True,
) -> Observation:
    """Run ``model`` over calibration text and collect per-layer, per-head statistics of the K and V (and Q) it
    writes; ``Observation.scales`` turns them into scales.

    Args:
        model, tokenizer, dataset, num_samples, max_seq_len, batch_size, include_query, split, text_column, seed,
            progress: as for ``calibrate``.
    """
    from tqdm.auto import tqdm

    from .integration import cache_keyword

    if num_samples < 1 or max_seq_len < 2 or batch_size < 1:
        raise ValueError(f"need num_samples >= 1, max_seq_len >= 2, batch_size >= 1; got {num_samples}, "
                         f"{max_seq_len}, {batch_size}")  # fmt: skip
    texts = _texts(dataset, tokenizer, split, text_column, num_samples, seed)
    if not texts:
        raise ValueError("the calibration dataset is empty")
    samples = [tokenizer(t, truncation=True, max_length=max_seq_len)["input_ids"] for t in texts]
    samples = [s for s in samples if len(s) >= 2]
    if not samples:
        raise ValueError(f"all {len(texts)} calibration samples are shorter than 2 tokens")
    samples.sort(key=len, reverse=True)
    observation = Observation(seed)
    observation.model_layers = _model_layers(model.config)
    keyword = cache_keyword(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    original_attention = model.config._attn_implementation
    if include_query:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(_OBSERVE_ATTENTION, _observing_attention(observation))
        AttentionMaskInterface.register(_OBSERVE_ATTENTION, sdpa_mask)
        model.set_attn_implementation(_OBSERVE_ATTENTION)
    try:
        batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
        for batch in tqdm(batches, desc="calibrating", disable=not progress):
            width = len(batch[0])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            valid = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, sample in enumerate(batch):
                ids[row, : len(sample)] = torch.tensor(sample)
                valid[row, : len(sample)] = True
            observation.valid = valid
            model(input_ids=ids.to(device), attention_mask=valid.long().to(device), use_cache=True,
                  **{keyword: _ObservingCache(observation, model.config)})  # fmt: skip
    finally:
        if include_query:
            model.set_attn_implementation(original_attention)
    return observation


def calibrate(
    model,
    tokenizer,
    dataset=None,
    *,
    num_samples: int = 512,
    max_seq_len: int = 2048,
    strategy: str = "tensor",
    observer: str = "mse",
    batch_size: int = 1,
    include_query: bool = False,
    kv_cache_dtype: str = "fp8",
    split: str | None = None,
    text_column: str | None = None,
    seed: int = 42,
    progress: bool = True,
) -> KVScales:
    """Static KV (and optionally Q) scales from running ``model`` over calibration text.

    The post-RoPE K and V every attention layer writes to the cache (and Q, with ``include_query``) are observed per
    layer and head over the unpadded positions, and turned into scales by ``observer``. Memory stays bounded however
    long the text.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        dataset: None (built-in offline English, ``corpus.documents("calibration")``), a list of strings, a local
            file (``DATASET_SUFFIXES``: ``.txt`` gives one sample per paragraph; ``.json`` / ``.jsonl`` /
            ``.parquet`` / ``.csv``), a ``datasets`` id or a ``datasets.Dataset``. Chat ``messages`` get the
            tokenizer's chat template, as vLLM's recipe does.
        num_samples: texts taken after shuffling with ``seed``.
        max_seq_len: tokens each text is truncated to.
        strategy: ``"tensor"`` (one scale per layer) or ``"attn_head"`` (one per KV head).
        observer: ``"amax"`` (llm-compressor's static min-max, scale = amax / fmax) or ``"mse"`` (of the candidates
            0.5x..2x that, the one minimising the FP8 round-trip MSE over a bounded uniform sample of the values).
        batch_size: texts per forward; batches are right-padded and padding is never observed.
        include_query: also observe Q (through a wrapping attention function) for ``q_scale``.
        kv_cache_dtype: the FP8 format the scales are for (``"fp8"`` = e4m3fn, ``"fp8_e5m2"``, ...).
        split: the split of a ``datasets`` id (default ``train_sft`` for ultrachat, else ``train``).
        text_column: the column holding the text (default: the first of messages, text, content, prompt).
        seed: the shuffle's seed.
        progress: show a progress bar.
    """
    check_strategy(strategy)
    _check_observer(observer)
    fmt = resolve_fp8_format(kv_cache_dtype, "calibration")
    observation = observe(model, tokenizer, dataset, num_samples=num_samples, max_seq_len=max_seq_len,
                          batch_size=batch_size, include_query=include_query, split=split, text_column=text_column,
                          seed=seed, progress=progress)  # fmt: skip
    gather_observation(observation, model.config)  # tensor parallelism: every head's statistics (sharding.py)
    return observation.scales(fmt, strategy, observer=observer, query=include_query)
