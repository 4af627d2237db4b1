"""KV scales under tensor parallelism: per-head scales follow the heads, per-tensor on-the-fly scales agree.

transformers' tensor parallelism (``tp_plan="auto"`` under torchrun) shards the k/v projections by contiguous output
rows, so rank r of a world of n holds KV heads ``[r * H / n, (r + 1) * H / n)`` and the cache sees ``H / n`` heads
while the config says H. With fewer KV heads than ranks each head is replicated on ``n / H`` consecutive ranks. vLLM
slices ``attn_head`` scales by the same rule (``scale[r * h:(r + 1) * h]``, replicated: ``scale[r // (n / H)]``).
The tensor-parallel group is taken to be the default process group (what ``tp_plan="auto"`` builds).

A per-tensor scale computed on the fly from a rank's own heads would differ between ranks and from a single-GPU run;
the largest over the ranks (``all_reduce`` MAX) is the single-GPU scale, so every rank stores the same bytes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["local_head_scales", "agree_across_ranks"]


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_head_sharded(local_heads: int, global_heads: int | None) -> bool:
    """Whether this process holds only part of the model's KV heads (tensor parallelism)."""
    return global_heads is not None and local_heads != global_heads and _world()[1] > 1


def local_head_scales(scale: torch.Tensor, local_heads: int, global_heads: int | None, what: str) -> torch.Tensor:
    """The part of a ``[1]`` or ``[global_heads]`` scale for the KV heads this rank holds (``[1]`` or
    ``[local_heads]``); a clear error naming both head counts when the scales fit neither."""
    if scale.numel() in (1, local_heads):
        return scale
    rank, world = _world()
    if scale.numel() == global_heads and is_head_sharded(local_heads, global_heads):
        if global_heads == local_heads * world:  # contiguous shards
            return scale[rank * local_heads : (rank + 1) * local_heads].contiguous()
        if local_heads == 1 and world % global_heads == 0:  # fewer KV heads than ranks: each head replicated
            return scale[rank // (world // global_heads)].reshape(1).contiguous()
    raise ValueError(
        f"{what}: per-head scales are for {scale.numel()} KV heads but key_states has {local_heads}"
        + (f" (the model has {global_heads}; rank {rank} of {world})" if world > 1 else "")
    )


def agree_across_ranks(scale: torch.Tensor, strategy: str, local_heads: int, global_heads: int | None) -> torch.Tensor:
    """A per-tensor scale made the same on every rank of a head-sharded model: the largest of the ranks' (each from its
    own heads), i.e. the scale one process holding every head computes. Per-head scales and unsharded runs pass."""
    if strategy == "tensor" and is_head_sharded(local_heads, global_heads):
        scale = scale.clone()
        dist.all_reduce(scale, op=dist.ReduceOp.MAX)
    return scale
