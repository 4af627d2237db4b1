"""Where eager generate's host time goes: dynamic vs fp8+attn at 1x4096 (8B shape), with GC on/off, cProfile and
torch.profiler; counts of memo rebuilds."""

import cProfile
import gc
import io
import os
import pstats

import torch
from hf_fp8cache.kernels import launch as L

from hf_fp8cache.bench.common import build_model
from hf_fp8cache.bench.generate import CONFIGURATIONS, _timed_generate

out = os.environ.get("OUT", ".")
dev = torch.device("cuda")
model = build_model("llama-3.1-8b", dev, torch.bfloat16)
ids = torch.randint(100, 20000, (1, 4096), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
rebuilds = [0]
orig_init = L._BoundLaunch.__init__


def counting_init(self, *a, **k):
    rebuilds[0] += 1
    orig_init(self, *a, **k)


L._BoundLaunch.__init__ = counting_init
print("direct launch:", L._DIRECT, flush=True)


def profile_configuration(name):
    cfg = CONFIGURATIONS[name]
    model.set_attn_implementation(cfg.attention)
    gen = lambda n: _timed_generate(model, inputs, n, cfg.make_cache(model.config, 4200), {})[0]
    gen(33)
    gen(1)
    r0 = rebuilds[0]
    per = (gen(33) - gen(1)) / 32 * 1e3
    print(f"{name}: {per:.2f} ms/token, memo rebuilds in 33+1 tokens: {rebuilds[0] - r0}", flush=True)
    gc.collect()
    gc.disable()
    per_nogc = (gen(33) - gen(1)) / 32 * 1e3
    gc.enable()
    print(f"{name}: {per_nogc:.2f} ms/token with gc disabled", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    gen(17)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(45)
    open(f"{out}/cprofile_{name.replace('+', '_')}.txt", "w").write(s.getvalue())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(60)
    open(f"{out}/cprofile_cum_{name.replace('+', '_')}.txt", "w").write(s.getvalue())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        gen(9)
    open(f"{out}/torchprof_{name.replace('+', '_')}.txt", "w").write(
        p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    )


for name in ["dynamic", "fp8+attn"]:
    profile_configuration(name)
