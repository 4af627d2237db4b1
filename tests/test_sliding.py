"""Sliding-window and chunked layers in FP8Cache: built from the config as transformers builds its own caches, the
same tokens as an independent fake-quantized oracle (transformers' own sliding layers storing fp8-cast K/V), and
memory bounded by the window."""

import pytest
import torch
from helpers import left_padded_prompts
from oracle import fake_fp8_cache
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
)
from transformers.cache_utils import DynamicSlidingWindowLayer

from hf_fp8cache import FP8Cache
from hf_fp8cache import attention as fp8_attention
from hf_fp8cache.cache_layer import FP8CacheLayer
from hf_fp8cache.contract import ATTENTION_NAME
from hf_fp8cache.integration import cache_keyword
from hf_fp8cache.sliding import FP8SlidingWindowLayer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WINDOW = 6  # tokens; prompts of 11 and 12 new tokens decode past it twice
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
FAMILIES = {
    # name: (config, attention implementations the family runs with)
    "mistral": (lambda: MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **SIZES), ("sdpa", ATTENTION_NAME)),
    "gemma3": (
        lambda: Gemma3TextConfig(num_hidden_layers=4, sliding_window=WINDOW, sliding_window_pattern=2, **SIZES),
        ("sdpa", ATTENTION_NAME),
    ),  # fmt: skip
    # logit softcapping small enough to change the tiny model's logits; scaling from query_pre_attn_scalar (256)
    "gemma2": (
        lambda: Gemma2Config(num_hidden_layers=2, sliding_window=WINDOW, attn_logit_softcapping=0.5, **SIZES),
        ("eager", ATTENTION_NAME),
    ),
    "gpt-oss": (
        lambda: GptOssConfig(
            num_hidden_layers=2, sliding_window=WINDOW, num_local_experts=2, num_experts_per_tok=1, **SIZES
        ),
        ("eager", ATTENTION_NAME),
    ),  # learned sinks  # fmt: skip
}
CASES = [(family, attention) for family, (_, attentions) in FAMILIES.items() for attention in attentions]


def _model(family: str, attention: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family][0](), attn_implementation=attention).eval()


def _prompts(batch=3, length=11):
    """Left-padded prompts, row r padded by 2r tokens."""
    return left_padded_prompts(batch, length, pads=lambda row: 2 * row, seed=1)


def _generate(model, cache, **kwargs):
    ids, mask = _prompts()
    kwargs = {"max_new_tokens": 12, **kwargs}
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                          **{cache_keyword(model): cache}, **kwargs)  # fmt: skip


@pytest.mark.parametrize("family, attention", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_generate_past_the_window_equals_the_oracle(family, attention, torch_path):
    model = _model(family, attention)
    cache = FP8Cache(model.config)
    ours = _generate(model, cache)
    assert torch.equal(ours, _generate(model, fake_fp8_cache(model.config)))
    logits = [_generate(model, c, output_logits=True, return_dict_in_generate=True).logits[-1]
              for c in (FP8Cache(model.config), DynamicCache(config=model.config))]  # fmt: skip
    assert not torch.equal(*logits)  # FP8 bytes were read (the tiny model's tokens survive them)
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    assert sliding and all(isinstance(layer, FP8SlidingWindowLayer) for layer in sliding)
    assert all(layer.sliding_window == WINDOW for layer in sliding)


@pytest.mark.parametrize("attention", ["sdpa", ATTENTION_NAME])
def test_generate_past_the_buffer_capacity_equals_the_oracle(attention, torch_path):
    # 11 + 260 tokens: the sliding layer's buffers (256 tokens) fill up and the window moves to their front mid-run
    model = _model("mistral", attention)
    cache = FP8Cache(model.config)
    ours = _generate(model, cache, max_new_tokens=260, min_new_tokens=260)
    assert torch.equal(ours, _generate(model, fake_fp8_cache(model.config), max_new_tokens=260, min_new_tokens=260))
    sliding = next(layer for layer in cache.layers if layer.is_sliding)
    assert sliding.capacity == 256 and sliding.get_seq_length() == 11 + 260 - 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp8_attention_reads_the_fp8_window_with_the_kernel(family, torch_path, monkeypatch):
    """With attn_implementation="hf_fp8cache" every decode step of every layer runs the decode kernel on the fp8
    bytes (with the sliding layers' window, GPT-OSS's sinks, Gemma 2's softcap and Gemma's scaling): nothing is
    dequantized, and the launch writes the step's token (sliding layers included)."""
    model = _model(family, ATTENTION_NAME)
    calls, carries_token = [], []

    def no_dequantize(self):
        raise AssertionError(f"layer {self.layer_idx} dequantized")

    def decode(query, inputs, scale, sinks, softcap):
        calls.append((inputs.sliding_window, sinks is not None, softcap, scale))
        carries_token.append(inputs.new_tokens is not None and inputs.new_tokens.claimable)
        return kernel(query, inputs, scale, sinks, softcap)

    kernel = fp8_attention._kernel_attention
    monkeypatch.setattr(FP8CacheLayer, "dequantized", no_dequantize)
    monkeypatch.setattr(FP8SlidingWindowLayer, "dequantized", no_dequantize)
    monkeypatch.setattr(fp8_attention, "_kernel_attention", decode)
    _generate(model, FP8Cache(model.config))
    layers = model.config.num_hidden_layers
    assert len(calls) == 11 * layers  # 12 new tokens: 11 decode steps after the prefill
    assert all(carries_token)  # no quantize launch of its own: the attention kernel writes each step's token
    windows = {window for window, *_ in calls}
    assert WINDOW in windows and (windows == {WINDOW}) == (family == "mistral")  # the others also have full layers
    assert all(has_sinks == (family == "gpt-oss") for _, has_sinks, _, _ in calls)
    assert all(softcap == (0.5 if family == "gemma2" else None) for _, _, softcap, _ in calls)
    expected_scale = 256**-0.5 if family.startswith("gemma") else 16**-0.5  # query_pre_attn_scalar for Gemma
    assert all(scale == pytest.approx(expected_scale) for *_, scale in calls)


@pytest.mark.parametrize("family", ["mistral", "gpt-oss"])
def test_speculative_and_long_chunks_past_the_window_equal_the_oracle(family, torch_path, monkeypatch):
    """Teacher-forced chunks after a padded prompt: several queries a row and a 20-token chunk past the window, all
    read from the fp8 bytes by the kernel with each query row's window (nothing dequantized), against the oracle's
    logits."""
    model = _model(family, ATTENTION_NAME)

    def no_dequantize(self):
        raise AssertionError(f"layer {self.layer_idx} dequantized")

    monkeypatch.setattr(FP8CacheLayer, "dequantized", no_dequantize)
    monkeypatch.setattr(FP8SlidingWindowLayer, "dequantized", no_dequantize)
    ids, mask = _prompts()
    chunks = torch.randint(3, 256, (3, 3 + 1 + 20 + 2), generator=torch.Generator().manual_seed(5))
    logits = []
    for cache in (FP8Cache(model.config), fake_fp8_cache(model.config)):
        seen, outputs = mask, []
        with torch.no_grad():
            model(input_ids=ids, attention_mask=seen, **{cache_keyword(model): cache})
            for lo, hi in ((0, 3), (3, 4), (4, 24), (24, 26)):
                seen = torch.cat([seen, torch.ones(3, hi - lo, dtype=mask.dtype)], 1)
                out = model(input_ids=chunks[:, lo:hi], attention_mask=seen, **{cache_keyword(model): cache})
                outputs.append(out.logits)
        logits.append(torch.cat(outputs, 1))
    # fp32 logits of magnitude ~0.7; measured max |difference| (torch twin vs SDPA / eager): mistral 1.8e-7, gpt-oss 0
    assert (logits[0] - logits[1]).abs().max().item() < 1e-5


def test_layers_follow_the_config_as_in_transformers(torch_path):
    config = FAMILIES["gemma3"][0]()
    ours = [type(layer).__name__ for layer in FP8Cache(config).layers]
    theirs = [isinstance(layer, DynamicSlidingWindowLayer) for layer in DynamicCache(config=config).layers]
    assert ours == ["FP8SlidingWindowLayer" if sliding else "FP8CacheLayer" for sliding in theirs]
    assert theirs == [True, False, True, False]
    chunked = LlamaConfig(num_hidden_layers=2, **SIZES)
    chunked.attention_chunk_size = 5
    assert [layer.sliding_window for layer in FP8Cache(chunked).layers] == [5, 5]  # chunked: the chunk is the window


def test_beam_search_and_a_continued_generate(torch_path):
    model = _model("mistral", "sdpa")
    ours = _generate(model, FP8Cache(model.config), num_beams=2)
    assert torch.equal(ours, _generate(model, fake_fp8_cache(model.config), num_beams=2))
    ids, mask = _prompts()
    cache, oracle = FP8Cache(model.config), fake_fp8_cache(model.config)
    outputs = []
    for c in (cache, oracle):
        first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                               **{cache_keyword(model): c})  # fmt: skip
        longer = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)
        outputs.append(model.generate(input_ids=first, attention_mask=longer, max_new_tokens=8, do_sample=False,
                                      pad_token_id=0, **{cache_keyword(model): c}))  # fmt: skip
    assert torch.equal(*outputs)


def test_memory_is_bounded_by_the_window(torch_path):
    config = FAMILIES["gemma3"][0]()
    cache = FP8Cache(config)
    x = torch.randn(2, 2, 40, 16)
    for layer in range(4):
        cache.update(x, x, layer)
    moves = []
    sliding, full = cache.layers[0], cache.layers[1]
    original_keep_last = sliding._keep_last
    sliding._keep_last = lambda tokens: (moves.append(sliding.length), original_keep_last(tokens))
    for _ in range(300):
        for layer in range(4):
            cache.update(x[:, :, :1], x[:, :, :1], layer)
    assert sliding.get_seq_length() == full.get_seq_length() == 340 and full.length == 340
    # the first prefill stored the window's W - 1 tokens; decode steps append until the capacity (one growth step of
    # 256 tokens) is full, then the window's tokens move to the front: one move in ~250 steps, not one a step
    assert sliding.capacity == 256 and moves == [256]
    # the move came at the step after 256 - (W - 1) appends and kept W - 1; every step since appended one
    assert sliding.length == (WINDOW - 1) + 300 - (256 - (WINDOW - 1)) and sliding.length <= sliding.capacity
    # FP8 K+V of the tokens it needs (W - 1 kept and the last one added) + 2 scales; the older ones are spare room
    assert sliding.nbytes == 2 * 2 * 2 * WINDOW * 16 + 8 and sliding.allocated_nbytes == 2 * 2 * 2 * 256 * 16 + 8


def test_a_long_exact_prefill_keeps_only_the_window_in_memory(torch_path):
    # transformers' DynamicSlidingWindowLayer keeps a view of the whole prompt's K/V until the next update (its slice
    # of torch.cat's result), which is why a bf16 DynamicCache cannot prefill Gemma-3-12B at 8x32768 on 139 GiB
    # (docs/benchmarks.md); our layer's storage holds the window from the first prefill on
    cache, reference = FP8Cache(FAMILIES["gemma3"][0]()), DynamicCache(config=FAMILIES["gemma3"][0]())
    x = torch.randn(1, 2, 1000, 16)
    for layer in range(4):
        cache.update(x, x, layer)
        reference.update(x, x, layer)
    theirs = reference.layers[0]
    assert theirs.keys.shape[-2] == WINDOW - 1 and theirs.keys.untyped_storage().nbytes() == x.nbytes
    ours = cache.layers[0]
    stored = sum(t.untyped_storage().nbytes() for t in (ours._key_bytes, ours._value_bytes))
    # one growth step of 256 tokens (B=1, H=2, D=16, K and V), not the prompt's 1000
    assert ours.length == WINDOW - 1 and ours.capacity == 256 and stored == 2 * 2 * 256 * 16


def test_a_whole_long_prompt_is_trimmed_to_the_window_at_the_next_update(torch_path):
    cache = FP8Cache(FAMILIES["gemma3"][0](), exact_prefill=False)  # the prompt attends over FP8: stored whole
    x = torch.randn(1, 2, 400, 16)
    for layer in range(4):
        cache.update(x, x, layer)
    assert cache.layers[0].length == 400
    for layer in range(4):
        cache.update(x[:, :, :1], x[:, :, :1], layer)
    assert cache.layers[0].length == WINDOW and cache.layers[1].length == 401  # not held until the buffer is full


def test_mask_sizes_lengths_and_returned_shapes_match_transformers(torch_path):
    ours, theirs = FP8SlidingWindowLayer(WINDOW, **_layer_settings()), DynamicSlidingWindowLayer(WINDOW)
    g = torch.Generator().manual_seed(3)
    for tokens in (4, 1, 1, 3, 1, 1):
        x = torch.randn(1, 2, tokens, 16, generator=g)
        mine, reference = ours.update(x, x), theirs.update(x, x)
        assert mine[0].shape == reference[0].shape
        assert ours.get_seq_length() == theirs.get_seq_length()
        for query in (1, 3):
            assert ours.get_mask_sizes(query) == theirs.get_mask_sizes(query)


def test_crop_follows_transformers_rules(torch_path):
    layer = FP8SlidingWindowLayer(WINDOW, **_layer_settings())
    x = torch.randn(1, 2, 4, 16)
    layer.update(x, x)
    layer.crop(-2)  # within the window: a full layer's crop
    assert layer.get_seq_length() == 2
    layer.update(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    with pytest.raises(RuntimeError, match="needs activate_past_recording"):
        layer.crop(-1)
    recording = FP8SlidingWindowLayer(WINDOW, **_layer_settings())
    recording.activate_past_recording()
    recording.update(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    keys, _ = recording.update(x[:, :, :3], x[:, :, :3])  # three drafted tokens
    assert keys.shape[2] == WINDOW - 1 + 3 and recording.length == 11
    with pytest.raises(RuntimeError, match="takes a negative count of tokens to remove, got 2"):
        recording.crop(2)
    recording.crop(-2)  # two drafts rejected
    assert recording.get_seq_length() == 9 and recording.length == WINDOW - 1


def test_exact_recent_window_is_refused_on_sliding_layers_clearly():
    config = FAMILIES["mistral"][0]()
    with pytest.raises(ValueError, match=r"residual_length is not supported on sliding-window layers \(window 6\)"):
        FP8Cache(config, residual_length=4)


def _layer_settings():
    from hf_fp8cache.cache_base import DequantWorkspace
    from hf_fp8cache.formats import resolve_format

    return dict(fmt=resolve_format("fp8"), strategy="tensor", scales=None, calculate_kv_scales=False,
                exact_prefill=True, workspace=DequantWorkspace(), layer_idx=0)  # fmt: skip
