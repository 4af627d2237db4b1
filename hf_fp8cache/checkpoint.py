"""KV-cache scales in checkpoints: read them from a local directory or the Hub, and write them back.

Read (``load_kv_scales``), by layer index whatever the prefix (``model.``, ``model.language_model.``, ...):

=============================  ======================================================  =========================
producer                       tensors (``...layers.N.self_attn.`` + name)             scheme read from
=============================  ======================================================  =========================
compressed-tensors (llm-comp.) ``k_scale``, ``v_scale`` (``q_scale``; zero points 0)   config.json
                               ``[1]``/``[]`` per tensor, ``[H_kv,1,1]``/``[H_kv]``     ``kv_cache_scheme``
ModelOpt                       ``k_proj.k_scale``, ``v_proj.v_scale``                  hf_quant_config.json
legacy                         ``k_proj.output_scale``, ``v_proj.output_scale``,       (none)
                               or one ``kv_scale`` for both
=============================  ======================================================  =========================

Only config files, the safetensors index and the shards that hold scale tensors are fetched (never pickles, never
remote code); tensors are read one by one with safetensors' lazy reader, so an 8B checkpoint costs kilobytes.

Write (``save_kv_scales`` / ``KVScales.save_pretrained``): the compressed-tensors layout vLLM reads --
``model.layers.N.self_attn.k_scale`` / ``v_scale`` (``[1]`` or ``[H_kv, 1, 1]``, float32 so a round trip is exact)
in their own ``kv_scales.safetensors``, listed in ``model.safetensors.index.json`` (created when missing), and a
``kv_cache_scheme`` in config.json's ``quantization_config``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

import torch

from .scales import KVScales, check_scale, check_strategy, unusable_scales

__all__ = [
    "CheckpointScales",
    "KV_SCALES_FILE",
    "load_kv_scales",
    "read_checkpoint_scales",
    "save_kv_scales",
    "to_kv_scales",
]

logger = logging.getLogger(__name__)

KV_SCALES_FILE = "kv_scales.safetensors"
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_MODELOPT = "hf_quant_config.json"

# suffix after "layers.N.self_attn." -> which scale it is
_SUFFIXES = {
    "k_scale": "k", "v_scale": "v", "q_scale": "q",  # compressed-tensors
    "k_proj.k_scale": "k", "v_proj.v_scale": "v",  # ModelOpt
    "k_proj.output_scale": "k", "v_proj.output_scale": "v",  # older llm-compressor / AutoFP8
    "kv_scale": "kv",  # one scale for both (oldest vLLM convention)
    "k_zero_point": "k_zero", "v_zero_point": "v_zero", "q_zero_point": "q_zero",
}  # fmt: skip
_NAME = re.compile(
    r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.self_attn\.(?P<suffix>"
    + "|".join(re.escape(s) for s in sorted(_SUFFIXES, key=len, reverse=True))
    + r")$"
)
# q_scale values outside this range are garbage (a real llm-compressor run wrote 1e28 and 1e-21), never used
SANE_Q_SCALE = (1e-12, 1e12)
_NON_TEXT_PREFIX = re.compile(r"vision|visual|audio|image|speech|encoder\.")


@dataclass
class CheckpointScales:
    """What a checkpoint says about its KV cache, before it is turned into ``KVScales``."""

    source: str
    producer: str  # "compressed-tensors" | "modelopt" | "legacy"
    strategy: str
    num_layers: int | None  # from config.json, when present
    num_kv_heads: int | None
    tensors: dict[str, dict[int, tuple[str, torch.Tensor]]] = field(default_factory=dict)  # kind -> layer -> (name, t)


def _text_config(config: dict) -> dict:
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(key), dict):
            return config[key]
    return config


class _Files:
    """Where the checkpoint's files come from: a local directory or a Hub repo (downloaded one file at a time).

    Every way of not getting a file the checkpoint needs is an error naming the checkpoint (and the revision) and
    what happened: no such directory, repo id, repository or revision, offline or unreachable without a cached
    copy, or a shard the index lists but the checkpoint lacks. Optional files are None when absent; offline, an
    optional file that was never cached is None too and remembered in ``uncached``."""

    def __init__(self, name_or_path: str | os.PathLike, revision, token, cache_dir, local_files_only) -> None:
        self.name = str(name_or_path)
        self.local = Path(name_or_path) if Path(name_or_path).is_dir() else None
        if self.local is None and (Path(name_or_path).is_absolute() or self.name.startswith(".")):
            raise FileNotFoundError(f"{self.name}: no such checkpoint directory")
        self.hub_kwargs = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        self.uncached: list[str] = []

    @overload
    def get(self, filename: str, listed: Literal[True]) -> Path: ...
    @overload
    def get(self, filename: str, listed: bool = False) -> Path | None: ...

    def get(self, filename: str, listed: bool = False) -> Path | None:
        """Local path of ``filename``, or None if the checkpoint has no such file -- an error if it is ``listed`` in
        the index."""
        if self.local is not None:
            path = self.local / filename
            if path.is_file():
                return path
            if listed:
                raise FileNotFoundError(f"{self.local}: {filename} is listed in {_INDEX} but does not exist")
            return None
        from huggingface_hub import errors, hf_hub_download

        try:
            return Path(hf_hub_download(self.name, filename, **self.hub_kwargs))
        except (
            errors.LocalEntryNotFoundError
        ) as error:  # before EntryNotFoundError: its subclass since huggingface_hub 1.0
            # offline (HF_HUB_OFFLINE / local_files_only) or unreachable, and not in the local cache: the config
            # tells whether the checkpoint is there at all, so it is required; other optional files count as absent
            if listed or filename == "config.json":
                raise self.not_downloaded([filename], error) from error
            self.uncached.append(filename)
            return None
        except errors.EntryNotFoundError as error:
            if listed:
                raise FileNotFoundError(
                    f"{self._revision_label()}: {filename} is listed in {_INDEX} but the Hub repository has no such "
                    "file"
                ) from error
            return None
        except errors.HFValidationError as error:
            raise FileNotFoundError(
                f"{self.name}: no such local directory, and not a Hub repo id ('name' or 'org/name')"
            ) from error
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as error:  # GatedRepoError: a subclass
            raise self._hub_error(error) from error

    def json(self, filename: str) -> dict | None:
        path = self.get(filename)
        return None if path is None else _read_json(path)

    def _revision_label(self) -> str:
        revision = self.hub_kwargs["revision"]
        return self.name if revision is None else f"{self.name} (revision {revision!r})"

    def _hub_error(self, error: OSError) -> OSError:
        """What the Hub's repository or revision error means for this checkpoint."""
        from huggingface_hub import constants
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        if isinstance(error, GatedRepoError):
            return PermissionError(
                f"{self.name}: the Hub repository is gated; accept its conditions at {constants.ENDPOINT}/{self.name} "
                "and log in (`hf auth login`) or pass token="
            )
        if isinstance(error, RepositoryNotFoundError):
            return FileNotFoundError(
                f"{self.name}: no such local directory, and no such repository on the Hub ({constants.ENDPOINT}); "
                "check the id, and for a private repository log in (`hf auth login`) or pass token="
            )
        return FileNotFoundError(
            f"{self.name}: the Hub repository has no revision {self.hub_kwargs['revision']!r}; pass an existing "
            "branch, tag or commit"
        )

    def not_downloaded(self, filenames: list[str], error: Exception | None = None) -> FileNotFoundError:
        """The error for Hub files that are neither in the local cache nor downloadable (offline or unreachable)."""
        from huggingface_hub import constants

        cache = self.hub_kwargs["cache_dir"] or constants.HF_HUB_CACHE
        files, verb = ", ".join(filenames), "is" if len(filenames) == 1 else "are"
        if self.hub_kwargs["local_files_only"] or constants.HF_HUB_OFFLINE:
            return FileNotFoundError(
                f"{self._revision_label()}: {files} {verb} not in the local Hugging Face cache ({cache}) and offline "
                "mode (HF_HUB_OFFLINE=1 or local_files_only=True) forbids downloading; download the checkpoint once "
                "online (it is then cached), or pass a local directory"
            )
        cause = error.__cause__ if error is not None and error.__cause__ is not None else error
        return FileNotFoundError(
            f"{self._revision_label()}: could not download {files} from the Hub ({constants.ENDPOINT}: "
            f"{type(cause).__name__}: {cause}) and no copy {verb} in the local cache ({cache}); check the network, "
            "or pass a local directory"
        )


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; anything else is a ValueError naming the file (the decoding error as cause)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({error}); the file is corrupt or truncated") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


def _read_index(path: Path) -> dict:
    """A safetensors index (``weight_map``: tensor name -> shard file), checked."""
    index = _read_json(path)
    weight_map = index.setdefault("weight_map", {})
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ValueError(f"{path}: 'weight_map' must map tensor names to shard file names, got {weight_map!r:.80}")
    return index


@contextmanager
def _open_safetensors(path: Path):
    """safetensors' lazy reader of ``path``; a file it cannot read is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as reader:
            yield reader
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error}); it is truncated or corrupt") from error


def _scheme(config: dict, modelopt: dict | None, source: str) -> tuple[str | None, str | None]:
    """(producer, strategy) declared by the checkpoint's configs; (None, None) when none declares a KV scheme."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "compressed-tensors" and quant.get("kv_cache_scheme"):
        scheme = quant["kv_cache_scheme"]
        if scheme.get("num_bits") != 8 or scheme.get("type") != "float":
            raise ValueError(
                f"{source}: kv_cache_scheme is num_bits={scheme.get('num_bits')!r} type={scheme.get('type')!r}; "
                "only 8-bit float KV caches are supported"
            )
        if scheme.get("dynamic"):
            raise ValueError(
                f"{source}: kv_cache_scheme is dynamic (no stored scales); use calculate_kv_scales=True instead"
            )
        if scheme.get("symmetric") is False:
            raise ValueError(f"{source}: kv_cache_scheme is asymmetric; FP8 KV scales must be symmetric")
        strategy = scheme.get("strategy", "tensor")
        if strategy == "head":
            strategy = "attn_head"
        try:
            check_strategy(strategy)
        except ValueError as error:
            raise ValueError(f"{source}: kv_cache_scheme strategy {strategy!r} is not supported") from error
        return "compressed-tensors", strategy
    algo = ((modelopt or {}).get("quantization") or {}).get("kv_cache_quant_algo") or quant.get("kv_cache_quant_algo")
    if algo is not None:
        if str(algo).upper() != "FP8":
            raise ValueError(f"{source}: ModelOpt kv_cache_quant_algo is {algo!r}; only 'FP8' is supported")
        return "modelopt", "tensor"
    return None, None


def _scale_shards(files: _Files) -> list[Path]:
    """The safetensors files that may hold scale tensors: from the index when there is one, else the single file."""
    index_path = files.get(_INDEX)
    if index_path is not None:
        weight_map = _read_index(index_path)["weight_map"]
        wanted = sorted({shard for name, shard in weight_map.items() if _NAME.match(name)})
        return [files.get(shard, listed=True) for shard in wanted]
    single = files.get(_SINGLE)
    if single is not None:
        return [single]
    scales_only = files.get(KV_SCALES_FILE)
    if scales_only is not None:
        return [scales_only]
    unknown = [name for name in (_INDEX, _SINGLE, KV_SCALES_FILE) if name in files.uncached]
    if unknown:  # offline and never cached: they may hold the scales
        raise files.not_downloaded(unknown)
    return []


def read_checkpoint_scales(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> CheckpointScales:
    """Find and read the KV scale tensors of a checkpoint without reading its weights (nothing is validated yet:
    ``to_kv_scales`` does that).

    Args:
        name_or_path: a local directory or a Hub repo id.
        revision: the Hub branch, tag or commit (default: the main branch).
        token: the Hub token (``True``: the saved login); for private or gated repositories.
        cache_dir: the Hugging Face cache to download into (default: ``HF_HUB_CACHE``).
        local_files_only: read only what the Hugging Face cache already holds.
    """
    files = _Files(name_or_path, revision, token, cache_dir, local_files_only)
    config = files.json("config.json") or {}
    producer, strategy = _scheme(config, files.json(_MODELOPT), files.name)
    text = _text_config(config)
    found = CheckpointScales(files.name, producer or "legacy", strategy or "tensor",
                             text.get("num_hidden_layers"), text.get("num_key_value_heads"))  # fmt: skip
    by_prefix: dict[str, dict[str, dict[int, tuple[str, torch.Tensor]]]] = {}
    for shard in _scale_shards(files):
        with _open_safetensors(shard) as reader:
            for name in reader.keys():
                match = _NAME.match(name)
                if match:
                    kinds = by_prefix.setdefault(match["prefix"], {})
                    kinds.setdefault(_SUFFIXES[match["suffix"]], {})[int(match["layer"])] = (
                        name, reader.get_tensor(name)
                    )  # fmt: skip
    if not by_prefix:
        raise ValueError(
            f"{files.name}: no KV cache scales found; looked for '*layers.N.self_attn.k_scale' / 'v_scale' "
            "(compressed-tensors), 'k_proj.k_scale' / 'v_proj.v_scale' (ModelOpt), 'k_proj.output_scale' / "
            f"'v_proj.output_scale' and 'kv_scale' (legacy) in {_INDEX}, {_SINGLE} or {KV_SCALES_FILE}"
        )
    prefixes = sorted(by_prefix)
    if len(prefixes) > 1:
        prefixes = [p for p in prefixes if not _NON_TEXT_PREFIX.search(p)] or prefixes
    if len(prefixes) > 1:
        raise ValueError(f"{files.name}: KV scales under several prefixes {prefixes}; cannot tell which is the LM")
    found.tensors = by_prefix[prefixes[0]]
    if producer is None and ("k" in found.tensors or "kv" in found.tensors):
        found.strategy = "attn_head" if any(t.numel() > 1 for _, t in found.tensors.get("k", {}).values()) else "tensor"
    return found


def to_kv_scales(found: CheckpointScales, *, missing: str = "error", num_layers: int | None = None) -> KVScales:
    """Validate what a checkpoint holds and build ``KVScales`` (see ``load_kv_scales`` for ``missing``); a bad scale
    tensor is refused by its name in the checkpoint (``scales.check_scale``)."""
    if missing not in ("error", "unit"):
        raise ValueError(f"missing must be 'error' or 'unit', got {missing!r}")
    for kind in ("k_zero", "v_zero", "q_zero"):
        for name, tensor in found.tensors.get(kind, {}).values():
            if tensor.float().abs().max().item() != 0.0:
                raise ValueError(f"{name} is not all zeros; asymmetric FP8 KV scales are not supported")
    keys = {i: check_scale(t, n) for i, (n, t) in found.tensors.get("k", {}).items()}
    values = {i: check_scale(t, n) for i, (n, t) in found.tensors.get("v", {}).items()}
    for i, (name, tensor) in found.tensors.get("kv", {}).items():
        shared = check_scale(tensor, name)
        keys.setdefault(i, shared)
        values.setdefault(i, shared)
    layers = num_layers or found.num_layers or (max([*keys, *values], default=-1) + 1)
    beyond = sorted(i for i in {*keys, *values} if i >= layers)
    if beyond:
        raise ValueError(
            f"{found.source}: scales for layer(s) {beyond} but the model has {layers} layers (a checkpoint for "
            "another model?)"
        )
    absent = sorted(i for i in range(layers) if i not in keys or i not in values)
    if absent and missing == "error":
        raise ValueError(
            f"{found.source}: no K/V scales for layer(s) {absent}; pass missing='unit' to use 1.0 there (vLLM's "
            "fallback)"
        )
    if absent:
        logger.warning("%s: no K/V scales for layer(s) %s; using 1.0 there", found.source, absent)
    heads = {t.numel() for t in (*keys.values(), *values.values())}
    if found.num_kv_heads is not None and heads - {1, found.num_kv_heads}:
        raise ValueError(
            f"{found.source}: per-head scales have {sorted(heads - {1})} entries but the model has "
            f"{found.num_kv_heads} KV heads"
        )
    width = max(heads)
    unit = torch.ones(width)
    expand = lambda t: t.expand(width).clone() if t.numel() == 1 else t  # a per-tensor layer in a per-head checkpoint
    strategy = "attn_head" if width > 1 else "tensor"
    return KVScales(
        [expand(keys.get(i, unit)) for i in range(layers)],
        [expand(values.get(i, unit)) for i in range(layers)],
        strategy,
        query=_sane_queries(found, layers),
    )


def _sane_queries(found: CheckpointScales, layers: int) -> list[torch.Tensor | None] | None:
    queries = found.tensors.get("q")
    if not queries:
        return None
    result: list[torch.Tensor | None] = [None] * layers
    ignored = []
    for i, (name, tensor) in queries.items():
        values = tensor.detach().float().flatten()
        if i < layers and not unusable_scales(values, *SANE_Q_SCALE).any():
            result[i] = values
        else:
            ignored.append(name)
    if ignored:
        logger.warning(
            "ignoring %d unusable q_scale tensor(s) (non-finite or absurd), e.g. %s", len(ignored), ignored[0]
        )
    return result if any(q is not None for q in result) else None


def load_kv_scales(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    missing: str = "error",
) -> KVScales:
    """KV scales of a checkpoint -- a local directory or a Hub repo id -- exactly as vLLM would use them.

    Every K/V scale must be finite, positive and within ``scales.SMALLEST_SCALE .. LARGEST_SCALE``; garbage
    ``q_scale`` tensors are dropped with a warning and never stop K/V from loading.

    Args:
        name_or_path: a local directory or a Hub repo id.
        revision, token, cache_dir, local_files_only: where and how Hub files are fetched, as for
            ``read_checkpoint_scales``.
        missing: ``"error"`` (default) refuses a checkpoint that lacks K or V scales for some layer; ``"unit"`` uses
            1.0 there with a warning naming the layers (vLLM's behaviour).
    """
    found = read_checkpoint_scales(
        name_or_path, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    return to_kv_scales(found, missing=missing)


def save_kv_scales(scales: KVScales, directory: str | os.PathLike, *, prefix: str = "model.") -> Path:
    """Write ``scales`` into ``directory`` in the compressed-tensors layout (see the module docstring); ``prefix`` is
    what comes before ``layers.N.self_attn.`` in the tensor names."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "config.json"
    config: dict = _read_json(config_path) if config_path.is_file() else {"num_hidden_layers": scales.num_layers}
    text = _text_config(config)
    if text.get("num_hidden_layers") not in (None, scales.num_layers):
        raise ValueError(f"scales are for {scales.num_layers} layers but {config_path} has {text['num_hidden_layers']}")
    quant = config.get("quantization_config")
    if quant and quant.get("quant_method") != "compressed-tensors":
        raise ValueError(
            f"{config_path} is quantized with {quant.get('quant_method')!r}; a compressed-tensors kv_cache_scheme "
            "cannot be added to it"
        )
    shape = (1,) if scales.strategy == "tensor" else (-1, 1, 1)
    tensors = {}
    for i in range(scales.num_layers):
        base = f"{prefix}layers.{i}.self_attn."
        tensors[base + "k_scale"] = scales.key[i].reshape(shape).contiguous()
        tensors[base + "v_scale"] = scales.value[i].reshape(shape).contiguous()
    save_file(tensors, str(directory / KV_SCALES_FILE), metadata={"format": "pt"})
    _update_index(directory, tensors)
    config["quantization_config"] = {
        **(quant or {"config_groups": {}, "format": "dense", "ignore": [], "quantization_status": "compressed"}),
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": {
            "num_bits": 8,
            "type": "float",
            "strategy": scales.strategy,
            "symmetric": True,
            "dynamic": False,
            "group_size": None,
            "observer": "minmax",
        },  # fmt: skip
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _update_index(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    index_path = directory / _INDEX
    if index_path.is_file():
        index = _read_index(index_path)
    else:
        index = {"metadata": {}, "weight_map": {}}
        single = directory / _SINGLE
        if single.is_file():
            with _open_safetensors(single) as reader:
                index["weight_map"] = {name: _SINGLE for name in reader.keys()}
    elsewhere = sorted(n for n, shard in index["weight_map"].items() if _NAME.match(n) and shard != KV_SCALES_FILE)
    if elsewhere:
        raise ValueError(
            f"{directory} already has KV scales in its weights (e.g. {elsewhere[0]}); write the new scales to a "
            "copy without them, or to a fresh directory"
        )
    weight_map = dict(index["weight_map"])
    weight_map.update({name: KV_SCALES_FILE for name in tensors})
    index["weight_map"] = dict(sorted(weight_map.items()))
    total = index.setdefault("metadata", {}).get("total_size")
    if isinstance(total, int):
        index["metadata"]["total_size"] = total + sum(t.numel() * t.element_size() for t in tensors.values())
    index_path.write_text(json.dumps(index, indent=2) + "\n")
