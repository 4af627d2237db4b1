"""The ``hf-fp8cache`` command: ``generate`` (text with an FP8 KV cache), ``inspect`` (a checkpoint's KV scales),
``calibrate`` (scales from a dataset, written as a checkpoint), ``eval`` (accuracy table) and ``bench``."""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time
from pathlib import Path

import torch

from .calibration import DATASET_SUFFIXES, OBSERVERS
from .formats import INT8, TOKEN_HEAD, resolve_format, resolve_fp8_format
from .models import DEFAULT_MODEL, resolve_dtype
from .scales import LARGEST_SCALE, SMALLEST_SCALE, STRATEGIES, unusable_scales

__all__ = ["main"]

DEFAULT_PROMPT = "Explain in two sentences why storing a transformer's KV cache in 8 bits saves memory."
# What checking the arguments raises for bad ones (bad values, missing files or checkpoints, unsupported models):
# reported on one line, exit status 2. Errors while the command runs after its checks keep their traceback.
_USAGE_ERRORS = (ValueError, TypeError, OSError, NotImplementedError)


def _at_least(args, **minimums: int) -> None:
    """Each named integer option is at least its minimum."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def _check_device(args) -> None:
    """``--device`` names a device this machine has, and ``--dtype`` a dtype."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: no CUDA GPU is available to torch here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    resolve_dtype(args.dtype, device)


def _check_model_path(name: str) -> None:
    """The embedded default model is installed; a model given as a path exists (a Hub id: ``models.load_config``)."""
    from .models import embedded_model_path

    if name == DEFAULT_MODEL:
        embedded_model_path()
    elif (Path(name).is_absolute() or name.startswith(".")) and not Path(name).is_dir():
        raise FileNotFoundError(f"model {name}: no such directory")


def _check_caches_fit(name: str, cache_options: list[dict]) -> None:
    """FP8 caches with these options fit model ``name`` (its layer types; its layers and heads for checkpoint
    scales), from its config. The embedded default fits any cache without scales: its config is then not read."""
    from .cache import QuantizedFP8Cache
    from .models import load_config

    if name == DEFAULT_MODEL and all(options.get("scales") is None for options in cache_options):
        return
    config = load_config(name)
    for options in cache_options:
        QuantizedFP8Cache(config, **options)


def _check_output(path: str | None, directory: bool) -> None:
    """``--output`` can be written: a directory (created if missing) or a file in an existing directory."""
    if path is None:
        return
    target = Path(path)
    if directory:
        if target.exists() and not target.is_dir():
            raise ValueError(f"--output {path} exists and is not a directory")
        parent = next(p for p in (target, *target.parents) if p.exists())
    else:
        if target.is_dir():
            raise ValueError(f"--output {path} is a directory; name the file to write")
        parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"--output {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--output {path}: {parent} is not writable")


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with an FP8 KV cache and report its memory")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local dir (default: the embedded SmolLM2-135M)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument(
        "--then",
        action="append",
        default=[],
        metavar="MESSAGE",
        help="a follow-up user message, answered from the cache the last turn left (repeat for more turns)",
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--kv-cache-dtype", default="fp8", help="fp8 (= fp8_e4m3), fp8_e5m2, auto, int8 (with --strategy "
                   "token_head), vLLM's fp8_per_token_head / int8_per_token_head, ...")  # fmt: skip
    p.add_argument(
        "--scales", default="unit", help="unit | dynamic (from the first prefill) | checkpoint dir or Hub id"
    )
    p.add_argument("--strategy", default=None, choices=(*STRATEGIES, TOKEN_HEAD),
                   help="default: the checkpoint's, a per-token-head kv-cache-dtype's, else tensor")  # fmt: skip
    p.add_argument("--residual-length", type=int, default=0, help="most recent tokens also kept exact (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--no-compare", action="store_true", help="skip the bf16/DynamicCache run used for comparison")
    p.set_defaults(func=_generate, check=_check_generate)


def _check_generate(args) -> dict:
    """Every argument, before the model is loaded; returns the cache's options (a checkpoint's scales read once)."""
    from .cache import QuantizedFP8Cache

    _at_least(args, max_new_tokens=1, residual_length=0)
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if any(not message.strip() for message in args.then):
        raise ValueError("--then is empty")
    _check_device(args)
    _check_model_path(args.model)
    options = dict(kv_cache_dtype=args.kv_cache_dtype, residual_length=args.residual_length)
    if args.scales in ("unit", "dynamic"):
        options.update(strategy=args.strategy, calculate_kv_scales=args.scales == "dynamic")
        QuantizedFP8Cache(**options)  # the format and strategy
    else:
        checkpoint = QuantizedFP8Cache.from_pretrained(args.scales, strategy=args.strategy, **options)
        options.update(kv_cache_dtype=checkpoint.format, scales=checkpoint.scales)
    _check_caches_fit(args.model, [options])
    return options


def _generate(args, cache_options: dict) -> int:
    from transformers import DynamicCache

    from .cache import QuantizedFP8Cache
    from .cache_layer import FP8CacheLayer
    from .chat import chat_turn, conversation_ids
    from .integration import cache_keyword
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
    if args.then and not tokenizer.chat_template:
        raise ValueError(f"--then needs a model whose tokenizer has a chat template; {args.model} has none")
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = inputs.to(args.device)
    prompt_len = inputs["input_ids"].shape[1]
    keyword = cache_keyword(model)
    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    cache = QuantizedFP8Cache(model.config, **cache_options)
    messages = [{"role": "user", "content": args.prompt}]
    start = time.perf_counter()
    if tokenizer.chat_template:  # chat_turn: the same ids and generate call, and the cache ready for --then
        chat_turn(model, tokenizer, messages, cache, **generate)
        out = conversation_ids(cache)
        assert out is not None  # (set by the turn just run)
    else:
        out = model.generate(**inputs, **generate, **{keyword: cache})
    seconds = time.perf_counter() - start
    text = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
    print(f"model: {args.model}  ({model.config.num_hidden_layers} layers, {model.dtype}, {args.device})")
    print(f"prompt: {args.prompt}")
    print(f"--- generated with the FP8 cache ({cache.format.name}, {cache.strategy}, scales {args.scales}) ---")
    print(text)
    print("---")
    tokens = cache.get_seq_length()
    keys = [layer.keys for layer in cache.layers if isinstance(layer, FP8CacheLayer)]
    bf16_bytes = sum(2 * k.numel() * 2 for k in keys if k is not None)  # K and V at 2 bytes an element
    window = f" (with the {args.residual_length} most recent a layer exact)" if args.residual_length else ""
    print(f"KV cache: {tokens} tokens, {cache.nbytes:,} bytes in FP8{window} vs {bf16_bytes:,} bytes in bf16 "
          f"({cache.nbytes / bf16_bytes:.3f}x); {out.shape[1] - prompt_len} new tokens in {seconds:.2f} s")  # fmt: skip
    if not args.no_compare:
        reference = model.generate(**inputs, **generate, **{keyword: DynamicCache(config=model.config)})
        new = out[0, prompt_len:]
        ref = reference[0, prompt_len:]
        n = min(len(new), len(ref))
        same = int((new[:n] == ref[:n]).cumprod(0).sum())
        print(f"vs the {model.dtype} DynamicCache: first {same} of {n} generated tokens identical")
    for message in args.then:  # each turn runs only its new tokens over the FP8 history
        messages.append({"role": "user", "content": message})
        held = int(cache.get_seq_length())
        reply = chat_turn(model, tokenizer, messages, cache, **generate)
        print(f"--- user: {message}  (continued from {held} cached tokens) ---")
        print(reply)
    if args.then:
        print(f"KV cache after {1 + len(args.then)} turns: {cache.get_seq_length()} tokens, {cache.nbytes:,} bytes")
    return 0


def _add_inspect(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show the KV cache scheme and per-layer scales of a checkpoint")
    p.add_argument("checkpoint", help="local directory or Hub repo id")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_inspect, check=_check_inspect)


def _describe(tensor: torch.Tensor | None, low: float = SMALLEST_SCALE, high: float = LARGEST_SCALE) -> str:
    """A scale for the table, flagged BAD when it is no usable scale in ``[low, high]`` (``scales.unusable_scales``:
    loading refuses such a K/V scale and drops such a q scale)."""
    if tensor is None:
        return "missing"
    values = tensor.detach().float().flatten()
    text = (
        f"{values.item():.6g}" if values.numel() == 1 else f"{values.min():.4g}..{values.max():.4g} ({values.numel()})"
    )
    if unusable_scales(values, low, high).any():
        text += "  BAD"
    return text


def _check_inspect(args):
    """The checkpoint exists and its files read: what ``_inspect`` shows, with the model's layer types when its
    config.json names a model transformers knows (None otherwise, e.g. a scales-only directory)."""
    from .checkpoint import read_checkpoint_scales

    return read_checkpoint_scales(args.checkpoint, revision=args.revision), _layer_types(args)


def _layer_types(args) -> list[str] | None:
    """Each decoder layer's cache type as transformers builds it (``"linear_attention"``, ``"full_attention"``, ...;
    shared and cache-less layers ``"dummy"``), or None when the checkpoint's config is no model transformers knows."""
    from transformers import AutoConfig

    from .cache_base import decoder_layer_types

    try:
        config = AutoConfig.from_pretrained(args.checkpoint, revision=args.revision)
    except (OSError, ValueError, KeyError):
        return None
    return decoder_layer_types(config)


def _inspect(args, checked) -> int:
    from .cache_base import KV_LAYER_TYPES, with_state_layer_placeholders
    from .checkpoint import SANE_Q_SCALE, to_kv_scales

    found, layer_types = checked
    layers = found.num_layers or 1 + max(i for kind in found.tensors.values() for i in kind)
    print(f"{found.source}: {found.producer}, strategy {found.strategy}, {layers} layers, "
          f"{found.num_kv_heads} KV heads")  # fmt: skip
    shown = [k for k in ("k", "v", "kv", "q") if k in found.tensors]
    print("layer  " + "  ".join(f"{kind + '_scale':<24}" for kind in shown))
    for i in range(layers):
        cells = [
            _describe(found.tensors[kind].get(i, (None, None))[1], *(SANE_Q_SCALE if kind == "q" else ()))
            for kind in shown
        ]
        if layer_types is not None and layer_types[i] not in KV_LAYER_TYPES and all(c == "missing" for c in cells):
            cells = [f"none: {layer_types[i]} layer"] * len(shown)  # no K/V there, so no scales expected
        print(f"{i:>5}  " + "  ".join(f"{c:<24}" for c in cells))
    try:
        # as FP8Cache.from_pretrained loads it for that model: layers without K/V need no scales
        scales = to_kv_scales(found if layer_types is None else with_state_layer_placeholders(found, layer_types))
    except ValueError as error:
        print(f"NOT USABLE: {error}")
        return 1
    print(f"usable: {scales}" + ("" if scales.query is None else " (with q scales)"))
    return 0


def _add_calibrate(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="compute KV scales over a dataset and write a checkpoint")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="Hub id or local dir (default: embedded SmolLM2)")
    p.add_argument("--dataset", default=None, help="datasets id, local .txt/.json/.jsonl/.parquet/.csv (default: "
                   "built-in offline English)")  # fmt: skip
    p.add_argument("--split", default=None)
    p.add_argument("--text-column", default=None)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--strategy", default="tensor", choices=STRATEGIES)
    p.add_argument("--observer", default="mse", choices=OBSERVERS)
    p.add_argument("--include-query", action="store_true")
    p.add_argument("--kv-cache-dtype", default="fp8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--scales-only", action="store_true", help="write only config.json and the scales, not the model")
    p.add_argument("--output", required=True, help="directory to write (compressed-tensors layout)")
    p.set_defaults(func=_calibrate, check=_check_calibrate)


def _check_dataset(dataset: str | None) -> None:
    """A local dataset file exists and has a type calibration reads; anything else needs ``datasets``."""
    if dataset is None:
        return
    path = Path(dataset)
    if path.is_file() and path.suffix not in DATASET_SUFFIXES:
        raise ValueError(
            f"--dataset {dataset}: unsupported file type {path.suffix!r}; use {', '.join(DATASET_SUFFIXES)}"
        )
    if not path.exists() and (path.suffix in DATASET_SUFFIXES or path.is_absolute() or dataset.startswith(".")):
        raise FileNotFoundError(f"--dataset {dataset}: no such file")
    if path.suffix != ".txt":
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            raise ValueError(
                f"--dataset {dataset} needs the datasets package (pip install datasets), or give a .txt file"
            )


def _check_calibrate(args) -> None:
    """Every argument, before the model is loaded."""
    _at_least(args, num_samples=1, max_seq_len=2, batch_size=1)
    resolve_fp8_format(args.kv_cache_dtype, "calibration")
    _check_device(args)
    _check_dataset(args.dataset)
    _check_output(args.output, directory=True)
    _check_model_path(args.model)
    if args.model != DEFAULT_MODEL:  # calibration works on any decoder: only that the model exists is checked
        from .models import load_config

        load_config(args.model)


def _calibrate(args, _checked) -> int:
    from .calibration import calibrate
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
    scales = calibrate(model, tokenizer, args.dataset, num_samples=args.num_samples, max_seq_len=args.max_seq_len,
                       strategy=args.strategy, observer=args.observer, batch_size=args.batch_size,
                       include_query=args.include_query, kv_cache_dtype=args.kv_cache_dtype, split=args.split,
                       text_column=args.text_column)  # fmt: skip
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):  # a QuantizationConfigMixin
        quantization = quantization.to_dict()
    quantization = quantization or {}
    packed_gguf = str(quantization.get("quant_method", "")).lower().endswith("gguf")
    if args.scales_only or packed_gguf:  # a GGUF-packed model has no safetensors weights to write: scales only
        import json
        from pathlib import Path

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if packed_gguf and not args.scales_only:
            print(f"{args.model} is GGUF-packed: writing only config.json and the scales")
    else:
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
    scales.save_pretrained(args.output)
    print(f"{scales} -> {args.output}")
    return 0


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="top-1 / KL / perplexity of FP8 cache configurations vs a full cache, or "
        "pass key retrieval (--task passkey)",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--scales", default=None, help="also evaluate the scales of this checkpoint dir or Hub id")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prefix", type=int, default=128, help="tokens prefilled at once before decoding")
    p.add_argument("--step", type=int, default=1, help="tokens fed per forward after the prefix")
    p.add_argument("--formats", default="fp8,fp8_e5m2", help="comma list: fp8, fp8_e5m2, int8 (token_head only), ...")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma list of {', '.join(STRATEGIES)} (on-the-fly and calibrated rows) and {TOKEN_HEAD} (a "
                        "row per format with per-token-head scales)")  # fmt: skip
    p.add_argument("--residual-lengths", default="0", help="comma list: each configuration with that exact window")
    p.add_argument("--quantize-query", action="store_true",
                   help="also each e4m3 configuration without an exact window with FP8 queries (quantize_query=True); "
                        "every row then runs attn_implementation='hf_fp8cache'")  # fmt: skip
    p.add_argument("--attention", choices=("model", "hf_fp8cache"), default="model",
                   help="model: the model's own attention (SDPA), over dequantized K/V; hf_fp8cache: every row runs "
                        "attn_implementation='hf_fp8cache', so FP8 rows read the cache in our kernels (DynamicCache "
                        "falls back to SDPA)")  # fmt: skip
    p.add_argument("--calibration-samples", type=int, default=64)
    p.add_argument("--calibration-seq-len", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--output", default=None, help="write the rows as JSON here")
    p.add_argument("--task", choices=("quality", "passkey"), default="quality",
                   help="quality: top-1 / KL / perplexity over the text; passkey: a key hidden in filler text, asked "
                        "for at the end (retrieval.py), per length and depth")  # fmt: skip
    p.add_argument("--lengths", default="2048,4096", help="passkey: prompt lengths in tokens (comma list)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="passkey: where the key sits, 0 = start, 1 = end")
    p.add_argument("--trials", type=int, default=4, help="passkey: prompts per length and depth")
    p.set_defaults(func=_eval, check=_check_eval)


def _factory(config, **kwargs):
    from .cache import QuantizedFP8Cache

    return functools.partial(QuantizedFP8Cache, config, **kwargs)


def _check_eval(args) -> tuple[list, list[int], dict, list[str]]:
    """Every argument, before the model is loaded; returns the formats, the exact windows, with ``--scales`` the
    checkpoint's scales for each fp8 format (read once, checked against the model), and the strategies (and parses
    ``--lengths`` / ``--depths`` into lists on ``args``)."""
    from .cache import QuantizedFP8Cache

    _at_least(args, sequences=1, seq_len=2, prefix=1, step=1, calibration_samples=1, calibration_seq_len=2, trials=1)
    try:
        args.lengths = [int(n) for n in args.lengths.split(",")]
        args.depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        raise ValueError(f"--lengths takes ints and --depths numbers, got {args.lengths!r}, {args.depths!r}") from None
    if min(args.lengths) < 64 or not all(0.0 <= d <= 1.0 for d in args.depths):
        raise ValueError(f"--lengths must be >= 64 tokens and --depths in [0, 1], got {args.lengths}, {args.depths}")
    if args.prefix >= args.seq_len:
        raise ValueError(f"--prefix ({args.prefix}) must be shorter than --seq-len ({args.seq_len})")
    formats = [resolve_format(f) for f in args.formats.split(",")]
    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s not in (*STRATEGIES, TOKEN_HEAD)]
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; use a comma list of {', '.join((*STRATEGIES, TOKEN_HEAD))}")
    if INT8 in formats and TOKEN_HEAD not in strategies:
        raise ValueError(f"--formats int8 needs {TOKEN_HEAD} in --strategies (int8 codes take per-token-head scales)")
    try:
        residual_lengths = [int(r) for r in args.residual_lengths.split(",")]
    except ValueError:
        raise ValueError(f"--residual-lengths must be comma-separated ints, got {args.residual_lengths!r}") from None
    if min(residual_lengths) < 0:
        raise ValueError(f"--residual-lengths must be >= 0, got {args.residual_lengths!r}")
    _check_device(args)
    _check_output(args.output, directory=False)
    _check_model_path(args.model)
    checkpoint = {}
    fp8 = [f for f in formats if f is not INT8]
    if args.scales:
        checkpoint = {f: QuantizedFP8Cache.from_pretrained(args.scales, kv_cache_dtype=f).scales for f in fp8}
    token_head = [dict(kv_cache_dtype=f, strategy=TOKEN_HEAD) for f in formats if TOKEN_HEAD in strategies]
    _check_caches_fit(args.model, [dict(kv_cache_dtype=f, scales=checkpoint.get(f)) for f in fp8] + token_head)
    return formats, residual_lengths, checkpoint, strategies


def _eval(args, checked: tuple[list, list[int], dict, list[str]]) -> int:
    import json

    from .attention import ATTENTION_NAME  # (registers our attention)
    from .calibration import observe
    from .evaluation import evaluate_configurations, evaluation_ids, format_table
    from .models import load_model_and_tokenizer
    from .retrieval import format_passkey_table, passkey_prompts, passkey_scores

    formats, residual_lengths, checkpoint, strategies = checked
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
    observation = observe(model, tokenizer, num_samples=args.calibration_samples, max_seq_len=args.calibration_seq_len)
    configurations = {}
    for residual_length, fmt in itertools.product(residual_lengths, formats):
        window = f" +{residual_length} exact" if residual_length else ""
        kw = dict(kv_cache_dtype=fmt, residual_length=residual_length)
        if TOKEN_HEAD in strategies:
            configurations[f"{fmt.name} {TOKEN_HEAD}{window}"] = _factory(model.config, strategy=TOKEN_HEAD, **kw)
        if fmt is INT8:  # per-token-head scales only
            continue
        configurations[f"{fmt.name} unit{window}"] = _factory(model.config, **kw)
        for strategy in (s for s in STRATEGIES if s in strategies):
            configurations[f"{fmt.name} on-the-fly {strategy}{window}"] = _factory(
                model.config, calculate_kv_scales=True, strategy=strategy, **kw
            )
            for observer in OBSERVERS:
                scales = observation.scales(fmt, strategy, observer=observer)
                configurations[f"{fmt.name} calibrated {observer} {strategy}{window}"] = _factory(
                    model.config, scales=scales, **kw
                )
        if args.scales:
            configurations[f"{fmt.name} checkpoint{window}"] = _factory(model.config, scales=checkpoint[fmt], **kw)
    if args.quantize_query or args.attention == ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    if args.quantize_query:  # FP8 queries need our attention, and e4m3 codes without an exact window
        for name, factory in list(configurations.items()):
            if factory.keywords["kv_cache_dtype"].name == "e4m3fn" and not factory.keywords["residual_length"]:
                configurations[f"{name} +FP8 queries"] = functools.partial(factory, quantize_query=True)
    if args.task == "passkey":
        prompts = passkey_prompts(tokenizer, args.lengths, args.depths, args.trials)
        rows = passkey_scores(model, tokenizer, prompts, configurations)
        print(f"{args.model}: pass key retrieval, {args.trials} prompts per length@depth, greedy, fraction retrieved; "
              f"DynamicCache in {model.dtype}; attention {model.config._attn_implementation}")  # fmt: skip
        print(format_passkey_table(rows))
    else:
        ids = evaluation_ids(tokenizer, sequences=args.sequences, seq_len=args.seq_len).to(args.device)
        rows = evaluate_configurations(model, ids, args.prefix, configurations, step=args.step)
        print(f"{args.model}: {args.sequences} x {args.seq_len} tokens of offline English, {args.prefix} prefilled, "
              f"then {args.step} at a time; against a {model.dtype} DynamicCache; attention "
              f"{model.config._attn_implementation}")  # fmt: skip
        print(format_table(rows))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


def _add_bench(subparsers) -> None:
    # its modes and options belong to hf_fp8cache.bench (``hf-fp8cache bench --help`` lists them)
    subparsers.add_parser("bench", add_help=False, help="decode benchmarks: generate speed, KV and peak memory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-fp8cache", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_inspect(subparsers)
    _add_calibrate(subparsers)
    _add_eval(subparsers)
    _add_bench(subparsers)
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        from .bench import main as bench_main  # imported here only: the library never imports its benchmarks

        bench_main(extra)
        return 0
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        checked = args.check(args)  # every argument, before any model is loaded
    except _USAGE_ERRORS as error:
        message = " ".join(str(error).split())  # one line, whatever the message
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    return args.func(args, checked)


if __name__ == "__main__":
    sys.exit(main())
