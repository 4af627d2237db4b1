"""Decode time a token inside one ``generate`` call, one prefill a configuration (issue 15), GPU machine.

``bench generate`` times a configuration by the difference of two calls, t(N + 1 tokens) - t(1 token), each with its
own prefill, twice (warm-up and timed): four prefills. A GPT-OSS-20B-shaped model prefills 8 x 32768 tokens eagerly
in about two minutes (transformers' MoE experts), so that method does not fit a 10-minute call at that case. Here a
logits processor stamps the clock at every decode step of one generate of N + 1 tokens, and the time a token is
(stamp[N] - stamp[0]) / N: the steps after the first, without the prefill. Every step ends in a device sync (generate
reads whether a row has finished, and the clock syncs before it stamps, so the first decode step does not carry the
prefill's tail), so the stamps follow the device as well as the host. Before it, each configuration starts from an
emptied CUDA caching allocator (as a new process would: a pool left by the previous configuration made one FP8 run's
first decode step free and re-reserve the whole pool, a 4.8 s stall) and warms up (compiles) on a 256-token prompt with
a cache of the same capacity.

Per configuration: ms a token, tokens/s, peak memory allocated during the timed call beyond the weights, and the
cache's KV bytes, as ``bench generate`` reports them, each step's time (``step_ms``: a one-time stall shows apart from
a slow step), with ratios to the same run's first ``dynamic`` row that ran (``dynamic:flex_attention``: a
configuration with another attention implementation). A configuration that fails leaves a row with its error and
innermost frames (which allocation ran out of memory). Rows are written
after every configuration (a cut run keeps them), with the CUDA caching allocator's retries (``num_alloc_retries``:
frees and retries when an allocation does not fit, which slow a step) and its ``cudaMalloc`` / ``cudaFree``
calls (``num_device_alloc`` / ``num_device_free``). With ``PROFILE=1`` a configuration then
continues its cache for 8 more tokens under ``torch.profiler`` (decode steps only: the prompt is in the cache) and
writes the top ops by CUDA and by CPU time to ``step_clock_<config>.txt``.

    SHAPE=gpt-oss-20b python benchmarks/gpu/step_clock.py dynamic,fp8+attn,fp8-static+attn 8x32768
                                                              # writes step_clock.json to $OUT
"""

import dataclasses
import json
import os
import sys
import time
import traceback

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_fp8cache.bench.common import SHAPE_FAMILIES, baseline_attention, build_model, sync
from hf_fp8cache.bench.generate import CONFIGURATIONS, for_family, kv_nbytes

out = os.environ.get("OUT", ".")
configs = (sys.argv[1] if len(sys.argv) > 1 else "dynamic,fp8+attn,fp8-static+attn").split(",")
B, L = map(int, (sys.argv[2] if len(sys.argv) > 2 else "8x32768").split("x"))
N = int(os.environ.get("TOKENS", "32"))
shape = os.environ.get("SHAPE", "gpt-oss-20b")
dev = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu SHAPE=tiny-gpt-oss: a CPU dry run
model = build_model(shape, dev, torch.bfloat16)
baseline = baseline_attention(SHAPE_FAMILIES.get(shape, "llama"), dev)
layer_types = getattr(model.config, "layer_types", None)
weights = sum(p.nbytes for p in model.parameters())
ids = torch.randint(
    100, min(20000, model.config.vocab_size), (B, L), device=dev, generator=torch.Generator(device=dev).manual_seed(0)
)


class StepClock(LogitsProcessor):
    """Stamps the clock at every step once the device has finished the step's forward (generate syncs at the end of
    each step anyway; the sync here makes the first stamp wait for the prefill too, so the first decode step's time
    is its own), with the CUDA caching allocator's retries so far."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.retries: list[int] = []

    def __call__(self, input_ids, scores):
        sync(dev)
        self.stamps.append(time.perf_counter())
        if dev.type == "cuda":
            self.retries.append(torch.cuda.memory_stats().get("num_alloc_retries", 0))
        return scores


def generate(cfg, prompt: torch.Tensor, cache, clock: StepClock | None = None, tokens: int = N + 1) -> torch.Tensor:
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                          max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                          logits_processor=LogitsProcessorList([clock] if clock else []),
                          **cfg.generate_kwargs)  # fmt: skip


def profile_decode(name: str, cfg, sequences: torch.Tensor, cache) -> None:
    """8 more tokens from ``cache`` (which holds ``sequences`` but their last token) under torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        generate(cfg, sequences, cache, tokens=8)
        sync(dev)
    events = prof.key_averages()
    with open(f"{out}/step_clock_{name.replace('+', '_')}.txt", "w") as fh:
        fh.write(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70) + "\n")
        fh.write(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


def write_rows() -> None:
    with open(f"{out}/step_clock.json", "w") as fh:
        gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
        json.dump(dict(gpu=gpu, torch=torch.__version__, weights_bytes=weights, rows=rows), fh, indent=2)


rows: list[dict] = []
with torch.no_grad():
    for name in configs:
        configuration, _, attention = name.partition(":")  # dynamic:flex_attention -- another attention
        cfg = for_family(CONFIGURATIONS[configuration], baseline, layer_types)
        if attention:
            cfg = dataclasses.replace(cfg, attention=attention, description=f"{cfg.description}, {attention}")
        model.set_attn_implementation(cfg.attention)
        capacity = L + N + 9  # (8 more for the profiled continuation)
        torch.cuda.empty_cache() if dev.type == "cuda" else None  # each configuration from an empty pool
        generate(cfg, ids[:, :256], cfg.make_cache(model.config, capacity))  # compile and warm, same capacity
        cache = cfg.make_cache(model.config, capacity)
        clock = StepClock()
        sync(dev)
        torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
        start = time.perf_counter()
        before = torch.cuda.memory_stats() if dev.type == "cuda" else {}
        try:
            sequences = generate(cfg, ids, cache, clock)
            sync(dev)
        except Exception as error:  # a row that says what and where; the next configuration still runs
            del cache
            torch.cuda.empty_cache()
            status = "OOM" if isinstance(error, torch.OutOfMemoryError) else type(error).__name__
            message = str(error).splitlines()[0][:300]
            steps = [(b - a) * 1e3 for a, b in zip(clock.stamps, clock.stamps[1:])]
            where = traceback.extract_tb(error.__traceback__)[-6:]  # the innermost frames: which allocation
            frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in where]
            rows.append(dict(config=name, description=cfg.description, shape=shape, case=f"{B}x{L}", status=status,
                             error=message, step_ms=steps, frames=frames))  # fmt: skip
            print(f"config {name} {status} after {len(clock.stamps)} stamps: {message}", flush=True)
            print("  " + "\n  ".join(rows[-1]["frames"]), flush=True)
            write_rows()
            continue
        call_s = time.perf_counter() - start
        per_token = (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1) * 1e3
        peak = torch.cuda.max_memory_allocated() - weights if dev.type == "cuda" else None
        row = dict(config=name, description=cfg.description, shape=shape, case=f"{B}x{L}", tokens=N,
                   ms_per_token=per_token, tokens_per_s=B * 1e3 / per_token,
                   ms_per_token_after_first=(clock.stamps[-1] - clock.stamps[1]) / (len(clock.stamps) - 2) * 1e3,
                   first_token_ms=(clock.stamps[0] - start) * 1e3, call_s=call_s, kv_bytes=kv_nbytes(cache)[0],
                   allocated_kv_bytes=kv_nbytes(cache)[1],
                   peak_bytes=peak, status="ok",
                   step_ms=[(b - a) * 1e3 for a, b in zip(clock.stamps, clock.stamps[1:])],
                   retries_at_stamp=clock.retries)  # fmt: skip
        if dev.type == "cuda":  # the caching allocator's retries and its cudaMalloc / cudaFree calls in the call
            after = torch.cuda.memory_stats()
            for key in ("num_alloc_retries", "num_device_alloc", "num_device_free"):
                row[key] = after.get(key, 0) - before.get(key, 0)
            row["reserved_bytes"] = after.get("reserved_bytes.all.current", 0)
        rows.append(row)
        dynamic = next((r for r in rows if r["config"].startswith("dynamic") and r["status"] == "ok"), None)
        for key in ("ms_per_token", "kv_bytes", "peak_bytes"):
            row[f"{key}_vs_dynamic"] = row[key] / dynamic[key] if dynamic and dynamic[key] and row[key] else None
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                       if k not in ("description", "step_ms", "retries_at_stamp")), flush=True)  # fmt: skip
        print(f"  first steps (ms): {' '.join(f'{t:.0f}' for t in row['step_ms'][:4])}", flush=True)
        write_rows()
        if os.environ.get("PROFILE") == "1":
            profile_decode(name, cfg, sequences, cache)
        del cache
