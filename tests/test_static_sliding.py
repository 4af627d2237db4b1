"""Sliding-window and chunked layers in FP8StaticCache: built from the config as transformers' StaticCache builds
them, the same tokens and logits as an independent fake-quantized oracle (transformers' own static layers storing
fp8-cast K/V, ``oracle.fake_fp8_static_cache``), transformers' lengths, mask sizes and crop rules, and memory bounded
by the window."""

import copy

import pytest
import torch
import torch._dynamo.testing
from helpers import assert_equal
from oracle import fake_fp8_static_cache
from test_sliding import FAMILIES, SIZES, WINDOW, _model, _prompts
from transformers import LlamaConfig, StaticCache
from transformers.cache_utils import StaticSlidingWindowLayer

from hf_fp8cache import FP8Cache, FP8StaticCache
from hf_fp8cache.cache_base import DequantWorkspace
from hf_fp8cache.contract import ATTENTION_NAME
from hf_fp8cache.formats import resolve_format
from hf_fp8cache.integration import cache_keyword
from hf_fp8cache.static_cache import FP8StaticLayer
from hf_fp8cache.static_sliding import FP8StaticSlidingLayer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

MAX_CACHE_LEN = 40  # the full layers' buffers; sliding layers hold WINDOW (6) tokens
THEIRS_CROP = hasattr(StaticSlidingWindowLayer, "crop")  # transformers' static layers crop from 5.20
CASES = [(family, attention) for family, (_, attentions) in FAMILIES.items() for attention in attentions]
# (batch, prompt tokens): a prompt longer than the window, and one shorter (it fills the ring by decode steps)
PROMPTS = {"long": (3, 11), "short": (2, 4)}


def _generate(model, cache, prompt="long", new_tokens=12, **kwargs):
    ids, mask = _prompts(*PROMPTS[prompt])
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                          **{cache_keyword(model): cache}, **kwargs)  # fmt: skip


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("family, attention", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_generate_past_the_window_equals_the_oracle(family, attention, prompt, torch_path):
    """Greedy, left padding, 12 new tokens: twice past the 6-token window. The logits equal the oracle's exactly
    through the model's own attention (measured max |difference| 0: the same values in the same positions under the
    same masks); through ours, whose kernel reads the full layers' FP8 bytes (the oracle runs SDPA), 3.1e-7."""
    model = _model(family, attention)
    cache = FP8StaticCache(model.config, max_cache_len=MAX_CACHE_LEN)
    ours = _generate(model, cache, prompt)
    oracle = _generate(model, fake_fp8_static_cache(model.config, MAX_CACHE_LEN), prompt)
    assert_equal(ours.sequences, oracle.sequences)
    difference = (torch.stack(ours.logits) - torch.stack(oracle.logits)).abs().max()
    assert difference <= (1e-6 if attention == ATTENTION_NAME else 0.0)
    bf16 = _generate(model, StaticCache(config=model.config, max_cache_len=MAX_CACHE_LEN), prompt)
    assert not torch.equal(torch.stack(ours.logits), torch.stack(bf16.logits))  # FP8 bytes were read
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    assert sliding and all(isinstance(layer, FP8StaticSlidingLayer) for layer in sliding)
    assert all(layer.get_seq_length() == PROMPTS[prompt][1] + 11 for layer in sliding)  # the last token is not fed


def test_the_triton_kernels_write_and_read_the_ring():
    """The same run through the Triton kernels (the interpreter here, compiled on the GPU) as through their torch
    twins: the same fp8 bytes in every slot, so the same logits."""
    from hf_fp8cache.kernels import cpu_backend

    model = _model("mistral", "sdpa")
    runs = []
    for backend in ("triton", "torch"):
        cache = FP8StaticCache(model.config, max_cache_len=MAX_CACHE_LEN)
        with cpu_backend(backend):
            runs.append((_generate(model, cache, "short", new_tokens=8), cache.layers[0].key_bytes.clone()))
    (triton_run, triton_bytes), (torch_run, torch_bytes) = runs
    assert_equal(triton_bytes, torch_bytes)
    assert_equal(torch.stack(triton_run.logits), torch.stack(torch_run.logits))


def test_layers_follow_the_config_as_in_transformers(torch_path):
    config = FAMILIES["gemma3"][0]()
    ours = FP8StaticCache(config, max_cache_len=MAX_CACHE_LEN).layers
    theirs = StaticCache(config=config, max_cache_len=MAX_CACHE_LEN).layers
    assert [isinstance(layer, StaticSlidingWindowLayer) for layer in theirs] == [True, False, True, False]
    assert [type(layer) for layer in ours] == [
        FP8StaticSlidingLayer if isinstance(layer, StaticSlidingWindowLayer) else FP8StaticLayer for layer in theirs
    ]
    assert [layer.get_max_length() for layer in ours] == [layer.get_max_length() for layer in theirs] == [6, 40] * 2
    chunked = LlamaConfig(num_hidden_layers=2, **SIZES)
    chunked.attention_chunk_size = 5
    assert [layer.sliding_window for layer in FP8StaticCache(chunked, max_cache_len=16).layers] == [5, 5]
    short = FP8StaticCache(config, max_cache_len=4)  # a cache shorter than the window bounds the ring
    assert short.layers[0].get_max_length() == StaticCache(config=config, max_cache_len=4).layers[0].get_max_length()


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_beam_search_equals_the_oracle(family, torch_path):
    model = _model(family, "sdpa")
    beams = dict(num_beams=2, num_return_sequences=2)
    ours = _generate(model, FP8StaticCache(model.config, max_cache_len=MAX_CACHE_LEN), **beams)
    oracle = _generate(model, fake_fp8_static_cache(model.config, MAX_CACHE_LEN), **beams)
    assert_equal(ours.sequences, oracle.sequences)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_continued_generate_equals_the_oracle(prompt, torch_path):
    """generate 2 tokens, then continue from the returned cache with 5 more prompt tokens (a chunk that crosses the
    window's end after the short prompt, and lands on a full ring after the long one) and 8 new tokens."""
    model = _model("gemma3", "sdpa")
    ids, mask = _prompts(*PROMPTS[prompt])
    more = torch.randint(3, 256, (ids.shape[0], 5), generator=torch.Generator().manual_seed(2))
    results = []
    for cache in (FP8StaticCache(model.config, max_cache_len=MAX_CACHE_LEN),
                  fake_fp8_static_cache(model.config, MAX_CACHE_LEN)):  # fmt: skip
        first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                               **{cache_keyword(model): cache})  # fmt: skip
        longer = torch.cat([mask, torch.ones(ids.shape[0], 2 + 5, dtype=mask.dtype)], 1)
        results.append(model.generate(input_ids=torch.cat([first, more], 1), attention_mask=longer, max_new_tokens=8,
                                      do_sample=False, pad_token_id=0, output_logits=True,
                                      return_dict_in_generate=True, **{cache_keyword(model): cache}))  # fmt: skip
    assert_equal(results[0].sequences, results[1].sequences)
    assert_equal(torch.stack(results[0].logits), torch.stack(results[1].logits))  # measured: exactly equal


def test_chunks_of_every_size_equal_the_oracle(torch_path):
    """Forward calls of 4, 5 (crosses the window's end), 9 (more than the window, on a full ring), 1, 1 and 3
    tokens: every update path, the logits exactly the oracle's (measured max |difference| 0)."""
    model = _model("mistral", "sdpa")
    ids = torch.randint(3, 256, (2, 23), generator=torch.Generator().manual_seed(4))
    bounds = [0, 4, 9, 18, 19, 20, 23]
    logits = []
    for cache in (FP8StaticCache(model.config, max_cache_len=MAX_CACHE_LEN),
                  fake_fp8_static_cache(model.config, MAX_CACHE_LEN)):  # fmt: skip
        with torch.no_grad():
            logits.append([model(ids[:, a:b], **{cache_keyword(model): cache}).logits
                           for a, b in zip(bounds, bounds[1:])])  # fmt: skip
        assert cache.get_seq_length() == 23
    for ours, theirs in zip(*logits):
        assert_equal(ours, theirs)


def test_lengths_mask_sizes_and_returned_shapes_match_transformers(torch_path):
    for max_cache_len in (MAX_CACHE_LEN, 4):  # the window, or a cache shorter than it, bounds the ring
        ours, theirs = _layer(max_cache_len), StaticSlidingWindowLayer(max_cache_len, WINDOW)
        g = torch.Generator().manual_seed(3)
        for tokens in (3, 1, 1, 1, 1, 2, 1, 8, 1):
            x = torch.randn(1, 2, tokens, 16, generator=g)
            for query in (1, 3, 7):
                assert ours.get_mask_sizes(query) == theirs.get_mask_sizes(query)
            mine, reference = ours.update(x, x), theirs.update(x, x)
            assert mine[0].shape == reference[0].shape
            assert ours.get_seq_length() == theirs.get_seq_length()
        assert ours.get_max_length() == theirs.get_max_length()
        assert ours.is_croppable == (max_cache_len <= WINDOW)  # transformers' rule (its static layers crop from 5.20)
        assert not THEIRS_CROP or ours.is_croppable == theirs.is_croppable
        ours.reset(), theirs.reset()
        assert ours.get_seq_length() == theirs.get_seq_length() == 0
        assert ours.get_mask_sizes(2) == theirs.get_mask_sizes(2)


def test_returned_window_is_the_fp8_of_the_last_tokens_oldest_first(torch_path):
    """Values 1..15 (exact in e4m3; 17 is not) make positions visible: every decode step past the window returns
    the window's tokens in order, and a chunk returns the kept tokens then its own."""
    layer = _layer(MAX_CACHE_LEN)
    column = lambda *v: torch.tensor(v, dtype=torch.float32).reshape(1, 1, -1, 1).expand(1, 2, -1, 16)  # noqa: E731
    first = [layer.update(column(*range(1, 5)), column(*range(1, 5)))[0]]
    assert first[0][0, 0, :4, 0].tolist() == [1, 2, 3, 4]
    for token in range(5, 13):
        keys, _ = layer.update(column(token), column(token))
        expected = list(range(max(token - WINDOW + 1, 1), token + 1))
        assert keys[0, 0, : len(expected), 0].tolist() == expected
    keys, _ = layer.update(column(13, 14, 15), column(13, 14, 15))
    assert keys[0, 0, :, 0].tolist() == list(range(8, 16))  # the last WINDOW - 1 kept, then the chunk


def test_crop_follows_transformers_and_refuses_evicted_tokens(torch_path):
    layer = _layer(MAX_CACHE_LEN)
    x = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(6))
    layer.update(x, x)
    layer.crop(-2)  # the ring has not wrapped: exact
    assert layer.get_seq_length() == 3 and int(layer.cumulative_length) == 3
    keys, _ = layer.update(x[:, :, 3:], x[:, :, 3:])  # the two cropped tokens again: positions 3 and 4
    assert_equal(keys[:, :, :5], x.to(torch.float8_e4m3fn).float())  # unit scales: the fp8 cast of x
    if THEIRS_CROP:  # transformers' own static sliding layer crops alike (5.20+)
        theirs = StaticSlidingWindowLayer(MAX_CACHE_LEN, WINDOW)
        theirs.update(x, x)
        theirs.crop(-2)
        assert_equal(
            keys[:, :, :5], theirs.update(x[:, :, 3:], x[:, :, 3:])[0][:, :, :5].to(torch.float8_e4m3fn).float()
        )
    layer.update(x, x)  # 10 tokens seen: the ring has wrapped
    layer.crop(-1)  # one token: the ring still holds what the next step reads
    assert layer.get_seq_length() == 9
    with pytest.raises(RuntimeError, match="cannot crop 2 tokens .* holds the last 6 of 9 tokens"):
        layer.crop(-2)
    layer.crop(9)  # positive: keep that many (transformers <= 5.19), a no-op here
    assert layer.get_seq_length() == 9 and int(layer.cumulative_length) == 9


def test_reset_reuses_the_ring_and_copies_are_independent(torch_path):
    model = _model("mistral", "sdpa")
    cache = FP8StaticCache(model.config, max_cache_len=MAX_CACHE_LEN)
    first = _generate(model, cache, "short")
    ring = cache.layers[0].key_bytes.data_ptr()
    twin = copy.deepcopy(cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and twin.get_seq_length() == 4 + 11
    again = _generate(model, cache, "short")
    assert cache.layers[0].key_bytes.data_ptr() == ring
    assert_equal(again.sequences, first.sequences)
    assert twin.layers[0].key_bytes.data_ptr() != ring


def test_memory_is_bounded_by_the_window(torch_path):
    cache = FP8StaticCache(FAMILIES["gemma3"][0](), max_cache_len=MAX_CACHE_LEN)
    x = torch.randn(2, 2, 10, 16)
    for layer in range(4):
        cache.update(x, x, layer)
    sizes = [layer.allocated_nbytes for layer in cache.layers]
    for _ in range(25):
        for layer in range(4):
            cache.update(x[:, :, :1], x[:, :, :1], layer)
    sliding, full = cache.layers[0], cache.layers[1]
    assert sliding.get_seq_length() == int(full.get_seq_length()) == 35
    assert [layer.allocated_nbytes for layer in cache.layers] == sizes
    assert sliding.allocated_nbytes == 2 * 2 * 2 * WINDOW * 16 + 2 * 4  # FP8 K+V of B=2, H=2, 6 slots, D=16 + scales
    assert full.allocated_nbytes == 2 * 2 * 2 * MAX_CACHE_LEN * 16 + 2 * 4


def test_a_step_past_the_full_layers_end_still_fails_on_a_hybrid_model(torch_path):
    cache = FP8StaticCache(FAMILIES["gemma3"][0](), max_cache_len=8)
    x = torch.randn(1, 2, 8, 16)
    for layer in range(4):
        cache.update(x, x, layer)
    cache.update(x[:, :, :1], x[:, :, :1], 0)  # a sliding layer takes any number of tokens
    with pytest.raises(RuntimeError, match="more tokens than max_cache_len=8"):
        cache.update(x[:, :, :1], x[:, :, :1], 1)  # the first full layer checks the step


def test_onthefly_scales_come_from_the_whole_first_prompt(torch_path):
    """A prompt longer than the ring: its scales still come from all its tokens, as in the dynamic sliding layer."""
    model = _model("gemma3", "sdpa")
    ids, mask = _prompts(*PROMPTS["long"])
    options = dict(calculate_kv_scales=True, strategy="attn_head")
    static, dynamic = FP8StaticCache(model.config, MAX_CACHE_LEN, **options), FP8Cache(model.config, **options)
    with torch.no_grad():
        for cache in (static, dynamic):
            model(ids, attention_mask=mask, **{cache_keyword(model): cache})
    ours, theirs = static.layers[0], dynamic.layers[0]  # sliding layers with the same input
    assert ours.key_scale.shape == (2,) and not torch.equal(ours.key_scale, torch.ones(2))
    assert_equal(ours.key_scale, theirs.key_scale, "key scales")
    assert_equal(ours.value_scale, theirs.value_scale, "value scales")


def test_exact_recent_window_is_refused_on_sliding_layers():
    with pytest.raises(ValueError, match=r"residual_length is not supported on sliding-window layers \(window 6\)"):
        _layer(MAX_CACHE_LEN, residual_length=4)


@pytest.mark.parametrize("family, attention", [("mistral", "sdpa"), ("gemma3", ATTENTION_NAME)])
def test_compiled_decode_traces_whole_steps_and_equals_eager(family, attention, torch_path):
    """torch.compile(fullgraph=True) over 12 decode steps from a 4-token prompt (filling the ring, then 8 steps
    past the window): no graph breaks, the eager tokens and logits. At most three frames, as for transformers' own
    static sliding layer: the first step, the host length turning dynamic, the ring's first wrap. Through SDPA the
    layer hands over its dequantized ring; through ours (Gemma 3: sliding and full layers) the kernel reads it."""
    from test_static_cache import _decode_steps

    torch._dynamo.reset()
    model = _model(family, attention)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.forward, backend=counter, fullgraph=True)
    ids = _prompts(*PROMPTS["short"])[0]
    tokens, logits = _decode_steps(model, compiled, FP8StaticCache(model.config, MAX_CACHE_LEN), ids, 12)
    eager_tokens, eager_logits = _decode_steps(model, model.forward, FP8StaticCache(model.config, MAX_CACHE_LEN),
                                               ids, 12)  # fmt: skip
    assert counter.frame_count <= 3
    assert_equal(tokens, eager_tokens)
    # measured max |difference| 8.9e-8 through SDPA (traced and decomposed by AOTAutograd; the cache's values are
    # the same), 0 through ours (the same kernel calls)
    assert (logits - eager_logits).abs().max() <= 1e-6


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_our_attention_reads_the_ring_in_place_on_decode_steps(family, torch_path, monkeypatch):
    """With our attention every decode step of a sliding layer goes to the decode kernel as a ring (no dequantized
    copy): one ring call per sliding layer and step, the first prefill excepted; the layer is then compileable, and
    with SDPA it is not (its dequantized ring would be a CUDA-graph output)."""
    import hf_fp8cache.attention as attention_module

    calls = []
    original = attention_module.ops.decode_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("ring", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_module.ops, "decode_attention", counting)
    model = _model(family, ATTENTION_NAME)
    cache = FP8StaticCache(model.config, max_cache_len=MAX_CACHE_LEN)
    _generate(model, cache, "long", new_tokens=12)
    sliding = sum(layer.is_sliding for layer in cache.layers)
    assert calls.count(True) == sliding * 11  # 11 decode steps after the prefill
    assert calls.count(False) == (len(cache.layers) - sliding) * 11
    assert cache.is_compileable and all(layer.is_compileable for layer in cache.layers)
    model.set_attn_implementation("sdpa")
    assert not cache.is_compileable


def _layer(max_cache_len: int, **kwargs) -> FP8StaticSlidingLayer:
    """A lone sliding layer of WINDOW tokens with unit e4m3 scales."""
    return FP8StaticSlidingLayer(max_cache_len, WINDOW, fmt=resolve_format("fp8"), strategy="tensor", scales=None,
                                 calculate_kv_scales=False, workspace=DequantWorkspace(static=True), layer_idx=0,
                                 **kwargs)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "family, attention, compiled",
    [("mistral", "sdpa", False), ("gemma3", ATTENTION_NAME, True), ("gpt-oss", ATTENTION_NAME, True)],
)
def test_generate_compiles_sliding_layers_only_through_our_attention_and_equals_the_oracle(family, attention, compiled):
    """On CUDA generate compiles a cache only when all its layers are compileable: a sliding layer is when our
    attention reads its ring in place, not when it hands a dequantized ring to SDPA (a CUDA-graph output the next
    replay overwrote before the next step read it). Either way the tokens equal the oracle's, decoding past the
    window."""
    model = _model(family, attention).cuda()  # fp32: no bf16 rounding between the compiled and the eager graph
    ids, mask = (t.cuda() for t in _prompts(3, 11))

    def greedy(cache, **kwargs):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                              **{cache_keyword(model): cache}, **kwargs)  # fmt: skip

    cache = FP8StaticCache(model.config, max_cache_len=MAX_CACHE_LEN)
    assert cache.is_compileable == compiled
    tokens = greedy(cache)
    assert hasattr(model, "_compiled_call") == compiled
    assert_equal(tokens, greedy(fake_fp8_static_cache(model.config, MAX_CACHE_LEN), disable_compile=True))


def test_fp8_queries_on_rings_equal_the_dynamic_cache(torch_path):
    """quantize_query=True (issue 17) on Gemma 3's sliding rings and full layers, 12 tokens past the window: the tokens
    and logits equal FP8Cache(quantize_query=True)'s (measured max |difference| 2.2e-7, 2.7e-7 without FP8 queries:
    the same fp8 values, the ring read in slot order), and move off the static cache's model-dtype queries (measured
    0.020)."""
    model = _model("gemma3", ATTENTION_NAME)
    runs = {q: _generate(model, FP8StaticCache(model.config, MAX_CACHE_LEN, quantize_query=q)) for q in (False, True)}
    dynamic = _generate(model, FP8Cache(model.config, quantize_query=True))
    assert_equal(runs[True].sequences, dynamic.sequences)
    assert (torch.stack(runs[True].logits) - torch.stack(dynamic.logits)).abs().max() <= 1e-6
    assert 1e-4 < (torch.stack(runs[True].logits) - torch.stack(runs[False].logits)).abs().max() < 0.1
