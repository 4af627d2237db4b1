"""End-to-end checks on a CUDA GPU (the device machine): compiled kernels inside real generate runs.

Run there with ``HF_FP8CACHE_NO_INTERPRET=1 pytest -m gpu tests/test_gpu.py tests/test_kernels.py``: test_kernels
then checks the compiled kernels' bytes against the torch twins on CUDA tensors (bf16 included)."""

import os

import pytest
import torch
from helpers import assert_equal, fake_quant_cache, left_padded_prompts, tiny_llama
from transformers import DynamicCache

from hf_fp8cache import FP8Cache, FP8StaticCache, attach, detach
from hf_fp8cache.bench.common import build_model
from hf_fp8cache.contract import ATTENTION_NAME
from hf_fp8cache.integration import cache_keyword

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_kernels_are_compiled_not_interpreted():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"


def _greedy(model, cache, ids, mask, new_tokens, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **{cache_keyword(model): cache}, **kwargs)  # fmt: skip


@pytest.mark.slow
def test_smollm2_generate_on_gpu_equals_oracle():
    from hf_fp8cache.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(device="cuda", dtype=torch.bfloat16)
    prompts = ["The capital of France is", "Write a haiku about memory bandwidth.", "def fibonacci(n):"]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = _greedy(model, FP8Cache(model.config), ids, mask, 24)
    oracle = _greedy(model, fake_quant_cache(model.config), ids, mask, 24)
    bf16 = _greedy(model, DynamicCache(config=model.config), ids, mask, 24)
    agree = (ours[:, ids.shape[1] :] == bf16[:, ids.shape[1] :]).float().mean().item()
    print(f"SmolLM2 bf16 on GPU: FP8 greedy tokens equal to bf16 DynamicCache: {agree:.3f}")
    for row in tokenizer.batch_decode(ours[:, ids.shape[1] :], skip_special_tokens=True):
        print("  FP8:", row.replace("\n", " ")[:120])
    assert_equal(ours, oracle)


def test_llama8b_shaped_generate_on_gpu_equals_oracle():
    torch.manual_seed(0)
    model = build_model("llama-3.1-8b", torch.device("cuda"), torch.bfloat16)
    config = model.config
    # the second row's first 100 positions are padding, random ids that only the mask hides
    ids, mask = left_padded_prompts(
        2, 300, pads=lambda row: 100 if row else 0, pad_id=None, vocab=config.vocab_size, device="cuda"
    )
    for cache_kwargs in ({}, {"calculate_kv_scales": True, "strategy": "attn_head"}):
        ours = _greedy(model, FP8Cache(config, **cache_kwargs), ids, mask, 8)
        if not cache_kwargs:
            assert_equal(ours, _greedy(model, fake_quant_cache(config), ids, mask, 8))
        assert ours.shape == (2, 308)
    cache = FP8Cache(config)
    _greedy(model, cache, ids, mask, 8)
    layer = cache.layers[5]
    assert layer.keys.device.type == "cuda" and layer.keys.dtype == torch.float8_e4m3fn
    assert cache.nbytes == 32 * 2 * 2 * 8 * 307 * 128 + 32 * 2 * 4  # FP8 K and V of 307 tokens + scales


@pytest.mark.parametrize("attention", ["sdpa", "hf_fp8cache"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_llama8b_shaped_generate_with_per_token_head_scales_stores_the_twins_bytes(fmt, attention, monkeypatch):
    """strategy="token_head" at real shapes (32 layers, 8 KV heads, D = 128, left padding) through generate: every
    update's codes and bf16 scales are the twin's bit for bit (with our attention, each decode step's written by the
    attention launch itself), and so is each layer's dequantization at the end.

    Not compared token for token with the fake-quantized DynamicCache here (that is done exactly on CPU): with K/V
    equal bit for bit, SDPA over our workspace and over DynamicCache's tensors still rounded differently on the H200
    (logits up to 0.14 apart at bf16, one run in fp8, another in int8), and this random model's top-2 logits can tie
    (gaps of 0.0 and 0.03 seen), so a token flipped in one of three runs (2026-12-01)."""
    from hf_fp8cache.kernels.reference import dequantize_token_head_ref, quantize_append_token_head_ref

    from hf_fp8cache.cache_layer import FP8CacheLayer
    from hf_fp8cache.formats import resolve_format

    torch.manual_seed(0)
    model = build_model("llama-3.1-8b", torch.device("cuda"), torch.bfloat16)
    model.set_attn_implementation(attention)
    config = model.config
    ids, mask = left_padded_prompts(
        2, 300, pads=lambda row: 100 if row else 0, pad_id=None, vocab=config.vocab_size, device="cuda"
    )
    updates, update = [], FP8CacheLayer.update

    def recorded(layer, key, value, *args, **kwargs):  # each update's K/V and where they go (checked at the end: a
        updates.append((layer, key, value, layer.length))  # decode token is written by the attention that follows)
        return update(layer, key, value, *args, **kwargs)

    monkeypatch.setattr(FP8CacheLayer, "update", recorded)
    cache = FP8Cache(config, kv_cache_dtype=fmt, strategy="token_head")
    _greedy(model, cache, ids, mask, 8)
    storage = resolve_format(fmt)
    assert len(updates) == 32 * 8  # the prefill and 7 decode steps of every layer
    for layer, key, value, start in updates:
        end = start + key.shape[2]
        stored = [t[:, :, start:end] for t in (layer._key_bytes, layer._value_bytes, layer._key_scales,
                                               layer._value_scales)]  # fmt: skip
        expected = [torch.empty_like(t) for t in stored]
        quantize_append_token_head_ref(key, value, *expected, 0, storage)
        for got, want in zip(stored, expected):
            assert_equal(got.view(torch.uint8), want.view(torch.uint8))
    for layer in cache.layers:
        expected = [torch.empty_like(t) for t in layer.dequantized()]
        dequantize_token_head_ref(layer._key_bytes, layer._value_bytes, layer._key_scales, layer._value_scales,
                                  layer.length, storage, *expected)  # fmt: skip
        for got, want in zip(layer.dequantized(), expected):
            assert_equal(got, want)
    assert cache.nbytes == 32 * 2 * 2 * 8 * 307 * (128 + 2)  # codes and a bf16 scale a token and head, K and V


def test_layers_on_different_devices_keep_their_buffers_there():
    """As with a device_map that splits layers: each layer's FP8 buffers and scales live with its inputs."""
    cache = FP8Cache(calculate_kv_scales=True)
    on_gpu, on_cpu = torch.randn(1, 2, 5, 16, device="cuda"), torch.randn(1, 2, 5, 16)
    cache.update(on_gpu, on_gpu, 0)
    cache.update(on_cpu, on_cpu, 1)
    k0, _ = cache.update(on_gpu[:, :, :1], on_gpu[:, :, :1], 0)
    k1, _ = cache.update(on_cpu[:, :, :1], on_cpu[:, :, :1], 1)
    assert cache.layers[0].keys.device.type == "cuda" and cache.layers[0].key_scale.device.type == "cuda"
    assert cache.layers[1].keys.device.type == "cpu" and cache.layers[1].key_scale.device.type == "cpu"
    assert k0.device.type == "cuda" and k1.device.type == "cpu" and k0.shape == k1.shape == (1, 2, 6, 16)


@pytest.mark.parametrize(
    "cache_kwargs",
    [{}, {"calculate_kv_scales": True, "strategy": "attn_head"}, {"kv_cache_dtype": "int8_per_token_head"},
     {"kv_cache_dtype": "fp8_per_token_head"}, {"quantize_query": True}],
    ids=["unit", "onthefly-head", "int8-token-head", "fp8-token-head", "fp8_queries"],
)  # fmt: skip
def test_generate_compiles_the_static_cache_and_equals_eager_fp8(cache_kwargs):
    """generate compiles the decode steps of an FP8StaticCache on CUDA (reduce-overhead: CUDA graphs); the tokens
    equal those of the eager dynamic FP8 cache, also after reset() and reuse for a second batch."""
    model = tiny_llama(seed=1).cuda()  # fp32: no bf16 rounding between the compiled and the eager graph
    model.set_attn_implementation(ATTENTION_NAME)
    static = FP8StaticCache(model.config, max_cache_len=65, **cache_kwargs)  # odd: token-head buffers take 66
    for seed in (0, 1):
        ids, mask = left_padded_prompts(3, 40, pads=lambda row: 13 if row else 0, pad_id=None, seed=seed, device="cuda")
        static.reset()
        compiled = _greedy(model, static, ids, mask, 16)
        assert_equal(compiled, _greedy(model, FP8Cache(model.config, **cache_kwargs), ids, mask, 16))
    assert hasattr(model, "_compiled_call")  # generate took its compiled path


def test_attach_static_compiles_once_for_calls_of_one_size_and_equals_eager_fp8():
    """attach(static=True): generate compiles the decode step of the cache it sizes; a second call of the same batch
    and size bucket reuses the cache and the compiled step (no new compile), and the tokens equal the eager dynamic
    FP8 cache's."""
    import torch._dynamo.utils as dynamo_utils

    model = tiny_llama(seed=2).cuda()  # fp32, as above
    ids, mask = left_padded_prompts(2, 30, pads=lambda row: 7 * row, pad_id=None, seed=3, device="cuda")
    eager = _greedy(model, FP8Cache(model.config), ids, mask, 12)
    attach(model, attention=True, static=True)
    try:
        first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        compiles = dynamo_utils.counters["stats"]["unique_graphs"]
        assert compiles > 0  # generate compiled the first call's step (the counter counts what dynamo compiles)
        second = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert dynamo_utils.counters["stats"]["unique_graphs"] == compiles  # the kept cache: nothing compiled again
    finally:
        detach(model)
    assert hasattr(model, "_compiled_call")  # generate took its compiled path
    assert_equal(first, eager)
    assert_equal(second, eager)


def _graphed_generates(model, prompts, options, **cache_kwargs) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Under attach(static=True, cuda_graphs=True, **cache_kwargs), one generate per (ids, mask) prompt: its tokens
    and the graphs' (captures, replays) after it."""
    attach(model, attention=True, static=True, cuda_graphs=True, **cache_kwargs)
    try:
        graphs, results = model.get_compiled_call(None), []
        for ids, mask in prompts:
            tokens = model.generate(input_ids=ids, attention_mask=mask, **options)
            results.append((tokens, (graphs.captures, graphs.replays)))
    finally:
        detach(model)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attach_cuda_graphs_replays_decode_steps_without_compiling_and_equals_eager_steps(dtype):
    """attach(static=True, cuda_graphs=True): the first decode step of a signature runs eagerly, the second is
    captured, every later one replays; nothing is compiled; a second call with the kept cache replays every decode
    step; another batch gets a new cache and a new capture. The tokens equal the same static cache run eagerly (the
    same kernels: bit for bit in bf16 too), left padding included (the row starts are computed inside the graph)."""
    import torch._dynamo.utils as dynamo_utils

    model = tiny_llama(seed=4).to("cuda", dtype)
    ids, mask = left_padded_prompts(2, 30, pads=lambda row: 7 * row, pad_id=None, seed=5, device="cuda")
    wider_ids, wider_mask = left_padded_prompts(3, 30, pads=lambda row: 5 * row, pad_id=None, seed=6, device="cuda")
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    compiles = dynamo_utils.counters["stats"]["unique_graphs"]
    (first, counts), (second, kept), (wider, other) = _graphed_generates(
        model, [(ids, mask), (ids, mask), (wider_ids, wider_mask)], options
    )
    assert counts == (1, 10)  # 11 decode steps: one eager, then captured + replayed
    assert kept == (1, 21)  # the kept cache: every decode step replays
    assert other[0] == 2  # another batch: a new cache, its own graph
    assert dynamo_utils.counters["stats"]["unique_graphs"] == compiles  # nothing compiled

    def eager_steps(ids, mask):  # the cache attach makes (30 + 12 tokens: the 256 minimum), never compiled or captured
        cache = FP8StaticCache(model.config, 256)
        return model.generate(input_ids=ids, attention_mask=mask, disable_compile=True, **options,
                              **{cache_keyword(model): cache})  # fmt: skip

    assert_equal(first, eager_steps(ids, mask))
    assert_equal(second, first)
    assert_equal(wider, eager_steps(wider_ids, wider_mask))


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_per_token_head", "int8_per_token_head"])
def test_attach_cuda_graphs_replays_per_token_head_scales_and_equals_eager_steps(kv_cache_dtype):
    """Per-token-head scales (issue 18) under CUDA-graph decode: each step's quantize writes codes and scales inside
    the graph; the tokens equal the same static cache run eagerly, left padding included."""
    model = tiny_llama(seed=8).to("cuda")
    ids, mask = left_padded_prompts(2, 30, pads=lambda row: 7 * row, pad_id=None, seed=9, device="cuda")
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    [(tokens, counts)] = _graphed_generates(model, [(ids, mask)], options, kv_cache_dtype=kv_cache_dtype)
    assert counts == (1, 10)
    cache = FP8StaticCache(model.config, 256, kv_cache_dtype=kv_cache_dtype)
    eager = model.generate(input_ids=ids, attention_mask=mask, disable_compile=True, **options,
                           **{cache_keyword(model): cache})  # fmt: skip
    assert_equal(tokens, eager)


@pytest.mark.parametrize("family", ["gemma3", "gpt-oss"])
def test_attach_cuda_graphs_replays_sliding_rings_and_equals_eager_steps(family):
    """attach(static=True, cuda_graphs=True) on models with sliding layers whose rings our attention reads in place:
    decode steps replay past the 6-token window (each replay advances the rings' host-side count, which the next
    mask sizes read), a second call with the kept cache replays every step, and the tokens equal the same static
    cache run eagerly."""
    from test_sliding import _model

    model = _model(family, ATTENTION_NAME).cuda()
    ids, mask = left_padded_prompts(2, 11, pads=lambda row: 3 * row, pad_id=None, seed=7, device="cuda")
    options = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    (first, counts), (second, kept) = _graphed_generates(model, [(ids, mask), (ids, mask)], options)
    assert counts == (1, 14) and kept == (1, 29)  # 15 decode steps: one eager, then captured + replayed; then all
    eager = model.generate(input_ids=ids, attention_mask=mask, disable_compile=True, **options,
                           **{cache_keyword(model): FP8StaticCache(model.config, 256)})  # fmt: skip
    assert_equal(first, eager)
    assert_equal(second, eager)


@pytest.mark.parametrize("family", ["qwen3-next", "falcon-h1"])
def test_generate_compiles_the_static_cache_of_a_hybrid_model_and_equals_eager_fp8(family):
    """A linear-attention hybrid (Qwen3-Next) and a mamba+attention one (Falcon-H1): the static cache, compiled by
    generate, keeps transformers' states and gives the eager dynamic FP8 cache's tokens."""
    from test_hybrid import _model

    model = _model(family, ATTENTION_NAME).cuda()  # fp32, as above
    ids, mask = left_padded_prompts(2, 24, pads=lambda row: 5 * row, pad_id=None, seed=0, device="cuda")
    static = FP8StaticCache(model.config, max_cache_len=48)
    assert static.is_compileable
    assert_equal(_greedy(model, static, ids, mask, 12), _greedy(model, FP8Cache(model.config), ids, mask, 12))
    assert hasattr(model, "_compiled_call")


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_second_turn_chunk_reads_the_fp8_history_and_equals_oracle(kind, monkeypatch):
    """Issue 17 compiled: a 200-token left-padded prompt and 8 tokens, then a second turn of 280 tokens continued
    from the cache: its chunk (4 query heads a KV head: 1124 query rows, nine 128-row tiles) is read from the FP8
    bytes by the kernel -- no layer dequantizes -- and both turns' tokens equal the fake-quantized oracle's (fp32
    model: no bf16 rounding between the paths). Eager decode steps (``disable_compile``): the compiled ones are
    test_generate_compiles_the_static_cache_and_equals_eager_fp8's, and compiling two static caches would cost this
    test a minute."""
    from oracle import fake_fp8_static_cache

    from hf_fp8cache.cache_layer import FP8CacheLayer
    from hf_fp8cache.static_cache import FP8StaticLayer

    model = tiny_llama(seed=3, heads=8, kv_heads=2, head_dim=64).cuda()
    model.set_attn_implementation(ATTENTION_NAME)
    ids, mask = left_padded_prompts(3, 200, pads=lambda row: 37 * row, pad_id=None, device="cuda")
    turn = torch.randint(3, 256, (3, 280), generator=torch.Generator().manual_seed(1)).cuda()
    if kind == "dynamic":
        caches, layer_class = (FP8Cache(model.config), fake_quant_cache(model.config)), FP8CacheLayer
    else:
        caches = (FP8StaticCache(model.config, max_cache_len=500), fake_fp8_static_cache(model.config, 500))
        layer_class = FP8StaticLayer
    tokens = []
    with monkeypatch.context() as patch:
        for cache in caches:
            first = _greedy(model, cache, ids, mask, 8, disable_compile=True)
            if cache is caches[0]:  # from the second turn on our cache never dequantizes its history
                patch.setattr(layer_class, "dequantized", lambda layer: pytest.fail("a layer dequantized"))
            both = torch.cat([first, turn], 1)
            both_mask = torch.cat([mask, torch.ones(3, both.shape[1] - mask.shape[1], dtype=mask.dtype,
                                                    device="cuda")], 1)  # fmt: skip
            tokens.append((first, _greedy(model, cache, both, both_mask, 8, disable_compile=True)))
            patch.undo()
    for (ours_first, ours_second), (theirs_first, theirs_second) in zip(tokens[:1], tokens[1:]):
        assert_equal(ours_first, theirs_first)
        assert_equal(ours_second, theirs_second)


def test_fp8_queries_generate_on_gpu_moves_the_logits_a_little():
    """quantize_query=True on the compiled kernel (e4m3 tensor-core dots), first prefill in FP8 too: a tiny fp32
    Llama's scores over 8 greedy steps of a left-padded batch stay within the bound the interpreted kernel meets on
    CPU (largest difference there 0.0097, tests/test_attention.py) of the same cache's model-dtype queries, and move
    by more than float noise (the queries really are rounded)."""
    model = tiny_llama(seed=1).cuda()
    model.set_attn_implementation(ATTENTION_NAME)
    ids, mask = left_padded_prompts(device="cuda")
    scores = {}
    for quantize_query in (False, True):
        cache = FP8Cache(model.config, exact_prefill=False, quantize_query=quantize_query)
        out = _greedy(model, cache, ids, mask, 8, output_scores=True, return_dict_in_generate=True)
        scores[quantize_query] = out.scores
    difference = max((a - b).abs().max().item() for a, b in zip(scores[False], scores[True]))
    print(f"FP8 queries on GPU: largest score difference {difference:.4f}")
    assert 1e-4 < difference < 0.1
