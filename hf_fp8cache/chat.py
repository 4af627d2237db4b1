"""Multi-turn chat over one cache: ``chat_turn`` continues a conversation from the cache the last turn left.

Each turn renders the whole conversation with the tokenizer's chat template and hands ``generate`` the cache of the
previous turns, so only the tokens the cache does not hold yet are run (the new user message, and the template's
markup around it): the history is not prefilled again, it is read from the FP8 bytes.

The cache holds the token ids of the last turn's prompt and reply but the reply's last token (``generate`` never
runs the token it ends with). A template may render a past reply with other ids than ``generate`` produced (a
different end-of-turn token, whitespace); then the cache is cropped to the longest prefix the two agree on and the
rest is run again, so the cached tokens always match the ids they stand for. Works with any cache that supports
``crop`` (``FP8Cache``, transformers' ``DynamicCache``); an ``FP8StaticCache`` continues as long as the prefix
matches and refuses a crop past what its sliding layers keep.
"""

from __future__ import annotations

import torch

from .integration import cache_keyword

__all__ = ["chat_turn", "conversation_ids"]


def chat_turn(model, tokenizer, messages: list[dict], cache, **generate_kwargs) -> str:
    """Append the assistant's reply to ``messages`` (a list of ``{"role", "content"}``, the last one the user's)
    and return it, continuing from ``cache`` (empty for the first turn; keep passing the same one).

    ``generate_kwargs`` go to ``model.generate`` (``max_new_tokens``, ``do_sample``, ...). The cached ids of the
    conversation so far are kept on the cache object (``cache.chat_token_ids``) to find the prefix the new rendering
    shares with them. One conversation (batch 1).
    """
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("messages must end with the user's turn, got " + repr(messages[-1:] or messages))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_turn needs a tokenizer with a chat template")
    device = next(model.parameters()).device
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"].to(device)  # fmt: skip
    held = int(cache.get_seq_length())  # (a static cache's length is a device tensor)
    if held:
        seen = conversation_ids(cache)
        if seen is None or seen.shape[1] <= held:
            raise ValueError(
                f"the cache holds {held} tokens that no earlier chat_turn recorded; start from an empty one"
            )
        agree = min(_common_prefix(seen[0, :held].to(device), ids[0]), ids.shape[1] - 1)  # one token left to run
        if agree < held:
            cache.crop(agree - held)  # drop the tokens after the shared prefix: they are run again
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generate_kwargs,
                         **{cache_keyword(model): cache})  # fmt: skip
    cache.chat_token_ids = out  # the cache now holds all of them but the last
    reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    messages.append({"role": "assistant", "content": reply})
    return reply


def conversation_ids(cache) -> torch.Tensor | None:
    """The ``[1, T]`` token ids of the conversation ``chat_turn`` has run on ``cache`` (prompts and replies; the cache
    holds all of them but the last), None before the first turn."""
    return getattr(cache, "chat_token_ids", None)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(a.shape[0], b.shape[0])
    differ = (a[:n].to(b.device) != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n
