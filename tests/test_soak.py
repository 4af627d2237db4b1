"""Soak: a thousand generate calls leave no memory behind, and a 100k-token history costs its bytes and no more.

Process memory is read as the resident set size (``/proc/self/statm``) after ``gc.collect()`` and glibc's
``malloc_trim``; GPU memory as ``torch.cuda.memory_allocated``. Both loops cycle through both caches and both read
paths (SDPA over dequantized K/V, and ``attn_implementation="hf_fp8cache"``), with a fresh cache per call and with
one reused cache per (kind, read path).
"""

import copy
import ctypes
import ctypes.util
import gc
import os
import statistics
import sys
import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fp8cache import FP8Cache, FP8StaticCache
from hf_fp8cache.attention import ATTENTION_NAME
from hf_fp8cache.integration import cache_keyword

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc"),
]

CALLS, WARMUP = 1000, 50
LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None
STATIC_LEN = 256  # static cache tokens: the dynamic cache's first capacity, so either kind's buffers are 64 KiB


@pytest.fixture
def one_thread():
    """One intra-op thread: a tiny model's calls are dominated by thread hand-offs (measured 3-4 ms a call on one
    thread, 6-9 ms on two of this machine's two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rss_bytes(collect: bool = True) -> int:
    """This process's resident set size now (not the peak): after collecting garbage (unless ``collect=False``) and
    handing the C heap's free pages back to the system (glibc's ``malloc_trim``), so freed memory does not count.
    Without the trim the resident size after the same 1000 calls moved by -3 to +6 MiB between runs (measured)."""
    if collect:
        gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tiny_models(device: str):
    """One small Llama layer (4 heads of 32) under each read path."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, head_dim=32, max_position_embeddings=STATIC_LEN, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    sdpa = LlamaForCausalLM(config).eval().to(device)
    fused = copy.deepcopy(sdpa)
    fused.set_attn_implementation(ATTENTION_NAME)
    return sdpa, fused


def new_cache(kind: str, model):
    return FP8Cache(model.config) if kind == "dynamic" else FP8StaticCache(model.config, max_cache_len=STATIC_LEN)


def generate(model, cache) -> None:
    """Greedy, 2 new tokens after a 6-token prompt. Eager: on CUDA generate would compile the static cache's decode
    step, and a thousand fresh static caches would soak torch.compile's guards and graphs rather than our caches."""
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0)).to(model.device)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                   pad_token_id=0, disable_compile=True, **{cache_keyword(model): cache})  # fmt: skip


def run_calls(models, reuse: bool, calls: int, caches: dict, born: list) -> None:
    """``calls`` generate calls cycling through (read path, cache kind); with ``reuse`` each pair's one cache in
    ``caches`` is reset and passed again, else a new cache is made (a weak reference to it kept in ``born``)."""
    for call in range(calls):
        model, kind = models[call % 2], ("dynamic", "static")[call // 2 % 2]
        if reuse:
            cache = caches.setdefault((kind, call % 2), new_cache(kind, model))
            cache.reset()
        else:
            cache = new_cache(kind, model)
            born.append(weakref.ref(cache))
        generate(model, cache)


def one_cache_bytes(model) -> int:
    """The FP8 buffers one call's cache holds, the smaller of the two kinds: the least a leak of a cache per call
    would add."""
    sizes = []
    for kind in ("dynamic", "static"):
        cache = new_cache(kind, model)
        generate(model, cache)
        sizes.append(cache.allocated_nbytes)
    return min(sizes)


def soak(models, reuse: bool, memory) -> int:
    """``WARMUP`` calls, then ``CALLS`` more: how much ``memory()`` grew over those. Checks on the way that every
    fresh cache was freed and that reused caches kept their buffers."""
    caches, born = {}, []
    run_calls(models, reuse, WARMUP, caches, born)
    before = memory()
    buffers = {key: cache.layers[0].key_bytes.data_ptr() for key, cache in caches.items()}
    run_calls(models, reuse, CALLS, caches, born)
    growth = memory() - before
    assert all(ref() is None for ref in born)  # every fresh cache was freed
    assert {key: cache.layers[0].key_bytes.data_ptr() for key, cache in caches.items()} == buffers  # no reallocation
    return growth


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reused"])
def test_thousand_generate_calls_keep_process_memory_flat(reuse, torch_path, one_thread):
    models = tiny_models("cpu")
    growth = soak(models, reuse, rss_bytes)
    leak = CALLS * one_cache_bytes(models[0])  # 64 MiB: 256 tokens x 4 heads x 32 x (K, V) bytes a call
    # measured growth after the 50-call warm-up (2026-11-30): 380-400 KiB with fresh caches, all of it in the first
    # ~400 calls and as much with transformers' own DynamicCache / StaticCache (pools settling), flat after; 4-8 KiB
    # with reused ones. The bound (4 MiB) leaves room for a loaded machine's allocator noise (the chunked test below saw
    # a 1.36 MB spike there) and is still 16 times below a leak of one cache a call
    assert growth <= min(4 << 20, leak // 16), f"RSS grew by {growth} bytes over {CALLS} calls"


def cuda_allocated() -> int:
    torch.cuda.synchronize()
    gc.collect()
    return torch.cuda.memory_allocated()


@pytest.mark.gpu
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reused"])
def test_thousand_generate_calls_keep_gpu_memory_flat(reuse):
    models = tiny_models("cuda")
    growth = soak(models, reuse, cuda_allocated)
    leak = CALLS * one_cache_bytes(models[0])
    # not yet measured on the GPU machine: live tensors are counted exactly, so a flat loop shows 0; 1 MiB leaves room
    # for a workspace a library makes lazily and is 64 times below a leak of one cache a call
    assert growth <= min(1 << 20, leak // 64), f"GPU memory grew by {growth} bytes over {CALLS} calls"


def test_hundred_thousand_tokens_in_chunks_cost_their_bytes(torch_path, one_thread):
    """100 chunks of 1000 tokens through ``update`` (what chunked prefill does), read by our attention (fp8 views, no
    dequantized copy): the buffers stay within the amortized-growth bound of the exact bytes, and the process grows
    by the tokens' bytes and nothing per chunk."""
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                         hidden_size=512)  # fmt: skip
    config._attn_implementation = ATTENTION_NAME
    cache = FP8Cache(config)
    chunk = torch.randn(1, 8, 1000, 64)
    token_bytes = 2 * 8 * 64  # K and V codes of one token
    before = rss_bytes()
    others = []  # process growth besides the cached tokens' bytes, after each chunk
    for _ in range(100):
        cache.update(chunk, chunk, 0)
        others.append(rss_bytes(collect=False) - before - cache.nbytes)  # untouched spare capacity is not resident
    length = cache.get_seq_length()
    assert length == 100_000 and cache.nbytes == length * token_bytes + 2 * 4
    # capacity <= max(needed, 17/16 of the previous capacity), rounded up to 256 tokens (hf_fp8cache/cache.py)
    assert length * token_bytes < cache.allocated_nbytes <= (length * 17 // 16 + 256) * token_bytes + 2 * 4
    # measured (2026-11-30): the process grew by the tokens' bytes plus 7-95 KiB (the last, partly filled page of
    # each head's rows) after most chunks, with single spikes up to 1.36 MB on a loaded machine (the allocator keeping
    # a freed buffer resident for a while) and no trend; with three test processes on the two cores the freed old
    # buffers went back gradually (up to 4.9 MB, median of the last ten 1.6 MB). One chunk's FP8 bytes (1 MB) kept
    # per chunk would reach ~100 MB by the end, 64 KB kept per chunk 6.4 MB
    settled = statistics.median(others[-10:])
    assert settled <= 4 << 20, f"the process grew besides the cache's tokens: {others}"
    assert max(map(abs, others)) <= 16 << 20, f"the process grew besides the cache's tokens: {others}"
