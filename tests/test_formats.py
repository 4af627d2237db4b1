import pytest
import torch
from hf_fp8cache.kernels import formats as kernel_formats

from hf_fp8cache.formats import FORMATS, INT8, resolve_format, resolve_kv_cache_dtype


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fp8", "e4m3fn"),
        ("fp8_e4m3", "e4m3fn"),
        ("FP8_E5M2", "e5m2"),
        ("fp8_e4m3fnuz", "e4m3fnuz"),
        ("e5m2fnuz", "e5m2fnuz"),
        (torch.float8_e5m2, "e5m2"),
    ],  # fmt: skip
)
def test_aliases(name, expected):
    assert resolve_format(name).name == expected


def test_auto_is_e4m3fn_off_rocm():
    assert resolve_format("auto").name == ("e4m3fnuz" if torch.version.hip else "e4m3fn")


@pytest.mark.parametrize(
    "name, fmax, bias, step",
    [
        ("e4m3fn", 448.0, 7, 2.0**-9),
        ("e5m2", 57344.0, 15, 2.0**-16),
        ("e4m3fnuz", 240.0, 8, 2.0**-10),
        ("e5m2fnuz", 57344.0, 16, 2.0**-17),
    ],  # fmt: skip
)
def test_derived_constants(name, fmax, bias, step):
    fmt = FORMATS[name]
    assert (fmt.max, fmt.bias, fmt.subnormal_step) == (fmax, bias, step)
    # the smallest subnormal code (0x01) is exactly one step
    assert torch.tensor([1], dtype=torch.uint8).view(fmt.dtype).float().item() == step


@pytest.mark.parametrize("bad", ["fp16", "int4", "", "fp8_e3m4"])
def test_unknown_names_are_rejected_by_name(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[")):
        resolve_format(bad)


@pytest.mark.parametrize(
    "name, fmt, strategy",
    [("fp8_per_token_head", FORMATS["e4m3fn"], "token_head"), ("INT8_per_token_head", INT8, "token_head"),
     ("int8", INT8, None), (torch.int8, INT8, None), ("fp8_e5m2", FORMATS["e5m2"], None)],
)  # fmt: skip
def test_vllm_per_token_head_names_give_format_and_strategy(name, fmt, strategy):
    assert resolve_kv_cache_dtype(name) == (fmt, strategy)


def test_a_format_alone_refuses_a_name_that_also_sets_the_strategy():
    with pytest.raises(ValueError, match="'int8_per_token_head' names a format and strategy='token_head'"):
        resolve_format("int8_per_token_head")


def test_non_fp8_dtype_rejected():
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_format(torch.bfloat16)


def test_kernels_know_the_same_formats_by_canonical_name_only():
    assert FORMATS is kernel_formats.FORMATS  # the library's table is the kernels' one
    assert all(kernel_formats.format_named(name) is fmt for name, fmt in FORMATS.items())
    with pytest.raises(ValueError, match="'fp8'.*'e4m3fn', 'e5m2', 'e4m3fnuz', 'e5m2fnuz'"):
        kernel_formats.format_named("fp8")  # an alias is the library's business (resolve_format)
