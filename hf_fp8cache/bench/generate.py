"""Decode speed through ``model.generate``, the way users call it, with each cache (``hf-fp8cache bench``'s default).

Model: a random-weight Llama -- the ``llama-3.1-8b`` shape in bf16 on the GPU, ``tiny`` in fp32 for CPU smoke
runs -- with SDPA unless a configuration switches to our attention (``model.set_attn_implementation``). The
``gpt-oss-20b`` / ``gemma-3-12b`` shapes (and their ``tiny-*`` CPU variants) measure those families: there every
configuration written "+ SDPA" below runs the family's baseline attention (``common.baseline_attention``: SDPA for
Gemma 3; for GPT-OSS, whose sinks SDPA lacks, ``flex_attention`` on CUDA and ``eager`` on CPU), and its row's
description names it. Prompt:
random ids ``[B, L]``; greedy, ``min_new_tokens = max_new_tokens`` (no early stop).

Per token: ``(t(generate N+1 tokens) - t(generate 1 token)) / N`` (N = 64 by default): the prefill and generate's
set-up cancel, the N decode steps remain with everything generate does around each forward. Each configuration
first generates N+1 and then 1 token untimed (Triton kernels and torch.compile compile there; with
``warmup_tokens`` from the first that many prompt tokens only, which compiles the same kernels and graphs at a
fraction of a long prefill's cost; the configurations whose cache is sized per call, ``static`` and
``fp8-attach-*``, still warm up on the whole prompt, since a shorter one would leave the timed calls' length to
compile), then ``repeats`` timed pairs; a row
gives the median of the pairs' per-token times, tokens/s = B / that time, and the median 1-token time as the time to
first token. ``torch.cuda.synchronize`` before and after every timed call.

Rounds: with ``rounds`` R > 1 the whole sequence of configurations runs R times in turn (A B C, A B C, ...), and a
row gives the median over the rounds of each value and of each ratio to the same round's ``dynamic`` row
(``ms_per_token_rounds`` keeps every round's time). The host of the GPU machine drifts by 10-20 % within one process
(the same configuration measured twice a minute apart on the H200 machine: 34.8 and 27.6 ms a token): rounds put
every configuration under the same drift, where one configuration after another would charge it to whichever ran
during a slow spell. A compiled configuration compiles again in every round (each configuration starts as a new
session does): give rounds to the eager, host-bound configurations, whose times drift. The first round of a process
also runs slow, after each configuration's own warm-up: 60-71 ms a token for ``DynamicCache`` at 1x4096 and 1x32768
against 19-42 ms in the six rounds after it (H200 machine, 2026-12-03), and one round with ``dynamic`` first showed
the eager FP8 cache at 0.74x where seven rounds give 1.28x. So the command line runs three rounds unless told.

Configurations (``CONFIGURATIONS``):

- ``dynamic``: ``DynamicCache`` + SDPA (generate's default; every ratio is to this row of the same run);
- ``static``: transformers' static cache, made and compiled by generate (``cache_implementation="static"``);
- ``hf-quantized-fp8``: transformers' ``QuantizedCache(backend="fp8")`` + SDPA (transformers >= 5.21; older
  versions give a ``skipped: ...`` row);
- ``fp8``: ``FP8Cache`` dequantized for the model's SDPA;
- ``fp8+attn``: ``FP8Cache`` + our attention reading FP8 (``attn_implementation="hf_fp8cache"``);
- ``fp8+attn+exact16``: the same with ``residual_length=16`` (the 16 most recent tokens also kept exact);
- ``fp8-token-head+attn``, ``int8-token-head+attn``: ``FP8Cache`` with a scale per token and KV head
  (``kv_cache_dtype="fp8_per_token_head"`` / ``"int8_per_token_head"``) + our attention;
- ``fp8-fp8-prefill+attn``: ``FP8Cache(exact_prefill=False)`` + our attention: the first prefill too reads the FP8
  K/V it has just written (through our kernel), for the time to first token;
- ``fp8-fp8q+attn``: the same with FP8 queries (``quantize_query=True``): both attention products on e4m3 operands,
  the first prefill included (issue 17's time-to-first-token row);
- ``fp8-static+attn``: ``FP8StaticCache(config, max_cache_len=L+N+1)`` + our attention, compiled by generate
  (every layer is compileable); one cache for the configuration's calls, ``reset()`` before each, as a user
  keeps it (a new cache object would recompile);
- ``fp8-static-token-head+attn``, ``int8-static-token-head+attn``: the same with a scale per token and KV head
  (issue 18's generate-level rows: compiled steps are device-bound, where the eager rows drift with the host);
- ``fp8-static-fp8q+attn``: the same with FP8 queries (``quantize_query=True``) on its decode steps (the first
  prefill attends over its exact K/V, as always in the static cache);
- ``fp8-attach-static+attn``: ``attach(model, attention=True, static=True)``: no cache is passed, the hook gives
  each call an ``FP8StaticCache`` sized from it (prompt + new tokens, a power of two) and keeps it for the next call
  of the same size, compiled by generate: what a user gets without choosing a maximum length;
- ``fp8-attach-graphs+attn``: ``attach(model, attention=True, static=True, cuda_graphs=True)``: the same caches, the
  decode steps captured as CUDA graphs and replayed (``decode_graphs.py``), nothing compiled.

Memory: ``peak_bytes`` is ``max_memory_allocated`` during the first timed (N+1)-token call minus what was
allocated before the configuration's first call (the weights): a static cache kept from an earlier call counts as
much as one made inside the call (CUDA only). ``kv_bytes``: bytes holding the cache's L+N tokens after that call
(ours: ``nbytes``; static caches: all they allocate); ``kv_allocated_bytes``: with spare capacity. Running out of
memory in one configuration gives an ``OOM`` row (its ``error``: the first line of torch's message, which names the
allocation) and the run goes on. Prints a table; writes
``generate_benchmark.{json,csv}`` after every case and ``.png`` at the end.

Floor (CUDA): ``floor_ms`` = the bytes a decode step must read at least -- every weight once plus the row's
``kv_bytes`` -- over the copy bandwidth measured at the start of the run (``copy_tb_s``, a 2 GiB device-to-device
copy); ``ms_per_token_vs_floor`` = ms per token over it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from ..attention import ATTENTION_NAME
from ..cache import FP8Cache
from ..integration import attach, cache_keyword, detach
from ..kernels import has_fp8_tensor_cores
from ..static_cache import FP8StaticCache
from .common import (
    MODEL_SHAPES,
    SDPA_BACKENDS,
    baseline_attention,
    build_model,
    cases_argument,
    cases_text,
    copy_ceiling_tb_s,
    environment,
    free_memory,
    model_family,
    parameter_bytes,
    plot_bars,
    print_aligned,
    sdpa_backend,
    sync,
    write_rows,
)

__all__ = [
    "CONFIGURATIONS",
    "Configuration",
    "for_family",
    "GPU_CASES",
    "CPU_CASES",
    "kv_nbytes",
    "run_generate_benchmark",
    "add_arguments",
    "run",
]

GPU_CASES = ((1, 4096), (1, 32768), (8, 16384), (8, 32768))
CPU_CASES = ((1, 64), (2, 32))
STEM = "generate_benchmark"
RECENT_EXACT = 16  # residual_length of the fp8+attn+exact16 configuration


def _hf_fp8_missing() -> str | None:
    from transformers import cache_utils

    if hasattr(cache_utils, "Fp8QuantizedLayer"):
        return None
    return f"transformers {transformers.__version__} has no QuantizedCache fp8 backend (5.21+)"


def _fp8_queries_missing() -> str | None:
    """Why FP8 queries cannot run here (a GPU without FP8 tensor cores), or None."""
    if not torch.cuda.is_available() or has_fp8_tensor_cores(torch.device("cuda")):
        return None
    return f"FP8 queries need compute capability 8.9+, {torch.cuda.get_device_name()} has less"


def _hf_fp8_cache(config, max_cache_len: int):
    from transformers import QuantizedCache

    return QuantizedCache(backend="fp8", config=config)


@dataclass(frozen=True)
class Configuration:
    """One way of generating: the attention implementation, the cache handed to generate (``make_cache(config,
    max_cache_len)``; None lets generate make its own from ``generate_kwargs``), and whether one cache serves all
    of the configuration's calls."""

    name: str
    description: str
    attention: str
    make_cache: Callable[[Any, int], Any] | None
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    reuse_cache: bool = False
    full_attention_only: str = ""  # why the cache refuses sliding-window layers, "" when it takes them
    missing: Callable[[], str | None] = lambda: None  # why this environment cannot run it, or None
    attach_options: dict[str, bool] | None = None  # the cache comes from attach(model, **these) (make_cache None)


CONFIGURATIONS: dict[str, Configuration] = {c.name: c for c in (
    Configuration("dynamic", "DynamicCache + SDPA", "sdpa", lambda config, _: DynamicCache(config=config)),
    Configuration("static", "transformers static cache + SDPA, compiled by generate", "sdpa", None,
                  {"cache_implementation": "static"}),
    Configuration("hf-quantized-fp8", "transformers QuantizedCache(backend='fp8') + SDPA", "sdpa", _hf_fp8_cache,
                  full_attention_only="QuantizedCache takes full-attention layers only", missing=_hf_fp8_missing),
    Configuration("fp8", "FP8Cache dequantized for SDPA", "sdpa", lambda config, _: FP8Cache(config)),
    Configuration("fp8+attn", "FP8Cache + hf_fp8cache attention", ATTENTION_NAME, lambda config, _: FP8Cache(config)),
    Configuration(f"fp8+attn+exact{RECENT_EXACT}", f"FP8Cache(residual_length={RECENT_EXACT}) + hf_fp8cache attention",
                  ATTENTION_NAME, lambda config, _: FP8Cache(config, residual_length=RECENT_EXACT),
                  full_attention_only="FP8Cache's residual_length is for full-attention layers only"),
    Configuration("fp8-token-head+attn", "FP8Cache(kv_cache_dtype='fp8_per_token_head') + hf_fp8cache attention",
                  ATTENTION_NAME, lambda config, _: FP8Cache(config, kv_cache_dtype="fp8_per_token_head")),
    Configuration("int8-token-head+attn", "FP8Cache(kv_cache_dtype='int8_per_token_head') + hf_fp8cache attention",
                  ATTENTION_NAME, lambda config, _: FP8Cache(config, kv_cache_dtype="int8_per_token_head")),
    Configuration("fp8-fp8-prefill+attn", "FP8Cache(exact_prefill=False) + hf_fp8cache attention", ATTENTION_NAME,
                  lambda config, _: FP8Cache(config, exact_prefill=False)),
    Configuration("fp8-fp8q+attn", "FP8Cache(exact_prefill=False, quantize_query=True) + hf_fp8cache attention",
                  ATTENTION_NAME, lambda config, _: FP8Cache(config, exact_prefill=False, quantize_query=True),
                  missing=_fp8_queries_missing),
    Configuration("fp8-static+attn", "FP8StaticCache + hf_fp8cache attention, compiled by generate", ATTENTION_NAME,
                  lambda config, length: FP8StaticCache(config, max_cache_len=length), reuse_cache=True),
    Configuration("fp8-static-token-head+attn", "FP8StaticCache(kv_cache_dtype='fp8_per_token_head') + hf_fp8cache "
                  "attention, compiled by generate", ATTENTION_NAME, lambda config, length: FP8StaticCache(config,
                  max_cache_len=length, kv_cache_dtype="fp8_per_token_head"), reuse_cache=True),  # fmt: skip
    Configuration("int8-static-token-head+attn", "FP8StaticCache(kv_cache_dtype='int8_per_token_head') + hf_fp8cache "
                  "attention, compiled by generate", ATTENTION_NAME, lambda config, length: FP8StaticCache(config,
                  max_cache_len=length, kv_cache_dtype="int8_per_token_head"), reuse_cache=True),  # fmt: skip
    Configuration("fp8-static-fp8q+attn", "FP8StaticCache(quantize_query=True) + hf_fp8cache attention, compiled by "
                  "generate", ATTENTION_NAME, lambda config, length: FP8StaticCache(config, max_cache_len=length,
                  quantize_query=True), reuse_cache=True, missing=_fp8_queries_missing),  # fmt: skip
    Configuration("fp8-attach-static+attn", "attach(static=True): FP8StaticCache sized per call + hf_fp8cache "
                  "attention, compiled by generate", ATTENTION_NAME, None, attach_options={"static": True}),
    Configuration("fp8-attach-graphs+attn", "attach(static=True, cuda_graphs=True): FP8StaticCache sized per call + "
                  "hf_fp8cache attention, decode steps replayed as CUDA graphs (not compiled)", ATTENTION_NAME, None,
                  attach_options={"static": True, "cuda_graphs": True}),
)}  # fmt: skip
# (row key, table label, divisor, decimals); the table gives each with its ratio to the dynamic row
COLUMNS = (("ms_per_token", "ms/token", 1, 3), ("tokens_per_s", "tok/s", 1, 1), ("ttft_ms", "TTFT ms", 1, 1),
           ("kv_bytes", "KV MiB", 2**20, 1), ("peak_bytes", "peak MiB", 2**20, 1))  # fmt: skip
RATIO_KEYS = {"ms_per_token": "ms_per_token_vs_dynamic", "tokens_per_s": "tokens_per_s_vs_dynamic",
              "ttft_ms": "ttft_vs_dynamic", "kv_bytes": "kv_bytes_vs_dynamic",
              "peak_bytes": "peak_vs_dynamic"}  # fmt: skip


def kv_nbytes(cache) -> tuple[int, int]:
    """(bytes holding the cached tokens, bytes allocated) of a cache after generate. Ours report both; an
    ``FP8StaticCache`` and transformers' caches hold what they allocate (transformers' fp8 layers: the fp8 codes
    and a 4-byte scale per tensor; the others: their K and V tensors)."""
    if isinstance(cache, FP8Cache):
        return cache.nbytes, cache.allocated_nbytes
    if isinstance(cache, FP8StaticCache):
        return cache.allocated_nbytes, cache.allocated_nbytes
    total = 0
    for layer in cache.layers:
        quantized = getattr(layer, "_quantized_keys", None)
        if quantized is not None:  # (fp8 codes, scale) pairs
            total += sum(t.nbytes for pair in (quantized, layer._quantized_values) for t in pair)
        else:
            total += layer.keys.nbytes + layer.values.nbytes
    return total, total


def _forget_generate_state(model) -> None:
    """Drop what generate keeps on the model between calls -- its compiled forward and the length of the last static
    cache it made (which would size the next one) -- so every configuration starts as a new session does."""
    compiled = model.__dict__.pop("_compiled_call", None) is not None
    for name in ("_last_compile_config", "_previous_max_cache_length", "_cache"):
        model.__dict__.pop(name, None)
    if compiled:
        torch._dynamo.reset()


def _timed_generate(model, inputs: dict[str, torch.Tensor], new_tokens: int, cache, extra: dict[str, Any]):
    """Seconds of one greedy generate of exactly ``new_tokens`` tokens, and the cache it leaves."""
    keyword = cache_keyword(model)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, **extra)  # fmt: skip
    if cache is not None:
        kwargs[keyword] = cache
    device = inputs["input_ids"].device
    sync(device)
    start = time.perf_counter()
    out = model.generate(**inputs, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    expected = inputs["input_ids"].shape[1] + new_tokens
    if out.sequences.shape[1] != expected:
        raise RuntimeError(f"generate returned {out.sequences.shape[1]} positions, expected {expected}")
    return seconds, getattr(out, keyword)


def _measure(model, configuration: Configuration, inputs: dict[str, torch.Tensor], new_tokens: int,
             repeats: int, warmup_tokens: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Warm-up, then ``repeats`` timed (N+1, 1)-token pairs with one configuration; the row's measured fields."""
    device = inputs["input_ids"].device
    cuda = device.type == "cuda"
    model.set_attn_implementation(configuration.attention)
    if configuration.attach_options:
        attach(model, **configuration.attach_options)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    max_cache_len = inputs["input_ids"].shape[1] + new_tokens + 1
    make = configuration.make_cache
    shared = make(model.config, max_cache_len) if configuration.reuse_cache else None

    def call(tokens: int, prompt: dict[str, torch.Tensor] = inputs):
        if shared is not None:
            shared.reset()
            cache = shared
        else:
            cache = None if make is None else make(model.config, max_cache_len)
        return _timed_generate(model, prompt, tokens, cache, configuration.generate_kwargs)

    if make is None:  # a cache sized per call: a shorter warm-up would leave the timed length to compile
        warmup_tokens = None
    warmup = inputs if warmup_tokens is None else {name: t[:, :warmup_tokens] for name, t in inputs.items()}
    call(new_tokens + 1, warmup)  # the longer call first: a static cache generate makes keeps the longer length
    call(1, warmup)
    compiled = "_compiled_call" in model.__dict__ and not (configuration.attach_options or {}).get("cuda_graphs")
    long_s, short_s = [], []
    for repeat in range(repeats):
        if cuda and repeat == 0:
            torch.cuda.reset_peak_memory_stats(device)
        seconds, cache = call(new_tokens + 1)
        if repeat == 0:
            peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
            kv, allocated = kv_nbytes(cache)
        del cache
        long_s.append(seconds)
        short_s.append(call(1)[0])
    per_token = statistics.median((long - short) / new_tokens for long, short in zip(long_s, short_s))
    B = inputs["input_ids"].shape[0]
    return {"ms_per_token": per_token * 1e3, "tokens_per_s": B / per_token if per_token > 0 else None,
            "ttft_ms": statistics.median(short_s) * 1e3, "generate_ms": statistics.median(long_s) * 1e3,
            "peak_bytes": peak, "kv_bytes": kv, "kv_allocated_bytes": allocated, "compiled": compiled}  # fmt: skip


def for_family(configuration: Configuration, baseline: str, layer_types: Sequence[str] | None) -> Configuration:
    """The configuration as a model family runs it: "sdpa" becomes the family's ``baseline`` attention (named in
    the description); a cache that refuses sliding layers is skipped on a model with any (``layer_types``)."""
    changes: dict[str, Any] = {}
    if configuration.attention == "sdpa" and baseline != "sdpa":
        changes["attention"] = baseline
        changes["description"] = configuration.description.replace("SDPA", f"{baseline} (no SDPA: attention sinks)")
    sliding = sorted({kind for kind in layer_types or () if kind != "full_attention"})
    if configuration.full_attention_only and sliding:
        changes["missing"] = lambda: f"{configuration.full_attention_only}; the model has {', '.join(sliding)}"
    return dataclasses.replace(configuration, **changes) if changes else configuration


def _unmeasured(status: str) -> dict[str, Any]:
    return {"ms_per_token": None, "tokens_per_s": None, "ttft_ms": None, "generate_ms": None, "peak_bytes": None,
            "kv_bytes": None, "kv_allocated_bytes": None, "compiled": None, "status": status}  # fmt: skip


def _run_configuration(model, configuration: Configuration, inputs, new_tokens: int, repeats: int,
                       backend: str | None, baseline: str = "sdpa",
                       warmup_tokens: int | None = None) -> dict[str, Any]:  # fmt: skip
    """One configuration's measured fields (or an ``OOM`` / ``skipped: ...`` row); the model goes back to its
    ``baseline`` attention after it."""
    missing = configuration.missing()
    if missing:
        return _unmeasured(f"skipped: {missing}")
    device = inputs["input_ids"].device
    _forget_generate_state(model)
    free_memory(device)
    try:
        with torch.no_grad(), sdpa_backend(backend):
            measured = {**_measure(model, configuration, inputs, new_tokens, repeats, warmup_tokens), "status": "ok"}
    except torch.cuda.OutOfMemoryError as error:  # the allocation that failed, for the record
        measured = {**_unmeasured("OOM"), "error": str(error).splitlines()[0][:300]}
    finally:
        detach(model)  # (a no-op unless the configuration attached)
        model.set_attn_implementation(baseline)
        _forget_generate_state(model)
        free_memory(device)
    return measured


def _copy_bandwidth_tb_s(device: torch.device) -> float | None:
    """The GPU's copy bandwidth measured now (``common.copy_ceiling_tb_s``); None on CPU (no floor)."""
    return copy_ceiling_tb_s() if device.type == "cuda" else None


def _floor(measured: dict[str, Any], weight_bytes: int, copy_tb_s: float | None) -> dict[str, float | None]:
    """``floor_ms`` (every weight and the row's cached K/V read once at the copy bandwidth) and the row's ms per
    token over it; None without a bandwidth (CPU) or a measured row."""
    kv_bytes, ms = measured["kv_bytes"], measured["ms_per_token"]
    if copy_tb_s is None or kv_bytes is None or ms is None:
        return {"floor_ms": None, "ms_per_token_vs_floor": None}
    floor_ms = (weight_bytes + kv_bytes) / (copy_tb_s * 1e12) * 1e3
    return {"floor_ms": floor_ms, "ms_per_token_vs_floor": ms / floor_ms}


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each metric of a case's rows over the same case's dynamic row (None where either is missing or zero)."""
    dynamic = next((r for r in rows if r["config"] == "dynamic"), None)
    for row in rows:
        for key, ratio in RATIO_KEYS.items():
            base = dynamic and dynamic[key]
            row[ratio] = row[key] / base if base and row[key] is not None else None


def _median_of_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One case's rows from its rounds (each a list of rows with ratios, configurations in the same order): every
    measured value and ratio is the median over the rounds; a row whose status is not ``ok`` in some round keeps
    that round's row."""
    rows = []
    for measured in zip(*rounds):
        failed = next((row for row in measured if row["status"] != "ok"), None)
        if failed is not None:
            rows.append(failed)
            continue
        row = dict(measured[0])
        for key in (*RATIO_KEYS, *RATIO_KEYS.values(), "generate_ms", "ms_per_token_vs_floor"):
            values = [r[key] for r in measured]
            row[key] = None if any(v is None for v in values) else statistics.median(values)
        row["ms_per_token_rounds"] = [r["ms_per_token"] for r in measured]
        rows.append(row)
    return rows


def _defaults(device, model_shape, cases, dtype):
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    model_shape = model_shape or ("llama-3.1-8b" if cuda else "tiny")
    cases = tuple(cases) if cases is not None else (GPU_CASES if cuda else CPU_CASES)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    return dev, model_shape, cases, dtype


def _check(cases, new_tokens: int, repeats: int, rounds: int, configs: Sequence[str], model_shape: str,
           warmup_tokens: int | None = None) -> None:  # fmt: skip
    for name, value in (("new_tokens", new_tokens), ("repeats", repeats), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not cases or any(len(case) != 2 or min(case) < 1 for case in cases):
        raise ValueError(f"cases must be (batch, prompt tokens) pairs, each >= 1, got {cases!r}")
    unknown = [name for name in configs if name not in CONFIGURATIONS]
    if unknown or not configs:
        raise ValueError(f"configs must be among {list(CONFIGURATIONS)}, got {list(configs)!r}")
    if model_shape not in MODEL_SHAPES:
        raise ValueError(f"model_shape must be one of {sorted(MODEL_SHAPES)}, got {model_shape!r}")
    if warmup_tokens is not None:
        if isinstance(warmup_tokens, bool) or not isinstance(warmup_tokens, int) or warmup_tokens < 1:
            raise ValueError(f"warmup_tokens must be None or an int >= 1, got {warmup_tokens!r}")


def run_generate_benchmark(
    cases: Sequence[tuple[int, int]] | None = None,
    model_shape: str | None = None,
    new_tokens: int = 64,
    repeats: int = 1,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    configs: Sequence[str] | None = None,
    out_dir: str | Path = "results",
    sdpa: str | None = None,
    rounds: int = 1,
    warmup_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Time ``model.generate`` with each configuration at every ``(B, L)``, ``rounds`` times in turn (module
    docstring); print, save and return the rows.

    None picks the device's defaults: CUDA when available, the 8B shape in bf16 over ``GPU_CASES`` there, the tiny
    shape in fp32 over ``CPU_CASES`` on CPU; every configuration."""
    dev, model_shape, cases, dtype = _defaults(device, model_shape, cases, dtype)
    configs = list(CONFIGURATIONS) if configs is None else list(configs)
    _check(cases, new_tokens, repeats, rounds, configs, model_shape, warmup_tokens)
    if sdpa is not None and sdpa not in SDPA_BACKENDS:
        raise ValueError(f"sdpa must be one of {SDPA_BACKENDS} or None, got {sdpa!r}")
    model = build_model(model_shape, dev, dtype)
    baseline = baseline_attention(model_family(model_shape), dev)
    copy_tb_s = _copy_bandwidth_tb_s(dev)
    weight_bytes = parameter_bytes(model)
    env = {"model_shape": model_shape, "dtype": str(dtype).removeprefix("torch."), "new_tokens": new_tokens,
           "repeats": repeats, "rounds": rounds, "warmup_tokens": warmup_tokens, "sdpa_backend": sdpa or "default",
           "copy_tb_s": copy_tb_s,
           **environment(dev)}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for B, L in cases:
        ids = torch.randint(3, model.config.vocab_size, (B, L), generator=generator).to(dev)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        case_rounds = []
        for _ in range(rounds):
            case_rows = []
            for name in configs:
                configuration = for_family(CONFIGURATIONS[name], baseline, getattr(model.config, "layer_types", None))
                measured = _run_configuration(model, configuration, inputs, new_tokens, repeats, sdpa, baseline,
                                              warmup_tokens)  # fmt: skip
                case_rows.append({"case": f"{B}x{L}", "B": B, "L": L, "config": name,
                                  "description": configuration.description, **measured,
                                  **_floor(measured, weight_bytes, copy_tb_s)})  # fmt: skip
            _add_ratios(case_rows)
            case_rounds.append(case_rows)
        rows += [{**row, **env} for row in _median_of_rounds(case_rounds)]
        write_rows(rows, out_dir, STEM)  # after every case: a long run that dies keeps what it measured
        del inputs, ids
    del model
    free_memory(dev)
    print_table(rows)
    save_plot(rows, Path(out_dir))
    return rows


def _cell(value, divisor: float, digits: int) -> str:
    return "-" if value is None else f"{value / divisor:.{digits}f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    """The run's conditions, then one line per case and configuration: each metric and its ratio to dynamic."""
    first = rows[0]
    print(f"model.generate, greedy, {first['new_tokens']} new tokens; per token = (t(N+1 tokens) - t(1 token)) / N, "
          f"median of {first['repeats']} pairs, of {first['rounds']} rounds | {first['model_shape']} "
          f"{first['dtype']} | sdpa {first['sdpa_backend']} | {first['gpu']} | torch {first['torch']} | transformers "
          f"{first['transformers']} | triton {first['triton']} | {first['git_sha']}")  # fmt: skip
    if first["copy_tb_s"] is not None:
        print(f"floor = (weights + the row's KV bytes) / copy bandwidth {first['copy_tb_s']:.2f} TB/s")
    head = ["case", "config"]
    for _, label, _, _ in COLUMNS:
        head += [label, "/dyn"]
    lines = [[*head, "ms/floor", "compiled", "status"]]
    for row in rows:
        line = [row["case"], row["config"]]
        for key, _, divisor, digits in COLUMNS:
            line += [_cell(row[key], divisor, digits), _cell(row[RATIO_KEYS[key]], 1, 3)]
        compiled = "-" if row["compiled"] is None else "yes" if row["compiled"] else "no"
        lines.append([*line, _cell(row["ms_per_token_vs_floor"], 1, 2), compiled, row["status"]])
    print_aligned(lines)


def save_plot(rows: list[dict[str, Any]], out_dir: Path) -> bool:
    """``generate_benchmark.png``: ms per token, KV MiB and (CUDA) peak MiB per case, a bar per configuration."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by = {(r["case"], r["config"]): r for r in rows}
    panels = []
    for key, label, divisor, _ in (COLUMNS[0], COLUMNS[3], COLUMNS[4]):
        if any(r[key] is not None for r in rows):
            series = {c: [None if by[case, c][key] is None else by[case, c][key] / divisor for case in cases]
                      for c in configs}  # fmt: skip
            panels.append((label, {c: values for c, values in series.items() if any(v is not None for v in values)}))
    if not panels:
        return False
    first = rows[0]
    title = f"model.generate per cache ({first['model_shape']}, {first['dtype']}, {first['gpu']})"
    return plot_bars(out_dir / f"{STEM}.png", cases, panels, title)


def add_arguments(parser) -> None:
    default = f"GPU {cases_text(GPU_CASES)}, CPU {cases_text(CPU_CASES)}"
    parser.add_argument("--cases", type=cases_argument, default=None, help=f"batch x prompt tokens (default {default})")
    parser.add_argument(
        "--model-shape", choices=sorted(MODEL_SHAPES), default=None, help="default llama-3.1-8b on GPU, tiny on CPU"
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="N: per token = (t(N+1) - t(1)) / N")
    parser.add_argument("--repeats", type=int, default=1, help="timed (N+1, 1) pairs; the median is reported")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every configuration in turn; the median")
    parser.add_argument("--warmup-tokens", type=int, default=None,
                        help="warm up on the first W prompt tokens (default: the whole prompt)")  # fmt: skip
    parser.add_argument("--configs", default=None, help=f"comma list among {','.join(CONFIGURATIONS)} (default all)")
    parser.add_argument("--device", default=None, help="default cuda when available, else cpu")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default bfloat16 on GPU, float32 on CPU",
    )
    parser.add_argument("--sdpa-backend", choices=SDPA_BACKENDS, default=None, help="pin torch SDPA to one backend")
    parser.add_argument("--out-dir", default="results")  # fmt: skip


def run(args) -> list[dict[str, Any]]:
    return run_generate_benchmark(
        args.cases, args.model_shape, args.new_tokens, args.repeats, args.device,
        getattr(torch, args.dtype) if args.dtype else None,
        args.configs.split(",") if args.configs else None, args.out_dir, args.sdpa_backend, args.rounds,
        args.warmup_tokens,
    )  # fmt: skip
