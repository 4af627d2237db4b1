"""Calibrate KV scales on the embedded SmolLM2 with built-in offline text, save them, and use them.

    python examples/calibrate.py [OUTPUT_DIR]

With network access, pass a dataset the way vLLM's FP8 KV-cache recipe does:
    calibrate(model, tokenizer, "HuggingFaceH4/ultrachat_200k", num_samples=512, max_seq_len=2048)
"""

import sys
import tempfile

import torch

from hf_fp8cache import FP8Cache, cache_keyword, calibrate, load_kv_scales, load_model_and_tokenizer

output = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="smollm2-fp8-kv-")
device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = load_model_and_tokenizer(device=device)

scales = calibrate(model, tokenizer, None, num_samples=64, max_seq_len=512, strategy="attn_head", observer="mse")
scales.save_pretrained(output)  # kv_scales.safetensors + index + kv_cache_scheme in config.json
print(f"{scales} saved to {output}")

assert load_kv_scales(output) == scales  # exact round trip
cache = FP8Cache(model.config, scales=scales)
inputs = tokenizer("The three laws of thermodynamics are", return_tensors="pt").to(device)
out = model.generate(**inputs, max_new_tokens=30, do_sample=False, **{cache_keyword(model): cache})
print(tokenizer.decode(out[0], skip_special_tokens=True))
