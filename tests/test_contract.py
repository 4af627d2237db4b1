"""The cache <-> attention contract (``contract.py``), checked the same way over both layer kinds: what ``update``
hands our attention, and what ``attention_inputs(mask)`` returns for it."""

import copy

import pytest
import torch
from helpers import tiny_llama
from hf_fp8cache.kernels import reference

from hf_fp8cache import FP8Cache, FP8StaticCache
from hf_fp8cache.contract import ATTENTION_NAME, FP8AttentionInputs, layer_of

KINDS = ["dynamic", "static"]
PADS = [0, 3, 1]  # left padding of each row


@pytest.fixture(scope="module")
def config():
    model = tiny_llama(seed=4)
    model.set_attn_implementation(ATTENTION_NAME)
    return model.config


def _cache(kind, config):
    if kind == "dynamic":
        return FP8Cache(config)
    return FP8StaticCache(config, max_cache_len=16)


def _mask(kv_length, pads=PADS, query_length=1):
    """A 4-D bool mask as transformers builds it: ``query_length`` new tokens over ``kv_length`` positions, causal,
    each row's first ``pads`` positions padded."""
    keys = torch.arange(kv_length)
    queries = torch.arange(kv_length - query_length, kv_length)
    causal = keys[None, :] <= queries[:, None]
    padded = keys[None, :] < torch.tensor(pads)[:, None]
    return (causal[None] & ~padded[:, None])[:, None]


def _filled(kind, config, prompt=6):
    """A cache of both layers after a prompt of ``prompt`` tokens and one decode token; returns (cache, decode K)."""
    cache = _cache(kind, config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(PADS), 2, prompt, 16, generator=g)
    step = torch.randn(len(PADS), 2, 1, 16, generator=g)
    returned = []
    for layer in range(2):
        cache.update(x, x * 0.5, layer)
        returned.append(cache.update(step, step, layer)[0])
    return cache, returned


@pytest.mark.parametrize("kind", KINDS)
def test_update_hands_our_attention_fp8_views_that_name_their_layer(kind, config, torch_path):
    cache, returned = _filled(kind, config)
    for layer, key in zip(cache.layers, returned):
        assert key.dtype == torch.float8_e4m3fn and layer_of(key) is layer


@pytest.mark.parametrize("kind", KINDS)
def test_a_copied_cache_hands_views_naming_its_own_layers(kind, config, torch_path):
    # the dynamic layer keeps its views from step to step, naming itself weakly: a deepcopy must not hand out the
    # original's views (attention would read the original cache)
    cache, _ = _filled(kind, config)
    copied_cache = copy.deepcopy(cache)
    step = torch.randn(len(PADS), 2, 1, 16, generator=torch.Generator().manual_seed(1))
    for index, (original, copied) in enumerate(zip(cache.layers, copied_cache.layers)):
        key = copied_cache.update(step, step, index)[0]
        assert layer_of(key) is copied and layer_of(key) is not original


@pytest.mark.parametrize("kind", KINDS)
def test_attention_inputs_describe_what_the_layer_holds(kind, config, torch_path):
    cache, _ = _filled(kind, config)
    mask = _mask(7 if kind == "dynamic" else 16)
    for layer in cache.layers:  # in a forward's order: the static cache's first layer reduces the mask for all
        inputs = layer.attention_inputs(mask)
    assert isinstance(inputs, FP8AttentionInputs) and inputs.fmt is cache.format
    assert int(inputs.length) == 7 and inputs.recent is None
    assert inputs.kv_start.dtype == torch.int32 and inputs.kv_start.tolist() == PADS
    for buffer in (inputs.key_bytes, inputs.value_bytes):
        assert buffer.dtype == torch.uint8 and buffer.shape[:2] == (3, 2) and buffer.shape[3] == 16
    # the bytes and scales are the layer's: dequantized by hand they are what the dequantize path returns (which
    # first writes a decode token the bundle offered the kernel: new_tokens)
    dequantized = layer.dequantized()[0][:, :, :7]
    by_hand = inputs.key_bytes[:, :, :7].view(torch.float8_e4m3fn).float() * inputs.key_scale
    assert torch.equal(by_hand, dequantized)


@pytest.mark.parametrize("claimed", [False, True])
def test_a_decode_token_is_offered_to_the_kernel_and_otherwise_written_by_the_layer(claimed, config, torch_path):
    cache, _ = _filled("dynamic", config)  # a 6-token prompt, then one decode token each layer has not written
    layer = cache.layers[1]
    inputs = layer.attention_inputs(_mask(7))
    assert inputs.new_tokens is not None and inputs.new_tokens.start == 6
    token = inputs.new_tokens.tokens.keys[:, :, 0]  # unit scales: its codes are torch's own fp8 cast
    written = token.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    layer.key_bytes[:, :, 6] = 0x7F  # NaN codes: what the buffer holds until someone writes the token
    if claimed:  # the decode kernel's launch writes what it claims; the layer must not write it again
        tokens = inputs.new_tokens.claim()
        assert tokens.keys.shape == (3, 2, 1, 16) and tokens.key_inv_scale is layer.key_inv_scale
    layer.dequantized()
    assert torch.equal(layer.key_bytes[:, :, 6], torch.full_like(written, 0x7F) if claimed else written)
    assert layer.attention_inputs(_mask(7)).new_tokens is None  # offered once


@pytest.mark.parametrize("kind", KINDS)
def test_only_a_dynamic_full_layers_decode_token_waits(kind, config, torch_path):
    cache, _ = _filled(kind, config)
    waits = [layer.attention_inputs(_mask(7 if kind == "dynamic" else 16)).new_tokens is not None
             for layer in cache.layers]  # fmt: skip
    assert waits == [kind == "dynamic"] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_row_starts_are_computed_once_per_mask_and_shared_by_the_layers(kind, config, torch_path):
    cache, _ = _filled(kind, config)
    kv_length = 7 if kind == "dynamic" else 16
    mask = _mask(kv_length)
    first, second = (layer.attention_inputs(mask).kv_start for layer in cache.layers)
    assert first is second and first.tolist() == PADS
    other = _mask(kv_length, pads=[2, 0, 5])  # the next step's mask: new starts, for every layer
    assert [layer.attention_inputs(other).kv_start.tolist() for layer in cache.layers] == [[2, 0, 5]] * 2


def test_dynamic_row_starts_follow_a_batch_that_changes(config, torch_path):
    cache, _ = _filled("dynamic", config)
    assert cache.layers[0].attention_inputs(_mask(7)).kv_start.tolist() == PADS
    cache.batch_select_indices([2, 0])
    assert cache.layers[0].attention_inputs(_mask(7, pads=[1, 0])).kv_start.tolist() == [1, 0]
    assert cache.layers[1].attention_inputs(None).kv_start.tolist() == [0, 0]  # no mask: every row from 0


def test_the_exact_window_travels_in_the_bundle(config, torch_path):
    cache = FP8Cache(config, residual_length=4)
    x = torch.randn(3, 2, 6, 16)
    cache.update(x, x, 0)
    cache.update(x[:, :, :1], x[:, :, :1], 0)
    recent = cache.layers[0].attention_inputs(None).recent
    assert recent.start == 3 and recent.keys.shape == (3, 2, 4, 16)  # positions 3..6 are held exactly


def test_dynamic_row_starts_hold_no_mask_alive(config, torch_path):
    """A prefill's [B, 1, L, L] mask must not outlive its forward (8 x 32768 tokens: 8.6 GB of bools)."""
    import gc
    import weakref

    cache, _ = _filled("dynamic", config)
    mask = _mask(7)
    cache.layers[0].attention_inputs(mask)
    alive = weakref.ref(mask)
    del mask
    gc.collect()
    assert alive() is None
    assert cache.layers[0].attention_inputs(None).kv_start.tolist() == [0, 0, 0]  # a dead mask is not reused


def test_rows_with_inner_padding_are_the_rows_whose_mask_skips_a_position_inside_them():
    """Left padding (a row's first positions) is one start; padding after the first attended position (a next turn
    left-padded after its history) is inside the row. Decode masks and a chunk's causal mask, bool and additive."""
    from hf_fp8cache.contract import rows_with_inner_padding

    decode = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    assert rows_with_inner_padding(decode[:, None, None, :]) == [2]
    additive = torch.where(decode, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    assert rows_with_inner_padding(additive) == [2]
    # a chunk of 3 queries at positions 3..5 over 6 keys (causal), the history's positions 1..2 padded in row 1
    causal = torch.ones(3, 6, dtype=torch.bool).tril(diagonal=3)
    chunk = torch.stack([causal, causal.clone()])
    chunk[1, :, 1:3] = False
    assert rows_with_inner_padding(chunk[:, None]) == [1]
    static = torch.zeros(2, 1, 1, 10, dtype=torch.bool)  # a static cache's mask: unwritten positions after the last
    static[0, 0, 0, :4] = static[1, 0, 0, 2:6] = True
    assert rows_with_inner_padding(static) == [] and rows_with_inner_padding(None) == []


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_per_token_head", "int8_per_token_head"])
def test_a_token_head_layers_decode_token_is_offered_and_otherwise_written_with_its_scales(kv_cache_dtype, config,
                                                                                            torch_path):  # fmt: skip
    """Per-token-head layers leave a decode token to the kernel too (it computes the token's scales); unclaimed, the
    layer writes the codes and the scales itself."""
    cache = FP8Cache(config, kv_cache_dtype=kv_cache_dtype)
    g = torch.Generator().manual_seed(0)
    prompt, step = torch.randn(3, 2, 6, 16, generator=g), torch.randn(3, 2, 1, 16, generator=g) * 5
    cache.update(prompt, prompt, 0)
    cache.update(step, step, 0)
    layer = cache.layers[0]
    inputs = layer.attention_inputs(_mask(7))
    assert inputs.new_tokens is not None and inputs.new_tokens.start == 6
    assert torch.equal(layer._key_scales[:, :, 6], torch.zeros(3, 2, dtype=torch.bfloat16))  # not written yet
    layer.dequantized()
    codes, scales = torch.zeros(3, 2, 1, 16, dtype=torch.uint8), torch.zeros(3, 2, 1, dtype=torch.bfloat16)
    reference.quantize_append_token_head_ref(step, step, codes, codes.clone(), scales, scales.clone(), 0, layer.fmt)
    assert torch.equal(layer.key_bytes[:, :, 6:7], codes) and torch.equal(layer._key_scales[:, :, 6:7], scales)
