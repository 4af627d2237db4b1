"""chat_turn: a conversation continued from the cache the last turn left, on the real SmolLM2-135M-Instruct."""

import pytest
import torch
from helpers import assert_equal, fake_quant_cache

from hf_fp8cache import FP8Cache, cache_keyword
from hf_fp8cache.chat import chat_turn

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_path")]  # the torch twins: the interpreter is slow

TURNS = ["Name a prime number.", "And another one?"]


def _rendered(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def _conversation(model, tokenizer, cache, seen_lengths=None):
    messages, replies = [], []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        replies.append(chat_turn(model, tokenizer, messages, cache, max_new_tokens=10, do_sample=False))
        if seen_lengths is not None:
            seen_lengths.append(int(cache.get_seq_length()))
    return messages, replies


def test_each_turn_runs_only_the_new_tokens_and_equals_the_fake_quant_oracle(smollm2):
    model, tokenizer = smollm2
    seen_inputs, lengths = [], []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen_inputs.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)  # fmt: skip
    try:
        cache = FP8Cache(model.config)
        messages, replies = _conversation(model, tokenizer, cache, lengths)
    finally:
        hook.remove()
    # the oracle: the same turns over a DynamicCache whose layers store fake-quantized K/V (exact first prefill)
    _, oracle = _conversation(model, tokenizer, fake_quant_cache(model.config))
    assert replies == oracle and len(set(replies)) == 2 and all(replies)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    # each turn's first forward ran only what the cache did not hold: the new message and the template around it
    first_forwards = [n for n in seen_inputs if n > 1]
    rendered = _rendered(tokenizer, messages[:3])
    assert len(first_forwards) == 2 and first_forwards[1] == len(rendered) - lengths[0]
    assert lengths[1] == cache.chat_token_ids.shape[1] - 1  # every id of the conversation but the last is cached


def _edited_conversation(model, tokenizer, cache):
    """Turn 1, then an edit of the first user message (the template renders other ids from inside turn 1 on), then
    turn 2: (tokens the cache held after turn 1, the ids turn 1 left, turn 2's rendered prompt, turn 2's reply)."""
    messages = [{"role": "user", "content": TURNS[0]}]
    chat_turn(model, tokenizer, messages, cache, max_new_tokens=8, do_sample=False)
    held, first_ids = int(cache.get_seq_length()), cache.chat_token_ids[0].tolist()
    messages[0]["content"] += " Answer in one word."
    messages.append({"role": "user", "content": TURNS[1]})
    rendered = _rendered(tokenizer, messages)
    return held, first_ids, rendered, chat_turn(model, tokenizer, messages, cache, max_new_tokens=8, do_sample=False)


def test_a_rendering_that_differs_from_the_cached_ids_crops_to_the_shared_prefix(smollm2):
    model, tokenizer = smollm2
    cache = FP8Cache(model.config)
    held, first_ids, rendered, reply = _edited_conversation(model, tokenizer, cache)
    agree = next(i for i, (a, b) in enumerate(zip(first_ids, rendered)) if a != b)
    assert 0 < agree < held  # the edit falls inside what the cache held: it was cropped there and re-run
    assert cache.chat_token_ids[0, : len(rendered)].tolist() == rendered  # the cache stands for the new ids
    assert int(cache.get_seq_length()) == cache.chat_token_ids.shape[1] - 1
    # the oracle, by hand: turn 1 over the fake-quantized cache, cropped where the ids part, then generate over the
    # new rendering (a cache still holding turn 1's ids there would attend over the wrong tokens)
    oracle = fake_quant_cache(model.config)
    chat_turn(model, tokenizer, [{"role": "user", "content": TURNS[0]}], oracle, max_new_tokens=8, do_sample=False)
    oracle.crop(agree - held)
    ids = torch.tensor([rendered])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         **{cache_keyword(model): oracle})  # fmt: skip
    assert reply == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    for ours, theirs in zip(cache.layers, oracle.layers):  # every stored key: the new ids' (unit scales: fp8 values)
        assert_equal(ours.keys.float(), theirs.keys[..., : ours.keys.shape[-1]].float())


def test_refusals(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="must end with the user's turn"):
        chat_turn(model, tokenizer, [{"role": "assistant", "content": "hi"}], FP8Cache(model.config))
    used = FP8Cache(model.config)
    model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False,
                   **{cache_keyword(model): used})  # fmt: skip
    with pytest.raises(ValueError, match="the cache holds 4 tokens that no earlier chat_turn recorded"):
        chat_turn(model, tokenizer, [{"role": "user", "content": "hi"}], used, max_new_tokens=2)
