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

__all__ = ["compare_caches", "evaluate_configurations", "evaluation_ids", "format_table", "generation_logits"]


@torch.no_grad()
def generation_logits(model, input_ids: torch.Tensor, prefix_len: int, cache, *, step: int = 1) -> torch.Tensor:
    """Logits predicting tokens ``prefix_len .. end`` (fp32 ``[B, T - prefix_len, V]``): the prefix prefilled at once
    into ``cache``, then ``step`` tokens a forward."""
    if not 1 <= prefix_len < input_ids.shape[1]:
        raise ValueError(f"prefix_len must be in [1, {input_ids.shape[1] - 1}], got {prefix_len}")
    keyword = cache_keyword(model)
    outputs = [model(input_ids=input_ids[:, :prefix_len], **{keyword: cache}, use_cache=True).logits[:, -1:]]
    for start in range(prefix_len, input_ids.shape[1] - 1, step):
        chunk = input_ids[:, start : min(start + step, input_ids.shape[1] - 1)]
        outputs.append(model(input_ids=chunk, **{keyword: cache}, use_cache=True).logits)
    return torch.cat(outputs, dim=1).float()


def compare_caches(
    model, input_ids: torch.Tensor, prefix_len: int, make_cache: Callable[[], object], *, step: int = 1
) -> dict[str, float]:
    """Top-1 agreement, KL and perplexity of ``make_cache()`` against a ``DynamicCache`` on the same tokens (the
    metrics of the module docstring, as a dict).

    Args:
        model: a causal LM.
        input_ids: ``[B, T]`` token ids.
        prefix_len: tokens prefilled in one forward; the metrics cover the positions after them.
        make_cache: builds the cache to compare (e.g. ``lambda: FP8Cache(model.config)``).
        step: continuation tokens fed per forward.
    """
    reference = generation_logits(model, input_ids, prefix_len, DynamicCache(config=model.config), step=step)
    ours = generation_logits(model, input_ids, prefix_len, make_cache(), step=step)
    return _metrics(reference, ours, input_ids[:, prefix_len:].to(ours.device))


def _metrics(reference: torch.Tensor, ours: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The module docstring's metrics of logits ``ours`` against ``reference`` for the true next ``targets``."""
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


def evaluation_ids(tokenizer, *, sequences: int = 8, seq_len: int = 512) -> torch.Tensor:
    """``[sequences, seq_len]`` token ids of the offline evaluation text (``corpus.documents("evaluation")``)."""
    from .corpus import documents

    ids = tokenizer("\n\n".join(documents("evaluation")), return_tensors="pt")["input_ids"][0]
    if ids.numel() < sequences * seq_len:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens; {sequences} x {seq_len} asked for")
    return ids[: sequences * seq_len].reshape(sequences, seq_len)


def evaluate_configurations(
    model,
    input_ids: torch.Tensor,
    prefix_len: int,
    configurations: dict[str, Callable[[], object]],
    *,
    step: int = 1,
) -> list[dict]:
    """``compare_caches`` for each named cache factory, the reference run once; one row (name + metrics) per
    configuration.

    Args:
        model, input_ids, prefix_len, step: as for ``compare_caches``.
        configurations: name -> cache factory, in the order of the rows.
    """
    reference = generation_logits(model, input_ids, prefix_len, DynamicCache(config=model.config), step=step)
    targets = input_ids[:, prefix_len:].to(reference.device)
    rows = []
    for name, make_cache in configurations.items():
        ours = generation_logits(model, input_ids, prefix_len, make_cache(), step=step)
        rows.append({"configuration": name, **_metrics(reference, ours, targets)})
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of ``evaluate_configurations`` as a fixed-width text table."""
    lines = [f"{'configuration':<44} {'top-1':>7} {'KL (nats)':>10} {'PPL':>8} {'PPL change':>11}"]
    for r in rows:
        lines.append(f"{r['configuration']:<44} {r['top1']:>7.4f} {r['kl']:>10.5f} {r['ppl']:>8.3f} "
                     f"{100 * r['ppl_increase']:>+10.2f}%")  # fmt: skip
    return "\n".join(lines)
