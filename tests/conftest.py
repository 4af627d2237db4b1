"""Test set-up: the Triton interpreter for CPU kernels, shared models, and the GPU marker.

TRITON_INTERPRET=1 must be set before triton and hf_fp8cache.kernels (which reads it once) are imported, so it is set
here, at collection time; the ``torch_path`` fixture switches to the torch reference with ``cpu_backend``. On the GPU
machine (``pytest -m gpu``) set ``HF_FP8CACHE_NO_INTERPRET=1`` to run the compiled kernels instead.
"""

import os

if not os.environ.get("HF_FP8CACHE_NO_INTERPRET"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread a worker: `make test` runs one worker a core
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_path():
    """Run CPU tensors through the torch reference instead of the (slow) interpreter; both write the same bytes."""
    from hf_fp8cache.kernels import cpu_backend

    with cpu_backend("torch"):
        yield


@pytest.fixture(scope="session")
def tiny_model():
    from helpers import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    from hf_fp8cache.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(device="cpu", dtype=torch.float32)
    return model, tokenizer
