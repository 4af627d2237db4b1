"""The decode attention kernel compiled for the H200 (sm_90a) on this machine, without a GPU: registers, spills and
the SASS instructions of its software-pipelined key loop, for the per-tensor and the per-token-head builds (issue 18).

Triton compiles to PTX and runs ptxas and nvdisasm from its own wheel, so a kernel change can be read at the machine
level before it costs device time: the loop body's instruction mix (shared-memory traffic from layout conversions,
shuffles from reductions, conversions, spills) is what a memory-bound loop hides or does not.

    python benchmarks/decode_sass.py [B L] [--new-token] [--device-length] [--full]   (default 8 32768; ~15 s a build)

``--new-token``: the launch that also writes the step's token (``FP8Cache``'s decode step); ``--device-length``: the
filled length read on the device (``FP8StaticCache``); ``--full``: every mnemonic of the loop with its count. Another
Triton release (the GPU image has 3.6) can be read with ``pip install --target DIR triton==3.6.0 --no-deps`` and
``PYTHONPATH=DIR``.

Prints one table row per build. The launch is planned as ``decode_attention`` plans it (``plan_decode_attention``,
132 SMs), with bf16 queries of 32 heads over 8 KV heads, d = 128.
"""

import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from hf_fp8cache.kernels import attention
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_fp8cache.formats import INT8, resolve_format

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_H200_SMS = 132
_POINTER_DTYPES = {"q_ptr": "*bf16", "k_cache_ptr": "*u8", "v_cache_ptr": "*u8", "kv_start_ptr": "*i32",
                   "length_ptr": "*i32", "recent_k_ptr": "*bf16", "recent_v_ptr": "*bf16", "sink_ptr": "*fp32",
                   "new_k_ptr": "*bf16", "new_v_ptr": "*bf16", "k_inv_scale_ptr": "*fp32",
                   "v_inv_scale_ptr": "*fp32", "out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32",
                   "part_l_ptr": "*fp32", "counter_ptr": "*i32"}  # fmt: skip
_FLOATS = {"qk_scale", "softcap"}


def _int_arguments(B: int, L: int, slots: int, token_scales: bool) -> dict:
    """The integer arguments of ``decode_attention``'s launch for one decode step over a full cache of L tokens
    (query a transposed ``[B, 1, 32, 128]`` view, as transformers hands it over; no exact window, no new token), which
    Triton specializes on: 1 becomes a constant, a multiple of 16 gets its divisibility."""
    H, D = 8, 128
    return dict(stride_qb=32 * D, stride_qh=D, stride_qs=32 * D, stride_qd=1, stride_cb=H * L * D, stride_ch=L * D,
                stride_rb=H * L * D, stride_rh=L * D, stride_rs=D, stride_nkb=0, stride_nkh=0, stride_nkd=0,
                stride_nvb=0, stride_nvh=0, stride_nvd=0, scale_stride_h=int(token_scales), H=H, G=4, SQ=1,
                num_slots=slots, R=L, window=0, ring_slots=L)  # fmt: skip


def _signature(kernel, constexprs: dict, token_scales: bool) -> dict:
    scale_dtype = "*bf16" if token_scales else "*fp32"
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("k_scale_ptr", "v_scale_ptr"):
            signature[name] = scale_dtype
        elif name in _POINTER_DTYPES:
            signature[name] = _POINTER_DTYPES[name]
        else:
            signature[name] = "fp32" if name in _FLOATS else "i32"
    return signature


def compile_decode(
    fmt, token_scales: bool, B: int = 8, L: int = 32768, new_token: bool = False, device_length: bool = False
):
    """The compiled kernel (``.asm["cubin"]`` etc.) and its plan, for one decode step at B x L, specialized as a real
    launch of ``decode_attention`` would be: ``new_token``, the step's token written by the launch (``FP8Cache``);
    ``device_length``, the filled length read on the device (``FP8StaticCache``)."""
    plan = attention.plan_decode_attention(B, 8, 4, 1, 128, L, None, _H200_SMS)
    meta, _ = attention._launch_meta(plan, fmt, tl.float16, device_length, False, False, False, new_token,
                                     token_scales, token_scales, False, None)  # fmt: skip
    options = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
    kernel = attention._decode_attention_kernel
    integers = _int_arguments(B, L, plan.slots, token_scales)
    unspecialized = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    constexprs = dict(meta, D=128, **{name: 1 for name, value in integers.items() if value == 1})
    signature = _signature(kernel, constexprs, token_scales)
    divisible = [i for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")
                 or (name in integers and integers[name] % 16 == 0 and name not in unspecialized)]  # fmt: skip
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in divisible})  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options), plan


def _instructions(sass: str) -> list[str]:
    """SASS lines as ``[label:]`` markers and instruction mnemonics (predicates dropped)."""
    out = []
    for line in sass.splitlines():
        if re.match(r"^\.L_x_\d+:", line):
            out.append(line.split(":")[0])
        elif match := re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)(.*)", line):
            out.append(match.group(1) + (" " + match.group(2).split("`(")[1].rstrip(" );") if "BRA" in
                                         match.group(1) and "`(" in match.group(2) else ""))  # fmt: skip
    return out


def pipelined_loop(sass: str) -> list[str]:
    """The instructions of the software-pipelined key loop (the unmasked blocks): the loop, a label and a branch
    back to it, that issues asynchronous copies (LDGSTS)."""
    lines = _instructions(sass)
    labels = {line: i for i, line in enumerate(lines) if line.startswith(".L_x_")}
    for i, line in enumerate(lines):
        if line.startswith("BRA ") and line.split()[1] in labels and labels[line.split()[1]] < i:
            body = lines[labels[line.split()[1]] + 1 : i + 1]
            if any(op.startswith("LDGSTS") for op in body):
                return body
    raise ValueError("no pipelined loop in this build")


def report(name: str, kernel) -> dict:
    """Registers, stack bytes (spills), and the pipelined loop's length and mnemonics (with width suffixes)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_BIN / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    body = pipelined_loop(sass)
    ops = collections.Counter(op.split()[0] for op in body)
    return {"build": name, "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)), "loop": len(body), "ops": ops}  # fmt: skip


def main(B: int = 8, L: int = 32768, full: bool = False, new_token: bool = False, device_length: bool = False) -> None:
    builds = [("e4m3 per tensor", resolve_format("fp8"), False), ("e4m3 token head", resolve_format("fp8"), True),
              ("int8 token head", INT8, True)]  # fmt: skip
    watched = ["HMMA", "LDG", "LDGSTS", "LDS", "LDSM", "STS", "STSM", "SHFL", "BAR", "F2FP", "PRMT", "LOP3", "MUFU",
               "FMUL", "FFMA", "LDL", "STL"]  # fmt: skip
    print(f"{'build':16s} {'reg':>4s} {'stack':>5s} {'loop':>5s} " + " ".join(f"{op:>6s}" for op in watched))
    for name, fmt, token_scales in builds:
        kernel, plan = compile_decode(fmt, token_scales, B, L, new_token, device_length)
        row = report(name, kernel)
        families: collections.Counter = collections.Counter()
        for op, count in row["ops"].items():
            families[op.split(".")[0]] += count
        print(f"{name:16s} {row['registers']:4d} {row['stack']:5d} {row['loop']:5d} "
              + " ".join(f"{families.get(op, 0):6d}" for op in watched), flush=True)  # fmt: skip
        if full:
            print("   ", dict(row["ops"].most_common()))
    print(
        f"(triton {triton.__version__}; plan: {plan}; the pipelined loop's instructions, one warp-iteration of "
        f"{plan.block_n} keys)"
    )


if __name__ == "__main__":
    flags = {"--full", "--new-token", "--device-length"}
    numbers = [int(arg) for arg in sys.argv[1:] if arg not in flags]
    main(*numbers[:2], full="--full" in sys.argv, new_token="--new-token" in sys.argv,
         device_length="--device-length" in sys.argv)  # fmt: skip
