"""A multi-turn chat over one FP8 cache on the embedded SmolLM2-135M-Instruct (offline): each turn runs only its new
tokens; the earlier turns are read from the FP8 bytes the cache keeps.

python examples/chat.py
"""

import torch

from hf_fp8cache import FP8Cache, load_model_and_tokenizer
from hf_fp8cache.chat import chat_turn

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = load_model_and_tokenizer(device=device)
cache = FP8Cache(model.config)  # one cache for the whole conversation
messages = []
for question in ["Name a prime number.", "And another one?", "Which of the two is larger?"]:
    messages.append({"role": "user", "content": question})
    held = cache.get_seq_length()
    reply = chat_turn(model, tokenizer, messages, cache, max_new_tokens=40, do_sample=False)  # appends the reply
    print(f"user: {question}\nassistant ({held} tokens already cached): {reply}\n")
print(f"{cache.get_seq_length()} tokens in {cache.nbytes:,} bytes of FP8 KV cache")
