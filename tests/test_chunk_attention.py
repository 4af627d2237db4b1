"""Chunks over an FP8 history through ``attn_implementation="hf_fp8cache"`` (issue 17): a second turn's prompt -- more
queries than a decode step, here 21 tokens of a model with 4 query heads a KV head (84 query rows: one 128-row
chunk tile) -- is attended by the kernel straight from the FP8 bytes, nothing dequantized, and generates the same
tokens as the fake-quantized oracle caches: ``FP8Cache`` (also with an exact recent window, int8 per-token-head
scales, and ``exact_prefill=False``, whose first prefill is a chunk too) and ``FP8StaticCache``. The kernel runs
under the Triton interpreter (CPU); ``tests/test_gpu.py`` repeats the check compiled."""

import pytest
import torch
from helpers import assert_equal, fake_quant_cache, left_padded_prompts, tiny_llama
from oracle import fake_fp8_cache, fake_fp8_static_cache

from hf_fp8cache import FP8Cache, FP8StaticCache
from hf_fp8cache import attention as fp8_attention
from hf_fp8cache.attention import ATTENTION_NAME
from hf_fp8cache.cache_layer import FP8CacheLayer
from hf_fp8cache.integration import cache_keyword
from hf_fp8cache.static_cache import FP8StaticLayer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning")

FIRST_TOKENS, SECOND_TOKENS = 4, 6  # generated in the first and the second turn
TURN = 20  # the second turn's new tokens: with the first reply's last token (never run) a chunk of 21


@pytest.fixture(scope="module")
def model():
    model = tiny_llama(seed=4, heads=8, kv_heads=2)  # G = 4
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def _two_turns(model, cache, on_second_turn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generate over a left-padded batch, then a second turn of ``TURN`` more tokens continued from the same
    cache (``on_second_turn()`` runs in between): the tokens of both turns."""
    ids, mask = left_padded_prompts()
    turn = torch.randint(3, 256, (ids.shape[0], TURN), generator=torch.Generator().manual_seed(7))
    greedy = dict(do_sample=False, pad_token_id=0, **{cache_keyword(model): cache})
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=FIRST_TOKENS, **greedy)
    if on_second_turn is not None:
        on_second_turn()
    ids = torch.cat([first, turn], 1)
    mask = torch.cat([mask, torch.ones(ids.shape[0], ids.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    second = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=SECOND_TOKENS, **greedy)
    return first, second


def _kernel_only(monkeypatch, layer_class) -> list[int]:
    """From now on: every attention over the cache runs the kernel (a dequantized read raises); the query lengths of
    its calls are recorded in the returned list."""
    lengths: list[int] = []
    kernel = fp8_attention._kernel_attention

    def recorded(query, *args):
        lengths.append(query.shape[2])
        return kernel(query, *args)

    def no_dequantize(self):
        raise AssertionError(f"layer {self.layer_idx} dequantized its history")

    monkeypatch.setattr(fp8_attention, "_kernel_attention", recorded)
    monkeypatch.setattr(layer_class, "dequantized", no_dequantize)
    return lengths


CACHES = {
    "unit": (dict(), lambda config: fake_fp8_cache(config)),
    "exact_window": (dict(residual_length=8), lambda config: fake_quant_cache(config, residual_length=8)),
    "int8_token_head": (dict(kv_cache_dtype="int8_per_token_head"),
                        lambda config: fake_quant_cache(config, "int8", token_head=True)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CACHES))
def test_second_turn_through_the_kernel_equals_the_oracle(model, monkeypatch, name):
    cache_kwargs, oracle = CACHES[name]
    expected = _two_turns(model, oracle(model.config))
    calls = []
    ours = _two_turns(model, FP8Cache(model.config, **cache_kwargs),
                      lambda: calls.append(_kernel_only(monkeypatch, FP8CacheLayer)))  # fmt: skip
    assert_equal(ours[0], expected[0], "first turn")
    assert_equal(ours[1], expected[1], "second turn")
    layers = model.config.num_hidden_layers  # one chunk a layer, then the decode steps
    assert calls[0] == [TURN + 1] * layers + [1] * (SECOND_TOKENS - 1) * layers


def test_first_prefill_without_exact_prefill_is_a_chunk_too(model, monkeypatch):
    expected = _two_turns(model, fake_fp8_cache(model.config, exact_prefill=False))
    lengths = _kernel_only(monkeypatch, FP8CacheLayer)
    ours = _two_turns(model, FP8Cache(model.config, exact_prefill=False))
    assert_equal(ours[0], expected[0], "first turn")
    assert_equal(ours[1], expected[1], "second turn")
    assert lengths[0] == left_padded_prompts()[0].shape[1] and max(lengths) == TURN + 1


def test_static_cache_second_turn_through_the_kernel_equals_the_oracle(model, monkeypatch):
    max_cache_len = 48
    expected = _two_turns(model, fake_fp8_static_cache(model.config, max_cache_len))
    calls = []
    ours = _two_turns(model, FP8StaticCache(model.config, max_cache_len=max_cache_len),
                      lambda: calls.append(_kernel_only(monkeypatch, FP8StaticLayer)))  # fmt: skip
    assert_equal(ours[0], expected[0], "first turn")
    assert_equal(ours[1], expected[1], "second turn")
    assert calls[0][: model.config.num_hidden_layers] == [TURN + 1] * model.config.num_hidden_layers
