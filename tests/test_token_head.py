"""strategy="token_head" (issue 18): one scale per (token, KV head), computed from each token as it is written, with
int8 or fp8 codes. The dynamic cache equals a DynamicCache whose K/V are fake-quantized by the kernels' twins token for
token (helpers.FakeQuantTokenHeadLayer), on both read paths, and the static cache equals the dynamic one (compiled
without recompiles); sliding-window and hybrid models keep them too; an outlier token changes none of the other
tokens' stored values; checkpoint scales are refused by name."""

import contextlib
import copy

import pytest
import torch
import torch._dynamo.testing
from helpers import assert_equal, fake_quant_cache, fake_quant_token_head, left_padded_prompts, tiny_llama
from hf_fp8cache.kernels import attention as attention_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from hf_fp8cache import FP8Cache, FP8StaticCache, KVScales, attach
from hf_fp8cache.attention import ATTENTION_NAME
from hf_fp8cache.formats import INT8, resolve_format
from hf_fp8cache.integration import cache_keyword

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning")

GREEDY, BEAM = dict(do_sample=False), dict(do_sample=False, num_beams=3, num_return_sequences=2)


def _generate(model, cache, implementation="sdpa", **kwargs):
    """Three left-padded prompts (rows padded by 0, 3, 5), 8 new tokens, through ``implementation``."""
    ids, mask = left_padded_prompts()
    model.set_attn_implementation(implementation)
    try:
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0,
                              **{cache_keyword(model): cache}, **kwargs)  # fmt: skip
    finally:
        model.set_attn_implementation("sdpa")


def _oracle(model, fmt, **kwargs):
    return fake_quant_cache(model.config, fmt, token_head=True, **kwargs)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("fmt", ["int8", "fp8", "fp8_e5m2"])
def test_generate_equals_the_fake_quant_oracle_on_the_dequantize_path(tiny_model, fmt, mode, torch_path):
    kwargs = GREEDY if mode == "greedy" else BEAM
    ours = _generate(tiny_model, FP8Cache(tiny_model.config, kv_cache_dtype=fmt, strategy="token_head"), **kwargs)
    assert_equal(ours, _generate(tiny_model, _oracle(tiny_model, fmt), **kwargs))


@pytest.mark.parametrize("implementation", ["sdpa", ATTENTION_NAME])
@pytest.mark.parametrize("kv_cache_dtype", ["int8_per_token_head", "fp8_per_token_head"])
def test_generate_through_the_triton_kernels_equals_the_oracle(kv_cache_dtype, implementation):
    """The Triton kernels (interpreted): quantize, and dequantize (sdpa) or the decode kernel reading per-token scales
    (ours, which leaves the step's token to the quantize kernel). vLLM's names set the strategy."""
    model = tiny_llama(seed=1)
    cache = FP8Cache(model.config, kv_cache_dtype=kv_cache_dtype)
    assert cache.strategy == "token_head"
    ours = _generate(model, cache, implementation, **GREEDY)
    assert_equal(ours, _generate(model, _oracle(model, "int8" if kv_cache_dtype.startswith("int8") else "fp8"),
                                 **GREEDY))  # fmt: skip


@pytest.mark.parametrize("implementation", ["sdpa", ATTENTION_NAME])
def test_exact_recent_window_equals_the_oracle(implementation, torch_path):
    """residual_length=4: the exact ring is independent of the scales; 11-token prompts and 8 steps slide it."""
    model = tiny_llama(seed=1)
    logits = lambda cache: torch.stack(_generate(model, cache, implementation, output_logits=True,
                                                 return_dict_in_generate=True, **GREEDY).logits)  # fmt: skip
    ours = logits(FP8Cache(model.config, kv_cache_dtype="int8", strategy="token_head", residual_length=4))
    oracle = logits(_oracle(model, "int8", residual_length=4))
    plain = logits(_oracle(model, "int8"))
    # sdpa reads the same values as the oracle; our kernel sums in another order: measured 2.4e-7 (fp32 model)
    torch.testing.assert_close(ours, oracle, rtol=0, atol=0 if implementation == "sdpa" else 2e-6)
    assert (ours - plain).abs().max() > 1e-4  # the window changes what attention reads


def _step(model, cache, ids):
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits


def test_crop_batch_ops_deepcopy_and_reset_follow_the_oracle(tiny_model, torch_path):
    """The scale buffers move with the codes: grown past the first capacity (256), cropped, repeated, selected,
    copied, and reused after a reset."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (2, 250), generator=g)
    ours = FP8Cache(tiny_model.config, kv_cache_dtype="int8", strategy="token_head")
    oracle = _oracle(tiny_model, "int8")
    for cache in (ours, oracle):
        _step(tiny_model, cache, ids)
        _step(tiny_model, cache, ids[:, :9])  # 259 tokens: the buffers grew
        cache.crop(-2)
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([3, 0, 1]))
    assert ours.layers[0].capacity > 256 and ours.get_seq_length() == 257
    twin = copy.deepcopy(ours)
    nxt = torch.randint(3, 256, (3, 2), generator=g)
    expected = _step(tiny_model, oracle, nxt)
    assert_equal(_step(tiny_model, ours, nxt), expected)
    assert_equal(_step(tiny_model, twin, nxt), expected)  # the copy holds its own codes and scales
    ours.reset()
    oracle = _oracle(tiny_model, "int8")
    assert_equal(_step(tiny_model, ours, nxt), _step(tiny_model, oracle, nxt))


def _stored(cache_kwargs, outlier):
    """K and V a one-layer cache reads back for 9 tokens of 2 heads, one key value of token 4 set to ``outlier``."""
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 9, 64, generator=g), torch.randn(1, 2, 9, 64, generator=g)
    keys[0, 1, 4, 7] = outlier
    cache = FP8Cache(**cache_kwargs)
    cache.update(keys, values, 0)
    return [x.clone() for x in cache.update(keys[:, :, :0], values[:, :, :0], 0)]  # what later tokens read


@pytest.mark.parametrize(
    "cache_kwargs, isolated",
    [(dict(kv_cache_dtype="int8", strategy="token_head"), True), (dict(strategy="token_head"), True),
     (dict(calculate_kv_scales=True), False)],  # per-tensor on-the-fly scales: the outlier moves every key
    ids=["int8-token_head", "e4m3-token_head", "e4m3-onthefly-tensor"],
)  # fmt: skip
def test_an_outlier_token_leaves_the_other_tokens_stored_values_unchanged(cache_kwargs, isolated, torch_path):
    with contextlib.nullcontext() if isolated else pytest.warns(UserWarning, match="outlier"):
        keys, values = _stored(cache_kwargs, 1e4)
    plain_keys, plain_values = _stored(cache_kwargs, 0.5)
    others = torch.ones(9, dtype=torch.bool)
    others[4] = False
    assert torch.equal(keys[:, :, others], plain_keys[:, :, others]) == isolated
    assert_equal(values, plain_values)  # the values never see the outlier
    if isolated:  # the outlier's own scale keeps it: measured 10033 (int8), 10024 (e4m3)
        assert abs(keys[0, 1, 4, 7] - 1e4) < 1e4 / 64


def test_bytes_count_the_scales():
    """bf16 scale per (token, head): 2 bytes per D code bytes, 3.1 % at D = 64 (1.56 % at 128)."""
    cache = FP8Cache(kv_cache_dtype="int8", strategy="token_head")
    x = torch.randn(2, 4, 100, 64, dtype=torch.bfloat16)
    cache.update(x, x, 0)
    codes, scales = 2 * 2 * 4 * 100 * 64, 2 * 2 * 4 * 100 * 2
    assert cache.nbytes == codes + scales and scales / codes == 2 / 64
    assert cache.allocated_nbytes == (codes + scales) * 256 // 100  # capacity 256 tokens
    k, _ = cache.update(x[:, :, :1], x[:, :, :1], 0)
    assert_equal(k[:, :, :100], fake_quant_token_head(x, INT8))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(kv_cache_dtype="int8"), ValueError, r"kv_cache_dtype='int8' \(int8 codes\) needs strategy='token_head'"),
        (dict(kv_cache_dtype="int8", strategy="attn_head"), ValueError, "got strategy='attn_head'"),
        (dict(strategy="token_head", scales=KVScales([1.0] * 2, [1.0] * 2)), ValueError,
         "strategy='token_head' computes a scale per token and head .* cannot use scales"),
        (dict(strategy="token_head", calculate_kv_scales=True), ValueError, "calculate_kv_scales=True .* conflicts"),
        (dict(kv_cache_dtype="int8_per_token_head", strategy="tensor"), ValueError,
         "kv_cache_dtype='int8_per_token_head' means strategy='token_head', got strategy='tensor'"),
    ],
)  # fmt: skip
def test_conflicting_options_are_refused_naming_them(tiny_model, kwargs, error, message):
    with pytest.raises(error, match=message):
        FP8Cache(tiny_model.config, **kwargs)
    with pytest.raises(error, match=message):
        attach(tiny_model, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(kv_cache_dtype="fp8_per_token_head"), dict(strategy="token_head")])
def test_checkpoint_scales_are_refused_before_anything_loads(tiny_model, kwargs):
    with pytest.raises(ValueError, match=r"cannot use a checkpoint's scales \(from_pretrained\)"):
        FP8Cache.from_pretrained("/nonexistent/checkpoint", tiny_model.config, **kwargs)


class _TokenHeadSlidingOracle(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer storing K/V fake-quantized per (token, head) by the twins
    (``fake_quant_token_head``); the first update of an empty layer returns the exact K/V."""

    def __init__(self, sliding_window: int, fmt) -> None:
        super().__init__(sliding_window)
        self.fmt = fmt

    def update(self, key_states, value_states, *args, **kwargs):
        empty = self.get_seq_length() == 0
        keys, values = super().update(fake_quant_token_head(key_states, self.fmt),
                                      fake_quant_token_head(value_states, self.fmt))  # fmt: skip
        return (key_states, value_states) if empty else (keys, values)


def _sliding_oracle(config, fmt_name):
    """A DynamicCache for a sliding model: its sliding layers ``_TokenHeadSlidingOracle``, its full ones
    ``FakeQuantTokenHeadLayer`` (``fake_quant_cache``)."""
    fmt = resolve_format(fmt_name)
    cache, full = DynamicCache(config=config), fake_quant_cache(config, fmt_name, token_head=True).layers
    cache.layers = [_TokenHeadSlidingOracle(layer.sliding_window, fmt) if isinstance(layer, DynamicSlidingWindowLayer)
                    else full[i] for i, layer in enumerate(cache.layers)]  # fmt: skip
    return cache


@pytest.mark.parametrize("family", ["mistral", "gemma3", "gpt-oss"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_sliding_layers_keep_per_token_head_scales_and_equal_the_oracle(family, fmt, torch_path):
    """Sliding-window models decoding twice past their 6-token window (test_sliding's prompts: left padding, a
    prompt longer than the window): the dynamic cache equals the oracle token for token on both read paths (the
    window's tokens move to the front with their scales), and the static cache's ring equals the dynamic cache."""
    from test_sliding import FAMILIES, _model, _prompts

    baseline = FAMILIES[family][1][0]  # the family's own attention (eager for softcap / sinks)
    model = _model(family, baseline)
    ids, mask = _prompts()

    def run(cache, implementation):
        model.set_attn_implementation(implementation)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=0, **{cache_keyword(model): cache})  # fmt: skip

    oracle = run(_sliding_oracle(model.config, fmt), baseline)
    for implementation in (baseline, ATTENTION_NAME):
        dynamic = run(FP8Cache(model.config, kv_cache_dtype=fmt, strategy="token_head"), implementation)
        assert_equal(dynamic, oracle)
        static = run(FP8StaticCache(model.config, 40, kv_cache_dtype=fmt, strategy="token_head"), implementation)
        assert_equal(static, oracle)


@pytest.mark.parametrize("family", ["qwen3-next", "falcon-h1"])
def test_hybrid_models_keep_per_token_head_scales(family, torch_path):
    """Linear-attention hybrids: only K/V take per-token-head scales (the states stay transformers' own); the
    static cache gives the dynamic one's tokens, and the stored bytes are read (they differ from bf16's)."""
    from test_hybrid import _model

    model = _model(family, ATTENTION_NAME)
    ids, mask = left_padded_prompts(2, 12, pads=lambda row: 3 * row, pad_id=None, seed=2)

    def run(cache):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True,
                              **{cache_keyword(model): cache})  # fmt: skip

    dynamic = run(FP8Cache(model.config, kv_cache_dtype="int8_per_token_head"))
    static = run(FP8StaticCache(model.config, 24, kv_cache_dtype="int8_per_token_head"))
    assert_equal(static.sequences, dynamic.sequences)
    bf16 = run(None)
    assert not torch.equal(torch.stack(dynamic.logits), torch.stack(bf16.logits))


@pytest.mark.parametrize("kv_cache_dtype, implementation", [("int8_per_token_head", ATTENTION_NAME),
                                                            ("fp8_per_token_head", "sdpa")])  # fmt: skip
def test_static_cache_equals_the_dynamic_one(kv_cache_dtype, implementation):
    """Through the Triton kernels (interpreted): 11-token prompts and 8 new tokens in max_cache_len=25, which the
    buffers round up to 26 slots so the attention reads the scales two to a word (PAIRED_SCALES)."""
    model = tiny_llama(seed=1)
    run = lambda cache: _generate(model, cache, implementation, output_logits=True, return_dict_in_generate=True,
                                  **GREEDY)  # fmt: skip
    cache = FP8StaticCache(model.config, max_cache_len=25, kv_cache_dtype=kv_cache_dtype)
    static = run(cache)
    layer = cache.layers[0]
    assert layer.key_bytes.shape[2] == layer._key_scales.shape[2] == 26 and cache.max_cache_len == 25
    assert attention_kernel._paired_scales(layer._key_scales, layer._value_scales)
    dynamic = run(FP8Cache(model.config, kv_cache_dtype=kv_cache_dtype))
    assert_equal(static.sequences, dynamic.sequences)
    # measured max |difference| of the step logits: 0 through our attention (the same kernel over the same bytes),
    # 1.5e-7 through SDPA (over all 25 slots, the unwritten ones masked)
    assert (torch.stack(static.logits) - torch.stack(dynamic.logits)).abs().max() <= 1e-6


def test_static_reorder_moves_the_scales_with_the_codes(tiny_model, torch_path):
    """Beam search reorders the rows in place: each row's scales (row b's values are 10^b times row 0's) go along."""
    cache = FP8StaticCache(tiny_model.config, 8, kv_cache_dtype="int8_per_token_head")
    x = (
        torch.randn(3, 2, 5, 16, generator=torch.Generator().manual_seed(8))
        * torch.tensor([1.0, 10.0, 100.0])[:, None, None, None]
    )
    for layer in range(len(cache.layers)):
        cache.update(x, x, layer)
    before = [t[:, :, :5].clone() for t in cache.layers[0].dequantized()]
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    after = cache.layers[0].dequantized()
    for moved, kept in zip(after, before):
        assert_equal(moved[:, :, :5], kept[[2, 0, 1]])


def test_static_cache_compiles_once_and_counts_its_scale_bytes():
    """torch.compile(fullgraph=True) over 8 decode steps: one graph, the eager tokens; the scale buffers are fixed
    and counted in allocated_nbytes."""
    model = tiny_llama(seed=1)
    torch._dynamo.reset()  # earlier compiles of LlamaForCausalLM.forward (other tests) count towards dynamo's limits
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.forward, backend=counter, fullgraph=True)
    ids = left_padded_prompts(batch=2)[0]
    tokens = []
    for forward in (compiled, model.forward):
        cache = FP8StaticCache(model.config, max_cache_len=32, kv_cache_dtype="int8_per_token_head")
        with torch.no_grad():
            step = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            out = [step]
            for _ in range(8):
                step = forward(input_ids=step, past_key_values=cache).logits[:, -1:].argmax(-1)
                out.append(step)
        tokens.append(torch.cat(out, 1))
    assert counter.frame_count == 1
    assert_equal(tokens[0], tokens[1])
    layers, B, H, D = model.config.num_hidden_layers, 2, model.config.num_key_value_heads, model.config.head_dim
    assert cache.allocated_nbytes == layers * 2 * B * H * 32 * (D + 2)  # codes and a bf16 scale a token and head
