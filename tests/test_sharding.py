"""KV scales under tensor parallelism, on CPU: two (or four) gloo processes, each holding its share of the KV heads
as transformers' tp_plan shards them, see the scales a single process holding every head would use for them."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import quick_cpu, tiny_llama
from hf_fp8cache.kernels import cpu_backend

from hf_fp8cache import FP8Cache, FP8StaticCache, KVScales
from hf_fp8cache.sharding import gather_heads, local_head_scales

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
            results[rank] = {**_rank_scales(rank, world), **_rank_gathers(rank, world)}
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


def _rank_gathers(rank: int, world: int) -> dict:
    """``gather_heads`` of this rank's share of a 4-head and a 2-head (replicated when world > 2) ``[H, 2]`` tensor,
    and the error for a head count the shards cannot make."""
    full = torch.tensor([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0], [0.4, 4.0]])
    local4 = full[rank * (4 // world) : (rank + 1) * (4 // world)]
    head = rank // (world // 2)  # two heads: rank r of 4 holds head r // 2
    local2 = full[head : head + 1]
    try:
        gather_heads(local2, 3, "layer 1 k")
        error = None
    except ValueError as caught:
        error = str(caught)
    return {"gathered4": gather_heads(local4, 4, "layer 0 k").tolist(),
            "gathered2": gather_heads(local2, 2, "layer 0 v").tolist(), "error": error}  # fmt: skip


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
    full_heads = torch.tensor([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0], [0.4, 4.0]])
    local = HEADS // world
    for rank in range(world):
        heads = slice(rank * local, (rank + 1) * local)
        assert results[rank]["given"] == PER_HEAD.key[0][heads].tolist()  # checkpoint scales follow the heads
        assert results[rank]["static"] == PER_HEAD.key[0][heads].tolist()
        assert results[rank]["onthefly"] == onthefly.tolist()  # one per-tensor scale, the same on every rank
        assert results[rank]["per_head"] == per_head[heads].tolist()
        # gather_heads inverts the sharding: every rank gets every head once, in head order (replicated at world 4)
        assert results[rank]["gathered4"] == full_heads.tolist()
        assert results[rank]["gathered2"] == full_heads[:2].tolist()
        assert results[rank]["error"] == f"layer 1 k: 1 heads on each of {world} ranks cannot be 3 sharded heads"
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


# -- calibration under tensor parallelism: every rank ends with the scales of all the heads -------------------------


class ByteTokenizer:
    """Just enough of a tokenizer for ``calibrate``: one id per UTF-8 byte (the tiny model's 256-id vocabulary)."""

    pad_token_id = 0

    def __call__(self, text: str, truncation: bool = True, max_length: int = 2048) -> dict:
        return {"input_ids": list(text.encode())[:max_length]}


CALIBRATION_TEXTS = ["Tensor parallelism shards the key and value projections by heads.",
                     "Every rank observes only its own heads; the scales must still cover all of them.",
                     "Short text."]  # fmt: skip
CALIBRATIONS = [("tensor", "amax"), ("tensor", "mse"), ("attn_head", "amax"), ("attn_head", "mse")]


def _calibrate_all(model) -> dict:
    """Every (strategy, observer) of ``calibrate`` over the texts, with query scales, as lists."""
    from hf_fp8cache import calibrate

    results = {}
    for strategy, observer in CALIBRATIONS:
        scales = calibrate(model, ByteTokenizer(), CALIBRATION_TEXTS, strategy=strategy, observer=observer,
                           batch_size=2, include_query=True, progress=False)  # fmt: skip
        results[strategy, observer] = [[t.tolist() for t in kind] for kind in (scales.key, scales.value, scales.query)]
    return results


def _calibration_worker(rank: int, world: int, port: int, model_dir: str, results) -> None:
    """One rank of a tensor-parallel run: transformers shards the saved model (``tp_plan="auto"``, gloo on CPU)."""
    from transformers import AutoModelForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with cpu_backend("torch"):
            model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
            assert model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0] == 4 * 16  # 4 of the 8 KV heads
            results[rank] = _calibrate_all(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_calibrate_under_tensor_parallelism_returns_the_single_process_scales_on_every_rank(tmp_path, torch_path):
    """A real tensor-parallel run (transformers' tp_plan over two gloo processes, 4 of the model's 8 KV heads and 8 of
    its 16 query heads on each): per-head scales of all 8 (16) heads, per-tensor scales of all of them (amax: the
    MAX over the ranks; mse: searched over every head's sample), equal to one process calibrating the whole model."""
    tiny_llama(layers=2, heads=16, kv_heads=8).save_pretrained(tmp_path / "model")
    from transformers import AutoModelForCausalLM

    single = _calibrate_all(AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval())
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_calibration_worker, args=(2, _free_port(), str(tmp_path / "model"), results), nprocs=2, join=True)
        results = dict(results)
    for key, (keys, values, queries) in single.items():
        per_head = key[0] == "attn_head"
        assert (len(keys[0]), len(queries[0])) == ((8, 16) if per_head else (1, 1))
        for rank in (0, 1):  # layer 1's inputs went through all-reduces: summed in another order, 1 ulp apart
            torch.testing.assert_close(results[rank][key], [keys, values, queries], rtol=2**-20, atol=0)


# -- generate under real tensor parallelism on CPU: the caches of every scale source give one process's tokens -------


def _sharded_and_single_process(tmp_path, dtype: torch.dtype) -> tuple[dict, tuple[dict, dict]]:
    """tests/multigpu_worker.py under torchrun with two gloo ranks in ``dtype`` (rank 0's JSON), and the same
    configurations in this process: ``(tokens, layer-0 scales)``. A small model (head dim 16): CPU time."""
    import multigpu_worker
    from transformers import AutoModelForCausalLM

    model_dir, scales_dir = multigpu_worker.save_model_and_scales(tmp_path, head_dim=16)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), multigpu_worker.__file__, str(model_dir), str(scales_dir),
               str(tmp_path / "tp.json"), str(dtype).removeprefix("torch.")]  # fmt: skip
    environment = {**os.environ, "TRITON_INTERPRET": "0"}  # the ranks run the torch reference kernels
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-4000:]
    with quick_cpu():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        single = multigpu_worker.run_configurations(model, scales_dir, *multigpu_worker.prompts("cpu"))
    return json.loads((tmp_path / "tp.json").read_text()), single


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_tensor_parallel_generate_on_cpu_gives_one_process_tokens(tmp_path):
    """tests/multigpu_worker.py under torchrun with two gloo ranks (transformers' tp_plan: 4 of the 8 KV heads each),
    fp32: every configuration of FP8Cache / FP8StaticCache x scale source x read path generates exactly the tokens of
    one process; checkpoint per-head scales are split by heads, on-the-fly per-tensor scales agree (the MAX)."""
    result, (tokens, scales) = _sharded_and_single_process(tmp_path, torch.float32)
    assert result["tokens"] == tokens
    for name, ranks in result["scales"].items():
        if "checkpoint-head" in name:
            assert ranks[0] + ranks[1] == scales[name] and len(ranks[0]) == 4
        elif "onthefly-tensor" in name:
            assert ranks[0] == ranks[1] == scales[name]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_tensor_parallel_bf16_on_cpu_fp8_generates_the_oracles_tokens_in_each_placement(tmp_path, capsys):
    """In bf16 the two gloo ranks' sharded matmuls and all-reduces can move K/V in the last bits, which FP8 rounding
    can turn into other tokens on a random model (on the H200: 0-6 of 32; with this small model on this CPU: none).
    In each placement FP8Cache (unit scales, read by SDPA) generates exactly the fake-quantized oracle's tokens: the
    cache is exact under the sharding, and any difference between placements is what FP8 rounding makes of the
    model's own (the counts are printed beside bf16 DynamicCache's)."""
    import multigpu_worker

    result, (single, _) = _sharded_and_single_process(tmp_path, torch.bfloat16)
    sharded = result["tokens"]
    for tokens in (sharded, single):
        assert tokens["fp8/unit+sdpa"] == tokens[multigpu_worker.ORACLE]
    with capsys.disabled():
        differing = {name: sum(a != b for rows in zip(sharded[name], single[name]) for a, b in zip(*rows))
                     for name in (multigpu_worker.BASELINE, multigpu_worker.ORACLE, "fp8/unit+sdpa")}  # fmt: skip
        print(f"\nTP=2 bf16 on CPU vs one process, tokens differing of 32: {differing}")
