"""Relaunching a Triton kernel without Triton's per-call argument binding: ``LaunchMemo``.

``kernel[grid](*args, **meta)`` binds and specializes every argument on each call before it launches: 10 to 25 us
of host time for our 11 to 34 arguments on the H200 machine's host, against about 6 us for the launch itself
(``benchmarks/results/host_breakdown.json``). A decode step launches one or two kernels per layer (the attention
with the step's token; the quantize when the attention does not write the token), so in an eager
``generate`` that binding is much of what the FP8 cache adds to a layer's host time.

A ``LaunchMemo`` belongs to one caller that launches the same kernels with mostly the same arguments step after step
(a cache layer). For each kernel it keeps the last launch: the compiled kernel Triton returned, the arguments and
the meta-parameters. The next launch of that kernel reuses the compiled kernel directly when it would be the one
Triton picks:

- the meta-parameters (constexprs and launch options) are equal;
- every argument is the same object as in the launch that compiled it, or specializes the same way: a tensor of the
  same dtype and 16-byte alignment of its address, an int with the same ``== 1``, ``% 16 == 0`` and int32-range
  properties (a superset of what Triton specializes on, so a kernel is never reused for arguments it was not
  compiled for; of an int the kernel marks ``do_not_specialize``, only the range), a float.

Otherwise the launch goes through Triton (which compiles or finds the kernel) and the memo keeps the new one.

A memo also remembers, per kernel, the form of the last call whose arguments it checked (``check_once``), so a step
like the last checks only what changes from step to step: the lengths of a decode attention (``kernels/attention.py``),
the position of a write (``kernels/dispatch.py``).

Every launch goes through Triton under the interpreter, with launch hooks installed (profilers), or with a Triton
whose compiled kernels lack the launcher signature this relies on (checked once: Triton 3.x).
"""

from __future__ import annotations

import functools
import inspect
import os
import weakref

import torch
import triton

__all__ = ["LaunchMemo", "launch"]


def _spec(arg):
    """What Triton's specialization can depend on, for an argument that is not the same object as before. An int's is
    an int (its int32 range, ``== 1``, ``% 16 == 0``), so the common case allocates nothing the garbage collector
    tracks; other kinds give a tuple (never equal to an int)."""
    kind = type(arg)
    if kind is int:
        return (arg >> 31) * 4 + (arg == 1) * 2 + (not arg & 15)
    if kind is float:
        return kind
    if isinstance(arg, torch.Tensor):
        return kind, arg.dtype, not arg.data_ptr() & 15
    return kind, arg


def _unspecialized_spec(arg):
    """``_spec`` of a ``do_not_specialize`` argument: an int's value does not matter, only its int32 range."""
    return arg >> 31 if type(arg) is int else _spec(arg)


@functools.cache
def _parameters(kernel) -> tuple[tuple[str, ...], tuple[object, ...], frozenset[str]]:
    """A kernel's parameter names, their defaults, and the names it does not specialize on."""
    parameters = inspect.signature(kernel.fn).parameters
    unspecialized = {name if isinstance(name, str) else list(parameters)[name] for name in kernel.do_not_specialize}
    return tuple(parameters), tuple(p.default for p in parameters.values()), frozenset(unspecialized)


# Triton 3.x compiled for a GPU (``triton.knobs``, the compiled kernel's ``run``); read once, like ``dispatch.py``
_DIRECT = os.environ.get("TRITON_INTERPRET", "0") != "1" and hasattr(triton, "knobs")


# The current CUDA device's index: torch.cuda.current_device() without its lazy-initialization check, which
# costs a microsecond a call on the H200 machine's host and is never needed here (CUDA tensors exist already).
current_cuda_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)


def _current_stream(device: int) -> int:
    """The raw handle of ``device``'s current stream, which Triton launches on."""
    return triton.runtime.driver.active.get_current_stream(device)


class _BoundLaunch:
    """One compiled kernel with the arguments and meta-parameters of its last launch."""

    def __init__(self, kernel, compiled, device: int, args: tuple, meta: dict) -> None:
        self.compiled = compiled
        self.device = device
        # of the launch that compiled it (tensors held weakly: a layer's old buffers must be freed): an argument that
        # is the same object needs no check
        self.args = tuple(weakref.ref(arg) if isinstance(arg, torch.Tensor) else arg for arg in args)
        names, defaults, unspecialized = _parameters(kernel)
        self.spec_of = tuple(_unspecialized_spec if name in unspecialized else _spec for name in names[: len(args)])
        self.specs = tuple(spec_of(arg) for spec_of, arg in zip(self.spec_of, args))
        self.meta = meta
        # the launcher takes every parameter in order, constexprs included (Triton passes its bound arguments)
        self.tail = tuple(meta[name] if name in meta else default for name, default in zip(names, defaults))[
            len(args) :
        ]

    def matches(self, args: tuple, meta: dict) -> bool:
        if (meta is not self.meta and meta != self.meta) or len(args) != len(self.args):
            return False
        for arg, old, spec, spec_of in zip(args, self.args, self.specs, self.spec_of):
            kind = type(old)
            if kind is weakref.ref:
                old = old()
            elif kind is int and type(arg) is int and arg == old:  # strides, sizes: equal ints specialize alike
                continue
            if arg is not old and spec_of(arg) != spec:
                return False
        return True

    def __call__(self, grid: tuple[int, ...], args: tuple) -> None:
        compiled = self.compiled
        stream = _current_stream(self.device)
        full = (*args, *self.tail)
        grid = (*grid, 1, 1)
        hooks = triton.knobs.runtime
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *full), hooks.launch_enter_hook, hooks.launch_exit_hook,
                     *full)  # fmt: skip


class LaunchMemo:
    """The last launch of each kernel by one caller, reused while the arguments keep their specialization (see the
    module docstring). Not thread-safe; a copy starts empty."""

    def __init__(self) -> None:
        # by (id of the kernel, slot): hashing a Triton kernel object costs microseconds, its id nothing (kernels
        # are module-level objects that live as long as the process)
        self._launches: dict[tuple[int, str | None], _BoundLaunch] = {}
        self._scratch: dict[str, torch.Tensor] = {}
        self._checked: dict[str, tuple[tuple, tuple[weakref.ref, ...]]] = {}  # by kernel: the last checked call

    def launch(self, kernel, grid: tuple[int, ...], args: tuple, meta: dict, slot: str | None = None) -> None:
        """``kernel[grid](*args, **meta)``, through the compiled kernel of the last launch when it fits. A caller that
        launches one kernel in several variants each call keeps each in its own ``slot``."""
        if not _DIRECT:
            kernel[grid](*args, **meta)
            return
        device = current_cuda_device()
        key = (id(kernel), slot)
        bound = self._launches.get(key)
        if bound is not None and bound.device == device and bound.matches(args, meta):
            bound(grid, args)
            return
        compiled = kernel[grid](*args, **meta)
        if compiled is not None and hasattr(compiled, "run"):
            self._launches[key] = _BoundLaunch(kernel, compiled, device, args, meta)

    def check_once(self, kernel: str, form: tuple, tensors: tuple[torch.Tensor, ...], check, arguments: tuple) -> bool:
        """``check(*arguments)``, unless the last call of ``kernel`` this memo checked had this ``form`` (compared by
        value) over these ``tensors`` (the same objects, held weakly: a buffer the caller drops is freed, and a new
        tensor never matches an old one's identity). Returns whether it checked; a caller whose call it did not check
        checks only what changes from call to call (a length, a write position). A failed check is not remembered."""
        last = self._checked.get(kernel)
        if last is not None and last[0] == form and len(last[1]) == len(tensors):
            if all(ref() is tensor for ref, tensor in zip(last[1], tensors)):
                return False
        check(*arguments)
        self._checked[kernel] = (form, tuple(weakref.ref(tensor) for tensor in tensors))
        return True

    def scratch(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, zeroed: bool = False
    ) -> torch.Tensor:
        """A buffer the caller rewrites on every call (a kernel's partial results), kept from the last call under
        ``name`` when its shape, dtype and device are the same: no allocation step after step. Reuse is safe in
        stream order: the caller's next launches are queued after the last ones that read it. Uninitialized when
        made, or zeros with ``zeroed`` (for a kernel that leaves it zero again, as its slot counters)."""
        buffer = self._scratch.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            make = torch.zeros if zeroed else torch.empty
            buffer = self._scratch[name] = make(shape, dtype=dtype, device=device)
        return buffer

    def __deepcopy__(self, memo: dict) -> LaunchMemo:
        return LaunchMemo()


def launch(
    kernel, grid: tuple[int, ...], args: tuple, meta: dict, memo: LaunchMemo | None, slot: str | None = None
) -> None:
    """``kernel[grid](*args, **meta)``, through ``memo`` when there is one (``slot``: see ``LaunchMemo.launch``)."""
    if memo is None:
        kernel[grid](*args, **meta)
    else:
        memo.launch(kernel, grid, args, meta, slot)
