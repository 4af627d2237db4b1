"""A text-generation pipeline over several prompts, each prompt with its own fresh FP8 cache.

transformers reuses ONE cache object for every prompt of a pipeline call, so `pipe(prompts, past_key_values=
FP8Cache())` would carry the first prompt's state into the second. `attach(model)` instead gives every
generate call that brings no cache a fresh FP8 cache.

    python examples/pipeline.py
"""

import torch
from transformers import pipeline

from hf_fp8cache import attach, detach, load_model_and_tokenizer

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = load_model_and_tokenizer(device=device)
attach(model, kv_cache_dtype="fp8", calculate_kv_scales=True)  # every later generate gets a fresh FP8 cache

pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
prompts = ["The three primary colors are", "A CPU cache is", "The capital of Italy is"]
for prompt, result in zip(prompts, pipe(prompts, max_new_tokens=20, do_sample=False, return_full_text=False)):
    print(f"{prompt!r} -> {result[0]['generated_text']!r}")

detach(model)  # model.generate is the model's own again
