"""The benchmark wing: ``hf-fp8cache bench [MODE] [options]``, or ``python -m hf_fp8cache.bench [MODE] [options]``.

One module per benchmark, each with ``add_arguments(parser)`` and ``run(args)``, sharing ``common.py``. Only the
chosen mode's module is imported. No module of the library outside this package imports it (the command line
imports it when the ``bench`` command runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

__all__ = ["MODES", "main"]

# mode -> (module of this package, what it measures)
MODES: dict[str, tuple[str, str]] = {
    "generate": ("generate", "decode through model.generate with each cache: ms/token, tokens/s, TTFT, KV and peak "
                 "memory (default; the 8B shape on GPU, a tiny one on CPU)"),
    "forward-loop": ("forward_loop", "a bare forward loop without generate: step time, KV bytes, peak memory"),
    "compiled": ("compiled", "compiled decode steps, FP8StaticCache vs StaticCache and the bandwidth floors (GPU)"),
    "attention": ("attention", "the decode attention kernel vs SDPA, CUDA-graph timed; --sweep tunes it (GPU)"),
    "layer": ("layer", "one layer's decode-step cache update, FP8 vs DynamicLayer (GPU)"),
    "prefill": ("prefill", "one layer's attention of a q-token chunk over an L-token FP8 history vs SDPA (issue 17)"),
    "multigpu": ("multigpu", "TP=2 decode at 8x32768 per cache, and the largest batch one GPU holds, bf16 vs FP8"),
}  # fmt: skip
DEFAULT_MODE = "generate"


def _top_parser() -> argparse.ArgumentParser:
    modes = "\n".join(f"  {name:<13} {text}" for name, (_, text) in MODES.items())
    parser = argparse.ArgumentParser(
        prog="hf-fp8cache bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decode benchmarks of the FP8 KV cache; rows go to <out-dir>/<name>.{json,csv,png}.",
        epilog=f"modes:\n{modes}\n\n'hf-fp8cache bench MODE --help' lists a mode's options.",
    )  # fmt: skip
    parser.add_argument("mode", nargs="?", choices=list(MODES), default=DEFAULT_MODE, metavar="MODE",
                        help=f"one of the modes below (default {DEFAULT_MODE})")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | None:
    """Run one benchmark: ``argv`` is ``[MODE] [options]`` (MODE defaults to ``generate``); returns its rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if argv[:1] in (["-h"], ["--help"]):
        top.print_help()
        return None
    mode = DEFAULT_MODE
    if argv and not argv[0].startswith("-"):
        if argv[0] not in MODES:
            top.error(f"unknown benchmark {argv[0]!r}; choose from {', '.join(MODES)}")
        mode = argv.pop(0)
    module = importlib.import_module(f"{__name__}.{MODES[mode][0]}")
    parser = argparse.ArgumentParser(prog=f"hf-fp8cache bench {mode}", description=module.__doc__.splitlines()[0])
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))
