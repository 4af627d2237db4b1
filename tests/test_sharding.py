"""KV scales under tensor parallelism, on CPU: two (or four) gloo processes, each holding its share of the KV heads
as transformers' tp_plan shards them, see the scales a single process holding every head would use for them."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_llama
from hf_fp8cache.kernels import cpu_backend

from hf_fp8cache import FP8Cache, FP8StaticCache, KVScales
from hf_fp8cache.sharding import local_head_scales

HEADS = 4  # the model's KV heads
PER_HEAD = KVScales([[0.1, 0.2, 0.3, 0.4]], [[1.0, 2.0, 3.0, 4.0]], "attn_head")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_states(rank: int, world: int, heads: int = HEADS):
    """This rank's K (and V = 2K) of the full model's ``[1, HEADS, 5, 8]`` states: contiguous heads, replicated when
    there are fewer heads than ranks. Head h's values peak at h + 1 (one 50x spike in head 3)."""
    full = torch.randn(1, heads, 5, 8, generator=torch.Generator().manual_seed(0))
    full[0, 3, 2, 1] = 50.0
    local = max(heads // world, 1)
    first = rank * local if heads >= world else rank // (world // heads)
    return full, full[:, first : first + local]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with cpu_backend("torch"):
            results[rank] = _rank_scales(rank, world)
    finally:
        dist.destroy_process_group()


def _rank_scales(rank: int, world: int) -> dict:
    """What each kind of cache of this rank holds after its share of one prefill."""
    config = tiny_llama(layers=1, heads=4, kv_heads=HEADS).config
    _, keys = _rank_states(rank, world)
    caches = {
        "given": FP8Cache(config, scales=PER_HEAD),
        "static": FP8StaticCache(config, max_cache_len=8, scales=PER_HEAD),
        "onthefly": FP8Cache(config, calculate_kv_scales=True),
        "per_head": FP8Cache(config, calculate_kv_scales=True, strategy="attn_head"),
    }
    for cache in caches.values():
        cache.update(keys, keys * 2, 0)
    return {name: cache.layers[0].key_scale.tolist() for name, cache in caches.items()}


def _run(world: int) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        return dict(results)


def _single_process():
    """The same caches in one process holding every head: the reference each rank must match."""
    config = tiny_llama(layers=1, heads=4, kv_heads=HEADS).config
    full, _ = _rank_states(0, 1)
    onthefly = FP8Cache(config, calculate_kv_scales=True)
    onthefly.update(full, full * 2, 0)
    per_head = FP8Cache(config, calculate_kv_scales=True, strategy="attn_head")
    per_head.update(full, full * 2, 0)
    return onthefly.layers[0].key_scale, per_head.layers[0].key_scale


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_ranks_use_the_single_process_scales_of_their_heads(world, torch_path):
    results = _run(world)
    onthefly, per_head = _single_process()
    local = HEADS // world
    for rank in range(world):
        heads = slice(rank * local, (rank + 1) * local)
        assert results[rank]["given"] == PER_HEAD.key[0][heads].tolist()  # checkpoint scales follow the heads
        assert results[rank]["static"] == PER_HEAD.key[0][heads].tolist()
        assert results[rank]["onthefly"] == onthefly.tolist()  # one per-tensor scale, the same on every rank
        assert results[rank]["per_head"] == per_head[heads].tolist()
    # the test can fail: without the reduction rank 0 (heads without the spike) would get a 50x smaller scale
    assert onthefly.item() > 10 * _single_rank_onthefly(world)


def _single_rank_onthefly(world: int) -> float:
    _, keys = _rank_states(0, world)
    return (keys.abs().amax() / 200).item()


def test_replicated_heads_and_mismatches(monkeypatch):
    """Fewer KV heads than ranks: each rank takes its head's scale (vLLM's scale[r // (n / H)]); scales for another
    head count are refused, naming both."""
    scale = torch.tensor([0.5, 0.7])
    with monkeypatch.context() as patch:
        patch.setattr("hf_fp8cache.sharding._world", lambda: (3, 4))  # rank 3 of 4, no processes
        assert torch.equal(local_head_scales(scale, 1, 2, "layer 0"), scale[1:])  # ranks 2 and 3 hold head 1
        with pytest.raises(ValueError, match=r"layer 0: per-head scales are for 2 KV heads but key_states has 3 \(the "
                                             r"model has 6; rank 3 of 4\)"):  # fmt: skip
            local_head_scales(scale, 3, 6, "layer 0")
    with pytest.raises(ValueError, match=r"per-head scales are for 2 KV heads but key_states has 3$"):
        local_head_scales(scale, 3, 2, "layer 0")  # one process: no sharding to explain it
