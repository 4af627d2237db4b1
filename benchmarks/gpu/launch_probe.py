"""Does a Triton launch, or our Python around it, make the eager decode step slower (issue 14)?

Inside ``generate`` the eager ``FP8Cache`` + our attention gives the GPU less work than ``DynamicCache`` + SDPA and
still takes longer a token: every torch op of the model runs slower on the host in our runs (docs/benchmarks.md,
"Re-measured 2026-12-03"). This script separates the two suspects in one process, four variants in turn for R rounds
(each round's ratio to its own ``DynamicCache`` step, then the median), decode only (one prefill a variant, then
``generate`` continues the cache by N + 1 and by 1 tokens and crops it back; per token = the difference / N):

- ``dynamic``: ``DynamicCache`` + SDPA;
- ``dynamic+launch``: the same, plus one tiny Triton kernel a layer, launched through a ``LaunchMemo`` as ours are
  (the cost of a Triton launch on torch's path, with none of our Python);
- ``fp8+attn``: ``FP8Cache`` + our attention;
- ``fp8+attn, no launch``: the same with our launches replaced by nothing (our Python without the driver launch; the
  outputs are garbage, the host path is the same).

If ``no launch`` runs as fast as ``dynamic``, the launches slow the step; if ``dynamic+launch`` is slower than
``dynamic`` by more than its launches, a Triton launch slows the torch ops around it.

    python benchmarks/gpu/launch_probe.py [BxL] [ROUNDS]      # writes launch_probe.json to $OUT (~2 min at 1x4096)
    DEVICE=cpu SHAPE=tiny TRITON_INTERPRET=1 python benchmarks/gpu/launch_probe.py 1x32 2    # a CPU dry run
"""

import json
import os
import statistics
import sys

import hf_fp8cache.kernels.attention as attention_kernel
import torch
import triton
import triton.language as tl
from hf_fp8cache.kernels.launch import LaunchMemo, launch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_fp8cache import FP8Cache
from hf_fp8cache.attention import ATTENTION_NAME
from hf_fp8cache.bench import common
from hf_fp8cache.bench.common import build_model

B, L = map(int, (sys.argv[1] if len(sys.argv) > 1 else "1x4096").split("x"))
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 7
N = 32
out = os.environ.get("OUT", ".")
dev = torch.device(os.environ.get("DEVICE", "cuda"))
model = build_model(os.environ.get("SHAPE", "llama-3.1-8b"), dev, torch.bfloat16)
ids = torch.randint(100, min(20000, model.config.vocab_size), (B, L), device=dev)
mask = torch.ones_like(ids)


@triton.jit
def _touch_kernel(x_ptr, value, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.full([BLOCK], value, tl.float32))


def sdpa_then_launch(module, *args, **kwargs):
    """SDPA, then one tiny Triton launch through the module's own memo, as our attention launches."""
    result = sdpa_attention_forward(module, *args, **kwargs)
    if not hasattr(module, "_probe_memo"):
        module._probe_memo = LaunchMemo()
        module._probe_buffer = torch.zeros(16, device=dev)
    launch(_touch_kernel, (1,), (module._probe_buffer, 1.0), {"BLOCK": 16}, module._probe_memo)
    return result


AttentionInterface.register("sdpa_then_launch", sdpa_then_launch)
AttentionMaskInterface.register("sdpa_then_launch", sdpa_mask)
real_launch = attention_kernel.launch
VARIANTS = {  # name: (attention, cache, our launches on)
    "dynamic": ("sdpa", lambda: DynamicCache(config=model.config), True),
    "dynamic+launch": ("sdpa_then_launch", lambda: DynamicCache(config=model.config), True),
    "fp8+attn": (ATTENTION_NAME, lambda: FP8Cache(model.config), True),
    "fp8+attn, no launch": (ATTENTION_NAME, lambda: FP8Cache(model.config), False),
}


def continue_generate(cache, tokens: int) -> float:
    return common.continue_generate(model, cache, ids, mask, tokens)


def per_token_ms(name: str, cache) -> float:
    attention, _, launches = VARIANTS[name]
    model.set_attn_implementation(attention)
    attention_kernel.launch = real_launch if launches else (lambda *args, **kwargs: None)
    try:
        return (continue_generate(cache, N + 1) - continue_generate(cache, 1)) / N * 1e3
    finally:
        attention_kernel.launch = real_launch


with torch.no_grad():
    caches = {}
    for name, (attention, make, _) in VARIANTS.items():  # one prefill a variant, then warm its decode
        model.set_attn_implementation(attention)
        caches[name] = make()
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=caches[name], logits_to_keep=1)
        per_token_ms(name, caches[name])
    rounds = [{name: per_token_ms(name, cache) for name, cache in caches.items()} for _ in range(ROUNDS)]

rows = []
print(f"decode ms a token inside generate, {B}x{L}, N={N}, median of {ROUNDS} rounds ({torch.__version__}, "
      f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'})")  # fmt: skip
for name in VARIANTS:
    times = [r[name] for r in rounds]
    ratios = [r[name] / r["dynamic"] for r in rounds]
    rows.append({"variant": name, "case": f"{B}x{L}", "ms_per_token": statistics.median(times),
                 "vs_dynamic": statistics.median(ratios), "rounds_ms": times})  # fmt: skip
    print(f"{name:22s} {statistics.median(times):8.2f} ms  {statistics.median(ratios):5.2f}x  rounds "
          + " ".join(f"{t:.1f}" for t in times))  # fmt: skip
with open(f"{out}/launch_probe.json", "w") as fh:
    json.dump({"rows": rows, "N": N, "rounds": ROUNDS, "torch": torch.__version__}, fh, indent=1)
