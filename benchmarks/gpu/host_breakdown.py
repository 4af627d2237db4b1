"""Host time per layer per decode step, broken down (GPU machine). Prints one line per measurement."""

import json
import os
import time

import torch
from hf_fp8cache.kernels import attention as ka
from hf_fp8cache.kernels.checks import check_decode_attention
from transformers import LlamaConfig
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_fp8cache import FP8Cache
from hf_fp8cache.attention import fp8_attention_forward

dev = torch.device("cuda")
H, Hq, D = 8, 32, 128
rows = []


def time_us(fn, n=400):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


class Mod(torch.nn.Module):
    is_causal = True
    num_key_value_groups = Hq // H


def record(case, what, us):
    rows.append(dict(case=case, what=what, host_us=round(us, 2)))
    print(f"{case:8s} {what:40s} {us:8.1f} us", flush=True)


def measure(B, L):
    case = f"{B}x{L}"
    cfg = LlamaConfig(
        num_hidden_layers=1, num_attention_heads=Hq, num_key_value_heads=H, head_dim=D, hidden_size=Hq * D
    )
    cfg._attn_implementation = "hf_fp8cache"
    mod = Mod()
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    x = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
    big = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16)
    # DynamicLayer: a fixed-length history (crop back each step) so the GPU copy stays the same
    dl = DynamicLayer()
    dl.update(big, big)

    def dyn_step():
        k, v = dl.update(x, x)
        sdpa_attention_forward(mod, q, k, v, None, scaling=D**-0.5)
        dl.keys = dl.keys[:, :, :L]
        dl.values = dl.values[:, :, :L]

    record(case, "DynamicLayer update+sdpa (+crop views)", time_us(dyn_step))
    k0, v0 = dl.update(x, x)
    record(case, "sdpa alone", time_us(lambda: sdpa_attention_forward(mod, q, k0, v0, None, scaling=D**-0.5)))
    cache = FP8Cache(cfg)
    cache.update(big, big, 0)
    layer = cache.layers[0]

    def fp8_step():
        k, v = cache.update(x, x, 0)
        fp8_attention_forward(mod, q, k, v, None, scaling=D**-0.5)
        layer.length -= 1

    record(case, "FP8 update+attention", time_us(fp8_step))

    def fp8_update():
        cache.update(x, x, 0)
        layer.length -= 1

    record(case, "FP8 cache.update", time_us(fp8_update))

    def fp8_layer_update():
        layer.update(x, x)
        layer.length -= 1

    record(case, "FP8 layer.update", time_us(fp8_layer_update))
    k, v = cache.update(x, x, 0)
    record(case, "fp8_attention_forward", time_us(lambda: fp8_attention_forward(mod, q, k, v, None, scaling=D**-0.5)))
    record(case, "layer.attention_inputs", time_us(lambda: layer.attention_inputs(None)))
    inp = layer.attention_inputs(None)
    args = (
        q,
        inp.key_bytes,
        inp.value_bytes,
        inp.length,
        inp.kv_start,
        inp.key_scale,
        inp.value_scale,
        inp.fmt,
        D**-0.5,
    )
    record(case, "decode_attention", time_us(lambda: ka.decode_attention(*args)))
    record(case, "decode_attention with the layer's memo",
           time_us(lambda: ka.decode_attention(*args, memo=layer._launches)))  # fmt: skip
    record(case, "check_decode_attention", time_us(lambda: check_decode_attention(*args[:8], None, None)))
    record(
        case,
        "plan_decode_attention",
        time_us(lambda: ka.plan_decode_attention(B, H, Hq // H, 1, D, inp.length, None, 132)),
    )
    record(
        case,
        "3x torch.empty",
        time_us(
            lambda: (
                torch.empty(B * 32, 32, device=dev),
                torch.empty(B * 32, 32, device=dev),
                torch.empty(B * 32, 32, D, device=dev),
            )
        ),
    )
    record(case, "keys+values views", time_us(lambda: (layer.keys, layer.values)))
    # quantize launch alone
    from hf_fp8cache.kernels import quantize_append_kv

    record(
        case,
        "quantize_append_kv",
        time_us(
            lambda: quantize_append_kv(
                x, x, inp.key_bytes, inp.value_bytes, inp.length, layer.key_inv_scale, layer.value_inv_scale, inp.fmt
            )
        ),
    )
    record(case, "quantize_append_kv with the layer's memo",
           time_us(lambda: quantize_append_kv(x, x, inp.key_bytes, inp.value_bytes, inp.length, layer.key_inv_scale,
                                              layer.value_inv_scale, inp.fmt, memo=layer._launches)))  # fmt: skip
    record(case, "torch.cuda.current_stream().cuda_stream", time_us(lambda: torch.cuda.current_stream().cuda_stream))
    record(case, "x.data_ptr() x10", time_us(lambda: [x.data_ptr() for _ in range(10)]))
    record(case, "x.stride() x10", time_us(lambda: [x.stride() for _ in range(10)]))


for B, L in [(1, 4096), (8, 16384)]:
    measure(B, L)

json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "host_breakdown.json"), "w"), indent=1)
