"""Generate with an FP8 KV cache on the embedded SmolLM2-135M-Instruct (offline), and compare with bf16 bytes.

python examples/generate.py
"""

import torch

from hf_fp8cache import FP8Cache, cache_keyword, load_model_and_tokenizer

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = load_model_and_tokenizer(device=device)  # or a Hub id / local dir as the first argument
messages = [{"role": "user", "content": "Why does an FP8 KV cache let a GPU serve longer contexts?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
inputs = inputs.to(device)

# Scales from the first prefill, one per KV head (vLLM's calculate_kv_scales=True rule).
cache = FP8Cache(config=model.config, calculate_kv_scales=True, strategy="attn_head")
# transformers <= 5.23 calls it past_key_values=, 5.24 also cache=
out = model.generate(**inputs, max_new_tokens=60, do_sample=False, **{cache_keyword(model): cache})
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
bf16_bytes = sum(2 * layer.keys.numel() * 2 for layer in cache.layers)
print(f"{cache.get_seq_length()} tokens: {cache.nbytes:,} bytes of FP8 KV cache vs {bf16_bytes:,} in bf16")
