"""Generate with the compileable FP8StaticCache on the embedded SmolLM2-135M-Instruct (offline), twice, reusing it.

On CUDA, generate compiles the decode steps (CUDA graphs) because every layer of the cache is compileable; the
second prompt reuses the buffers and the compiled graph. On CPU the same code runs eagerly.

python examples/compiled_generate.py
"""

import torch

from hf_fp8cache import FP8StaticCache, cache_keyword, load_model_and_tokenizer

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = load_model_and_tokenizer(device=device)
model.set_attn_implementation("hf_fp8cache")  # decode attention reads the FP8 bytes of the tokens written only
cache = FP8StaticCache(model.config, max_cache_len=256, calculate_kv_scales=True, strategy="attn_head")
for question in ("Why does an FP8 KV cache let a GPU serve longer contexts?", "What is a CUDA graph?"):
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = inputs.to(device)
    cache.reset()  # same buffers, scales recomputed from this prompt
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False, **{cache_keyword(model): cache})
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
print(f"compiled decode steps: {hasattr(model, '_compiled_call')}; FP8 buffers: {cache.allocated_nbytes:,} bytes")
