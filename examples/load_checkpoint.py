"""Use the KV scales of an FP8-KV checkpoint (compressed-tensors / llm-compressor, ModelOpt or legacy layout).

    python examples/load_checkpoint.py CHECKPOINT_DIR_OR_HUB_ID [MODEL]

Only config files, the safetensors index and the shards holding scale tensors are read, so pointing this at a
full 8B checkpoint costs kilobytes. MODEL defaults to the embedded SmolLM2 (its scales must fit: 30 layers, 3
KV heads) -- e.g. a directory written by examples/calibrate.py.
"""

import sys

import torch

from hf_fp8cache import FP8Cache, cache_keyword, load_kv_scales, load_model_and_tokenizer

checkpoint = sys.argv[1]
print(load_kv_scales(checkpoint))  # validated: finite, positive, every layer present, head counts

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = load_model_and_tokenizer(*sys.argv[2:3], device=device)  # MODEL, else the embedded SmolLM2
cache = FP8Cache.from_pretrained(checkpoint, config=model.config)  # checked against the model
inputs = tokenizer("A KV cache stores", return_tensors="pt").to(device)
out = model.generate(**inputs, max_new_tokens=20, do_sample=False, **{cache_keyword(model): cache})
print(tokenizer.decode(out[0], skip_special_tokens=True))
