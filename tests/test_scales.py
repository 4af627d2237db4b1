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
