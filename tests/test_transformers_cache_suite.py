"""transformers' generic cache tests, ported to the FP8 caches (issue 19, "keep it honest").

The cases of transformers' ``tests/utils/test_cache_utils.py`` (batched and beam-search generation, extra left
padding, copying a prompt cache, MHA/GQA/MQA shapes, synthetic static-cache contents, reorder) and the cache cases
of its generation mixin tests (continue from a returned cache, inputs_embeds, assisted and prompt-lookup decoding
over ``crop``, chunked prefill, ``early_initialization``, ``batch_repeat_interleave`` / ``batch_select_indices`` as
contrastive search and beam search use them, seq length and mask sizes, reset and reuse, deepcopy, a cache passed to
``generate`` filled in place), written anew for ``FP8Cache`` and ``FP8StaticCache`` (where a fixed-batch cache can
do the operation; where it refuses by design, the error is asserted) and for both read paths: SDPA over dequantized
K/V, and ``attn_implementation="hf_fp8cache"`` reading FP8 directly.

The reference is ``oracle.py``: transformers' own ``DynamicCache`` storing K/V fake-quantized by torch's cast, sharing
no code with the library. Greedy tokens must equal the oracle's; beams, their sequences; direct reads, its bytes.
"""

import copy

import pytest
import torch
from helpers import assert_equal, left_padded_prompts
from oracle import fake_fp8, fake_fp8_cache
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from hf_fp8cache import FP8Cache, FP8StaticCache
from hf_fp8cache.attention import ATTENTION_NAME
from hf_fp8cache.contract import layer_of
from hf_fp8cache.integration import cache_keyword

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning"),
    pytest.mark.usefixtures("torch_path"),
]

READ_PATHS = ["sdpa", ATTENTION_NAME]
KINDS = ["dynamic", "static"]
MAX_CACHE_LEN = 40  # static cache: room for the longest case below, assisted decoding's 13 + 10 tokens + 3 drafts
NEW_TOKENS = 8


def tiny_llama(seed: int, kv_heads: int, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


# Seeds picked so that FP8 changes the output of both greedy and beam search on the prompts below (see
# test_the_oracle_is_not_the_exact_cache): a cache that stored exact K/V, or rounded differently, fails.
@pytest.fixture(scope="module")
def gqa_model():
    return tiny_llama(seed=3, kv_heads=2)


@pytest.fixture(scope="module")
def mha_model():
    return tiny_llama(seed=2, kv_heads=4)


@pytest.fixture(params=READ_PATHS)
def model(request, gqa_model):
    """The GQA model under each read path."""
    gqa_model.set_attn_implementation(request.param)
    yield gqa_model
    gqa_model.set_attn_implementation("sdpa")


def new_cache(kind: str, config, **kwargs):
    """One of our caches for a model ``config``."""
    if kind == "dynamic":
        return FP8Cache(config, **kwargs)
    return FP8StaticCache(config, max_cache_len=MAX_CACHE_LEN, **kwargs)


def transformers_cache(kind: str, config):
    """transformers' own cache of the same kind, exact."""
    return DynamicCache(config=config) if kind == "dynamic" else StaticCache(config=config, max_cache_len=MAX_CACHE_LEN)


def generate(model, cache, ids=None, mask=None, **kwargs):
    """``model.generate`` with ``cache`` and the dict output (logits included)."""
    if ids is None and "inputs_embeds" not in kwargs:
        ids, mask = left_padded_prompts()
    kwargs = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "pad_token_id": 0, **kwargs}
    return model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True,
                          **{cache_keyword(model): cache}, **kwargs)  # fmt: skip


def returned_cache(model, out):
    return getattr(out, cache_keyword(model))


def forward(model, cache, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_keyword(model): cache}).logits


def assert_logits_close(ours, oracle):
    """Per-step logits against the oracle's (or another run's). Measured max |difference| (2026-11-30): 0 through SDPA
    over the dynamic cache (the same fp32 values in the same SDPA call); <= 1.8e-7 through the static cache (SDPA also
    sums its masked extra slots), through our decode kernel (another summation order) and behind extra padding."""
    ours, oracle = torch.stack(list(ours)), torch.stack(list(oracle))
    assert (ours - oracle).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# The oracle itself
# ---------------------------------------------------------------------------------------------------------------


def test_the_oracle_is_not_the_exact_cache(gqa_model, mha_model):
    """FP8 changes both models' greedy and beam outputs on these prompts, so every token comparison below can fail."""
    for model in (gqa_model, mha_model):
        for kwargs in ({}, {"num_beams": 3, "num_return_sequences": 2}):
            fake = generate(model, fake_fp8_cache(model.config), **kwargs).sequences
            exact = generate(model, DynamicCache(config=model.config), **kwargs).sequences
            assert not torch.equal(fake, exact)


def test_the_oracle_encodes_like_torch_and_saturates():
    x = torch.tensor([1.0, -2.0, 3.125, 3.375, 500.0, -1e6, 2.0**-10]).reshape(1, 1, -1, 1)
    # 3.125 and 3.375 are ties between e4m3 neighbours 0.25 apart: to the even mantissa; 2^-10 is half the smallest
    # subnormal (2^-9): a tie to 0
    expected = torch.tensor([1.0, -2.0, 3.0, 3.5, 448.0, -448.0, 0.0]).reshape(1, 1, -1, 1)
    assert_equal(fake_fp8(x, torch.ones(1)), expected)
    assert_equal(fake_fp8(x * 4, torch.tensor([4.0])), expected * 4)


# ---------------------------------------------------------------------------------------------------------------
# generate (test_cache_utils: batched, beam search, extra left padding, copy; generation mixin: continue, embeds,
# assisted / prompt lookup, chunked prefill, early initialization, reset and reuse, filled in place)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("read_path", READ_PATHS)
@pytest.mark.parametrize("heads", ["gqa", "mha"])
def test_left_padded_batch_greedy_equals_oracle(kind, read_path, heads, gqa_model, mha_model):
    model = gqa_model if heads == "gqa" else mha_model
    model.set_attn_implementation(read_path)
    try:
        cache = new_cache(kind, model.config)
        ours = generate(model, cache)
        oracle = generate(model, fake_fp8_cache(model.config))
    finally:
        model.set_attn_implementation("sdpa")
    assert returned_cache(model, ours) is cache
    assert_equal(ours.sequences, oracle.sequences)
    assert_logits_close(ours.logits, oracle.logits)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_equals_oracle(kind, model):
    draws = []
    for cache in (new_cache(kind, model.config), fake_fp8_cache(model.config)):
        torch.manual_seed(11)
        draws.append(generate(model, cache, do_sample=True, top_k=20).sequences)
    assert_equal(draws[0], draws[1])


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_reorders_the_cache_and_equals_oracle(kind, model):
    kwargs = {"num_beams": 3, "num_return_sequences": 2}
    ours = generate(model, new_cache(kind, model.config), **kwargs)
    oracle = generate(model, fake_fp8_cache(model.config), **kwargs)
    assert_equal(ours.sequences, oracle.sequences)
    # some returned sequence went through more than one beam: reorder_cache had to move rows
    assert any(len(set(row[row >= 0].tolist())) > 1 for row in ours.beam_indices)


def max_value_token(model) -> int:
    """The token whose layer-0 V has the largest |value| (V has no rotary embedding: the same at every position)."""
    layer = model.model.layers[0]
    with torch.no_grad():
        values = layer.self_attn.v_proj(layer.input_layernorm(model.model.embed_tokens.weight))
    return int(values.abs().amax(-1)[3:].argmax()) + 3


def _padding_counts_with_a_warning(model, cache, ids, mask, pad):
    """The documented fallback of the dequantize path (any attention but ours, which never hands the cache the
    mask): on-the-fly scales over every position of the first prefill, padding included, and for a batch of several
    rows (where padding comes from) a warning saying so."""
    if ids.shape[0] > 1:
        with pytest.warns(UserWarning, match="cannot see the padding mask, so the on-the-fly scales include any pad"):
            generate(model, cache, ids, mask, pad_token_id=pad)
    else:
        generate(model, cache, ids, mask, pad_token_id=pad)
    oracle = fake_fp8_cache(model.config, onthefly_mask=torch.ones_like(mask))  # every position counts
    generate(model, oracle, ids, mask, pad_token_id=pad)
    for layer, oracle_layer in zip(cache.layers, oracle.layers):
        torch.testing.assert_close(layer.value_scale, oracle_layer.value_scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scales", ["unit", "onthefly"])
def test_extra_left_padding_changes_nothing(kind, scales, model):
    """One prompt alone and behind 6 pad tokens: the same tokens, logits and scales. The pad token is the one with the
    largest V, so scales that counted padding positions would differ."""
    pad = max_value_token(model)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    ids[ids == pad] = pad + 1
    padded = torch.cat([torch.full((1, 6), pad), ids], 1)
    padded_mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones_like(ids)], 1)
    kwargs = {"calculate_kv_scales": True} if scales == "onthefly" else {}
    if scales == "onthefly" and model.config._attn_implementation != ATTENTION_NAME:
        return _padding_counts_with_a_warning(model, new_cache(kind, model.config, **kwargs), padded, padded_mask, pad)
    alone, behind = new_cache(kind, model.config, **kwargs), new_cache(kind, model.config, **kwargs)
    out_alone = generate(model, alone, ids, torch.ones_like(ids), pad_token_id=pad)
    out_behind = generate(model, behind, padded, padded_mask, pad_token_id=pad)
    for layer_alone, layer_behind in zip(alone.layers, behind.layers):
        # measured with the oracle's rule: equal alone and behind padding (a few fp32 ulps allowed)
        torch.testing.assert_close(layer_behind.key_scale, layer_alone.key_scale, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer_behind.value_scale, layer_alone.value_scale, rtol=1e-6, atol=0)
    assert_equal(out_alone.sequences, out_behind.sequences[:, 6:])
    assert_logits_close(out_alone.logits, out_behind.logits)


@pytest.mark.parametrize("kind", KINDS)
def test_onthefly_scales_from_real_tokens_equal_oracle(kind, model):
    """Left-padded batch with on-the-fly scales: vLLM's first-prefill rule over the real tokens only (the pad token
    has the largest V of the vocabulary), then the same greedy tokens as the oracle using those scales."""
    pad = max_value_token(model)
    ids, mask = left_padded_prompts(pad_id=pad)
    ids[(ids == pad) & (mask == 1)] = pad + 1
    cache = new_cache(kind, model.config, calculate_kv_scales=True)
    if model.config._attn_implementation != ATTENTION_NAME:
        return _padding_counts_with_a_warning(model, cache, ids, mask, pad)
    oracle = fake_fp8_cache(model.config, onthefly_mask=mask)
    ours = generate(model, cache, ids, mask, pad_token_id=pad)
    theirs = generate(model, oracle, ids, mask, pad_token_id=pad)
    for layer, oracle_layer in zip(cache.layers, oracle.layers):
        # amax / 200 here, amax * (2.24 / 448) there: measured equal on unpadded prompts (a few fp32 ulps allowed)
        torch.testing.assert_close(layer.key_scale, oracle_layer.key_scale, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.value_scale, oracle_layer.value_scale, rtol=1e-6, atol=0)
    assert_equal(ours.sequences, theirs.sequences)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_continues_from_the_returned_cache(kind, model):
    """Two generate calls of 4 tokens, the second fed the first's sequences and returned cache, give the one-call
    8 tokens; the cache passed in is the one returned, filled in place and never reset."""
    ids, mask = left_padded_prompts()
    cache = new_cache(kind, model.config)
    first = generate(model, cache, ids, mask, max_new_tokens=4)
    assert returned_cache(model, first) is cache
    assert int(cache.get_seq_length()) == first.sequences.shape[1] - 1  # the last token is not yet in the cache
    longer_mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)
    second = generate(model, cache, first.sequences, longer_mask, max_new_tokens=4)
    assert returned_cache(model, second) is cache and int(cache.get_seq_length()) == ids.shape[1] + 7
    assert_equal(second.sequences, generate(model, fake_fp8_cache(model.config), ids, mask).sequences)
    assert_equal(second.sequences, generate(model, new_cache(kind, model.config), ids, mask).sequences)


def stored_values(cache) -> list[torch.Tensor]:
    """Every layer's cached K and V as the values they stand for, ``[B, H, length, D]``."""
    out = []
    for layer in cache.layers:
        if isinstance(cache, DynamicCache):
            out += [layer.keys, layer.values]
            continue
        length = int(layer.get_seq_length())
        for codes, scale in ((layer.key_bytes, layer.key_scale), (layer.value_bytes, layer.value_scale)):
            out.append(codes[:, :, :length].view(cache.format.dtype).float() * scale.reshape(1, -1, 1, 1))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_the_cache_passed_to_generate_holds_the_oracle_values(kind, model):
    cache, oracle = new_cache(kind, model.config), fake_fp8_cache(model.config)
    generate(model, cache)
    generate(model, oracle)
    ours, theirs = stored_values(cache), stored_values(oracle)
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    # the same bytes on both read paths (measured: our decode kernel's ~1e-7 differences move no e4m3 code here)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_equal(a, b, f"layer {i // 2} {'values' if i % 2 else 'keys'}")


@pytest.mark.parametrize("kind", KINDS)
def test_generate_from_inputs_embeds_and_continue(kind, model):
    ids, mask = left_padded_prompts()
    embeds = model.get_input_embeddings()(ids).detach()
    cache = new_cache(kind, model.config)
    first = generate(model, cache, None, mask, inputs_embeds=embeds, max_new_tokens=4).sequences
    more_embeds = torch.cat([embeds, model.get_input_embeddings()(first).detach()], 1)
    more_mask = torch.cat([mask, torch.ones_like(first)], 1)
    second = generate(model, cache, None, more_mask, inputs_embeds=more_embeds, max_new_tokens=4).sequences
    oracle = generate(model, fake_fp8_cache(model.config), None, mask, inputs_embeds=embeds).sequences
    assert_equal(torch.cat([first, second], 1), oracle)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("assistant", ["prompt_lookup", "draft_model"])
def test_assisted_decoding_rolls_back_with_crop_and_matches_greedy(kind, assistant, model):
    """Drafts rejected by the target are cropped off the cache (transformers' ``crop(-n)``); the tokens are greedy's
    with the same cache kind, and the oracle's."""
    pattern = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(8))
    ids = torch.cat([pattern, pattern, pattern[:, :3]], 1)  # repeated n-grams: prompt lookup proposes drafts
    mask = torch.ones_like(ids)
    kwargs = {"prompt_lookup_num_tokens": 3} if assistant == "prompt_lookup" else {
        "assistant_model": tiny_llama(seed=7, kv_heads=2)}  # fmt: skip
    cache = new_cache(kind, model.config)
    crops = []
    original_crop = cache.crop
    cache.crop = lambda n: (crops.append(n), original_crop(n))[1]
    assisted = generate(model, cache, ids, mask, max_new_tokens=10, **kwargs).sequences
    assert any(n < 0 for n in crops)  # some drafts were rejected and rolled back
    greedy = generate(model, new_cache(kind, model.config), ids, mask, max_new_tokens=10).sequences
    oracle = generate(model, fake_fp8_cache(model.config), ids, mask, max_new_tokens=10).sequences
    assert_equal(assisted, greedy, "assisted vs greedy tokens")
    assert_equal(greedy, oracle, "greedy vs oracle tokens")


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_equals_oracle(kind, model):
    """``prefill_chunk_size=4``: the prompt enters as 4 + 4 + 3 tokens, the later chunks over an FP8 history."""
    ours = generate(model, new_cache(kind, model.config), prefill_chunk_size=4)
    oracle = generate(model, fake_fp8_cache(model.config), prefill_chunk_size=4)
    assert_equal(ours.sequences, oracle.sequences)
    assert_logits_close(ours.logits, oracle.logits)


@pytest.mark.parametrize("kind", KINDS)
def test_early_initialization_then_generate_equals_oracle(kind, model):
    cache = new_cache(kind, model.config)
    cache.early_initialization(batch_size=3, num_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.is_initialized and int(cache.get_seq_length()) == 0
    ours, oracle = generate(model, cache), generate(model, fake_fp8_cache(model.config))
    assert_equal(ours.sequences, oracle.sequences)
    assert_logits_close(ours.logits, oracle.logits)  # the prompt was still a prefill, read exact


@pytest.mark.parametrize("kind", KINDS)
def test_a_copied_prompt_cache_serves_two_continuations(kind, model):
    """transformers' cache-copy recipe: fill a cache with a shared prefix once, deepcopy it for each prompt."""
    g = torch.Generator().manual_seed(9)
    prefix = torch.randint(3, 256, (1, 8), generator=g)
    suffixes = [torch.randint(3, 256, (1, n), generator=g) for n in (3, 5)]
    prefix_cache, oracle_prefix = new_cache(kind, model.config), fake_fp8_cache(model.config)
    forward(model, prefix_cache, prefix)
    forward(model, oracle_prefix, prefix)
    for suffix in suffixes:
        ids = torch.cat([prefix, suffix], 1)
        ours = generate(model, copy.deepcopy(prefix_cache), ids, torch.ones_like(ids)).sequences
        theirs = generate(model, copy.deepcopy(oracle_prefix), ids, torch.ones_like(ids)).sequences
        assert_equal(ours, theirs)
    assert int(prefix_cache.get_seq_length()) == 8  # the copies grew, not the original


@pytest.mark.parametrize("kind", KINDS)
def test_reset_then_reuse_equals_a_fresh_cache(kind, model):
    cache = new_cache(kind, model.config, calculate_kv_scales=True)
    generate(model, cache)
    buffers = [layer.key_bytes.data_ptr() for layer in cache.layers]
    first_scales = [layer.key_scale.clone() for layer in cache.layers]
    cache.reset()
    assert int(cache.get_seq_length()) == 0
    other_ids, other_mask = left_padded_prompts(seed=4)
    reused = generate(model, cache, other_ids, other_mask)
    fresh_cache = new_cache(kind, model.config, calculate_kv_scales=True)
    fresh = generate(model, fresh_cache, other_ids, other_mask)
    assert_equal(reused.sequences, fresh.sequences)
    assert_logits_close(reused.logits, fresh.logits)
    assert [layer.key_bytes.data_ptr() for layer in cache.layers] == buffers  # same batch shape: buffers reused
    for layer, fresh_layer, first in zip(cache.layers, fresh_cache.layers, first_scales):  # from the new prompt
        assert_equal(layer.key_scale, fresh_layer.key_scale)
        assert not torch.equal(layer.key_scale, first)


# ---------------------------------------------------------------------------------------------------------------
# Batch operations with a model: contrastive search repeats rows and keeps some; beam search reorders
# ---------------------------------------------------------------------------------------------------------------


def test_repeat_then_select_rows_then_decode_equals_oracle(model):
    ids, mask = left_padded_prompts()
    nxt = torch.randint(3, 256, (3, 1), generator=torch.Generator().manual_seed(2))
    logits = []
    for cache in (FP8Cache(model.config), fake_fp8_cache(model.config)):
        forward(model, cache, ids, mask)
        mask_now = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        forward(model, cache, nxt, mask_now)  # a decode step: the history is read from FP8
        cache.batch_repeat_interleave(2)  # 6 rows: 0 0 1 1 2 2
        cache.batch_select_indices(torch.tensor([5, 0, 2]))  # rows 2, 0, 1
        rows = mask_now.repeat_interleave(2, 0)[[5, 0, 2]]
        logits.append(forward(model, cache, nxt, torch.cat([rows, torch.ones(3, 1, dtype=mask.dtype)], 1)))
    assert_logits_close(logits[0], logits[1])


@pytest.mark.parametrize("operation", ["batch_repeat_interleave", "batch_select_indices"])
def test_static_cache_refuses_batch_changes_by_design(operation, gqa_model):
    cache = FP8StaticCache(gqa_model.config, max_cache_len=16)
    forward(gqa_model, cache, left_padded_prompts()[0])
    argument = 2 if operation == "batch_repeat_interleave" else torch.tensor([0, 2])
    with pytest.raises(NotImplementedError, match="fixed batch"):
        getattr(cache, operation)(argument)


# ---------------------------------------------------------------------------------------------------------------
# The Cache API directly (test_cache_utils' model-free cases), against the oracle and transformers' own caches
# ---------------------------------------------------------------------------------------------------------------


def llama_config(kv_heads: int = 2, read_path: str = "sdpa") -> LlamaConfig:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16)  # fmt: skip
    config._attn_implementation = read_path
    return config


def states(batch: int, heads: int, tokens: int, seed: int) -> torch.Tensor:
    """Random K or V ``[batch, heads, tokens, 16]`` spanning e4m3's subnormals to past its saturation (|x| > 448)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, 16, generator=g) * torch.logspace(-3, 2.8, 16)


def read(returned: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of what ``update`` returned, as values (fp8 views are unit-scaled here). Our
    attention's fp8 views are read through the layer they name, as that attention does: a decode step's token is
    written by the attention kernel's launch, or by the layer's own reads (``keys`` here) when no kernel ran."""
    layer = layer_of(returned)
    if layer is not None and returned.dtype == layer.fmt.dtype:
        returned = layer.keys if returned.data_ptr() == layer.key_bytes.data_ptr() else layer.values
    return returned[:, :, :length].float()


def filled_pair(kind: str, read_path: str, batch: int = 3):
    """Our cache and the oracle, each given a 5-token prefill and 2 decoded tokens in both layers."""
    config = llama_config(read_path=read_path)
    ours = new_cache(kind, config)
    oracle = fake_fp8_cache(config)
    for cache in (ours, oracle):
        for layer in range(2):
            for seed, tokens in ((layer, 5), (10 + layer, 1), (20 + layer, 1)):
                cache.update(states(batch, 2, tokens, seed), states(batch, 2, tokens, seed + 100), layer)
    return ours, oracle


def assert_next_reads_equal(ours, oracle, seed: int = 50):
    """One more token into both: every layer reads back exactly the oracle's K/V."""
    batch = oracle.layers[0].keys.shape[0]
    for layer in range(2):
        step_k, step_v = states(batch, 2, 1, seed + layer), states(batch, 2, 1, seed + 10 + layer)
        theirs = oracle.update(step_k, step_v, layer)
        mine = ours.update(step_k, step_v, layer)
        length = theirs[0].shape[2]
        assert int(ours.layers[layer].get_seq_length()) == length
        assert_equal(read(mine[0], length), theirs[0], f"layer {layer} keys")
        assert_equal(read(mine[1], length), theirs[1], f"layer {layer} values")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("read_path", READ_PATHS)
def test_updates_read_back_the_oracle_values(kind, read_path):
    ours, oracle = filled_pair(kind, read_path)
    assert_next_reads_equal(ours, oracle)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("read_path", READ_PATHS)
def test_reorder_cache_like_dynamic_cache(kind, read_path):
    ours, oracle = filled_pair(kind, read_path)
    beam_idx = torch.tensor([2, 2, 0])
    ours.reorder_cache(beam_idx)
    oracle.reorder_cache(beam_idx)
    assert_next_reads_equal(ours, oracle)


INDEX_FORMS = {
    "list": [2, 0],
    "tuple": (2, 0),
    "tensor": torch.tensor([2, 0]),
    "bool-mask": torch.tensor([True, False, True]),
    "slice": slice(1, 3),
    "repeated": torch.tensor([1, 1, 0, 2]),
}


@pytest.mark.parametrize("form", list(INDEX_FORMS))
@pytest.mark.parametrize("read_path", READ_PATHS)
def test_batch_select_indices_takes_every_index_form_dynamic_cache_takes(form, read_path):
    """The rows DynamicCache keeps for the same index (contrastive search passes a tensor; users pass lists)."""
    ours, oracle = filled_pair("dynamic", read_path)
    ours.batch_select_indices(INDEX_FORMS[form])
    oracle.batch_select_indices(INDEX_FORMS[form])
    assert_next_reads_equal(ours, oracle)


@pytest.mark.parametrize("read_path", READ_PATHS)
def test_batch_repeat_interleave_like_dynamic_cache(read_path):
    ours, oracle = filled_pair("dynamic", read_path, batch=2)
    ours.batch_repeat_interleave(3)
    oracle.batch_repeat_interleave(3)
    assert_next_reads_equal(ours, oracle)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tokens", [0, 2, 5])
def test_crop_like_dynamic_cache(kind, tokens):
    """``crop(-n)`` (assisted decoding's rollback): 0 changes nothing, 2 drops the decoded tokens, 5 also most of the
    prompt; what is kept, and what the next token reads, is the oracle's."""
    ours, oracle = filled_pair(kind, "sdpa")
    ours.crop(-tokens)
    oracle.crop(-tokens)
    assert int(ours.get_seq_length()) == oracle.get_seq_length() == 7 - tokens
    assert_next_reads_equal(ours, oracle)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("read_path", READ_PATHS)
def test_a_prompt_into_a_cropped_empty_cache_reads_exact_values(kind, read_path):
    """After ``crop`` removed every token, the next update is the first prefill of an empty layer again: it returns
    the exact K/V, as after ``reset()`` and as the oracle (the caches' ``exact_prefill`` default)."""
    ours, oracle = filled_pair(kind, read_path)
    ours.crop(-7)
    oracle.crop(-7)
    for layer in range(2):
        x = states(3, 2, 4, 70 + layer)
        assert_equal(read(ours.update(x, x, layer)[0], 4), x)
        assert_equal(oracle.update(x, x, layer)[0], x)
    assert_next_reads_equal(ours, oracle)


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_is_independent(kind):
    ours, oracle = filled_pair(kind, "sdpa")
    twin, oracle_twin = copy.deepcopy(ours), copy.deepcopy(oracle)
    assert_next_reads_equal(twin, oracle_twin, seed=60)  # the copy grows ...
    assert int(ours.get_seq_length()) == 7  # ... the original does not
    assert_next_reads_equal(ours, oracle, seed=80)  # and still holds its own tokens


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_update_shapes_follow_transformers_caches_for_mha_gqa_mqa(kind, kv_heads):
    config = llama_config(kv_heads)
    ours = new_cache(kind, config)
    theirs = transformers_cache(kind, config)
    for tokens in (3, 1):
        x = states(1, kv_heads, tokens, tokens)
        keys, values = ours.update(x, x, 0)
        their_keys, their_values = theirs.update(x, x, 0)
        assert keys.shape == their_keys.shape and values.shape == their_values.shape


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_and_mask_sizes_follow_transformers_caches(kind):
    """get_seq_length, get_mask_sizes (which build generate's masks), get_max_length and the flags generate reads,
    as DynamicCache / StaticCache answer them after the same updates and crop."""
    config = llama_config()
    ours = new_cache(kind, config)
    theirs = transformers_cache(kind, config)
    assert int(ours.get_seq_length()) == int(theirs.get_seq_length()) == 0
    assert ours.get_mask_sizes(4, 0) == theirs.get_mask_sizes(4, 0)
    for step, tokens in enumerate((5, 1, 1)):
        for layer in range(2):
            x = states(2, 2, tokens, step)
            ours.update(x, x, layer)
            theirs.update(x, x, layer)
    ours.crop(-2)
    theirs.crop(-2)
    assert int(ours.get_seq_length()) == int(theirs.get_seq_length()) == 5
    for query_length in (1, 3):
        assert ours.get_mask_sizes(query_length, 0) == theirs.get_mask_sizes(query_length, 0)
    assert ours.get_max_length() == theirs.get_max_length()
    assert (ours.is_compileable, ours.is_croppable, ours.is_sliding) == (
        theirs.is_compileable, theirs.is_croppable, theirs.is_sliding)  # fmt: skip
    ours.reset()
    theirs.reset()
    assert int(ours.get_seq_length()) == int(theirs.get_seq_length()) == 0


def test_static_cache_contents_and_capacity():
    """test_cache_utils' synthetic static cache: prefill 2 tokens, write at positions 2 and 3, read the FP8 values
    back in place; a fifth token does not fit. Values: exact, a tie (3.125 -> 3.0, even mantissa), saturated."""
    cache = FP8StaticCache(llama_config(kv_heads=1), max_cache_len=4)
    column = lambda *values: torch.tensor(values).reshape(1, 1, -1, 1).expand(1, 1, -1, 16)  # noqa: E731
    cache.update(column(1.0, -2.0), column(1.0, -2.0), 0)
    cache.update(column(3.125), column(3.125), 0)
    layer = cache.layers[0]
    assert layer.keys[0, 0, :, 0].float().tolist() == [1.0, -2.0, 3.0, 0.0]
    cache.update(column(500.0), column(500.0), 0)
    assert layer.keys[0, 0, :, 0].float().tolist() == layer.values[0, 0, :, 0].float().tolist() == [1, -2, 3, 448]
    with pytest.raises(RuntimeError, match="more tokens than max_cache_len=4"):
        cache.update(column(5.0), column(5.0), 0)
    dynamic = FP8Cache(llama_config(kv_heads=1))
    for values in ((1.0, -2.0), (3.125,), (500.0,), (5.0,)):
        dynamic.update(column(*values), column(*values), 0)
    assert dynamic.layers[0].keys[0, 0, :, 0].float().tolist() == [1.0, -2.0, 3.0, 448.0, 5.0]  # grows instead
