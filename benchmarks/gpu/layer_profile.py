"""One layer's decode update + our attention in a loop (1x4096, Llama-8B head shape): host us a step, beside the same
loop over transformers' ``DynamicCache`` + SDPA (interleaved rounds, one process: the host drifts), then cProfile."""

import cProfile
import io
import pstats
import time

import torch
from transformers import DynamicCache, LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_fp8cache import FP8Cache
from hf_fp8cache.attention import fp8_attention_forward

dev = torch.device("cuda")
H, Hq, D, B, L = 8, 32, 128, 1, 4096
config = LlamaConfig(num_hidden_layers=1, num_attention_heads=Hq, num_key_value_heads=H, head_dim=D,
                     hidden_size=Hq * D)  # fmt: skip
config._attn_implementation = "hf_fp8cache"


class Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = Hq // H


module = Module()
query = torch.randn(B, 1, Hq, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)  # a transposed view, as models pass
token = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
prompt = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16)
cache = FP8Cache(config)
cache.update(prompt, prompt, 0)
layer = cache.layers[0]


baseline = DynamicCache(config=config)
baseline.update(prompt, prompt, 0)
baseline_layer = baseline.layers[0]


def step() -> None:
    key, value = cache.update(token, token, 0)
    fp8_attention_forward(module, query, key, value, None, scaling=D**-0.5)
    layer.length -= 1  # the same length every step


def baseline_step() -> None:
    key, value = baseline.update(token, token, 0)
    sdpa_attention_forward(module, query, key, value, None, scaling=D**-0.5)
    baseline_layer.keys, baseline_layer.values = key[:, :, :L], value[:, :, :L]  # the same length every step


def host_us(function) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(1000):
        function()
    elapsed = (time.perf_counter() - start) * 1e3  # ms for 1000 steps = us a step
    torch.cuda.synchronize()
    return elapsed


for function in (step, baseline_step):
    for _ in range(50):
        function()
rounds = [(host_us(step), host_us(baseline_step)) for _ in range(5)]
ours, theirs = (sorted(column)[2] for column in zip(*rounds))
print(f"host us/step: FP8Cache + hf_fp8cache {ours:.1f}, DynamicCache + SDPA {theirs:.1f} (median of 5 rounds)")
profiler = cProfile.Profile()
profiler.enable()
for _ in range(2000):
    step()
profiler.disable()
torch.cuda.synchronize()
text = io.StringIO()
pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
print(text.getvalue())
