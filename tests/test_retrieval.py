"""The pass key retrieval task (retrieval.py, `hf-fp8cache eval --task passkey`) on the embedded SmolLM2."""

import pytest
import torch

from hf_fp8cache import FP8Cache, KVScales
from hf_fp8cache.retrieval import format_passkey_table, passkey_prompts, passkey_scores

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_prompts_hold_the_key_at_its_depth_and_end_with_the_question(smollm2):
    _, tokenizer = smollm2
    prompts = passkey_prompts(tokenizer, [300, 600], [0.0, 0.5, 1.0], 2, seed=1)
    assert [(p.length, p.depth) for p in prompts] == [(n, d) for n in (300, 600) for d in (0.0, 0.5, 1.0) for _ in "ab"]
    assert len({p.key for p in prompts}) == len(prompts) and all(len(p.key) == 5 and p.key.isdigit() for p in prompts)
    question = tokenizer("\nWhat is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    for prompt in prompts:
        ids = prompt.input_ids[0].tolist()
        assert len(ids) == prompt.length and ids[-len(question) :] == question
        needle = f"\nThe pass key is {prompt.key}. Remember it. {prompt.key} is the pass key.\n"
        needle_ids = tokenizer(needle, add_special_tokens=False)["input_ids"]
        at = [i for i in range(len(ids)) if ids[i : i + len(needle_ids)] == needle_ids]
        assert len(at) == 1  # once, whole
        filler = len(ids) - len(needle_ids) - len(question)  # tokens of filler; the needle after depth of them
        assert abs(at[0] - prompt.depth * filler) <= 0.5, (at[0], prompt.depth, filler)
    again = passkey_prompts(tokenizer, [300, 600], [0.0, 0.5, 1.0], 2, seed=1)
    assert all(torch.equal(a.input_ids, b.input_ids) and a.key == b.key for a, b in zip(prompts, again))


@pytest.mark.parametrize(
    ("lengths", "depths", "trials", "message"),
    [([300], [1.5], 1, "depths must be in"), ([300], [0.5], 0, "trials must be >= 1, got 0"),
     ([20], [0.5], 1, "length 20 leaves")],
)  # fmt: skip
def test_bad_prompt_settings_are_refused_by_value(smollm2, lengths, depths, trials, message):
    with pytest.raises(ValueError, match=message):
        passkey_prompts(smollm2[1], lengths, depths, trials)


def test_scores_find_the_key_with_a_full_cache_and_lose_it_with_a_broken_one(smollm2, torch_path):
    """SmolLM2 retrieves every key at 512 tokens with DynamicCache and with the default FP8 cache (measured: all of
    them also at 1024, and 2 of 3 depths at 2048); scales 1e-4 times too small saturate every stored value, and then
    no key comes back: the score can tell a broken cache."""
    model, tokenizer = smollm2
    prompts = passkey_prompts(tokenizer, [512], [0.1, 0.9], 2)
    broken = KVScales([torch.tensor([1e-4])] * 30, [torch.tensor([1e-4])] * 30, strategy="tensor")
    configurations = {"fp8": lambda: FP8Cache(model.config), "saturated": lambda: FP8Cache(model.config, scales=broken)}
    rows = passkey_scores(model, tokenizer, prompts, configurations)
    by = {(r["configuration"], r["depth"]): r["retrieved"] for r in rows}
    assert all(r["trials"] == 2 for r in rows)
    assert by == {("DynamicCache", 0.1): 1.0, ("DynamicCache", 0.9): 1.0, ("fp8", 0.1): 1.0, ("fp8", 0.9): 1.0,
                  ("saturated", 0.1): 0.0, ("saturated", 0.9): 0.0}  # fmt: skip
    table = format_passkey_table(rows)
    assert table.splitlines()[0].split()[1:] == ["512@0.1", "512@0.9"]
    assert table.splitlines()[3].split() == ["saturated", "0.00", "0.00"]
