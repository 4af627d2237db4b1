"""LaunchMemo (kernels/launch.py): a relaunch reuses the compiled kernel only when Triton would pick the same one.

The memo only acts on a GPU; here a fake kernel stands in for Triton (it records whether a launch went through
Triton's binding or straight to the compiled kernel's launcher) and the memo's direct path is switched on. The GPU
tests run the real path (every cache test on the GPU machine goes through it).
"""

import weakref

import pytest
import torch
from hf_fp8cache.kernels import launch


class FakeCompiled:
    function = "function-handle"
    packed_metadata = "packed"

    def __init__(self, log):
        self.log = log

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter, exit, *args):
        self.log.append(("direct", (g0, g1, g2), args))


class FakeKernel:
    """Stands for a @triton.jit kernel ``(x_ptr, n, scale, BLOCK: constexpr, FLAG: constexpr = 7)``."""

    def __init__(self):
        self.log = []

        def kernel(x_ptr, n, scale, BLOCK, FLAG=7):
            pass

        self.fn = kernel
        self.do_not_specialize = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("triton", grid, args))
            return FakeCompiled(self.log)

        return run


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(launch, "_DIRECT", True)
    monkeypatch.setattr(launch, "current_cuda_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 1234)


def test_a_relaunch_with_the_same_specialization_goes_straight_to_the_compiled_kernel(direct):
    kernel, memo = FakeKernel(), launch.LaunchMemo()
    x = torch.zeros(64, dtype=torch.uint8)
    memo.launch(kernel, (4,), (x, 4096, 0.5), {"BLOCK": 64})
    memo.launch(kernel, (5, 2), (x, 4112, 0.25), {"BLOCK": 64})  # another length, same specialization
    memo.launch(kernel, (5,), (x.clone(), 4128, 0.25), {"BLOCK": 64})  # a new aligned tensor of the same dtype
    assert [entry[0] for entry in kernel.log] == ["triton", "direct", "direct"]
    # the launcher gets every parameter in order, the constexprs (given or default) after the arguments
    assert kernel.log[1] == ("direct", (5, 2, 1), (x, 4112, 0.25, 64, 7))


@pytest.mark.parametrize(
    "change",
    ["unaligned tensor", "other dtype", "int becomes 1", "int becomes a multiple of 16", "int beyond int32", "meta"],
)
def test_a_relaunch_that_specializes_differently_goes_through_triton(direct, change):
    kernel, memo = FakeKernel(), launch.LaunchMemo()
    x = torch.zeros(64, dtype=torch.uint8)
    args, meta = (x, 4097, 0.5), {"BLOCK": 64}
    memo.launch(kernel, (4,), args, meta)
    changed = {
        "unaligned tensor": ((x[1:], 4097, 0.5), meta),
        "other dtype": ((x.view(torch.int8), 4097, 0.5), meta),
        "int becomes 1": ((x, 1, 0.5), meta),
        "int becomes a multiple of 16": ((x, 4096, 0.5), meta),
        "int beyond int32": ((x, 2**31 + 1, 0.5), meta),
        "meta": (args, {"BLOCK": 32}),
    }[change]
    memo.launch(kernel, (4,), *changed)
    memo.launch(kernel, (4,), *changed)  # and the memo now holds that specialization
    assert [entry[0] for entry in kernel.log] == ["triton", "triton", "direct"]


def test_without_the_direct_path_every_launch_goes_through_triton(monkeypatch):
    monkeypatch.setattr(launch, "_DIRECT", False)  # the interpreter, as in this CI
    kernel, memo = FakeKernel(), launch.LaunchMemo()
    x = torch.zeros(64, dtype=torch.uint8)
    for _ in range(3):
        memo.launch(kernel, (4,), (x, 4097, 0.5), {"BLOCK": 64})
    assert [entry[0] for entry in kernel.log] == ["triton"] * 3


def test_variants_of_one_kernel_keep_their_own_slots(direct):
    kernel, memo = FakeKernel(), launch.LaunchMemo()
    x = torch.zeros(64, dtype=torch.uint8)
    for _ in range(2):  # a caller launching two variants of a kernel every call, as decode with an exact window
        memo.launch(kernel, (4,), (x, 4097, 0.5), {"BLOCK": 64}, slot="fp8")
        memo.launch(kernel, (1,), (x, 4097, 0.5), {"BLOCK": 32}, slot="window")
    assert [entry[0] for entry in kernel.log] == ["triton", "triton", "direct", "direct"]


def test_an_unspecialized_int_may_change_freely(direct):
    kernel, memo = FakeKernel(), launch.LaunchMemo()
    kernel.do_not_specialize = ["n"]
    x = torch.zeros(64, dtype=torch.uint8)
    for n in (4097, 4096, 1, 4098):  # a length that crosses multiples of 16 every few steps, as decode's does
        memo.launch(kernel, (4,), (x, n, 0.5), {"BLOCK": 64})
    assert [entry[0] for entry in kernel.log] == ["triton", "direct", "direct", "direct"]


def test_the_memo_does_not_keep_old_buffers_alive(direct):
    kernel, memo = FakeKernel(), launch.LaunchMemo()
    x = torch.zeros(64, dtype=torch.uint8)
    memo.launch(kernel, (4,), (x, 4097, 0.5), {"BLOCK": 64})
    gone = weakref.ref(x)
    kernel.log.clear()  # (the fake's record of the arguments)
    del x
    assert gone() is None  # a cache layer's grown-out buffer is freed
    memo.launch(kernel, (4,), (torch.zeros(64, dtype=torch.uint8), 4097, 0.5), {"BLOCK": 64})
    assert [entry[0] for entry in kernel.log] == ["direct"]


def test_scratch_buffers_are_kept_while_shape_dtype_and_device_hold():
    memo = launch.LaunchMemo()
    first = memo.scratch("part", (4, 8), torch.float32, torch.device("cpu"))
    assert memo.scratch("part", (4, 8), torch.float32, torch.device("cpu")) is first
    assert memo.scratch("other", (4, 8), torch.float32, torch.device("cpu")) is not first  # its own name
    grown = memo.scratch("part", (4, 16), torch.float32, torch.device("cpu"))
    assert grown is not first and grown.shape == (4, 16)
    assert memo.scratch("part", (4, 16), torch.float64, torch.device("cpu")).dtype == torch.float64


def test_a_call_is_checked_unless_its_form_and_tensors_are_the_last_checked_ones():
    memo, buffer, scale, checks = launch.LaunchMemo(), torch.zeros(4), torch.ones(1), []
    other_scale = scale.clone()  # equal values, another tensor

    def checked(kernel, form, tensors):
        return memo.check_once(kernel, form, tensors, checks.append, (kernel,))

    assert checked("kernel", ("form",), (buffer, scale))
    assert not checked("kernel", ("form",), (buffer, scale))
    assert checked("another kernel", ("form",), (buffer, scale))
    assert not checked("kernel", ("form",), (buffer, scale))  # each kernel its own last call
    assert checked("kernel", ("other form",), (buffer, scale))
    assert checked("kernel", ("form",), (buffer, scale))
    assert checked("kernel", ("form",), (buffer, other_scale))
    assert checked("kernel", ("form",), (buffer,))
    assert checks == ["kernel", "another kernel", "kernel", "kernel", "kernel", "kernel"]


def test_a_failed_check_is_not_remembered():
    memo, buffer = launch.LaunchMemo(), torch.zeros(4)

    def bad(*arguments):
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        memo.check_once("kernel", ("form",), (buffer,), bad, ())
    with pytest.raises(ValueError, match="bad"):
        memo.check_once("kernel", ("form",), (buffer,), bad, ())


def test_a_checked_call_does_not_keep_its_tensors_alive():
    memo, buffer, checks = launch.LaunchMemo(), torch.zeros(4), []
    memo.check_once("kernel", ("form",), (buffer,), checks.append, (1,))
    freed = weakref.ref(buffer)
    del buffer
    assert freed() is None
    assert memo.check_once("kernel", ("form",), (torch.zeros(4),), checks.append, (2,))
    assert checks == [1, 2]
