# Sourced by the GPU scripts (from the repository root or anywhere): $OUT made, the compiled kernels rather than the
# interpreter, unbuffered output, the working directory the repository root, and the package installed editable
# against the image's torch / triton / transformers (no network: --no-deps).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_FP8CACHE_NO_INTERPRET=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.txt 2>&1 || { tail -5 /tmp/pip.txt; exit 1; }
