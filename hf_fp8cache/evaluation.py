"""Accuracy of an FP8 cache against a full-precision cache on the same tokens, in generation mode.

The text is split into a prefix (prefilled in one forward) and a continuation fed ``step`` tokens at a time, so
every continuation position attends over what the cache stored. Reported over the continuation positions:

- ``top1``: fraction of positions where both caches predict the same next token;
- ``kl``: mean KL(reference || ours) of the next-token distributions (nats);
- ``ppl`` / ``ppl_reference``: perplexity of the true next tokens, and ``ppl_increase`` = ppl / ppl_reference - 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import DynamicCache

from .integration import cache_keyword

__all__ = ["generation_logits", "compare_caches"]


@torch.no_grad()
def generation_logits(model, input_ids: torch.Tensor, prefix_len: int, cache, step: int = 1) -> torch.Tensor:
    """Logits predicting tokens ``prefix_len .. end`` (fp32 ``[B, T - prefix_len, V]``), prefix prefilled at once."""
    if not 1 <= prefix_len < input_ids.shape[1]:
        raise ValueError(f"prefix_len must be in [1, {input_ids.shape[1] - 1}], got {prefix_len}")
    keyword = cache_keyword(model)
    outputs = [model(input_ids=input_ids[:, :prefix_len], **{keyword: cache}, use_cache=True).logits[:, -1:]]
    for start in range(prefix_len, input_ids.shape[1] - 1, step):
        chunk = input_ids[:, start : min(start + step, input_ids.shape[1] - 1)]
        outputs.append(model(input_ids=chunk, **{keyword: cache}, use_cache=True).logits)
    return torch.cat(outputs, dim=1).float()


def compare_caches(
    model, input_ids: torch.Tensor, prefix_len: int, make_cache: Callable[[], object], step: int = 1
) -> dict[str, float]:
    """Top-1 agreement, KL and perplexity of ``make_cache()`` against a ``DynamicCache`` on the same tokens."""
    reference = generation_logits(model, input_ids, prefix_len, DynamicCache(config=model.config), step)
    ours = generation_logits(model, input_ids, prefix_len, make_cache(), step)
    targets = input_ids[:, prefix_len:].to(ours.device)
    log_ref, log_ours = reference.log_softmax(-1), ours.log_softmax(-1)
    nll = lambda logp: -logp.gather(-1, targets.unsqueeze(-1)).mean().item()
    ppl, ppl_reference = math.exp(nll(log_ours)), math.exp(nll(log_ref))
    return {
        "top1": (reference.argmax(-1) == ours.argmax(-1)).float().mean().item(),
        "kl": (log_ref.exp() * (log_ref - log_ours)).sum(-1).mean().item(),
        "ppl": ppl,
        "ppl_reference": ppl_reference,
        "ppl_increase": ppl / ppl_reference - 1.0,
    }
