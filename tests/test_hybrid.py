"""Hybrid models in FP8Cache: linear-attention / state-space / conv layers keep transformers' own states, attention
layers keep FP8 K/V, KV-shared layers keep nothing -- built from the config exactly as transformers' DynamicCache
builds its layers. Tokens equal an independent fake-quantized oracle (``oracle.fake_fp8_hybrid_cache``); states equal
bit for bit; scales, checkpoints, calibration, eval and inspect go by decoder layer index."""

import shutil

import pytest
import torch
from helpers import left_padded_prompts
from oracle import fake_fp8_cache, fake_fp8_hybrid_cache
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from hf_fp8cache import FP8Cache, FP8StaticCache, KVScales, calibrate
from hf_fp8cache.cache_base import kv_layer_indices
from hf_fp8cache.cache_layer import FP8CacheLayer
from hf_fp8cache.contract import ATTENTION_NAME
from hf_fp8cache.hybrid import FP8HybridLayer
from hf_fp8cache.integration import cache_keyword
from hf_fp8cache.static_cache import FP8StaticLayer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
LINEAR_FULL = ["linear_attention", "full_attention"] * 2
# name: (model_type, its tiny sizes). Every family runs with SDPA and with our attention (all pass plain attention
# kwargs to it); each exists in transformers 5.17 and 5.24 (checked by running this file under both).
FAMILIES = {
    "qwen3-next": ("qwen3_next", dict(num_hidden_layers=4, layer_types=LINEAR_FULL, linear_num_value_heads=2,
                   linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=2,
                   num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "qwen3.5": ("qwen3_5_text", dict(num_hidden_layers=4, layer_types=LINEAR_FULL, linear_num_value_heads=2,
                linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)),
    "falcon-h1": ("falcon_h1", dict(num_hidden_layers=2, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                  mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16)),  # every layer: mamba + attention
    "granite-4": ("granitemoehybrid", dict(num_hidden_layers=4, layer_types=["mamba", "attention"] * 2,
                  num_local_experts=2, num_experts_per_tok=1, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8,
                  mamba_chunk_size=16)),
    "jamba": ("jamba", dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
              expert_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=8, use_mamba_kernels=False)),
    "lfm2": ("lfm2", dict(num_hidden_layers=4, layer_types=["conv", "full_attention"] * 2, block_ff_dim=64,
             block_auto_adjust_ff_dim=False)),
    "gemma-3n": ("gemma3n_text", dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                 num_kv_shared_layers=2, sliding_window=6, hidden_size_per_layer_input=8,
                 vocab_size_per_layer_input=256, laurel_rank=4, altup_num_inputs=2,
                 activation_sparsity_pattern=[0.0] * 4, intermediate_size=[64] * 4)),  # layers 2, 3 share K/V
}  # fmt: skip
CASES = [(family, attention) for family in FAMILIES for attention in ("sdpa", ATTENTION_NAME)]


def _config(family: str, **overrides):
    model_type, sizes = FAMILIES[family]
    return AutoConfig.for_model(model_type, **{**SIZES, **sizes, **overrides})


def _model(family: str, attention: str = "sdpa", **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(family, **overrides), attn_implementation=attention).eval()


def _prompts(batch=2, length=9):
    """Left-padded prompts (row 1 padded by 2 tokens)."""
    return left_padded_prompts(batch, length, pads=lambda row: 2 * row, seed=1)


def _generate(model, cache, ids=None, mask=None, new_tokens=5, **kwargs):
    if ids is None:
        ids, mask = _prompts()
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **{cache_keyword(model): cache}, **kwargs)  # fmt: skip


@pytest.mark.parametrize("family, attention", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_generate_equals_the_oracle(family, attention, torch_path):
    model = _model(family, attention)
    cache = FP8Cache(model.config)
    logits = dict(output_logits=True, return_dict_in_generate=True)
    ours, oracle = (_generate(model, c, **logits) for c in (cache, fake_fp8_hybrid_cache(model.config)))
    assert torch.equal(ours.sequences, oracle.sequences)
    if attention == "sdpa":  # FP8 bytes were read: the tiny models' tokens survive them, their logits do not
        assert not torch.equal(
            ours.logits[-1], _generate(model, DynamicCache(config=model.config), **logits).logits[-1]
        )
    _assert_layers_as_transformers(cache.layers, DynamicCache(config=model.config).layers, FP8CacheLayer)
    assert cache.kv_layers and cache.nbytes > 0


def _assert_layers_as_transformers(ours: list, theirs: list, kv_layer: type) -> None:
    """One layer per transformers layer; transformers' own class wherever no K/V is kept."""
    assert len(ours) == len(theirs)
    for layer, their in zip(ours, theirs):
        assert isinstance(layer, (kv_layer, FP8HybridLayer)) or type(layer) is type(their), (type(layer), type(their))
        assert isinstance(layer, LinearAttentionCacheLayerMixin) == isinstance(their, LinearAttentionCacheLayerMixin)


@pytest.mark.parametrize("family, attention", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_the_static_cache_builds_the_same_layers_and_equals_the_oracle(family, attention, torch_path):
    model = _model(family, attention)
    ids, mask = _prompts()
    cache = FP8StaticCache(model.config, max_cache_len=ids.shape[1] + 5)
    ours, oracle = (_generate(model, c, ids, mask) for c in (cache, fake_fp8_hybrid_cache(model.config)))
    assert torch.equal(ours, oracle)
    theirs = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 5).layers
    _assert_layers_as_transformers(cache.layers, theirs, FP8StaticLayer)
    assert cache.kv_layers and cache.allocated_nbytes > 0


@pytest.mark.parametrize("family", ["qwen3-next", "falcon-h1"])
def test_continued_generate_from_a_returned_cache(family, torch_path):
    model = _model(family)
    ids, mask = _prompts()
    runs = []
    for cache in (FP8Cache(model.config), fake_fp8_hybrid_cache(model.config)):
        first = _generate(model, cache, ids, mask, new_tokens=3, return_dict_in_generate=True)
        returned = getattr(first, cache_keyword(model))
        assert returned is cache
        longer = torch.cat([mask, torch.ones_like(first.sequences[:, ids.shape[1] :])], dim=1)
        runs.append(_generate(model, returned, first.sequences, longer, new_tokens=4))
    assert torch.equal(*runs)
    assert runs[0].shape[1] == ids.shape[1] + 7


def _states(layer) -> list[torch.Tensor]:
    return [s for states in (layer.conv_states, layer.recurrent_states) for s in states.values() if s is not None]


@pytest.mark.parametrize("family", ["qwen3-next", "jamba", "falcon-h1", "lfm2"])
def test_states_equal_transformers_step_for_step_while_kv_is_fp8(family, torch_path):
    """Teacher-forced steps: every linear-attention / SSM / conv state is bit-identical to the oracle's (a plain
    DynamicCache whose own state layers are untouched) and, before the first attention layer, to a plain
    DynamicCache's; the K/V layers hold FP8 bytes whose values equal the oracle's fake-quantized K/V."""
    model = _model(family)
    ids, mask = _prompts(batch=2, length=14)
    ours, oracle, plain = FP8Cache(model.config), fake_fp8_hybrid_cache(model.config), DynamicCache(config=model.config)
    first_kv = kv_layer_indices(model.config)[0]
    keyword = cache_keyword(model)
    for start, stop in ((0, 8), (8, 9), (9, 10), (10, 12), (12, 13)):  # prefill, decode steps, a 2-token chunk
        for cache in (ours, oracle, plain):
            model(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop], use_cache=True, **{keyword: cache})
        for i, (layer, twin, bare) in enumerate(zip(ours.layers, oracle.layers, plain.layers)):
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                assert _states(layer) and len(_states(layer)) == len(_states(twin))
                assert all(torch.equal(a, b) for a, b in zip(_states(layer), _states(twin))), (family, i, stop)
                if family != "falcon-h1" and i < first_kv:  # its states see no FP8 yet: equal to a bf16 cache's
                    assert all(torch.equal(a, b) for a, b in zip(_states(layer), _states(bare)))
            if isinstance(layer, (FP8CacheLayer, FP8HybridLayer)):
                assert layer.keys.dtype == torch.float8_e4m3fn and layer.keys.shape == twin.keys.shape
                assert torch.equal(layer.keys.float().to(twin.keys.dtype), twin.keys)  # unit scales: the values


def test_kv_sharing_layers_hold_nothing_and_producers_survive_the_next_update(torch_path):
    """Gemma 3n: layers 2 and 3 read the K/V layers 0 (sliding) and 1 (full) returned. On the dequantize path each
    producer dequantizes into a workspace of its own: with the shared one, layer 1's update could overwrite what
    layer 2 reads once the workspace stops growing (not reached by these short runs: checked only structurally)."""
    model = _model("gemma-3n")
    cache = FP8Cache(model.config)
    _generate(model, cache)
    assert len(cache.kv_layers) == 2 and all(layer.nbytes > 0 for layer in cache.kv_layers)
    assert all(not isinstance(layer, FP8CacheLayer) for layer in cache.layers[2:])
    assert kv_layer_indices(model.config) == [0, 1]
    assert len(cache._shared_kv_workspaces) == 2 and cache.workspace_nbytes > cache._workspace.nbytes


def test_scales_go_by_layer_index_and_onthefly_scales_match_the_oracle(torch_path):
    model = _model("jamba", ATTENTION_NAME)  # layers: mamba, attention, mamba, attention
    keys, values = [0.5, 0.011, 0.5, 0.013], [0.5, 0.021, 0.5, 0.023]  # 0.5: placeholders of the mamba layers
    cache = FP8Cache(model.config, scales=KVScales(keys, values))
    _generate(model, cache, new_tokens=2)
    assert [(layer.layer_idx, layer.key_scale.item()) for layer in cache.kv_layers] == [
        (1, pytest.approx(0.011)),
        (3, pytest.approx(0.013)),
    ]
    with pytest.raises(ValueError, match="scales are for 2 layers but the model has 4"):
        FP8Cache(model.config, scales=KVScales([0.01, 0.01], [0.01, 0.01]))
    ids, mask = _prompts()
    ours = _generate(model, FP8Cache(model.config, calculate_kv_scales=True))
    oracle = fake_fp8_hybrid_cache(model.config)
    oracle.layers = [fake_fp8_cache(model.config, onthefly_mask=mask).layers[i] if i in (1, 3) else layer
                     for i, layer in enumerate(oracle.layers)]  # fmt: skip
    assert torch.equal(ours, _generate(model, oracle))


def _strip_state_layer_scales(directory, kv_layers):
    """Keep only the K/V layers' scales in a checkpoint written by ``KVScales.save_pretrained``: what llm-compressor
    writes for a hybrid model (its observers sit on attention modules only) and vLLM reads."""
    import json

    from safetensors.torch import load_file, save_file

    path = directory / "kv_scales.safetensors"
    kept = {n: t for n, t in load_file(path).items() if int(n.split("layers.")[1].split(".")[0]) in kv_layers}
    save_file(kept, path, metadata={"format": "pt"})
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != path.name or n in kept}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _byte_tokenizer():
    """A tokenizer with one token per byte (256, the tiny models' vocabulary), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=sorted(alphabet)[0])


def test_calibrate_checkpoint_inspect_and_eval_on_a_hybrid_model(tmp_path, capsys, torch_path):
    from hf_fp8cache.cli import main

    tokenizer = _byte_tokenizer()
    model = _model(
        "qwen3.5"
    )  # layers: linear, full, linear, full (dense: loading a kv-only compressed-tensors MoE fails in transformers)
    texts = [f"Paragraph {i} talks about caches, keys and values, and state-space layers." for i in range(4)]
    scales = calibrate(model, tokenizer, texts, observer="amax", progress=False)
    assert scales.num_layers == 4 and [scales.key[i].item() for i in (0, 2)] == [1.0, 1.0]  # no K/V: placeholders
    assert all(scales.key[i].item() != 1.0 and scales.value[i].item() != 1.0 for i in (1, 3))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    shutil.copytree(tmp_path / "model", tmp_path / "ckpt")
    scales.save_pretrained(tmp_path / "ckpt")
    _strip_state_layer_scales(tmp_path / "ckpt", kv_layer_indices(model.config))
    loaded = FP8Cache.from_pretrained(tmp_path / "ckpt", model.config).scales
    assert all(torch.equal(loaded.key[i], scales.key[i]) for i in (1, 3))

    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert out.count("none: linear_attention layer") == 2 * 2 and "usable: KVScales(layers=4" in out
    _strip_state_layer_scales(tmp_path / "ckpt", [1])  # an attention layer without scales is still refused
    assert main(["inspect", str(tmp_path / "ckpt")]) == 1
    assert "NOT USABLE" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"no K/V scales for layer\(s\) \[3\]"):
        FP8Cache.from_pretrained(tmp_path / "ckpt", model.config)

    (tmp_path / "data.txt").write_text("\n\n".join(texts))
    # the CLI on the model without scales (transformers 5.17 + compressed-tensors would quantize K/V inside the model)
    args = ["calibrate", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.txt"), "--num-samples", "2",
            "--max-seq-len", "32", "--scales-only", "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    args = ["eval", str(tmp_path / "model"), "--sequences", "1", "--seq-len", "24", "--prefix", "16", "--step", "4",
            "--formats", "fp8", "--calibration-samples", "2", "--calibration-seq-len", "32"]  # fmt: skip
    assert main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("e4m3fn")]
    assert len(rows) == 7  # unit, 2 on-the-fly, 4 calibrated
