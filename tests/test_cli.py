"""The hf-fp8cache command on the embedded model (fully offline)."""

import json
import re
import subprocess
import sys

import pytest
from helpers import tiny_llama, write_checkpoint

from hf_fp8cache import KVScales
from hf_fp8cache.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.slow
def test_generate_on_embedded_model_reports_half_the_kv_bytes(capsys, torch_path):
    assert main(["generate", "--max-new-tokens", "6", "--scales", "dynamic", "--strategy", "attn_head"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"KV cache: (\d+) tokens, ([\d,]+) bytes in FP8 vs ([\d,]+) bytes in bf16 \((\S+)x\)", out)
    assert match, out
    tokens, fp8, bf16 = int(match[1]), int(match[2].replace(",", "")), int(match[3].replace(",", ""))
    # SmolLM2: 30 layers x K and V x 3 KV heads x head dim 64, one byte each, plus 3 fp32 scales a tensor
    assert fp8 == tokens * 30 * 2 * 3 * 64 + 30 * 2 * 3 * 4
    assert bf16 == tokens * 30 * 2 * 3 * 64 * 2
    assert "generated tokens identical" in out


@pytest.mark.slow
def test_generate_then_continues_the_chat_from_the_cache(capsys, torch_path):
    assert main(["generate", "--max-new-tokens", "6", "--then", "And in one word?", "--no-compare"]) == 0
    out = capsys.readouterr().out
    first = int(re.search(r"KV cache: (\d+) tokens", out)[1])
    continued = re.search(r"--- user: And in one word\?  \(continued from (\d+) cached tokens\) ---\n(.+)\n", out)
    assert continued and int(continued[1]) == first and continued[2].strip(), out  # the second turn's reply
    total = int(re.search(r"KV cache after 2 turns: (\d+) tokens", out)[1])
    assert total > first + 6  # the new message and the second reply were added to the same cache


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: every argument must be checked before."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("hf_fp8cache.models.load_model_and_tokenizer", load)


def _usage_error(capsys, argv: list[str]) -> str:
    """Run the command expecting a usage error: exit status 2, one line on stderr; returns its message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("hf-fp8cache: error: "), err
    return err.strip().removeprefix("hf-fp8cache: error: ")


_OUT = ["--output", "{tmp}/out"]
BAD_ARGUMENTS = [
    (["generate", "--kv-cache-dtype", "fp6"], r"^unknown kv_cache_dtype 'fp6'; use one of 'auto', 'fp8'"),
    (["generate", "--max-new-tokens", "0"], r"^--max-new-tokens must be >= 1, got 0$"),
    (["generate", "--residual-length", "-1"], r"^--residual-length must be >= 0, got -1$"),
    (["generate", "--prompt", " "], r"^--prompt is empty$"),
    (["generate", "--then", "hello", "--then", ""], r"^--then is empty$"),
    (["generate", "--device", "gpu"], r"^--device 'gpu' is not a torch device; use cpu, cuda or cuda:N$"),
    (["generate", "--device", "cuda:99"], r"^--device 'cuda:99': (no CUDA GPU is available|this machine has \d)"),
    (["generate", "--dtype", "fp64"], r"^unknown dtype 'fp64'; use auto, bf16"),
    (["generate", "--strategy", "attn_head", "--scales", "{tmp}/missing"], r"/missing: no such checkpoint directory$"),
    (["generate", "--scales", "{tmp}/no-scales"], r"/no-scales: no KV cache scales found; looked for"),
    (["generate", "--scales", "{tmp}/bad-json"], r"/bad-json/config\.json: not valid JSON \(Expecting"),
    (["generate", "--model", "./no-such-model"], r"^model ./no-such-model: no such directory$"),
    (["inspect", "{tmp}/missing"], r"/missing: no such checkpoint directory$"),
    (["inspect", "{tmp}/no-scales"], r"/no-scales: no KV cache scales found"),
    (["inspect", "{tmp}/bad-json"], r"/bad-json/config\.json: not valid JSON"),
    (["calibrate", "--num-samples", "0", *_OUT], r"^--num-samples must be >= 1, got 0$"),
    (["calibrate", "--max-seq-len", "1", *_OUT], r"^--max-seq-len must be >= 2, got 1$"),
    (["calibrate", "--batch-size", "0", *_OUT], r"^--batch-size must be >= 1, got 0$"),
    (["calibrate", "--kv-cache-dtype", "int8", *_OUT], r"^calibration is for fp8 formats .* got kv_cache_dtype='int8'"),
    (["calibrate", "--kv-cache-dtype", "int4", *_OUT], r"^unknown kv_cache_dtype 'int4'"),
    (["generate", "--kv-cache-dtype", "int8"], r"^kv_cache_dtype='int8' \(int8 codes\) needs strategy='token_head'"),
    (
        ["generate", "--kv-cache-dtype", "int8_per_token_head", "--strategy", "attn_head"],
        r"^kv_cache_dtype='int8_per_token_head' means strategy='token_head', got strategy='attn_head'$",
    ),
    (["generate", "--strategy", "token_head", "--scales", "dynamic"], r"calculate_kv_scales=True .* conflicts"),
    (["generate", "--strategy", "token_head", "--scales", "{tmp}/no-scales"], r"cannot use a checkpoint's scales"),
    (["eval", "--formats", "fp8,int8"], r"^--formats int8 needs token_head in --strategies"),
    (["eval", "--strategies", "tensor,token"], r"^--strategies: unknown \['token'\]; use a comma list of tensor, "),
    (["calibrate", "--dataset", "{tmp}/missing.txt", *_OUT], r"^--dataset .*/missing\.txt: no such file$"),
    (["calibrate", "--dataset", "{tmp}/notes.md", *_OUT], r"unsupported file type '\.md'; use \.txt, \.json"),
    (["calibrate", "--output", "{tmp}/notes.md"], r"^--output .*/notes\.md exists and is not a directory$"),
    (["calibrate", "--output", "{tmp}/notes.md/out"], r"^--output .*/notes\.md/out: .*/notes\.md is not a directory$"),
    (["calibrate", "/no/such/model", *_OUT], r"^model /no/such/model: no such directory$"),
    (["eval", "--formats", "fp8,fp6"], r"^unknown kv_cache_dtype 'fp6'"),
    (["eval", "--residual-lengths", "0,x"], r"^--residual-lengths must be comma-separated ints, got '0,x'$"),
    (["eval", "--residual-lengths", "8,-1"], r"^--residual-lengths must be >= 0, got '8,-1'$"),
    (["eval", "--seq-len", "64", "--prefix", "64"], r"^--prefix \(64\) must be shorter than --seq-len \(64\)$"),
    (["eval", "--step", "0"], r"^--step must be >= 1, got 0$"),
    (["eval", "--task", "passkey", "--trials", "0"], r"^--trials must be >= 1, got 0$"),
    (["eval", "--task", "passkey", "--depths", "0.5,x"], r"^--lengths takes ints and --depths numbers, got "),
    (["eval", "--task", "passkey", "--lengths", "32"], r"^--lengths must be >= 64 tokens and --depths in \[0, 1\]"),
    (["eval", "--task", "passkey", "--depths", "1.5"], r"^--lengths must be >= 64 tokens and --depths in \[0, 1\]"),
    (["eval", "--calibration-seq-len", "1"], r"^--calibration-seq-len must be >= 2, got 1$"),
    (["eval", "--output", "{tmp}"], r"^--output .* is a directory; name the file to write$"),
    (
        ["eval", "--output", "{tmp}/missing/rows.json"],
        r"^--output .*/missing/rows\.json: .*/missing is not a directory$",
    ),
    (["eval", "--scales", "{tmp}/no-scales"], r"/no-scales: no KV cache scales found"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_arguments_are_one_line_before_any_model_load(tmp_path, capsys, no_model_load, argv, message):
    write_checkpoint(tmp_path / "no-scales", layout="none")
    write_checkpoint(tmp_path / "bad-json")
    (tmp_path / "bad-json" / "config.json").write_text('{"num_hidden_layers": 4,')
    (tmp_path / "notes.md").write_text("# notes")
    assert re.search(message, _usage_error(capsys, [a.format(tmp=tmp_path) for a in argv]))


def test_unwritable_output_is_refused(tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)  # the tests run as root, who may write anywhere
    message = _usage_error(capsys, ["calibrate", "--output", str(tmp_path / "out")])
    assert message == f"--output {tmp_path / 'out'}: {tmp_path} is not writable"


def test_checkpoint_for_another_model_is_refused_before_loading(tmp_path, capsys, no_model_load):
    write_checkpoint(tmp_path / "ckpt", layers=4, kv_heads=3)  # the embedded SmolLM2 has 30 layers, 3 KV heads
    assert _usage_error(capsys, ["generate", "--scales", str(tmp_path / "ckpt")]) == (
        "scales are for 4 layers but the model has 30"
    )
    tiny_llama(layers=3, kv_heads=3).config.save_pretrained(tmp_path / "model")  # a config is all it reads
    model, ckpt = str(tmp_path / "model"), str(tmp_path / "ckpt")
    for command in (["generate", "--model", model, "--scales", ckpt], ["eval", model, "--scales", ckpt]):
        assert _usage_error(capsys, command) == "scales are for 4 layers but the model has 3"


def test_good_arguments_reach_the_model_load_and_its_errors_keep_their_traceback(monkeypatch):
    def load(*args, **kwargs):
        raise RuntimeError("loading the model")

    monkeypatch.setattr("hf_fp8cache.models.load_model_and_tokenizer", load)
    with pytest.raises(RuntimeError, match="loading the model"):
        main(["generate", "--scales", "dynamic", "--strategy", "attn_head", "--no-compare"])


def test_command_line_prints_one_line_and_exits_2():
    command = [sys.executable, "-m", "hf_fp8cache.cli", "generate", "--kv-cache-dtype", "fp6"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("hf-fp8cache: error: unknown kv_cache_dtype 'fp6'; use one of")
    assert len(done.stderr.splitlines()) == 1 and done.stdout == ""


@pytest.mark.slow
def test_generate_with_checkpoint_scales(tmp_path, capsys, torch_path):
    scales = KVScales([[0.02, 0.03, 0.04]] * 30, [[0.01, 0.02, 0.005]] * 30, "attn_head")  # SmolLM2: 30 x 3 heads
    scales.save_pretrained(tmp_path)
    args = ["generate", "--max-new-tokens", "4", "--scales", str(tmp_path), "--no-compare", "--residual-length", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "attn_head" in out
    match = re.search(r"KV cache: (\d+) tokens, ([\d,]+) bytes in FP8 \(with the 4 most recent a layer exact\)", out)
    assert match, out
    # 30 layers x K and V x 3 heads x 64: one byte a token, plus 4 exact tokens in fp32 (CPU), plus 3 scales a tensor
    assert int(match[2].replace(",", "")) == int(match[1]) * 30 * 2 * 3 * 64 + 30 * 2 * 3 * 64 * 4 * 4 + 30 * 2 * 3 * 4


def test_inspect_prints_scheme_table_and_verdict(tmp_path, capsys):
    write_checkpoint(tmp_path / "good", layers=3, strategy="attn_head", q_scale=1e28)
    assert main(["inspect", str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors, strategy attn_head, 3 layers, 2 KV heads" in out
    assert out.count("\n") >= 5 and "usable: KVScales(layers=3" in out and "(with q scales)" not in out
    assert out.count("1e+28  BAD") == 3  # garbage q_scale flagged, and not used
    write_checkpoint(tmp_path / "bad", layers=3, skip_layers=(2,))
    assert main(["inspect", str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    assert "missing" in out and "NOT USABLE" in out and "[2]" in out


@pytest.mark.slow
def test_calibrate_then_eval_on_local_data(tmp_path, capsys, torch_path):
    from hf_fp8cache import load_kv_scales

    (tmp_path / "data.txt").write_text(
        "\n\n".join(f"Paragraph {i} talks about caches, keys and values." for i in range(6))
    )
    args = ["calibrate", "--dataset", str(tmp_path / "data.txt"), "--num-samples", "4", "--max-seq-len", "64",
            "--strategy", "attn_head", "--scales-only", "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    scales = load_kv_scales(tmp_path / "out")
    assert scales.num_layers == 30 and scales.num_heads == 3  # SmolLM2
    assert (
        main(
            [
                "eval",
                "--scales",
                str(tmp_path / "out"),
                "--sequences",
                "1",
                "--seq-len",
                "136",
                "--prefix",
                "128",
                "--step",
                "4",
                "--formats",
                "fp8",
                "--residual-lengths",
                "0,8",
                "--calibration-samples",
                "2",
                "--calibration-seq-len",
                "32",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("e4m3fn")]
    # unit, 2 on-the-fly, 4 calibrated, checkpoint; then the same with an exact window of 8 tokens
    assert len(rows) == 16 and rows[7].startswith("e4m3fn checkpoint ")
    assert rows[8].startswith("e4m3fn unit +8 exact ") and rows[15].startswith("e4m3fn checkpoint +8 exact ")


@pytest.mark.slow
def test_generate_and_eval_with_per_token_head_scales(capsys, torch_path):
    """vLLM's name on the embedded SmolLM2: one bf16 scale per token and KV head beside the int8 codes; eval rows for
    int8 and e4m3 with per-token-head scales (int8 has no other row)."""
    args = ["generate", "--max-new-tokens", "4", "--kv-cache-dtype", "int8_per_token_head", "--no-compare"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(int8, token_head, scales unit)" in out
    match = re.search(r"KV cache: (\d+) tokens, ([\d,]+) bytes in FP8", out)
    assert match, out
    # 30 layers x K and V x 3 heads: 64 code bytes and a 2-byte scale a token
    assert int(match[2].replace(",", "")) == int(match[1]) * 30 * 2 * 3 * (64 + 2)
    args = ["eval", "--sequences", "1", "--seq-len", "136", "--prefix", "128", "--step", "4", "--formats", "int8,fp8",
            "--strategies", "token_head", "--calibration-samples", "2", "--calibration-seq-len", "32"]  # fmt: skip
    assert main(args) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines() if line.startswith(("int8", "e4m3"))]
    assert rows == [["int8", "token_head"], ["e4m3fn", "token_head"], ["e4m3fn", "unit"]]


@pytest.mark.slow
def test_eval_passkey_task_prints_retrieval_per_length_and_depth(capsys, torch_path, tmp_path):
    """`eval --task passkey` on the embedded SmolLM2: a row per cache, DynamicCache first, a column per length@depth;
    at 512 tokens the full cache and per-token-head int8 retrieve the key (measured: every trial at 512 and 1024).
    With --attention hf_fp8cache the int8 row's decode steps run our kernel (each step's token written by it)."""
    out_file = tmp_path / "passkey.json"
    args = ["eval", "--task", "passkey", "--lengths", "512", "--depths", "0.5", "--trials", "1", "--formats", "int8",
            "--strategies", "token_head", "--calibration-samples", "2", "--calibration-seq-len", "32",
            "--attention", "hf_fp8cache", "--output", str(out_file)]  # fmt: skip
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("attention hf_fp8cache") for line in lines)
    table = lines[lines.index(next(line for line in lines if line.startswith("configuration"))) :]
    assert [line.split() for line in table] == [["configuration", "512@0.5"], ["DynamicCache", "1.00"],
                                                ["int8", "token_head", "1.00"]]  # fmt: skip
    rows = json.loads(out_file.read_text())
    assert [(r["configuration"], r["retrieved"], r["trials"]) for r in rows] == [
        ("DynamicCache", 1.0, 1), ("int8 token_head", 1.0, 1)]  # fmt: skip
