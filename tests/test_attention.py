"""attn_implementation="hf_fp8cache": attention straight from the FP8 cache, equal to SDPA over the same cache."""

import pytest
import torch
from helpers import assert_equal, left_padded_prompts, record_keyword, tiny_llama
from transformers import AutoModelForCausalLM

from hf_fp8cache import FP8Cache, attach, detach
from hf_fp8cache.attention import ATTENTION_NAME, fp8_attention_forward
from hf_fp8cache.contract import layer_of
from hf_fp8cache.integration import cache_keyword

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning")


def _generate(model, implementation, cache_kwargs=None, **kwargs):
    ids, mask = left_padded_prompts()
    model.set_attn_implementation(implementation)
    cache = FP8Cache(model.config, **(cache_kwargs or {}))
    try:
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0,
                              **{cache_keyword(model): cache}, **kwargs)  # fmt: skip
    finally:
        model.set_attn_implementation("sdpa")


GREEDY, BEAM = dict(do_sample=False), dict(do_sample=False, num_beams=3)
E5M2_HEAD = {"kv_cache_dtype": "fp8_e5m2", "calculate_kv_scales": True, "strategy": "attn_head"}
WINDOW = {"calculate_kv_scales": True, "residual_length": 5}  # the window slides over the last decode steps


@pytest.mark.parametrize(
    "kwargs, cache_kwargs",
    [(GREEDY, {}), (BEAM, {}), (GREEDY, E5M2_HEAD), (BEAM, E5M2_HEAD), (GREEDY, WINDOW)],
    ids=["greedy-e4m3", "beam-e4m3", "greedy-e5m2-head", "beam-e5m2-head", "greedy-e4m3-window"],
)
def test_fused_generate_equals_sdpa_over_the_same_cache(kwargs, cache_kwargs):
    """Through the Triton kernel (interpreted): left-padded batch, GQA, greedy and beam search."""
    model = tiny_llama(seed=1)
    fused = _generate(model, ATTENTION_NAME, cache_kwargs, **kwargs)
    assert_equal(fused, _generate(model, "sdpa", cache_kwargs, **kwargs))


def test_update_hands_fp8_to_our_attention_and_workspace_to_others(tiny_model):
    cache = FP8Cache(tiny_model.config)
    x = torch.randn(1, 2, 4, 16)
    cache.update(x, x, 0)
    k, _ = cache.update(x[:, :, :1], x[:, :, :1], 0)
    assert k.dtype == torch.float32  # sdpa model: dequantized
    tiny_model.set_attn_implementation(ATTENTION_NAME)  # the cache follows the model's config live
    try:
        k, v = cache.update(x[:, :, :1], x[:, :, :1], 0)
        layer = cache.layers[0]
        assert k.dtype == torch.float8_e4m3fn and layer_of(k) is layer and layer.length == 6
        # the whole buffer as fp8: the attention reads attention_inputs, not the shape
        assert k.shape == (1, 2, layer.capacity, 16) and k.data_ptr() == layer.key_bytes.data_ptr()
    finally:
        tiny_model.set_attn_implementation("sdpa")
    no_config = FP8Cache()
    no_config.update(x, x, 0)
    assert no_config.update(x[:, :, :1], x[:, :, :1], 0)[0].dtype == torch.float32  # no config: always dequantize


def test_chunked_prefill_reads_the_cache_and_no_cache_runs_sdpa(torch_path):
    model = tiny_llama(seed=2)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    logits = {}
    for implementation in ("sdpa", ATTENTION_NAME):
        model.set_attn_implementation(implementation)
        cache = FP8Cache(model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :10], past_key_values=cache, use_cache=True)
            chunk = model(input_ids=ids[:, 10:30], past_key_values=cache, use_cache=True).logits  # 20 queries: kernel
            step = model(input_ids=ids[:, 30:33], past_key_values=cache, use_cache=True).logits  # decode kernel
            plain = model(input_ids=ids).logits  # no cache at all
        logits[implementation] = (chunk, step, plain)
    model.set_attn_implementation("sdpa")
    sdpa, ours = logits["sdpa"], logits[ATTENTION_NAME]
    assert_equal(ours[2], sdpa[2], "logits without a cache")  # same SDPA route
    # kernel twin vs SDPA over the dequantized cache, fp32: measured 1.8e-7 (chunk), 1.2e-7 (step)
    torch.testing.assert_close(ours[0], sdpa[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], sdpa[1], rtol=0, atol=1e-6)


def test_attach_can_switch_the_attention(tiny_model):
    attach(tiny_model, attention=True)
    try:
        assert tiny_model.config._attn_implementation == ATTENTION_NAME
    finally:
        detach(tiny_model)
        tiny_model.set_attn_implementation("sdpa")


@pytest.mark.slow
def test_smollm2_fused_equals_dequantize_path(smollm2, torch_path):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    batch = tokenizer(["The theory of relativity", "In 1492, Columbus"], return_tensors="pt", padding=True)
    kw = dict(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    keyword = cache_keyword(model)
    reference = model.generate(**kw, **{keyword: FP8Cache(model.config)})
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        fused = model.generate(**kw, **{keyword: FP8Cache(model.config)})
    finally:
        model.set_attn_implementation("sdpa")
    assert_equal(fused, reference)


def test_a_softcap_outside_the_kernel_is_never_dropped():
    """Without fp8 views (no FP8 cache, a first prefill) a softcap goes to the family's own eager attention (SDPA
    refuses softcaps); a module without one is refused clearly, not computed without it."""
    q = k = v = torch.randn(1, 2, 3, 16)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match=r"Module passes a logit softcap, which only its own eager attention"):
        fp8_attention_forward(module, q, k, v, None, softcap=30.0)


@pytest.mark.parametrize("implementation", ["sdpa", ATTENTION_NAME])
def test_a_dropped_cache_is_freed_at_once_not_by_the_garbage_collector(implementation):
    """No reference cycle ties a cache's layers to the tensors they hand attention: a fresh FP8Cache per generate
    call (the usual use) frees its buffers as soon as the caller drops it, not at Python's next full collection (a
    cycle once kept every dropped cache's bytes, raising generate's peak memory above DynamicCache's)."""
    import gc
    import weakref

    model = tiny_llama(seed=4)
    model.set_attn_implementation(implementation)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    cache = FP8Cache(model.config)
    model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0, **{cache_keyword(model): cache})
    layer = weakref.ref(cache.layers[0])
    gc.disable()
    try:
        del cache
        assert layer() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("queries, keys, padded", [(6, 6, False), (6, 6, True), (3, 9, False)])
def test_calls_with_sinks_outside_the_kernel_equal_gpt_oss_eager_attention(queries, keys, padded):
    """A prompt or a long chunk with learned sinks (GPT-OSS) runs SDPA with each sink as one more key: the same as the
    family's eager attention (which builds L x L scores), with causality bottom-right, with and without padding."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    config = GptOssConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                          vocab_size=256, layer_types=["full_attention"])  # fmt: skip
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(config, attn_implementation="eager").model.layers[0].self_attn.eval()
    with torch.no_grad():
        module.sinks.copy_(torch.randn(4) * 3)
    q, k, v = torch.randn(2, 4, queries, 16), torch.randn(2, 2, keys, 16), torch.randn(2, 2, keys, 16)
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    attended = torch.ones(2, keys, dtype=torch.bool)
    attended[1, :2] = not padded
    mask = (causal & attended[:, None])[:, None]
    expected, _ = eager_attention_forward(module, q, k, v, torch.where(mask, 0.0, -1e30), scaling=0.25)
    ours, _ = fp8_attention_forward(module, q, k, v, mask if padded else None, scaling=0.25, s_aux=module.sinks)
    assert (ours - expected).abs().max() < 2e-6  # measured 2.4e-7 (fp32)


def _second_turn_with_inner_padding(model, cache, implementation):
    """Two rows (row 1 left-padded), then a second turn whose new tokens are left-padded in row 1 -- after its
    history, so row 1's mask skips positions inside it -- through ``implementation``: the second call's output."""
    model.set_attn_implementation(implementation)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4] = mask[1, :4] = 0
    options = dict(do_sample=False, pad_token_id=0, **{cache_keyword(model): cache})
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, **options)
    new = torch.randint(3, 200, (2, 6), generator=g)
    new_mask = torch.ones_like(new)
    new[1, :3] = new_mask[1, :3] = 0
    ids, mask = torch.cat([first, new], 1), torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype), new_mask], 1)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, output_logits=True,
                          return_dict_in_generate=True, **options)  # fmt: skip


def test_padding_inside_a_row_runs_the_models_attention_and_equals_the_oracle(torch_path):
    """The decode kernel reads a row's padding as one start position; a mask with padding inside a row (a batch's
    next turn left-padded after its history) goes to the model's attention over the dequantized K/V instead. Before,
    the kernel attended over that padding: row 1's logits moved by 0.72 (measured), the tokens changed."""
    from oracle import fake_fp8_cache

    model = tiny_llama(seed=3)
    ours = _second_turn_with_inner_padding(model, FP8Cache(model.config), ATTENTION_NAME)
    oracle = _second_turn_with_inner_padding(model, fake_fp8_cache(model.config), "sdpa")
    assert_equal(ours.sequences, oracle.sequences)
    # measured max |difference| 0: the same fp8 values through the same SDPA
    assert (torch.stack(ours.logits) - torch.stack(oracle.logits)).abs().max() <= 1e-6


def test_only_masks_of_several_queries_are_read_for_inner_padding(torch_path, monkeypatch):
    """The inner-padding check syncs with the device, so it reads only the masks that can bring padding into a row,
    and one more when nothing was read yet: here the first decode step (the first prefill attends over its exact K/V,
    not through the kernel) and the next turn's 7 new tokens (6 + the last generated one, which the cache had not
    seen); the other 11 decode steps reuse the answer."""
    from oracle import fake_fp8_cache

    import hf_fp8cache.cache_base as cache_base

    model = tiny_llama(seed=3)
    read = []
    original = cache_base.rows_with_inner_padding

    def counting(mask):
        read.append(tuple(mask.shape))
        return original(mask)

    monkeypatch.setattr(cache_base, "rows_with_inner_padding", counting)
    ours = _second_turn_with_inner_padding(model, FP8Cache(model.config), ATTENTION_NAME)
    assert [shape[2] for shape in read] == [1, 7]  # the query lengths of the masks read
    oracle = _second_turn_with_inner_padding(model, fake_fp8_cache(model.config), "sdpa")
    assert_equal(ours.sequences, oracle.sequences)  # the second turn's decode steps still took the fallback


def test_the_static_cache_refuses_padding_inside_a_row_by_name(torch_path):
    """FP8StaticCache cannot fall back inside a compiled step: the eager prefill that brings such a mask raises."""
    from hf_fp8cache import FP8StaticCache

    model = tiny_llama(seed=3)
    with pytest.raises(ValueError, match=r"rows \[1\] of the attention mask have padding inside them"):
        _second_turn_with_inner_padding(model, FP8StaticCache(model.config, 64), ATTENTION_NAME)


def test_fp8_queries_reach_the_kernel_in_generate_and_move_the_logits_a_little(monkeypatch):
    """quantize_query=True with exact_prefill=False: every call of our kernel, the first prefill's included, runs on
    FP8 queries, and the logits move off those of the same cache's model-dtype queries by the roundings, boundedly
    (tiny Llama, fp32, interpreted kernel: largest difference measured 0.0097)."""
    import hf_fp8cache.attention as fp8_attention

    flags = record_keyword(monkeypatch, fp8_attention, "decode_attention", "quantize_query")
    model = tiny_llama(seed=1)
    runs = {}
    for quantize_query in (False, True):
        flags.clear()
        cache = {"quantize_query": quantize_query, "exact_prefill": False}
        runs[quantize_query] = _generate(model, ATTENTION_NAME, cache, do_sample=False, output_scores=True,
                                         return_dict_in_generate=True)  # fmt: skip
        assert flags == [quantize_query] * model.config.num_hidden_layers * 8  # 1 prefill + 7 decode steps a layer
    difference = max((a - b).abs().max().item() for a, b in zip(runs[False].scores, runs[True].scores))
    assert 1e-4 < difference < 0.1


@pytest.mark.parametrize(
    "cache_kwargs, message",
    [({"kv_cache_dtype": "fp8_e5m2"}, "got kv_cache_dtype e5m2"), ({"residual_length": 4}, "residual_length 4")],
)
def test_fp8_queries_refuse_caches_they_cannot_read(cache_kwargs, message):
    with pytest.raises(ValueError, match=message):
        FP8Cache(quantize_query=True, **cache_kwargs)
