"""``python -m hf_fp8cache.bench [MODE] [options]``: the same as ``hf-fp8cache bench``."""

from . import main

main()
