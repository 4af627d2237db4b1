"""hf_fp8cache: an FP8 KV cache for HuggingFace transformers, written and read by Triton kernels."""

from . import attention  # noqa: F401  (registers attn_implementation="hf_fp8cache")
from .cache import FP8Cache, QuantizedFP8Cache
from .calibration import calibrate
from .checkpoint import load_kv_scales, save_kv_scales
from .formats import FORMATS, FP8Format, resolve_format
from .integration import attach, cache_keyword, detach
from .models import load_model_and_tokenizer
from .scales import KVScales
from .static_cache import FP8StaticCache

__all__ = [
    "FORMATS",
    "FP8Cache",
    "FP8Format",
    "FP8StaticCache",
    "KVScales",
    "QuantizedFP8Cache",
    "attach",
    "cache_keyword",
    "calibrate",
    "detach",
    "load_kv_scales",
    "load_model_and_tokenizer",
    "resolve_format",
    "save_kv_scales",
]
__version__ = "0.1.0"
