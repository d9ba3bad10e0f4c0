"""Compile every Triton kernel of megatron_ultramem.kernels for sm_90 (H100/H200) without a GPU.

    python tests/kernels/compile_sm90.py [--json OUT] [--md OUT]   # TRITON_INTERPRET unset

The interpreter checks numerics, but not what only the compiler enforces: a variable must keep one
type (shape included) across `if` branches and loop iterations, constexpr-ness, and what lowers
at all. This compiles each kernel at representative constexpr values through Triton's own
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the ptxas Triton ships), targeting
compute capability 9.0, and reports each cubin's resource usage (registers, stack, shared memory)
read with the cuobjdump Triton ships. It proves the kernels compile for Hopper under this Triton;
it does not run them (tests/kernels on CUDA and benchmarks/gpu_check.py do that).
"""

import json
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_ultramem.kernels import gather as G  # noqa: E402
from megatron_ultramem.kernels import topm as TM  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _variants():
    """(name, kernel, signature, constexprs, num_warps), each as the launchers would pass them:
    bf16 tables (the training dtype) at every launch-table shape, fp32/fp64 at one shape each."""
    out = []
    fwd = [("*bf16", 64, 4, 8, 1), ("*bf16", 256, 4, 4, 2), ("*bf16", 256, 16, 4, 4),
           ("*fp32", 32, 9, 4, 2)]  # fmt: skip  (dtype, BLOCK_D, E, UNROLL, warps)
    for dt, bd, e, unroll, warps in fwd:
        for dest in sorted({dt, "*fp32"}):  # direct store, or the split workspace
            sig = dict(rows_ptr="*i64", blocks_ptr="*i64", scores_ptr="*fp32", values_ptr=dt,
                       out_ptr=dest, T="i32", M="i32", Dv="i32", DH="i32", CHUNK="i32")  # fmt: skip
            c = dict(E=e, E_PAD=triton.next_power_of_2(e), H_CORES=2, BLOCK_D=bd,
                     UNROLL=unroll, ACC=tl.float32, RNE_BY_HAND=False)  # fmt: skip
            out.append((f"gather_fwd {dt[1:]}->{dest[1:]} bd{bd} E{e} u{unroll}",
                        G._gather_pool_fwd_kernel, sig, c, warps))  # fmt: skip
    out.append(("split_reduce ->bf16", G._split_reduce_kernel,
                dict(ws_ptr="*fp32", out_ptr="*bf16", n="i32", SPLIT="i32"),
                dict(BLOCK=1024, RNE_BY_HAND=False), 4))  # fmt: skip
    bwd = [("*bf16", True, True), ("*bf16", True, False), ("*fp32", False, True)]
    for dt, need_gs, atomic in bwd:
        sig = dict(grad_ptr=dt, rows_ptr="*i64", blocks_ptr="*i64", scores_ptr="*fp32",
                   values_ptr=dt, gscores_ptr="*fp32", gvalues_ptr="*fp32", TM="i32", M="i32",
                   Dv="i32", DH="i32")  # fmt: skip
        c = dict(E=4, H_CORES=2, H_PAD=2, BLOCK_K=16, BLOCK_D=128, ACC=tl.float32,
                 NEED_GS=need_gs, ATOMIC_DV=atomic, RNE_BY_HAND=False)  # fmt: skip
        out.append((f"gather_bwd {dt[1:]} gs{int(need_gs)} atomic{int(atomic)}",
                    G._gather_pool_bwd_kernel, sig, c, 8))  # fmt: skip
    # (destination, LOAD_OLD): an fp32 main_grad, a bf16 main_grad (grad_reduce_in_fp32 off), and
    # the zero-filled bf16 gradient of a table without main_grad
    for dest, load_old in (("*fp32", True), ("*bf16", True), ("*bf16", False)):
        sig = dict(grad_ptr="*bf16", order_ptr="*i64", sorted_rows_ptr="*i64", run_end_ptr="*i32",
                   blocks_ptr="*i64", scores_ptr="*fp32", gvalues_ptr=dest, M="i32", Dv="i32",
                   DH="i32")  # fmt: skip
        c = dict(E=4, H_CORES=2, BLOCK_D=256, UNROLL=4, ACC=tl.float32, LOAD_OLD=load_old,
                 RNE_BY_HAND=False)  # fmt: skip
        out.append((f"scatter_sorted bf16->{dest[1:]} load_old{int(load_old)}",
                    G._scatter_sorted_kernel, sig, c, 2))  # fmt: skip
    register = [("*bf16", 128, 2), ("*fp32", 16, 3), ("*fp64", 128, 2)]  # (dtype, M_PAD, r)
    tiled = [("*bf16", 768, 2), ("*bf16", 129, 2), ("*fp32", 13, 2), ("*fp32", 1024, 3),
             ("*fp64", 257, 2)]  # fmt: skip  (dtype, m, r)
    for dt, m_pad, r in register:
        fp64 = dt == "*fp64"
        comp = "*fp64" if fp64 else "*fp32"
        sig = dict(sr_ptr=dt, sc_ptr=dt, csum_ptr=comp, out_idx_ptr="*i64", out_val_ptr=comp,
                   H="i32", m="i32")  # fmt: skip
        c = dict(R=r, M_PAD=m_pad, **TM._key_args(fp64))
        out.append((f"topm_register {dt[1:]} M_PAD{m_pad} r{r}", TM._tucker_select_kernel,
                    sig, c, max(1, min(16, m_pad * m_pad // 1024))))  # fmt: skip
    for dt, m, r in tiled:
        fp64 = dt == "*fp64"
        comp = "*fp64" if fp64 else "*fp32"
        sig = dict(sr_ptr=dt, sc_ptr=dt, csum_ptr=comp, out_idx_ptr="*i64", out_val_ptr=comp,
                   scr_val_ptr=comp, scr_idx_ptr="*i32", status_ptr="*i32", H="i32", m="i32",
                   cap="i32", idx_bits="i32")  # fmt: skip
        c = dict(R=r, MARGIN=1e-6, **TM.tiled_config(m), **TM._key_args(fp64))
        out.append((f"topm_tiled {dt[1:]} m{m} r{r}", TM._tucker_select_tiled_kernel,
                    sig, c, 8))  # fmt: skip
    return out


def resource_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    usage = {}
    for line in res.stdout.splitlines():
        for item in line.replace(",", " ").split():
            if ":" in item and item.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"):
                key, value = item.split(":")
                usage[key.lower()] = int(value)
    return usage


def markdown(results) -> str:
    import datetime
    import platform

    import torch

    lines = [
        "# Kernels compiled for sm_90 without a GPU: resource usage",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()} {platform.machine()}, CPU only (no GPU); triton "
        f"{triton.__version__}, torch {torch.__version__}, python {platform.python_version()}",
        "- command: `python tests/kernels/compile_sm90.py --md <this file>` (TRITON_INTERPRET "
        "unset; tests/kernels/test_compile_sm90.py runs the same compiles)",
        "- what it is: Triton's own pipeline (TTIR -> PTX -> cubin, the ptxas Triton ships) for "
        "compute capability 9.0; usage read from each cubin with Triton's cuobjdump. Not a run: "
        "no timings; the H200 image's Triton 3.6 may allocate differently.",
        "",
        "| kernel variant | num_warps | registers / thread | stack frame bytes | shared bytes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {r.get('num_warps')} | {r.get('reg')} | {r.get('stack')} "
                     f"| {r.get('shared')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    results = []
    for name, fn, sig, consts, warps in _variants():
        full = dict(sig, **{k: "constexpr" for k in consts})
        try:
            k = triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts), target=TARGET,
                               options={"num_warps": warps})  # fmt: skip
            usage = resource_usage(k.asm["cubin"])
            results.append(dict(name=name, ok=True, num_warps=warps, **usage))
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            results.append(dict(name=name, ok=False, error=f"{type(e).__name__}: {e}"[-2000:]))
        print(json.dumps(results[-1]), flush=True)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(results, f, indent=1)
    if "--md" in sys.argv:
        with open(sys.argv[sys.argv.index("--md") + 1], "w") as f:
            f.write(markdown(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
