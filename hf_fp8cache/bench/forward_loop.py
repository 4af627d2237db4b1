"""A bare forward loop: decode steps as direct ``model(...)`` calls, without ``generate``, per cache.

Not what users run (``generate.py`` measures that): this loop calls the model's forward itself, so it leaves out
generate's logits processing and input preparation and keeps in the eager per-step overhead. Use it to look at one
step's parts; quote ``generate.py``'s numbers.

A random-weight Llama (``llama-3.1-8b`` shape, or ``tiny`` for CPU smoke runs; SDPA, built on the device in
``dtype``, eval, no grad) prefills random ids ``[B, L]`` in 2048-token chunks into a fresh cache of each kind, then
runs ``warmup`` untimed and ``steps`` timed one-token decode steps (one fixed random token sequence, shared by all
caches). Per (B, L, cache): median wall ms per step (``cuda.synchronize`` around the clock reads, so it includes
Python/launch overhead), median GPU ms (CUDA event pair; None on CPU), KV bytes (DynamicCache: K+V of all layers;
FP8Cache: ``nbytes``, with ``allocated_nbytes`` and ``workspace_nbytes``), peak ``max_memory_allocated`` over
prefill + decode minus parameter bytes (CUDA only; mostly prefill activations at long L), and the fraction of rows
whose greedy token after the last step matches across caches (sanity only: random weights give flat logits).
Prints a table; writes ``forward_loop_benchmark.{json,csv,png}``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from ..attention import ATTENTION_NAME
from ..cache import FP8Cache
from ..integration import cache_keyword
from .common import (
    LLAMA_SHAPES,
    SDPA_BACKENDS,
    build_model,
    cases_argument,
    environment,
    free_memory,
    parameter_bytes,
    plot_bars,
    print_aligned,
    sdpa_backend,
    sync,
    write_rows,
)

__all__ = ["CACHES", "available_caches", "run_forward_loop_benchmark", "print_table", "save_rows", "add_arguments",
           "run"]  # fmt: skip

STEM = "forward_loop_benchmark"
PREFILL_CHUNK = 2048
# DynamicCache + SDPA; FP8 cache + SDPA (dequantize path); FP8 cache + our attention reading FP8 directly;
# transformers' own QuantizedCache(backend="fp8") + SDPA (transformers >= 5.21; left out where it does not exist)
CACHES = ("dynamic", "fp8", "fp8+attn", "hf-quantized-fp8")
# the run's conditions, printed above the table
CONDITIONS = ("model_shape", "dtype", "sdpa_backend", "steps", "warmup", "gpu", "torch", "transformers", "triton",
              "git_sha")  # fmt: skip
# (row key, table/plot label, divisor, decimals) of the metrics compared side by side
METRICS = [("wall_ms_median", "wall ms", 1, 3), ("gpu_ms_median", "gpu ms", 1, 3), ("kv_bytes", "KV MiB", 2**20, 2),
           ("peak_extra_bytes", "peak+ MiB", 2**20, 1)]  # fmt: skip


def available_caches() -> tuple[str, ...]:
    """The cache kinds this transformers version has (``QuantizedCache``'s fp8 backend came in 5.21)."""
    from transformers import cache_utils

    return tuple(k for k in CACHES if k != "hf-quantized-fp8" or hasattr(cache_utils, "Fp8QuantizedLayer"))


def _new_cache(kind: str, config):
    if kind == "dynamic":
        return DynamicCache(config=config)
    if kind == "hf-quantized-fp8":
        from transformers import QuantizedCache

        return QuantizedCache(backend="fp8", config=config)
    return FP8Cache(config=config)


def _cache_bytes(kind: str, cache) -> tuple[int, int, int]:
    """(KV bytes, allocated bytes, workspace bytes) of a filled cache."""
    if isinstance(cache, FP8Cache):
        return cache.nbytes, cache.allocated_nbytes, cache.workspace_nbytes
    if kind == "hf-quantized-fp8":  # fp8 tensors (torch.cat per step) and one fp32 scale each
        pairs = [(lay._quantized_keys, lay._quantized_values) for lay in cache.layers]
        kv = sum(t[0].nbytes + 4 for pair in pairs for t in pair)
        return kv, kv, 0
    # DynamicCache holds exactly-sized tensors and no workspace
    kv = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
    return kv, kv, 0


def _run_one(model, kind: str, prompt: torch.Tensor, decode_tokens: torch.Tensor, warmup: int, param_bytes: int,
             backend: str | None) -> tuple[dict[str, Any], torch.Tensor]:  # fmt: skip
    """Prefill + decode with one fresh cache; returns the row and the greedy token after the last step."""
    device, kw, cuda = prompt.device, cache_keyword(model), prompt.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.set_attn_implementation(ATTENTION_NAME if kind == "fp8+attn" else "sdpa")
    cache = _new_cache(kind, model.config)
    wall_ms: list[float] = []
    gpu_ms: list[float] = []
    with torch.no_grad(), sdpa_backend(backend):
        for start in range(0, prompt.shape[1], PREFILL_CHUNK):
            chunk = prompt[:, start : start + PREFILL_CHUNK]
            logits = model(input_ids=chunk, **{kw: cache}, use_cache=True, logits_to_keep=1).logits
        for i, token in enumerate(decode_tokens):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
            sync(device)
            t0 = time.perf_counter()
            if events:
                events[0].record()
            logits = model(input_ids=token, **{kw: cache}, use_cache=True, logits_to_keep=1).logits
            if events:
                events[1].record()
            sync(device)
            if i >= warmup:
                wall_ms.append((time.perf_counter() - t0) * 1e3)
                if events:
                    gpu_ms.append(events[0].elapsed_time(events[1]))
    kv, allocated, workspace = _cache_bytes(kind, cache)
    peak = torch.cuda.max_memory_allocated(device) - param_bytes if cuda else None
    row = {"cache": kind, "wall_ms_median": statistics.median(wall_ms),
           "gpu_ms_median": statistics.median(gpu_ms) if gpu_ms else None, "kv_bytes": kv,
           "allocated_bytes": allocated, "workspace_bytes": workspace, "peak_extra_bytes": peak}  # fmt: skip
    next_token = logits[:, -1].argmax(dim=-1).cpu()
    del cache, logits
    free_memory(device)
    return row, next_token


def run_forward_loop_benchmark(
    cases: tuple[tuple[int, int], ...] = ((1, 4096), (8, 8192)),
    model_shape: str = "llama-3.1-8b",
    steps: int = 20,
    warmup: int = 3,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    out_dir: str | Path = "results",
    sdpa: str | None = None,
) -> list[dict[str, Any]]:
    """Benchmark bare forward decode steps with each cache for every ``(B, L)``; print, save and return the rows."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps!r}, warmup={warmup!r}")
    dev = torch.device(device)
    model = build_model(model_shape, dev, dtype)
    param_bytes = parameter_bytes(model)
    env = {"model_shape": model_shape, "dtype": str(dtype).removeprefix("torch."), "steps": steps, "warmup": warmup,
           "sdpa_backend": sdpa or "default", **environment(dev)}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows: list[dict[str, Any]] = []
    for B, L in cases:
        prompt = torch.randint(vocab, (B, L), generator=generator).to(dev)
        decode_tokens = torch.randint(vocab, (warmup + steps, B, 1), generator=generator).to(dev)
        results = [_run_one(model, kind, prompt, decode_tokens, warmup, param_bytes, sdpa)
                   for kind in available_caches()]  # fmt: skip
        model.set_attn_implementation("sdpa")
        for row, token in results:
            ratio = row["kv_bytes"] / results[0][0]["kv_bytes"]
            match = (token == results[0][1]).float().mean().item()
            rows.append({"case": f"{B}x{L}", "B": B, "L": L, **row, "kv_ratio_vs_dynamic": ratio,
                         "greedy_match": match, **env})  # fmt: skip
    del model
    free_memory(dev)
    print_table(rows)
    save_rows(rows, Path(out_dir))
    return rows


def _kinds(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["cache"] for r in rows))


def _row(rows: list[dict[str, Any]], case: str, kind: str) -> dict[str, Any]:
    return next(r for r in rows if r["case"] == case and r["cache"] == kind)


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per case and metric group: DynamicCache, then each FP8 variant with its ratio to DynamicCache."""
    kinds = _kinds(rows)
    head = ["case"]
    for _, label, _, _ in METRICS:
        head += [f"{label} dyn"] + [f"{label} {kind}{suffix}" for kind in kinds[1:] for suffix in ("", " /dyn")]
    head += [f"greedy= {kind}" for kind in kinds[1:]]
    lines = [head]
    for case in dict.fromkeys(r["case"] for r in rows):
        dyn, *others = (_row(rows, case, kind) for kind in kinds)
        line = [case]
        for key, _, div, digits in METRICS:
            line.append("-" if dyn[key] is None else f"{dyn[key] / div:.{digits}f}")
            for other in others:
                value = other[key]
                line.append("-" if value is None else f"{value / div:.{digits}f}")
                line.append(f"{value / dyn[key]:.3f}" if dyn[key] and value is not None else "-")
        lines.append([*line, *(f"{other['greedy_match']:.2f}" for other in others)])
    print("bare forward loop (no generate) | " + " | ".join(f"{k}={rows[0][k]}" for k in CONDITIONS))
    print_aligned(lines)


def save_rows(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Write ``forward_loop_benchmark.json``, ``.csv`` and (if matplotlib is available) ``.png`` under ``out_dir``."""
    write_rows(rows, out_dir, STEM)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    panels = [(label, {kind: [_row(rows, case, kind)[key] / div for case in cases] for kind in _kinds(rows)})
              for key, label, div, _ in METRICS if rows[0][key] is not None]  # fmt: skip
    title = f"bare forward loop: DynamicCache vs FP8Cache ({rows[0]['model_shape']}, {rows[0]['gpu']})"
    plot_bars(Path(out_dir) / f"{STEM}.png", cases, panels, title)


def add_arguments(parser) -> None:
    parser.add_argument("--cases", type=cases_argument, default=((1, 4096), (8, 8192)), help="e.g. 1x4096,8x8192")
    parser.add_argument("--model-shape", choices=LLAMA_SHAPES, default="llama-3.1-8b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--sdpa-backend", choices=SDPA_BACKENDS, default=None, help="pin torch SDPA to one backend")
    parser.add_argument("--out-dir", default="results")


def run(args) -> list[dict[str, Any]]:
    return run_forward_loop_benchmark(args.cases, args.model_shape, args.steps, args.warmup, args.device,
                                      getattr(torch, args.dtype), args.out_dir, args.sdpa_backend)  # fmt: skip
