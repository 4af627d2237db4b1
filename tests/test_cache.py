"""QuantizedFP8Cache semantics: token-for-token equal to a fake-quantized DynamicCache (same bytes, same scales)
through every path generate uses, plus memory, scales and bad input.

The oracle (helpers.FakeQuantLayer) stores decode(encode(x / scale)) * scale in a plain DynamicLayer, so any
difference in tokens is a bug in our cache's bookkeeping, not FP8 noise."""

import copy

import pytest
import torch
from helpers import assert_equal, fake_quant, fake_quant_cache, left_padded_prompts, tiny_llama
from transformers import DynamicCache, LlamaConfig, MistralConfig

from hf_fp8cache import FP8Cache, KVScales, QuantizedFP8Cache
from hf_fp8cache.integration import cache_keyword

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning")


def _prompts(batch=3):
    """This file's prompts: seed 1, row r left-padded with 2r pad tokens (id 0)."""
    return left_padded_prompts(batch, seed=1, pads=lambda row: 2 * row)


def _generate(model, cache, seed=0, **kwargs):
    ids, mask = _prompts()
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0,
                          **{cache_keyword(model): cache}, **kwargs)  # fmt: skip


SCALES = {
    "unit": ({}, dict()),
    "tensor": ({"scales": KVScales([0.02, 0.03], [0.01, 0.04])}, dict(key_scale=None, value_scale=None)),
    "attn_head": ({"scales": KVScales([[0.02, 0.05]] * 2, [[0.03, 0.01]] * 2, "attn_head")}, {}),
}


def _oracle(model, fmt, cache_kwargs, exact_prefill=True):
    scales = cache_kwargs.get("scales")
    cache = fake_quant_cache(model.config, fmt, exact_prefill=exact_prefill,
                             residual_length=cache_kwargs.get("residual_length", 0))  # fmt: skip
    if scales is not None:
        for i, layer in enumerate(cache.layers):
            layer.key_scale, layer.value_scale = scales.key[i], scales.value[i]
    return cache


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("scales", list(SCALES))
def test_generate_equals_fake_quant_oracle(tiny_model, mode, fmt, scales, torch_path):
    kwargs = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=20),
              "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2)}[mode]  # fmt: skip
    cache_kwargs = SCALES[scales][0]
    ours = _generate(tiny_model, FP8Cache(tiny_model.config, kv_cache_dtype=fmt, **cache_kwargs), **kwargs)
    oracle = _generate(tiny_model, _oracle(tiny_model, fmt, cache_kwargs), **kwargs)
    assert_equal(ours, oracle)


def test_generate_through_triton_interpreter_equals_oracle(tiny_model):
    """The same check through the real Triton kernels (interpreted on CPU) instead of the torch twins."""
    ours = _generate(tiny_model, FP8Cache(tiny_model.config), do_sample=False)
    oracle = _generate(tiny_model, _oracle(tiny_model, "fp8", {}), do_sample=False)
    assert_equal(ours, oracle)
    beams = _generate(tiny_model, FP8Cache(), do_sample=False, num_beams=2)  # no config: layers made lazily
    assert_equal(beams, _generate(tiny_model, _oracle(tiny_model, "fp8", {}), do_sample=False, num_beams=2))


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("residual_length", [1, 4, 32])
def test_exact_recent_window_equals_oracle(tiny_model, mode, residual_length, torch_path):
    """11-token prompts plus 8 new tokens: a window of 1 or 4 slides (positions leave it), 32 holds everything.
    Compared on the logits of every step, not just the tokens."""
    kwargs = dict(do_sample=False, num_beams=3 if mode == "beam" else 1, output_logits=True,
                  return_dict_in_generate=True)  # fmt: skip
    logits = lambda cache: torch.stack(_generate(tiny_model, cache, **kwargs).logits)
    cache_kwargs = {"residual_length": residual_length, "calculate_kv_scales": True, "strategy": "attn_head"}
    cache = FP8Cache(tiny_model.config, **cache_kwargs)
    ours = logits(cache)
    oracle_cache = _oracle(tiny_model, "fp8", cache_kwargs)
    for ours_layer, oracle_layer in zip(cache.layers, oracle_cache.layers):  # the on-the-fly scales ours computed
        oracle_layer.key_scale, oracle_layer.value_scale = ours_layer.key_scale, ours_layer.value_scale
    assert_equal(ours, logits(oracle_cache))
    assert cache.layers[0].recent_start == max(0, cache.get_seq_length() - residual_length)
    plain = logits(FP8Cache(tiny_model.config, calculate_kv_scales=True, strategy="attn_head"))
    full = logits(DynamicCache(config=tiny_model.config))
    if residual_length == 32:  # nothing is ever read from FP8 after the exact prefill: full precision
        torch.testing.assert_close(ours, full, rtol=0, atol=1e-5)  # measured: equal up to fp32 summation order
    else:  # the window changes what attention reads, and brings it closer to full precision
        assert not torch.equal(ours, plain)
        assert (ours - full).abs().mean() < (plain - full).abs().mean()


def test_exact_recent_window_through_crop_and_batch_ops(tiny_model):
    """Through the Triton interpreter: a crop back into the window, then beams reordered, against the oracle."""
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 256, (2, 9), generator=g)
    ours = FP8Cache(tiny_model.config, residual_length=4)
    oracle = _oracle(tiny_model, "fp8", {"residual_length": 4})
    for cache in (ours, oracle):
        _step(tiny_model, cache, ids)
        _step(tiny_model, cache, ids[:, :3])  # 12 tokens: 8..11 exact
        cache.crop(-2)  # 10 tokens: 8, 9 still exact, evicted 0..7 stay FP8
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([3, 0, 1]))
    assert ours.layers[0].recent_start == 8
    for n in (1, 2, 3):  # 11, 13, 16 tokens: the window refills, then slides
        nxt = torch.randint(3, 256, (3, n), generator=g)
        assert_equal(_step(tiny_model, ours, nxt), _step(tiny_model, oracle, nxt))
    assert ours.layers[0].recent_start == 12
    ours.crop(-10)  # below the window: nothing exact is left
    assert ours.layers[0].recent_start == ours.get_seq_length() == 6


def test_quantized_prefill_option(tiny_model, torch_path):
    ours = _generate(tiny_model, FP8Cache(tiny_model.config, exact_prefill=False), do_sample=False)
    oracle = _generate(tiny_model, _oracle(tiny_model, "fp8", {}, exact_prefill=False), do_sample=False)
    assert_equal(ours, oracle)


def test_both_keyword_names(tiny_model, torch_path):
    ids, mask = _prompts()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    by_old_name = tiny_model.generate(**kw, past_key_values=FP8Cache(tiny_model.config))
    if cache_keyword(tiny_model) != "cache":
        pytest.skip("this transformers version has no cache= keyword (added in 5.24)")
    assert_equal(by_old_name, tiny_model.generate(**kw, cache=FP8Cache(tiny_model.config)))


def test_continue_generation_from_returned_cache(tiny_model, torch_path):
    ids, mask = _prompts()
    results = []
    for cache in (FP8Cache(tiny_model.config), _oracle(tiny_model, "fp8", {})):
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, past_key_values=cache)
        first = tiny_model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert cache.get_seq_length() == first.shape[1] - 1
        longer_mask = torch.cat([mask, torch.ones(3, 5, dtype=mask.dtype)], 1)
        results.append(tiny_model.generate(input_ids=first, attention_mask=longer_mask, **kw))
    assert results[0].shape[1] == ids.shape[1] + 10
    assert_equal(results[0], results[1])


def _step(model, cache, ids):
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits


def test_crop_batch_select_and_repeat_follow_dynamic_semantics(tiny_model, torch_path):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (2, 9), generator=g)
    ours, oracle = FP8Cache(tiny_model.config), _oracle(tiny_model, "fp8", {})
    for cache in (ours, oracle):
        _step(tiny_model, cache, ids)
        _step(tiny_model, cache, ids[:, :3])
        cache.crop(-2)  # assisted decoding's rollback
    assert ours.get_seq_length() == oracle.get_seq_length() == 10
    ours.crop(8), oracle.crop(-2)  # legacy positive form: keep 8 (transformers <= 5.19)
    assert ours.get_seq_length() == 8
    assert ours.get_mask_sizes(3, 0) == oracle.get_mask_sizes(3, 0) == (11, 0)
    for cache in (ours, oracle):
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([3, 0, 1]))
    nxt = torch.randint(3, 256, (3, 2), generator=g)
    assert_equal(_step(tiny_model, ours, nxt), _step(tiny_model, oracle, nxt))


def test_assisted_decoding_equals_oracle(tiny_model, torch_path):
    draft = tiny_llama(seed=7)
    ids, mask = _prompts(batch=1)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
              assistant_model=draft)  # fmt: skip
    ours = tiny_model.generate(**kw, past_key_values=FP8Cache(tiny_model.config))
    oracle = tiny_model.generate(**kw, past_key_values=_oracle(tiny_model, "fp8", {}))
    assert_equal(ours, oracle)


def test_deepcopy_is_independent(tiny_model, torch_path):
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    cache = FP8Cache(tiny_model.config)
    _step(tiny_model, cache, ids)
    twin = copy.deepcopy(cache)
    a = _step(tiny_model, cache, ids[:, :1])
    b = _step(tiny_model, twin, ids[:, :1])
    _step(tiny_model, twin, ids[:, 1:4])  # only the copy grows
    assert_equal(a, b)
    assert cache.get_seq_length() == 8 and twin.get_seq_length() == 11


def test_reset_and_reuse_without_reallocation(tiny_model, torch_path):
    cache = FP8Cache(tiny_model.config, calculate_kv_scales=True)
    _generate(tiny_model, cache, do_sample=False)
    pointer = cache.layers[0]._key_bytes.data_ptr()
    first_scale = cache.layers[0].key_scale.clone()
    cache.reset()
    assert cache.get_seq_length() == 0
    ids = torch.randint(3, 256, (3, 11), generator=torch.Generator().manual_seed(9)) * 0 + 5  # a different prompt
    out_reused = tiny_model.generate(
        input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, past_key_values=cache
    )
    fresh = FP8Cache(tiny_model.config, calculate_kv_scales=True)
    out_fresh = tiny_model.generate(
        input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, past_key_values=fresh
    )
    assert_equal(out_reused, out_fresh)
    assert cache.layers[0]._key_bytes.data_ptr() == pointer  # same buffer, no reallocation
    assert_equal(cache.layers[0].key_scale, fresh.layers[0].key_scale)  # scales from the new prefill
    assert not torch.equal(cache.layers[0].key_scale, first_scale)


def test_onthefly_scales_follow_vllm_rule():
    cache = FP8Cache(calculate_kv_scales=True)
    key = torch.zeros(1, 2, 4, 8)
    key[0, 0, 1, 2], key[0, 1, 3, 0] = -10.0, 4.0
    cache.update(key, key * 2, 0)
    layer = cache.layers[0]
    assert layer.key_scale.tolist() == pytest.approx([10.0 / 200])  # vLLM: amax / 200 for K
    assert layer.value_scale.tolist() == pytest.approx([20.0 / 100])  # amax / 100 for V
    per_head = FP8Cache(calculate_kv_scales=True, strategy="attn_head")
    per_head.update(key, key * 2, 0)
    assert per_head.layers[0].key_scale.tolist() == pytest.approx([10.0 / 200, 4.0 / 200])
    cache.update(key * 100, key, 0)  # frozen after the first prefill
    assert layer.key_scale.tolist() == pytest.approx([10.0 / 200])
    zero = FP8Cache(calculate_kv_scales=True)
    zero.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    assert zero.layers[0].key_scale.tolist() == [1.0]


def test_update_returns_dequantized_history_in_shared_workspace():
    cache = FP8Cache(kv_cache_dtype="fp8", scales=KVScales([0.5, 0.5], [0.25, 0.25]))
    x = torch.randn(2, 3, 5, 16) * 30
    k0, _ = cache.update(x, x, 0)
    assert k0 is x  # exact prefill
    cache.update(x, x, 1)
    step = torch.randn(2, 3, 1, 16)
    k, v = cache.update(step, step, 0)
    expected = torch.cat([x, step], 2)
    assert_equal(k, fake_quant(expected, cache.format, torch.tensor([0.5])))
    assert_equal(v, fake_quant(expected, cache.format, torch.tensor([0.25])))
    k1, _ = cache.update(step, step, 1)
    assert k1.data_ptr() == k.data_ptr()  # one workspace for all layers
    assert cache.workspace_nbytes == 2 * 2 * 3 * 6 * 16 * 4  # one layer's K and V in fp32


def test_kv_bytes_half_of_dynamic_cache_and_amortized_growth(torch_path):
    model = tiny_llama(head_dim=64, heads=4, kv_heads=2)
    ids = torch.randint(3, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    ours, dynamic = FP8Cache(model.config), DynamicCache(config=model.config)
    for cache in (ours, dynamic):
        _step(model, cache, ids)
    pointers = {ours.layers[0]._key_bytes.data_ptr()}
    for _ in range(300):
        tok = torch.randint(3, 256, (2, 1))
        _step(model, ours, tok)
        _step(model, dynamic, tok)
        pointers.add(ours.layers[0]._key_bytes.data_ptr())
    dynamic_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in dynamic.layers)
    assert ours.get_seq_length() == 400
    # fp32 model: FP8 is a quarter of its bytes; half of what a bf16 cache of the same tokens would take
    assert ours.nbytes == dynamic_bytes // 4 + 2 * 4 * len(ours.layers)  # + one fp32 K and one V scale a layer
    assert ours.nbytes / (dynamic_bytes / 2) <= 0.501
    assert len(pointers) <= 3  # 100 -> 256 -> 512 tokens: two growths in 300 steps, no copy per step
    assert ours.allocated_nbytes <= 1.3 * ours.nbytes


def test_exact_recent_window_bytes():
    cache = FP8Cache(residual_length=16)
    x = torch.randn(2, 4, 100, 64, dtype=torch.bfloat16)
    cache.update(x, x, 0)
    fp8 = 2 * 2 * 4 * 100 * 64
    ring = 2 * 2 * 4 * 16 * 64 * 2  # K and V, 16 tokens, bf16
    assert cache.nbytes == fp8 + ring + 2 * 4
    assert FP8Cache(residual_length=0).nbytes == 0


@pytest.mark.parametrize("bad", [-1, 2.0, True, "16"])
def test_bad_residual_length_is_an_error(bad):
    with pytest.raises(ValueError, match=f"residual_length must be an int >= 0, got {bad!r}$"):
        FP8Cache(residual_length=bad)


def test_errors_name_the_bad_value(tiny_model):
    with pytest.raises(ValueError, match="'fp4'"):
        FP8Cache(kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="'per_token'"):
        FP8Cache(strategy="per_token")
    with pytest.raises(ValueError, match="not both"):
        FP8Cache(scales=KVScales([1.0], [1.0]), calculate_kv_scales=True)
    with pytest.raises(ValueError, match="for 1 layers but the model has 2"):
        FP8Cache(tiny_model.config, scales=KVScales([1.0], [1.0]))
    with pytest.raises(ValueError, match="for 3 KV heads but the model has 2"):
        FP8Cache(tiny_model.config, scales=KVScales([[1.0] * 3] * 2, [[1.0] * 3] * 2, "attn_head"))
    with pytest.raises(TypeError, match="KVScales"):
        FP8Cache(scales={"k": 1.0})
    lazy = FP8Cache(scales=KVScales([[1.0] * 3], [[1.0] * 3], "attn_head"))
    with pytest.raises(ValueError, match="3 KV heads but key_states has 2"):
        lazy.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="scales cover 1 layers but the model updates layer 1"):
        lazy.update(torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8), 1)


def test_dtype_and_shape_changes_between_updates_are_errors():
    cache = QuantizedFP8Cache()
    cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="torch.float16 on cpu but this cache holds torch.float32"):
        cache.update(torch.randn(1, 2, 1, 8).half(), torch.randn(1, 2, 1, 8).half(), 0)
    with pytest.raises(ValueError, match="does not continue a cache of batch 1"):
        cache.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), 0)
    with pytest.raises(ValueError, match=r"\(1, 2, 1, 8\) and value_states \(1, 2, 2, 8\) must have the same"):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 2, 8), 0)
    with pytest.raises(TypeError, match="torch.int64"):
        QuantizedFP8Cache().update(
            torch.ones(1, 1, 1, 4, dtype=torch.long), torch.ones(1, 1, 1, 4, dtype=torch.long), 0
        )
    cache.reset()
    cache.update(torch.randn(1, 2, 1, 8).half(), torch.randn(1, 2, 1, 8).half(), 0)  # after reset a new dtype is fine
    assert cache.layers[0].dtype == torch.float16


def test_layer_types_without_an_fp8_layer_are_refused_naming_them():
    """Sliding layers are built (test_sliding.py), linear-attention ones too (test_hybrid.py); indexed sparse
    attention (DeepSeek V3.2) is not."""
    assert FP8Cache(MistralConfig(num_hidden_layers=2, sliding_window=64)).layers[0].is_sliding
    config = LlamaConfig(num_hidden_layers=2)
    config.layer_types = ["full_attention", "indexed_attention"]
    refusal = r"LlamaConfig has \['indexed_attention'\] layers; this FP8 cache supports full_attention, sliding_att"
    with pytest.raises(NotImplementedError, match=refusal):
        FP8Cache(config)


def _roundtrip(x):
    """What a fresh FP8 cache hands back for x (unit scales)."""
    cache = FP8Cache()
    cache.update(x, x, 0)
    return cache.layers[0].dequantized()[0].clone()


@pytest.mark.parametrize(
    "indices", [(0, 2), [0, 2], torch.tensor([0, 2]), torch.tensor([True, False, True, False])],
    ids=["tuple", "list", "tensor", "bool-mask"],
)  # fmt: skip
def test_batch_select_indices_takes_every_index_form_of_dynamic_cache(indices, torch_path):
    """A tuple used to index (batch 0, head 2): with 4 KV heads a silently garbled cache of 4 rows."""
    x = torch.randn(4, 4, 5, 16)
    ours, dynamic = FP8Cache(), DynamicCache()
    for cache in (ours, dynamic):
        cache.update(x, x, 0)
        cache.batch_select_indices(indices)
    assert ours.layers[0].keys.shape == dynamic.layers[0].keys.shape == (2, 4, 5, 16)
    assert_equal(dynamic.layers[0].keys, x[[0, 2]])
    assert_equal(ours.layers[0].dequantized()[0], _roundtrip(x[[0, 2]]))


def _generate_positions(mask):
    """The position ids generate gives a left-padded prompt (pads at 1, real tokens from 0)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_onthefly_scales_leave_padding_out(tiny_model, cache_class, strategy, torch_path):
    """With our attention the first prefill's scales come from the unpadded positions only: equal to the rule over
    the same prompts' valid K, where padded positions with huge K (1000x) used to set them."""
    from hf_fp8cache import FP8StaticCache
    from hf_fp8cache.contract import ATTENTION_NAME
    from hf_fp8cache.scales import ONTHEFLY_HEADROOM

    model = copy.deepcopy(tiny_model)
    ids, mask = _prompts()
    pads = (mask == 0)[:, :, None]

    def huge_padded_keys(module, args, out):  # the pad embedding is zero (padding_idx): give its K a value itself
        return out + 1000.0 * pads if out.shape[1] == ids.shape[1] else out

    model.model.layers[0].self_attn.k_proj.register_forward_hook(huge_padded_keys)
    probe = DynamicCache()  # the exact K of the prompt, as generate computes it
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=_generate_positions(mask), use_cache=True,
              **{cache_keyword(model): probe})  # fmt: skip
    keys = probe.layers[0].keys
    dims = (0, 2, 3) if strategy == "attn_head" else (0, 1, 2, 3)
    rule = lambda k: (k.abs().amax(dim=dims).reshape(-1) * (ONTHEFLY_HEADROOM["key"] / 448.0)).float()
    expected = rule(keys.masked_fill(~mask.bool()[:, None, :, None], 0))
    assert (rule(keys) / expected).min() > 10  # the pads would set the scale

    model.set_attn_implementation(ATTENTION_NAME)
    kwargs = {"calculate_kv_scales": True, "strategy": strategy}
    cache = (FP8Cache(model.config, **kwargs) if cache_class == "dynamic"
             else FP8StaticCache(model.config, max_cache_len=24, **kwargs))  # fmt: skip
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                   **{cache_keyword(model): cache})  # fmt: skip
    assert_equal(cache.layers[0].key_scale, expected)


def test_onthefly_scales_on_the_dequantize_path_warn_that_padding_counts(tiny_model, torch_path):
    ids, mask = _prompts()
    cache = FP8Cache(tiny_model.config, calculate_kv_scales=True)
    with pytest.warns(UserWarning, match="cannot see the padding mask"):
        tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, pad_token_id=0,
                            **{cache_keyword(tiny_model): cache})  # fmt: skip


def test_one_outlier_setting_the_onthefly_scale_is_reported(torch_path):
    """vLLM's rule lets one huge value decide a whole tensor's scale; the user hears of it (per head: of the head
    that holds it)."""
    import warnings

    key = torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary data: no warning
        FP8Cache(calculate_kv_scales=True).update(key, key, 0)
        FP8Cache(calculate_kv_scales=True, strategy="attn_head").update(key, key, 0)
    spiked = key.clone()
    spiked[0, 1, 3, 5] = 1e6
    with pytest.warns(UserWarning, match=r"layer 0 keys: 100% of the first prefill's values fall below e4m3fn"):
        FP8Cache(calculate_kv_scales=True).update(spiked, key, 0)
    with pytest.warns(UserWarning, match=r"layer 0 keys: 100% of head 1 of the first prefill's values"):
        FP8Cache(calculate_kv_scales=True, strategy="attn_head").update(spiked, key, 0)
