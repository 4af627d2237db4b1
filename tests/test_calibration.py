"""Dataset calibration: observed statistics, observers, datasets, round trip, bad input."""

import json

import pytest
import torch
from helpers import tiny_llama
from transformers import DynamicCache

from hf_fp8cache import KVScales, calibrate, load_kv_scales
from hf_fp8cache.calibration import Observer
from hf_fp8cache.formats import FORMATS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
E4M3 = FORMATS["e4m3fn"]


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2):
    """A tiny random Llama (GQA, 3 layers) that speaks SmolLM2's tokenizer."""
    _, tokenizer = smollm2
    model = tiny_llama(seed=11, layers=3, heads=4, kv_heads=2)
    model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Memory bandwidth, not arithmetic, bounds the decode step of a language model.",
         "Short one.", "A fourth sample, of middling length, about caches and keys."]  # fmt: skip


def _reference_amax(model, tokenizer, texts):
    """Per-layer, per-head amax of the post-RoPE K and V, from DynamicCache runs one text at a time."""
    stats = {}
    for text in texts:
        cache = DynamicCache(config=model.config)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            for kind, x in (("k", layer.keys), ("v", layer.values)):
                amax = x.abs().amax(dim=(0, 2, 3))
                stats[(kind, i)] = torch.maximum(stats.get((kind, i), amax), amax)
    return stats


@pytest.mark.parametrize("batch_size", [1, 3])
def test_amax_observer_gives_amax_over_fmax_exactly(model_and_tokenizer, torch_path, batch_size):
    model, tokenizer = model_and_tokenizer
    if batch_size > 1:  # make padding loud: if a padded position were observed, the amax would explode
        with torch.no_grad():
            model.get_input_embeddings().weight[tokenizer.pad_token_id] *= 0
            model.get_input_embeddings().weight[tokenizer.pad_token_id] += 1000.0
    expected = _reference_amax(model, tokenizer, TEXTS)
    for strategy in ("tensor", "attn_head"):
        scales = calibrate(model, tokenizer, TEXTS, strategy=strategy, observer="amax", batch_size=batch_size,
                           progress=False)  # fmt: skip
        for i in range(3):
            k = expected[("k", i)] if strategy == "attn_head" else expected[("k", i)].amax().reshape(1)
            v = expected[("v", i)] if strategy == "attn_head" else expected[("v", i)].amax().reshape(1)
            torch.testing.assert_close(scales.key[i], k / 448.0, rtol=1e-6 if batch_size > 1 else 0, atol=0)
            torch.testing.assert_close(scales.value[i], v / 448.0, rtol=1e-6 if batch_size > 1 else 0, atol=0)
        assert scales.key[0].shape == ((2,) if strategy == "attn_head" else (1,))


def test_mse_observer_picks_the_lowest_error_candidate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, 16, generator=g) * torch.tensor([1.0, 0.01]).view(1, 2, 1)
    x[0, 0, 0] = 80.0  # one outlier in head 0
    observer = Observer("k")
    observer.update(x)
    chosen = observer.scale(E4M3, "attn_head", "mse")
    amax_scale = observer.scale(E4M3, "attn_head", "amax")
    values = x.transpose(0, 1).reshape(2, -1)

    def mse(scale):  # independent round trip in float64
        s = scale.double()[:, None]
        q = (values.double() / s).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * s
        return (q - values.double()).pow(2).mean(1)

    assert (mse(chosen) <= mse(amax_scale) + 1e-30).all()
    for alpha in (0.5, 0.75, 1.0, 1.25, 2.0):
        assert (mse(chosen) <= mse(amax_scale * alpha) * (1 + 1e-6)).all()


def test_include_query_and_round_trip(model_and_tokenizer, tmp_path, torch_path):
    model, tokenizer = model_and_tokenizer
    scales = calibrate(model, tokenizer, TEXTS, strategy="attn_head", include_query=True, progress=False)
    assert scales.query is not None and scales.query[2].shape == (4,)  # one per query head
    assert model.config._attn_implementation != "hf_fp8cache_calibration"  # restored
    scales.save_pretrained(tmp_path)
    assert load_kv_scales(tmp_path) == scales


def test_local_files_and_memory_is_bounded(model_and_tokenizer, tmp_path, torch_path):
    model, tokenizer = model_and_tokenizer
    (tmp_path / "data.txt").write_text("\n\n".join(TEXTS * 3))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    chats = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "Yes."}]} for t in TEXTS]
    (tmp_path / "chat.json").write_text(json.dumps(chats))
    from_txt = calibrate(model, tokenizer, str(tmp_path / "data.txt"), observer="amax", progress=False)
    from_jsonl = calibrate(model, tokenizer, str(tmp_path / "data.jsonl"), observer="amax", progress=False)
    assert from_txt == from_jsonl  # the same texts (3 copies do not change an amax)
    from_chat = calibrate(model, tokenizer, str(tmp_path / "chat.json"), progress=False)
    assert isinstance(from_chat, KVScales) and from_chat.num_layers == 3
    long_text = [" ".join(["caches"] * 3000)]
    from hf_fp8cache.calibration import observe

    observation = observe(model, tokenizer, long_text, max_seq_len=4096, progress=False)
    assert max(o.samples.shape[1] for o in observation.observers.values()) <= 1 << 16


def test_bad_input(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="shorter than 2 tokens"):
        calibrate(model, tokenizer, ["", "a"], progress=False)
    with pytest.raises(ValueError, match="'median'"):
        calibrate(model, tokenizer, TEXTS, observer="median", progress=False)
    with pytest.raises(ValueError, match="'channel'"):
        calibrate(model, tokenizer, TEXTS, strategy="channel", progress=False)

    class NoAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.config = model.config

        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, cache=None, use_cache=None):
            return None

    with pytest.raises(ValueError, match="no attention layer"):
        calibrate(NoAttention(), tokenizer, TEXTS, progress=False)
