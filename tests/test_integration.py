"""attach(): every generate / pipeline call without its own cache gets a fresh FP8 cache."""

import pytest
import torch
from helpers import assert_equal, fake_quant_cache
from transformers import pipeline

from hf_fp8cache import FP8Cache, FP8StaticCache, attach, detach
from hf_fp8cache.integration import MIN_STATIC_LENGTH, cache_keyword, static_cache_length

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_attach_injects_a_fresh_fp8_cache_per_call(torch_path):
    from helpers import tiny_llama

    model = tiny_llama(seed=3)
    seen = []
    original_forward, keyword = model.forward, cache_keyword(model)

    def spy(*args, **kwargs):
        seen.append(kwargs.get(keyword))
        return original_forward(*args, **kwargs)

    model.forward = spy
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    attach(model, kv_cache_dtype="fp8_e5m2")
    first = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    first_calls = list(seen)
    seen.clear()
    model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert all(c is first_calls[0] for c in first_calls) and all(c is seen[0] for c in seen)  # one per call
    assert seen[0] is not first_calls[0]  # and a fresh one for each call
    assert isinstance(seen[0], FP8Cache) and seen[0].format.name == "e5m2"
    oracle = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                            **{keyword: fake_quant_cache(model.config, "fp8_e5m2")})  # fmt: skip
    assert_equal(first, oracle)
    own = FP8Cache(model.config)
    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0, past_key_values=own)
    assert own.get_seq_length() == 7  # an explicit cache is used as given
    detach(model)
    seen.clear()
    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert not isinstance(seen[0], FP8Cache)


def test_attach_validates_arguments_up_front(tiny_model):
    with pytest.raises(ValueError, match="'fp7'"):
        attach(tiny_model, kv_cache_dtype="fp7")


@pytest.mark.parametrize(
    ("tokens", "length"),
    # below 256 the minimum; else the next multiple of (the power of two at or above) / 8
    [(1, 256), (256, 256), (257, 320), (320, 320), (321, 384), (513, 640), (4161, 5120), (8192, 8192), (8193, 10240)],
)
def test_static_cache_length_rounds_up_to_four_buckets_per_doubling(tokens, length):
    assert static_cache_length(tokens) == length
    assert length < 1.25 * max(tokens, 256)  # at most a quarter spare


def test_attach_static_sizes_a_static_cache_per_call_and_keeps_it_for_the_next(torch_path):
    from helpers import tiny_llama

    model = tiny_llama(seed=5)
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    keyword = cache_keyword(model)
    attach(model, static=True, kv_cache_dtype="fp8_e5m2")
    try:
        first = model.generate(input_ids=ids, max_new_tokens=5, **kw)
        cache = getattr(first, keyword)
        assert isinstance(cache, FP8StaticCache) and cache.max_cache_len == MIN_STATIC_LENGTH == 256
        assert cache.format.name == "e5m2"  # the options reach the cache
        second = model.generate(input_ids=ids, max_new_tokens=5, **kw)
        assert getattr(second, keyword) is cache  # the same batch and size bucket: reset and reused
        assert_equal(second.sequences, first.sequences)
        # 6 prompt tokens + 300 new: the next bucket (multiples of 512 / 8 = 64), a new cache replacing the kept one
        longer = model.generate(input_ids=ids, max_new_tokens=300, min_new_tokens=300, **kw)
        assert getattr(longer, keyword).max_cache_len == 320 and getattr(longer, keyword) is not cache
        beams = model.generate(input_ids=ids, max_new_tokens=5, num_beams=2, **kw)  # 4 rows: another cache
        assert getattr(beams, keyword) is not getattr(longer, keyword)
        with pytest.raises(ValueError, match="needs max_new_tokens >= 1 or max_length above the prompt's 6 tokens"):
            model.generate(input_ids=ids, max_length=6, **kw)
    finally:
        detach(model)
    # the oracle: an FP8StaticCache of the size attach picks for 6 + 5 tokens (the 256-token minimum), given by hand
    by_hand = FP8StaticCache(model.config, 256, kv_cache_dtype="fp8_e5m2")
    assert_equal(first.sequences, model.generate(input_ids=ids, max_new_tokens=5, **kw, **{keyword: by_hand}).sequences)


def test_attach_static_refuses_a_non_bool_and_bad_cache_options(tiny_model):
    with pytest.raises(ValueError, match="static must be True or False, got 'yes'"):
        attach(tiny_model, static="yes")
    with pytest.raises(ValueError, match="max_batch_size must be None or an int >= 1, got 0"):
        attach(tiny_model, static=True, max_batch_size=0)


@pytest.mark.slow
def test_pipeline_over_prompts_equals_separate_generate_calls(smollm2, torch_path):
    model, tokenizer = smollm2
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["The capital of France is", "Memory bandwidth limits", "A haiku about caches:"]
    kw = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    separate = [pipe(p, past_key_values=FP8Cache(model.config), **kw)[0]["generated_text"] for p in prompts]
    attach(model, calculate_kv_scales=True)
    try:
        together = [r[0]["generated_text"] for r in pipe(prompts, **kw)]
    finally:
        detach(model)
    attach(model)
    try:
        together_unit = [r[0]["generated_text"] for r in pipe(prompts, **kw)]
    finally:
        detach(model)
    assert together_unit == separate
    assert len(set(together)) == 3 and all(len(t) > 0 for t in together)
    # without attach, one cache object shared by the prompts of a call breaks the second prompt: generate takes its
    # ids from the first prompt's cached length on, so no token is left to reach attention
    with pytest.raises(RuntimeError, match=r"cannot reshape tensor of 0 elements into shape \[1, 0, -1, 64\]"):
        pipe(prompts, past_key_values=FP8Cache(model.config), **kw)
