"""A long-context retrieval check users recognise: a passkey hidden in filler text, asked for at the end.

Each prompt is English filler (``corpus.documents("evaluation")``, the offline docstrings) of a given length in tokens
with one sentence inserted at a given depth (0.0 = the start, 1.0 = just before the question):
``"The pass key is 48213. Remember it. 48213 is the pass key."``, then the question ``"What is the pass key? The pass
key is"``. The model generates a few tokens greedily into the cache under test; a trial succeeds when the key's digits
appear in them. The same prompts go to every cache, the full-precision ``DynamicCache`` first, so a quantized cache
is compared with the model's own ability at each length and depth (what vLLM's FP8 KV work checked with
needle-in-a-haystack, where one accumulation bug dropped the score from 91 % to 13 %).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .integration import cache_keyword

__all__ = ["PasskeyPrompt", "passkey_prompts", "passkey_scores", "format_passkey_table"]

_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
_QUESTION = "What is the pass key? The pass key is"
_NEW_TOKENS = 8  # enough for a five-digit key and the space before it


@dataclass(frozen=True)
class PasskeyPrompt:
    """One trial: the prompt's token ids ``[1, length]``, the key, and where the needle sits."""

    input_ids: torch.Tensor
    key: str
    length: int
    depth: float


def passkey_prompts(
    tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, *, seed: int = 0
) -> list[PasskeyPrompt]:
    """``trials`` prompts for each (length, depth): filler text cut to ``length`` tokens in all, the needle at
    ``depth`` of the filler, each trial with its own five-digit key and its own stretch of filler."""
    from .corpus import documents

    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths must be in [0, 1], got {depth}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    filler = tokenizer(" ".join(documents("evaluation")), add_special_tokens=False)["input_ids"]
    question = tokenizer("\n" + _QUESTION, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randrange(10000, 100000))
                needle = tokenizer("\n" + _NEEDLE.format(key=key) + "\n", add_special_tokens=False)["input_ids"]
                room = length - len(needle) - len(question)
                if room < 1 or room > len(filler):
                    raise ValueError(f"length {length} leaves {room} filler tokens (the text has {len(filler)})")
                offset = rng.randrange(0, len(filler) - room + 1)
                text = filler[offset : offset + room]
                at = round(depth * room)
                ids = text[:at] + needle + text[at:] + question
                prompts.append(PasskeyPrompt(torch.tensor([ids]), key, length, depth))
    return prompts


@torch.no_grad()
def _retrieves(model, tokenizer, prompt: PasskeyPrompt, cache) -> bool:
    ids = prompt.input_ids.to(model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=_NEW_TOKENS,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id,
                         **{cache_keyword(model): cache})  # fmt: skip
    return prompt.key in tokenizer.decode(out[0, ids.shape[1] :])


def passkey_scores(
    model, tokenizer, prompts: Sequence[PasskeyPrompt], configurations: dict[str, Callable[[], object]]
) -> list[dict]:
    """One row per cache (``"DynamicCache"`` first, then each named factory) and (length, depth): the fraction of
    trials whose key came back, with the trial count."""
    caches: dict[str, Callable[[], object]] = {"DynamicCache": lambda: DynamicCache(config=model.config)}
    rows = []
    for name, make_cache in {**caches, **configurations}.items():
        found: dict[tuple[int, float], list[bool]] = {}
        for prompt in prompts:
            found.setdefault((prompt.length, prompt.depth), []).append(
                _retrieves(model, tokenizer, prompt, make_cache())
            )
        for (length, depth), hits in found.items():
            rows.append({"configuration": name, "length": length, "depth": depth,
                         "retrieved": sum(hits) / len(hits), "trials": len(hits)})  # fmt: skip
    return rows


def format_passkey_table(rows: list[dict]) -> str:
    """The rows as a text table: one line per configuration, one column per (length, depth)."""
    cells = list(dict.fromkeys((r["length"], r["depth"]) for r in rows))
    by = {(r["configuration"], r["length"], r["depth"]): r["retrieved"] for r in rows}
    names = list(dict.fromkeys(r["configuration"] for r in rows))
    head = f"{'configuration':<44}" + "".join(f" {f'{length}@{depth:g}':>10}" for length, depth in cells)
    lines = [head] + [
        f"{name:<44}" + "".join(f" {by[(name, length, depth)]:>10.2f}" for length, depth in cells) for name in names
    ]
    return "\n".join(lines)
