"""A decode step inside ``model.generate``, without the prefill in the way (issues 14 and 18), 8B shape, GPU machine.

Each configuration of ``bench generate`` prefills its cache once with the prompt's first L - 1 tokens; every
measurement then continues that cache with ``generate`` (the prompt's last token, then N new ones) and crops it back
to L - 1 tokens, so a long context costs one prefill a configuration instead of four. Per configuration:

- ``per_token_ms``: ``(t(N + 1 tokens) - t(1 token)) / N`` from the cropped cache, median of 3 pairs;
- ``kernel_ms_per_step``: the CUDA kernels' summed time a decode step (torch.profiler over one N+1-token call);
- ``profiled_wall_ms_per_step``: that call's wall time a step, under the profiler (slower than unprofiled);
- the top kernels by device time and the top ops by host time, written to ``decode_profile_<config>.txt``.

A step whose kernel time is close to its per-token time is device-bound; one whose kernel time is much lower is
host-bound (the device waits for launches).

    python benchmarks/gpu/decode_profile.py [configs] [BxL]      # writes decode_profile.json to $OUT
"""

import json
import os
import statistics
import sys

import torch

from hf_fp8cache.bench import common
from hf_fp8cache.bench.common import build_model
from hf_fp8cache.bench.generate import CONFIGURATIONS

out = os.environ.get("OUT", ".")
configs = (sys.argv[1] if len(sys.argv) > 1 else "fp8+attn,fp8-token-head+attn,int8-token-head+attn").split(",")
B, L = map(int, (sys.argv[2] if len(sys.argv) > 2 else "8x32768").split("x"))
N = 32
dev = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu SHAPE=tiny: a CPU dry run
model = build_model(os.environ.get("SHAPE", "llama-3.1-8b"), dev, torch.bfloat16)
ids = torch.randint(
    100, min(20000, model.config.vocab_size), (B, L), device=dev, generator=torch.Generator(device=dev).manual_seed(0)
)
mask = torch.ones_like(ids)


def continue_generate(cache, tokens: int) -> float:
    return common.continue_generate(model, cache, ids, mask, tokens)


rows = []
with torch.no_grad():
    for name in configs:
        cfg = CONFIGURATIONS[name]
        model.set_attn_implementation(cfg.attention)
        cache = cfg.make_cache(model.config, L + N + 1)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, logits_to_keep=1)
        continue_generate(cache, N + 1), continue_generate(cache, 1)  # compile, warm
        per_token = statistics.median(
            (continue_generate(cache, N + 1) - continue_generate(cache, 1)) / N * 1e3 for _ in range(3)
        )
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:  # fmt: skip
            wall = continue_generate(cache, N + 1)
        events = prof.key_averages()
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        steps = N + 1
        row = dict(config=name, case=f"{B}x{L}", per_token_ms=per_token, kernel_ms_per_step=kernel_us / steps / 1e3,
                   profiled_wall_ms_per_step=wall / steps * 1e3)  # fmt: skip
        rows.append(row)
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        with open(f"{out}/decode_profile_{name.replace('+', '_')}.txt", "w") as fh:
            fh.write(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
            fh.write("\n")
            fh.write(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
        del cache, prof
        with open(f"{out}/decode_profile.json", "w") as fh:  # after every configuration: a cut run keeps its rows
            gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
            json.dump(dict(gpu=gpu, torch=torch.__version__, N=N, rows=rows), fh, indent=2)
