"""Anatomy of an eager decode step inside ``model.generate`` (issue 14), 8B shape, on the GPU machine.

For each configuration of ``bench generate`` given on the command line (default dynamic, fp8, fp8+attn) and each case
(default 1x4096): the per-token time by the bench's difference method, and, for the decode forwards of one
generate call, the host time of each forward (from its call to its return, read by forward hooks; the device runs
behind) -- a step whose forward host time is close to its per-token time is host-bound -- then torch.profiler over
a short generate of 9 and of 1 tokens: CUDA kernel time per
decode step (what the device needs) and the top CPU ops. Writes
step_anatomy.json and anatomy_<config>_<case>.txt to $OUT.

    python benchmarks/gpu/step_anatomy.py [configs] [cases]
"""

import json
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from hf_fp8cache.bench.common import build_model
from hf_fp8cache.bench.generate import CONFIGURATIONS, _timed_generate

out = os.environ.get("OUT", ".")
configs = (sys.argv[1] if len(sys.argv) > 1 else "dynamic,fp8,fp8+attn").split(",")
cases = [tuple(map(int, c.split("x"))) for c in (sys.argv[2] if len(sys.argv) > 2 else "1x4096").split(",")]
dev = torch.device("cuda")
model = build_model("llama-3.1-8b", dev, torch.bfloat16)
forward_host = []
entered = [0.0]
model.register_forward_pre_hook(lambda *_: entered.__setitem__(0, time.perf_counter()))
model.register_forward_hook(lambda *_: forward_host.append(time.perf_counter() - entered[0]))
rows = []


def anatomy(name: str, B: int, L: int) -> None:
    cfg = CONFIGURATIONS[name]
    model.set_attn_implementation(cfg.attention)
    ids = torch.randint(100, 20000, (B, L), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    static = cfg.make_cache(model.config, L + 40) if name.startswith("fp8-static") else None
    make = (lambda: static) if static is not None else (lambda: cfg.make_cache(model.config, L + 40))
    gen = lambda n: _timed_generate(model, inputs, n, make(), {})[0]
    gen(33), gen(1)
    per_token = statistics.median((gen(33) - gen(1)) / 32 * 1e3 for _ in range(3))
    forward_host.clear()
    gen(33)
    decode_host = statistics.median(forward_host[1:]) * 1e3  # [0] is the prefill
    cuda_ms = {}
    for n in (1, 9):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            gen(n)
        events = p.key_averages()
        cuda_ms[n] = sum(e.self_device_time_total for e in events) / 1e3
    decode_cuda = (cuda_ms[9] - cuda_ms[1]) / 8
    row = dict(case=f"{B}x{L}", config=name, per_token_ms=per_token, forward_host_ms=decode_host,
               decode_cuda_ms=decode_cuda)  # fmt: skip
    rows.append(row)
    print(f"{row['case']:8s} {name:16s} per token {per_token:7.2f} ms  decode forward host {decode_host:7.2f} ms  "
          f"CUDA kernel time per decode step {decode_cuda:7.2f} ms", flush=True)  # fmt: skip
    with open(f"{out}/anatomy_{name.replace('+', '_')}_{B}x{L}.txt", "w") as fh:
        fh.write(events.table(sort_by="self_device_time_total", row_limit=20))
        fh.write("\n")
        fh.write(events.table(sort_by="self_cpu_time_total", row_limit=45))


for B, L in cases:
    for name in configs:
        anatomy(name, B, L)
with open(f"{out}/step_anatomy.json", "w") as fh:
    json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), fh, indent=2)
