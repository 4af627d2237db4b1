"""KV scales under tensor parallelism: per-head scales follow the heads, per-tensor on-the-fly scales agree.

transformers' tensor parallelism (``tp_plan="auto"`` under torchrun) shards the k/v projections by contiguous output
rows, so rank r of a world of n holds KV heads ``[r * H / n, (r + 1) * H / n)`` and the cache sees ``H / n`` heads
while the config says H. With fewer KV heads than ranks each head is replicated on ``n / H`` consecutive ranks. vLLM
slices ``attn_head`` scales by the same rule (``scale[r * h:(r + 1) * h]``, replicated: ``scale[r // (n / H)]``).
The tensor-parallel group is taken to be the default process group (what ``tp_plan="auto"`` builds).

A per-tensor scale computed on the fly from a rank's own heads would differ between ranks and from a single-GPU run;
the largest over the ranks (``all_reduce`` MAX) is the single-GPU scale, so every rank stores the same bytes.

Calibration under tensor parallelism (``calibrate``) observes each rank's heads; ``gather_observation`` gathers every
observer's per-head statistics (running amax, value sample) to all the model's heads, in rank order by the rule
above, before scales are made. Per-head scales are then the single-process ones, per-tensor amax scales the MAX over
the ranks', and per-tensor MSE scales are searched over every head's sample as one process would: every rank returns
(and may write) the full scales.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["local_head_scales", "agree_across_ranks", "gather_heads", "gather_observation"]


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


def _collective_device() -> torch.device:
    """Where the default group's collectives take tensors: the current GPU for NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank_of_each_head(local_heads: int, global_heads: int, what: str) -> range:
    """The rank holding each of the model's heads first, in head order, by ``local_head_scales``' rule."""
    _, world = _world()
    if global_heads == local_heads * world:  # contiguous shards
        return range(world)
    if local_heads == 1 and world % global_heads == 0:  # replicated heads: the first of each group of ranks
        return range(0, world, world // global_heads)
    raise ValueError(f"{what}: {local_heads} heads on each of {world} ranks cannot be {global_heads} sharded heads")


def gather_heads(local: torch.Tensor, global_heads: int, what: str) -> torch.Tensor:
    """Every rank's ``[local_heads, ...]`` joined to ``[global_heads, ...]`` in head order (the inverse of
    ``local_head_scales``); unsharded runs get ``local`` back. Every rank must call it, with the same shape."""
    if not is_head_sharded(local.shape[0], global_heads):
        return local
    ranks = _rank_of_each_head(local.shape[0], global_heads, what)
    device = _collective_device()
    parts = [torch.empty_like(local, device=device) for _ in range(_world()[1])]
    dist.all_gather(parts, local.to(device).contiguous())
    return torch.cat([parts[rank] for rank in ranks]).to(local.device)


def gather_observation(observation, config) -> None:
    """Under tensor parallelism, give every observer of a calibration ``Observation`` the statistics of all the
    model's heads (KV heads for keys and values, query heads for queries, by ``config``), in place. Collective:
    every rank calls it after the same calibration passes. A no-op in one process or when no head is sharded."""
    if _world()[1] == 1:
        return
    text_config = config.get_text_config(decoder=True)
    heads = {"k": text_config.num_key_value_heads, "v": text_config.num_key_value_heads,
             "q": text_config.num_attention_heads}  # fmt: skip
    for (kind, layer), observer in sorted(observation.observers.items()):  # the same order on every rank
        what = f"layer {layer} {kind}"
        observer.amax = gather_heads(observer.amax, heads[kind], what)
        observer.samples = gather_heads(observer.samples, heads[kind], what)
