"""Reading KV scales from checkpoints of every layout (local and Hub), validation, and writing them back."""

import json
import logging
import re

import pytest
import torch
from helpers import fake_quant_cache, tiny_llama, write_checkpoint

from hf_fp8cache import FP8Cache, KVScales, load_kv_scales, save_kv_scales
from hf_fp8cache.integration import cache_keyword


@pytest.mark.parametrize(
    "layout, strategy",
    [("compressed-tensors", "tensor"), ("compressed-tensors", "attn_head"), ("modelopt", "tensor"),
     ("legacy-output", "tensor")],  # per-head scales exist only in compressed-tensors
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shards", [1, 2])
def test_layouts_load_exactly(tmp_path, layout, strategy, dtype, shards):
    k, v = write_checkpoint(tmp_path, strategy=strategy, dtype=dtype, layout=layout, shards=shards)
    scales = load_kv_scales(tmp_path)
    assert scales.strategy == strategy and scales.num_layers == 4
    for i in range(4):
        assert torch.equal(scales.key[i], k[i].float()) and torch.equal(scales.value[i], v[i].float())


def test_single_kv_scale_serves_both(tmp_path):
    k, _ = write_checkpoint(tmp_path, layout="legacy-kv")
    scales = load_kv_scales(tmp_path)
    assert all(
        torch.equal(scales.key[i], k[i].float()) and torch.equal(scales.value[i], k[i].float()) for i in range(4)
    )


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model.", ""])
def test_prefixes_matched_by_layer_index(tmp_path, prefix):
    k, v = write_checkpoint(tmp_path, prefix=prefix, strategy="attn_head")
    scales = load_kv_scales(tmp_path)
    assert torch.equal(scales.value[3], v[3].float()) and scales.num_heads == 2


def test_fp8_weights_present(tmp_path):
    k, _ = write_checkpoint(tmp_path, fp8_weights=True, shards=2)
    assert torch.equal(load_kv_scales(tmp_path).key[2], k[2].float())


def test_weight_shards_without_scales_are_never_opened(tmp_path):
    write_checkpoint(tmp_path, shards=2)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"not a safetensors file")  # the 16 GB of weights
    assert load_kv_scales(tmp_path).num_layers == 4


def test_garbage_q_scale_is_ignored_with_a_warning(tmp_path, caplog):
    k, _ = write_checkpoint(tmp_path, q_scale=1e28)
    with caplog.at_level(logging.WARNING):
        scales = load_kv_scales(tmp_path)
    assert scales.query is None and torch.equal(scales.key[0], k[0].float())
    assert "q_scale" in caplog.text
    write_checkpoint(tmp_path / "nan", q_scale=float("nan"))
    assert load_kv_scales(tmp_path / "nan").query is None
    write_checkpoint(tmp_path / "good", q_scale=0.02)
    assert load_kv_scales(tmp_path / "good").query[1].tolist() == pytest.approx([0.02])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.5])
def test_bad_kv_scale_names_the_tensor(tmp_path, bad):
    write_checkpoint(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.self_attn.v_scale"] = torch.tensor([bad], dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.v_scale must be finite and positive"):
        load_kv_scales(tmp_path)


@pytest.mark.parametrize("bad", [1e-40, 1e36])
def test_out_of_range_kv_scale_names_the_tensor(tmp_path, bad):
    """A float32 checkpoint scale whose reciprocal (1e-40) or dequantized values (1e36) overflow is refused."""
    write_checkpoint(tmp_path, dtype=torch.float32)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.self_attn.k_scale"] = torch.tensor([bad], dtype=torch.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.self_attn\.k_scale = .* is outside \[1\.18e-38, 5\.93e\+33\]"
    ):
        load_kv_scales(tmp_path)


def test_missing_layer_is_an_error_unless_unit_fallback(tmp_path, caplog):
    k, _ = write_checkpoint(tmp_path, skip_layers=(1, 3))
    with pytest.raises(ValueError, match=r"no K/V scales for layer\(s\) \[1, 3\]"):
        load_kv_scales(tmp_path)
    with caplog.at_level(logging.WARNING):
        scales = load_kv_scales(tmp_path, missing="unit")
    assert scales.key[1].tolist() == [1.0] and torch.equal(scales.key[2], k[2].float()) and "[1, 3]" in caplog.text


def test_other_bad_checkpoints(tmp_path):
    write_checkpoint(tmp_path / "none", layout="none")
    with pytest.raises(ValueError, match="no KV cache scales found; looked for"):
        load_kv_scales(tmp_path / "none")
    write_checkpoint(tmp_path / "zp", zero_points=0.5)
    with pytest.raises(ValueError, match="k_zero_point is not all zeros"):
        load_kv_scales(tmp_path / "zp")
    write_checkpoint(tmp_path / "zp0", zero_points=0.0)
    assert load_kv_scales(tmp_path / "zp0").num_layers == 4
    write_checkpoint(tmp_path / "heads", strategy="attn_head", kv_heads=3)
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    config["num_key_value_heads"] = 8
    (tmp_path / "heads" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"per-head scales have \[3\] entries but the model has 8 KV heads"):
        load_kv_scales(tmp_path / "heads")
    write_checkpoint(tmp_path / "dyn")
    config = json.loads((tmp_path / "dyn" / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"]["dynamic"] = True
    (tmp_path / "dyn" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dynamic"):
        load_kv_scales(tmp_path / "dyn")


def test_checkpoint_for_another_model_is_refused(tmp_path):
    write_checkpoint(tmp_path, layers=6)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layer\(s\) \[4, 5\] but the model has 4 layers"):
        load_kv_scales(tmp_path)
    model = tiny_llama()  # 2 layers
    write_checkpoint(tmp_path / "four", layers=4)
    with pytest.raises(ValueError, match="for 4 layers but the model has 2"):
        FP8Cache.from_pretrained(tmp_path / "four", config=model.config)


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_save_load_round_trip_is_exact(tmp_path, strategy):
    width = 1 if strategy == "tensor" else 2
    g = torch.Generator().manual_seed(0)
    scales = KVScales([torch.rand(width, generator=g) + 1e-3 for _ in range(3)],
                      [torch.rand(width, generator=g) + 1e-3 for _ in range(3)], strategy)  # fmt: skip
    scales.save_pretrained(tmp_path / "fresh")
    assert load_kv_scales(tmp_path / "fresh") == scales
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fresh" / "kv_scales.safetensors"), framework="pt") as f:
        shape = f.get_tensor("model.layers.1.self_attn.k_scale").shape
    assert tuple(shape) == ((1,) if strategy == "tensor" else (2, 1, 1))  # what compressed-tensors writes


def test_save_into_existing_model_directories(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "single")  # model.safetensors, no index
    scales = KVScales([0.5, 0.25], [0.125, 2.0])
    save_kv_scales(scales, tmp_path / "single")
    index = json.loads((tmp_path / "single" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.1.self_attn.v_scale"] == "kv_scales.safetensors"
    assert index["weight_map"]["model.norm.weight"] == "model.safetensors"
    config = json.loads((tmp_path / "single" / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["strategy"] == "tensor"
    assert config["num_hidden_layers"] == 2  # the rest of the config is kept
    assert load_kv_scales(tmp_path / "single") == scales
    save_kv_scales(KVScales([1.0, 1.0], [1.0, 1.0]), tmp_path / "single")  # rewriting our own file is fine
    assert load_kv_scales(tmp_path / "single") == KVScales([1.0, 1.0], [1.0, 1.0])

    write_checkpoint(tmp_path / "quantized", layers=2, fp8_weights=True, layout="none")
    config = json.loads((tmp_path / "quantized" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                     "config_groups": {"group_0": {"targets": ["Linear"]}}}  # fmt: skip
    (tmp_path / "quantized" / "config.json").write_text(json.dumps(config))
    save_kv_scales(scales, tmp_path / "quantized")
    config = json.loads((tmp_path / "quantized" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"] == {"group_0": {"targets": ["Linear"]}} and config["format"] == "float-quantized"
    assert load_kv_scales(tmp_path / "quantized") == scales

    write_checkpoint(tmp_path / "has", layers=2, shards=2)
    with pytest.raises(ValueError, match="already has KV scales"):
        save_kv_scales(scales, tmp_path / "has")
    (tmp_path / "awq").mkdir()
    (tmp_path / "awq" / "config.json").write_text(
        json.dumps({"num_hidden_layers": 2, "quantization_config": {"quant_method": "awq"}})
    )
    with pytest.raises(ValueError, match="'awq'"):
        save_kv_scales(scales, tmp_path / "awq")


def test_generate_with_checkpoint_scales_equals_given_scales(tmp_path, torch_path):
    model = tiny_llama()
    scales = KVScales([[0.02, 0.05], [0.03, 0.01]], [[0.04, 0.02], [0.01, 0.06]], "attn_head")
    scales.save_pretrained(tmp_path)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    keyword = cache_keyword(model)
    from_checkpoint = model.generate(**kw, **{keyword: FP8Cache.from_pretrained(tmp_path, config=model.config)})
    given = model.generate(**kw, **{keyword: FP8Cache(model.config, scales=scales)})
    assert torch.equal(from_checkpoint, given)
    oracle = fake_quant_cache(model.config)
    for i, layer in enumerate(oracle.layers):
        layer.key_scale, layer.value_scale = scales.key[i], scales.value[i]
    assert torch.equal(from_checkpoint, model.generate(**kw, **{keyword: oracle}))


def test_rocm_fnuz_storage_doubles_e4m3fn_scales(tmp_path):
    write_checkpoint(tmp_path, layers=2)
    fn = FP8Cache.from_pretrained(tmp_path)
    fnuz = FP8Cache.from_pretrained(tmp_path, kv_cache_dtype="fp8_e4m3fnuz")
    assert fnuz.format.name == "e4m3fnuz"
    assert torch.equal(fnuz.scales.key[1], fn.scales.key[1] * 2)


def test_written_checkpoint_parses_as_compressed_tensors_and_still_loads(tmp_path):
    """compressed-tensors' own config parser (the one vLLM uses) accepts what we write, and transformers still
    loads the model from the directory with identical weights."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    model.save_pretrained(tmp_path)
    KVScales([[0.5, 0.25]] * 2, [[0.125, 2.0]] * 2, "attn_head").save_pretrained(tmp_path)
    config = QuantizationConfig.model_validate(
        json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    )
    scheme = config.kv_cache_scheme
    assert (scheme.num_bits, scheme.type, scheme.strategy, scheme.symmetric, scheme.dynamic) == (
        8, "float", "attn_head", True, False
    )  # fmt: skip
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize(
    "filename, text, problem",
    [("config.json", '{"num_hidden_layers": 4,', r"not valid JSON \(Expecting property name"),
     ("model.safetensors.index.json", '{"weight_map": {', r"not valid JSON \(Expecting property name"),
     ("hf_quant_config.json", "", r"not valid JSON \(Expecting value: line 1 column 1"),
     ("config.json", "[4]", "expected a JSON object, got a JSON list"),
     ("model.safetensors.index.json", '{"weight_map": ["a"]}', "'weight_map' must map tensor names to shard file")],
)  # fmt: skip
def test_malformed_json_names_the_file(tmp_path, filename, text, problem):
    write_checkpoint(tmp_path, shards=2, layout="modelopt")
    (tmp_path / filename).write_text(text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / filename))}: {problem}") as caught:
        load_kv_scales(tmp_path)
    assert isinstance(caught.value.__cause__, json.JSONDecodeError) == problem.startswith("not valid JSON")


@pytest.mark.parametrize("keep", [0, 7, 100, -1])  # empty, shorter than the header length, mid-header, last byte cut
def test_truncated_scale_shard_names_the_file(tmp_path, keep):
    from safetensors import SafetensorError

    write_checkpoint(tmp_path, shards=2)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:keep])
    problem = "not a readable safetensors file .*; it is truncated or corrupt"
    with pytest.raises(ValueError, match=f"^{re.escape(str(shard))}: {problem}$") as caught:
        load_kv_scales(tmp_path)
    assert isinstance(caught.value.__cause__, SafetensorError)


def test_shard_listed_in_the_index_but_missing_is_named(tmp_path):
    write_checkpoint(tmp_path, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=f"^{re.escape(str(tmp_path))}: model-00002-of-00002.safetensors is listed in "
        r"model\.safetensors\.index\.json but does not exist$",
    ):
        load_kv_scales(tmp_path)


def test_saving_into_a_directory_with_malformed_files_names_them(tmp_path):
    scales = KVScales([0.5, 0.25], [0.125, 2.0])
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'config' / 'config.json'))}: not valid JSON"):
        save_kv_scales(scales, tmp_path / "config")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "model.safetensors.index.json").write_text('{"weight_map": 1}')
    with pytest.raises(ValueError, match="model.safetensors.index.json: 'weight_map' must map tensor names"):
        save_kv_scales(scales, tmp_path / "index")
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "model.safetensors").write_bytes(b"\x10")
    with pytest.raises(ValueError, match=r"single/model\.safetensors: not a readable safetensors file"):
        save_kv_scales(scales, tmp_path / "single")
