"""Garbage-collector work inside one eager generate (8B shape, 1x4096): collections per generation with their time,
and the unreachable objects a generate leaves (reference cycles), for DynamicCache and FP8Cache + our attention."""

import collections
import gc
import time

import torch

from hf_fp8cache.bench.common import build_model
from hf_fp8cache.bench.generate import CONFIGURATIONS, _timed_generate

dev = torch.device("cuda")
model = build_model("llama-3.1-8b", dev, torch.bfloat16)
ids = torch.randint(100, 20000, (1, 4096), device=dev)
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
stats: dict[int, list] = collections.defaultdict(lambda: [0, 0.0, 0])  # generation: [count, seconds, collected]
started = [0.0]


def on_collection(phase: str, info: dict) -> None:
    if phase == "start":
        started[0] = time.perf_counter()
        return
    entry = stats[info["generation"]]
    entry[0] += 1
    entry[1] += time.perf_counter() - started[0]
    entry[2] += info["collected"]


def generate(configuration, new_tokens: int) -> float:
    return _timed_generate(model, inputs, new_tokens, configuration.make_cache(model.config, 4200), {})[0]


for name in ["dynamic", "fp8+attn"]:
    configuration = CONFIGURATIONS[name]
    model.set_attn_implementation(configuration.attention)
    generate(configuration, 33), generate(configuration, 1)
    gc.collect()
    print(name, "tracked objects:", len(gc.get_objects()), "thresholds", gc.get_threshold())
    stats.clear()
    gc.callbacks.append(on_collection)
    seconds = generate(configuration, 33)
    gc.callbacks.remove(on_collection)
    summary = {g: (count, round(s * 1e3, 1), found) for g, (count, s, found) in sorted(stats.items())}
    print(name, f"generate(33) {seconds * 1e3:.0f} ms; collections (generation: count, ms, collected): {summary}")
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    generate(configuration, 33)
    unreachable = gc.collect()
    kinds = collections.Counter(type(o).__name__ for o in gc.garbage).most_common(10)
    print(name, "unreachable after generate(33) with the collector off:", unreachable, kinds)
    gc.garbage.clear()
    gc.set_debug(0)
    gc.enable()
