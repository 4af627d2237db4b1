import pytest
import torch

from hf_fp8cache import KVScales


def test_shapes_are_normalised():
    s = KVScales([torch.tensor([[[0.5]], [[2.0]]]), [1.0, 3.0]], [torch.tensor([1.0, 2.0]), [4.0, 5.0]], "attn_head")
    assert s.key[0].shape == (2,) and s.key[0].dtype == torch.float32 and s.num_heads == 2 and s.num_layers == 2
    t = KVScales([torch.tensor(0.25, dtype=torch.bfloat16)], [torch.tensor([3.0])])
    assert t.key[0].tolist() == [0.25] and t.num_heads is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_non_finite_or_non_positive_rejected_naming_layer(bad):
    with pytest.raises(ValueError, match=r"v_scale of layer 1 .*" + ("nan" if bad != bad else "")):
        KVScales([1.0, 1.0], [1.0, bad])


def test_tensor_strategy_needs_one_element():
    with pytest.raises(ValueError, match="k_scale of layer 0 has 2 elements"):
        KVScales([[1.0, 2.0]], [1.0])


def test_mismatched_lengths_and_strategy():
    with pytest.raises(ValueError, match="2 key scales but 1 value"):
        KVScales([1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="'per_channel'"):
        KVScales([1.0], [1.0], strategy="per_channel")


def test_check_model():
    s = KVScales([[1.0, 2.0]] * 3, [[1.0, 2.0]] * 3, "attn_head")
    s.check_model(3, 2)
    with pytest.raises(ValueError, match="for 3 layers but the model has 4"):
        s.check_model(4, 2)
    with pytest.raises(ValueError, match="for 2 KV heads but the model has 8"):
        s.check_model(3, 8)


@pytest.mark.parametrize("bad", [1e-44, 1e-39, 1e38, 1e34])
def test_scales_whose_arithmetic_overflows_are_refused(bad):
    """1e-44: 1 / scale is inf in float32 and exact zeros became NaN; 1e38: every K/V became zero and the largest
    code dequantized to inf."""
    with pytest.raises(ValueError, match=r"k_scale of layer 0 = .* is outside \[1.18e-38, 5.93e\+33\]"):
        KVScales([bad], [1.0])


@pytest.mark.parametrize("kv_cache_dtype, bad", [("fp8", 1e-6), ("fp8", 1e6), ("fp8_e5m2", 1e-8)])
def test_a_cache_warns_about_scales_its_format_cannot_use(kv_cache_dtype, bad):
    """e4m3 with scale 1e-6 stores at most 4.5e-4 (every real K saturates); with 1e6 its smallest step is ~2e3
    (every real K rounds to zero)."""
    import warnings

    from hf_fp8cache import FP8Cache

    with pytest.warns(UserWarning, match=r"v_scale of layer 1 .* outside the magnitudes of real K/V"):
        FP8Cache(kv_cache_dtype=kv_cache_dtype, scales=KVScales([0.05, 0.05], [0.05, bad]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FP8Cache(kv_cache_dtype=kv_cache_dtype, scales=KVScales([0.05, 1e-4], [2.0, 0.05]))  # plausible: silent


def test_onthefly_scale_of_values_too_small_for_a_usable_scale_falls_back_to_one():
    """amax 1e-37 gives amax / 200 ~ 5e-40, whose reciprocal overflows (exact zeros would become NaN)."""
    from hf_fp8cache.formats import resolve_format
    from hf_fp8cache.scales import ONTHEFLY_HEADROOM, onthefly_scale

    x = torch.zeros(1, 2, 3, 4)
    x[0, 0, 1, 2] = 1e-37
    fmt = resolve_format("fp8")
    assert onthefly_scale(x, fmt, "tensor", ONTHEFLY_HEADROOM["key"]).tolist() == [1.0]
    x[0, 1, 0, 0] = 20.0
    per_head = onthefly_scale(x, fmt, "attn_head", ONTHEFLY_HEADROOM["key"])
    assert per_head.tolist() == pytest.approx([1.0, 20.0 / 200])


def test_later_arguments_are_keyword_only():
    from hf_fp8cache import FP8Cache, FP8StaticCache, attach

    with pytest.raises(TypeError, match="positional argument"):
        KVScales([1.0], [1.0], "tensor", [1.0])
    with pytest.raises(TypeError, match="positional argument"):
        FP8Cache(None, "fp8")
    with pytest.raises(TypeError, match="positional argument"):
        FP8StaticCache(None, 8, 2)
    with pytest.raises(TypeError, match="positional argument"):
        attach(None, True)
