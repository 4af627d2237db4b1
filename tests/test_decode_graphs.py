"""DecodeGraphs (attach(static=True, cuda_graphs=True)): what reaches a graph and what goes to the fallback, on CPU
(captures and replays run in tests/test_gpu.py)."""

import pytest
import torch
from helpers import tiny_llama
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_fp8cache import FP8Cache, FP8StaticCache, attach, detach
from hf_fp8cache.contract import ATTENTION_NAME
from hf_fp8cache.decode_graphs import DecodeGraphs, _argument_signature, _Graph, eager_reason
from hf_fp8cache.integration import cache_keyword

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_signature_of_tensors_values_and_dicts():
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    assert _argument_signature(mask) == ("tensor", (2, 1, 1, 8), torch.bool, torch.device("cpu"), mask.stride())
    assert _argument_signature(mask) != _argument_signature(mask.transpose(0, 3))  # strides count
    assert _argument_signature(3) == ("value", 3) and _argument_signature(None) == ("value", None)
    assert _argument_signature({"full_attention": mask, "sliding_attention": 1}) == (
        "dict", (("full_attention", _argument_signature(mask)), ("sliding_attention", ("value", 1))),
    )  # fmt: skip
    # not replayable: the fallback runs
    assert _argument_signature([mask]) is None and _argument_signature({"a": object()}) is None


def test_steps_a_graph_cannot_take_go_to_the_fallback(torch_path):
    """On CPU (no CUDA graphs), with a cache that is not a static cache of full-attention layers, or with outputs
    generate accumulates, every step runs the fallback, whose result is returned as is."""
    model = tiny_llama(seed=1)
    keyword = cache_keyword(model)
    graphs = DecodeGraphs(model)
    calls = []

    def fallback(**kwargs):
        calls.append(kwargs)
        return "fallback"

    graphs.fallback = fallback
    ids = torch.tensor([[5], [7]])
    static = FP8StaticCache(model.config, 16)
    for cache, extra in ((static, {}), (FP8Cache(model.config), {}), (static, {"output_attentions": True})):
        assert graphs(input_ids=ids, **{keyword: cache}, **extra) == "fallback"
    assert len(calls) == 3 and graphs.captures == graphs.replays == 0


def test_attach_cuda_graphs_installs_generates_decode_hook_and_detach_removes_it(torch_path):
    model = tiny_llama(seed=2)
    with pytest.raises(ValueError, match="cuda_graphs=True replays the decode steps of a static cache"):
        attach(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be True or False, got 'yes'"):
        attach(model, static=True, cuda_graphs="yes")
    attach(model, static=True, cuda_graphs=True)
    hook = model.get_compiled_call(None)
    assert isinstance(hook, DecodeGraphs)
    assert hook.fallback == type(model).get_compiled_call(model, None)  # what generate would run without graphs
    detach(model)
    assert "get_compiled_call" not in model.__dict__ and not isinstance(model.get_compiled_call(None), DecodeGraphs)


def test_eager_reasons(torch_path, monkeypatch):
    """Each reason a step stays out of a graph, in the order they are checked (the GPU one last: on CPU the others
    are reached first)."""
    model = tiny_llama(seed=3)
    static = FP8StaticCache(model.config, 16)
    assert eager_reason(model, FP8Cache(model.config), {}) == (
        "not a static cache of full-attention layers and rings read in place"
    )
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}  # a capture would miss the second GPU's work
    assert eager_reason(model, static, {}) == "the model is spread over several devices"
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 0}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert eager_reason(model, static, {}) == "torch.distributed is initialized (tensor parallelism)"
    monkeypatch.undo()
    assert eager_reason(model, static, {}) == "the model is not on a GPU"
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    assert eager_reason(model, static, {"output_hidden_states": True}) == "attentions or hidden states are asked for"
    assert eager_reason(model, static, {"output_hidden_states": False}) is None


def test_signature_follows_inputs_attention_and_weight_addresses(torch_path, monkeypatch):
    """A replayable step's signature (on a model taken for a GPU one): equal for equal inputs; new when an input's
    shape, the attention implementation or the embeddings' storage (a model moved away and back) changes."""
    model = tiny_llama(seed=5)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    graphs, cache = DecodeGraphs(model), FP8StaticCache(model.config, 16)
    keyword = cache_keyword(model)

    def signature(ids):
        return graphs._signature(model, {"input_ids": ids, keyword: cache}, keyword, cache)

    first = signature(torch.tensor([[5], [7]]))
    assert first is not None and signature(torch.tensor([[9], [2]])) == first  # values are copied in, not baked
    assert signature(torch.tensor([[5], [7], [1]])) != first
    model.get_input_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    moved = signature(torch.tensor([[5], [7]]))
    assert moved != first
    model.config._attn_implementation = "eager"
    assert signature(torch.tensor([[5], [7]])) != moved


def test_sliding_rings_replay_only_when_our_attention_reads_them(torch_path):
    """A static cache with sliding rings is replayable when our attention reads the rings in place (they are
    compileable), not when they hand a dequantized ring to SDPA."""
    from test_sliding import _model

    model = _model("gemma3", ATTENTION_NAME)
    cache = FP8StaticCache(model.config, 16)
    assert eager_reason(model, cache, {}) == "the model is not on a GPU"  # the layers passed
    model.set_attn_implementation("sdpa")
    assert eager_reason(model, cache, {}) == "not a static cache of full-attention layers and rings read in place"


def test_a_replay_advances_the_rings_host_count_except_right_after_its_capture():
    """A replay runs no Python: each replay but the first (the capture ran the step's update) advances every ring's
    host-side token count by the step's tokens, which the next mask sizes read."""

    class Ring:
        count = 0

        def advance(self, tokens):
            self.count += tokens

    class Graph:
        replays = 0

        def replay(self):
            self.replays += 1

    graph = _Graph.__new__(_Graph)
    graph.inputs, graph.rings, graph.tokens, graph.captured, graph.graph = {}, [Ring(), Ring()], 1, True, Graph()
    graph.output = CausalLMOutputWithPast(logits=torch.zeros(1))
    for _ in range(4):
        graph.replay({})
    assert graph.graph.replays == 4 and [ring.count for ring in graph.rings] == [3, 3]
