"""Compile every launch variant of megatron_ultramem.kernels for sm_90 (H100/H200) as a real launch
would, without a GPU, and read what the compiler made of it.

    python tests/kernels/compile_sm90.py [--md OUT.md] [--json OUT.json] [--quick]
        # TRITON_INTERPRET unset; --quick: the gather kernels at the shapes the test needs

How the variants are found: the launchers themselves (gather_pool_forward / gather_pool_backward /
phase2_select) run on `meta` tensors at real shapes (training and decode sizes, bf16 and fp32,
Dv a multiple of 16 and not, every destination), with each @triton.jit kernel replaced by a
recorder; each recorded launch is specialized by Triton's own JIT binder for an sm_90 target
(so pointers and ints divisible by 16 get `tt.divisibility`, ints equal to 1 become constants,
exactly as a launch on a GPU; the pointers are 16-byte aligned like the caching allocator's, plus
the tensor's storage offset), and every distinct specialization is compiled through Triton's full
pipeline (TTIR -> TTGIR -> PTX -> cubin with the ptxas Triton ships). What a compile without
these attributes shows (scalar loads, other layouts, other register counts) never launches.

Read per variant:
- registers/thread, spills (STL/LDL instructions in the SASS; stack and local bytes), static
  (cuobjdump) and dynamic (launch metadata) shared memory;
- global load/store/atomic widths in bytes, from the SASS opcodes (LDG.E.128 = 16 B ...); "row
  loads" are the loads on source lines marked `# row load` (nvdisasm -g maps instructions to
  source lines), i.e. the table / gradient rows that carry the bytes;
- layout conversions inside loops (`ttg.convert_layout` inside an `scf.for` of the TTGIR) and
  barriers (BAR.*) inside SASS loops (backward branches) that contain row loads, or between two
  row loads;
- row loads in flight per thread: row-load bytes issued before the first instruction that reads
  the first row load's registers; bytes in flight per SM = CTAs per SM (registers, shared
  memory, 32-CTA and 64-warp limits) x threads x that, against the bandwidth-latency product
  (H200: 4.8 TB/s x 0.7 us / 132 SMs = 25.5 KB; H100 SXM: 3.35 TB/s -> 17.8 KB);
- int32 products of two runtime values that feed an address (TTIR), the overflow of issue #16.
The checks (`failures`): no spills; no barrier or shared-memory round trip between row loads; row
loads at least as wide as the shape allows (16 bytes when Dv / h is a multiple of 16 / elt); no
int32 address products; bytes in flight >= the H100 SXM product for every gather kernel variant
(the table also marks which reach the H200's 25.5 KB).
It proves what the compiler emits for Hopper under this Triton (3.9 here; the GPU images have
3.6 and may allocate registers differently); it runs nothing (benchmarks/gpu_check.py does).
"""

import argparse
import atexit
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; 1 = 3.6's default
# A fresh cache: a cached cubin keeps the source line numbers of the file it was compiled from,
# and the row-load markers are found by line.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ultramem-sm90-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], True)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from megatron_ultramem.kernels import gather as G  # noqa: E402
from megatron_ultramem.kernels import topm as TM  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
NVBIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SMS = 132
PRODUCT = {"H200": 4.8e12 * 0.7e-6 / SMS, "H100 SXM": 3.35e12 * 0.7e-6 / SMS}  # bytes per SM
GATHER_KERNELS = {  # kernels that stream table / gradient rows: held to the row-load checks
    "_gather_pool_fwd_kernel", "_split_reduce_kernel", "_segment_sum_kernel",
    "_segment_fixup_kernel", "_gather_pool_bwd_kernel",
}  # fmt: skip


# ----------------------------------------------------------------------------- launches
class _Ptr:
    """What the JIT sees of a CUDA tensor: dtype and address (the caching allocator's blocks are
    512-byte aligned; a view adds its storage offset)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


class _Recorder:
    def __init__(self, fn, name, sink):
        self.fn, self.name, self.sink = fn, name, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.name, self.fn, grid, args, kwargs))

        return launch


def capture(call):
    """Run call() with every kernel of the gather and topm modules replaced by a recorder."""
    sink, saved = [], {}
    for mod in (G, TM):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                saved[(mod, name)] = obj
                setattr(mod, name, _Recorder(obj, name, sink))
    try:
        call()
    finally:
        for (mod, name), obj in saved.items():
            setattr(mod, name, obj)
    return sink


def specialize(fn, args, kwargs):
    """Triton's JIT binder for the sm_90 backend: (signature, constexprs, attrs, options)."""
    args = [_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: (_Ptr(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(fn.signature, fn.params, BACKEND)
    bound, spec, options = binder(*args, **kwargs)
    return fn._pack_args(BACKEND, kwargs, bound, spec, options)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _gather_inputs(T, M, N, Dv, h, dtype):
    rows = _meta(T, M, dtype=torch.int64)
    return rows, _meta(T, M, dtype=torch.int64), _meta(T, M, h, dtype=dtype), _meta(N, Dv, dtype=dtype)


def launch_plan(quick=False):
    """(label, call) pairs: each call runs a launcher at one shape on meta tensors."""
    bf16, f32 = torch.bfloat16, torch.float32
    plan = []
    N = 1 << 20
    # forward: (T, M, Dv, h, E, dtype): training (T = 8192: the single-pass one-hot kernel and
    # the sorted path for E = 16) and decode (T = 1, 64: the split) sizes; Dv = 1000 / 300: not
    # a multiple of 16 (ALIGN 4 / 2 columns after h = 2 cores).
    fwd = [(8192, 160, 1024, 2, 4, bf16), (8192, 160, 1024, 2, 16, bf16), (1, 160, 1024, 2, 4, bf16),
           (64, 1536, 1024, 2, 4, bf16), (8192, 160, 1000, 2, 4, bf16), (8192, 160, 1024, 2, 4, f32),
           (8192, 160, 128, 1, 1, bf16)]  # fmt: skip
    if not quick:
        fwd += [(1, 1536, 1024, 2, 16, bf16), (8192, 160, 300, 2, 4, bf16), (1, 160, 1024, 2, 4, f32),
                (8192, 160, 1024, 2, 9, f32)]  # fmt: skip
    for T, M, Dv, h, E, dt in fwd:
        label = f"fwd T={T} M={M} Dv={Dv} h={h} E={E} {str(dt)[6:]}"
        plan.append((label, lambda a=(T, M, N, Dv, h, dt), E=E: G.gather_pool_forward(
            *_gather_inputs(*a), E)))  # fmt: skip
    # backward: (T, M, Dv, h, E, table dtype, destination, deterministic)
    bwd = [(8192, 160, 1024, 2, 4, bf16, "fp32 main_grad", False), (8192, 160, 1024, 2, 4, bf16, "bf16 main_grad", False),
           (8192, 160, 1000, 2, 4, bf16, "bf16 main_grad", False), (8192, 160, 1024, 2, 4, bf16, "grad", False),
           (8192, 160, 1024, 2, 4, f32, "grad", False)]  # fmt: skip  (the last: fp32 atomics)
    if not quick:
        bwd += [(8192, 160, 1024, 2, 4, bf16, "fp32 main_grad", True), (8192, 160, 1024, 2, 4, f32, "grad", True),
                (512, 160, 1024, 2, 4, bf16, "bf16 main_grad", False)]  # fmt: skip
    for T, M, Dv, h, E, dt, dest, det in bwd:
        label = f"bwd T={T} M={M} Dv={Dv} h={h} E={E} {str(dt)[6:]} -> {dest}" + (" det" if det else "")

        def call(T=T, M=M, Dv=Dv, h=h, E=E, dt=dt, dest=dest, det=det):
            rows, blocks, scores, values = _gather_inputs(T, M, N, Dv, h, dt)
            main = None if dest == "grad" else _meta(N, Dv, dtype=f32 if "fp32" in dest else bf16)
            G.gather_pool_backward(_meta(T, E, Dv, dtype=dt), rows, blocks, scores, values,
                                   deterministic=det, values_grad_out=main)  # fmt: skip

        plan.append((label, call))
    if quick:
        return plan
    # phase 2 selection: (T, H, m, r, dtype) through the register (m <= 128) and tiled kernels
    for T, H, m, r, dt in [(8192, 2, 32, 2, bf16), (8192, 2, 128, 2, bf16), (64, 2, 16, 3, f32),
                           (8192, 2, 768, 2, bf16), (1, 2, 129, 2, bf16), (64, 2, 1024, 3, f32),
                           (64, 2, 128, 2, torch.float64), (8, 2, 257, 2, torch.float64)]:  # fmt: skip
        label = f"topm T={T} H={H} m={m} r={r} {str(dt)[6:]}"
        plan.append((label, lambda a=(T, H, m, r, dt): TM.phase2_select(
            _meta(*a[:3], a[3], dtype=a[4]), _meta(*a[:3], a[3], dtype=a[4]),
            _meta(a[1], a[3], a[3], dtype=torch.float64 if a[4] == torch.float64 else f32), a[2])))  # fmt: skip
    return plan


def variants(plan):
    """Distinct specializations over the plan: [dict(name, kernel, fn, sig, consts, attrs, options,
    shapes)], each compiled once and listed with the shapes that launch it."""
    found = collections.OrderedDict()
    for label, call in plan:
        for name, fn, grid, args, kwargs in capture(call):
            options, signature, constexprs, attrs = specialize(fn, args, kwargs)
            key = (name, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items(), key=str)),
                   repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))  # fmt: skip
            v = found.get(key)
            if v is None:
                v = found[key] = dict(kernel=name, fn=fn, signature=signature, constexprs=constexprs,
                                      attrs=attrs, options=options, shapes=[])  # fmt: skip
            v["shapes"].append(label)
    return list(found.values())


# ----------------------------------------------------------------------------- reading the output
def _run_tool(tool, args, cubin):
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([os.path.join(NVBIN, tool), *args, f.name], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    finally:
        os.unlink(f.name)


def resource_usage(cubin) -> dict:
    usage = {}
    for item in _run_tool("cuobjdump", ["-res-usage"], cubin).replace(",", " ").split():
        if ":" in item and item.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"):
            key, value = item.split(":")
            usage[key.lower()] = int(value)
    return usage


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FILE_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


def sass_instructions(cubin):
    """[(address, opcode, operands, (file, line))] from `nvdisasm -g` (source lines attached;
    branch targets rewritten from labels to hex addresses)."""
    out, where, labels, pending = [], (None, None), {}, []
    for line in _run_tool("nvdisasm", ["-g", "-c"], cubin).splitlines():
        m = _FILE_LINE.search(line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            out.append((addr, m.group(3), m.group(4).strip(), where))
    fix = lambda ops: re.sub(r"`\((\.L_x_\d+)\)", lambda m: hex(labels.get(m.group(1), 0)), ops)  # noqa: E731
    return [(a, op, fix(ops) if op.startswith("BRA") else ops, w) for a, op, ops, w in out]


def _width(opcode: str) -> int:
    """Bytes per thread of a global memory instruction from its SASS opcode."""
    parts = opcode.split(".")
    for p, w in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if p in parts:
            return w
    return 4


def _regs(text: str):
    regs = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?", text):
        base = int(m.group(1))
        regs.update(range(base, base + (2 if m.group(2) else 1)))
    return regs


def _is_row_load(op: str) -> bool:
    """Row loads carry an explicit eviction hint (LDG.E.EF / LDG.E.EL: evict_first for streamed
    table / gradient / workspace rows, evict_last for reused grad_pooled rows), and no other load
    in these kernels does: an exact tag in the SASS (source-line info is too loose for this)."""
    parts = op.split(".")
    return parts[0] == "LDG" and ("EF" in parts or "EL" in parts)


def _ttgir_converts_in_loops(ttgir: str) -> int:
    """`ttg.convert_layout` ops nested in an `scf.for` (by the region braces of the TTGIR)."""
    depth, loops, count = 0, [], 0
    for line in ttgir.splitlines():
        s = line.strip()
        if "scf.for" in s and s.endswith("{"):
            loops.append(depth)
        if "ttg.convert_layout" in s and loops:
            count += 1
        depth += line.count("{") - line.count("}")
        while loops and depth <= loops[-1]:
            loops.pop()
    return count


def _i32_address_products(ttir: str) -> list:
    """Source locations of int32 multiplications of two runtime values (no constant operand)
    whose result reaches a `tt.addptr` offset through integer arithmetic."""
    defs, consts = {}, set()
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.#]+)(?::\d+)? = ([\w.]+) (.*)", line)
        if not m:
            continue
        name, op, rest = m.groups()
        if op == "arith.constant":
            consts.add(name)
        defs[name] = (op, re.findall(r"%[\w.#]+", rest.split(" : ")[0].split(" loc(")[0]), rest)
    locs = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)$", ttir, re.M))

    def where(loc):  # "#loc14" -> "gather.py:272"
        for _ in range(10):
            m = re.match(r'"([^"]+)":(\d+)', locs.get(loc, ""))
            if m:
                return f"{os.path.basename(m.group(1))}:{m.group(2)}"
            m = re.search(r"(#loc\d*)", locs.get(loc, ""))
            if not m:
                return loc
            loc = m.group(1)
        return loc

    bad, seen = [], set()

    def walk(name):
        if name in seen or name not in defs:
            return
        seen.add(name)
        op, operands, rest = defs[name]
        if op == "arith.muli" and re.search(r":\s*(tensor<[^>]*xi32|i32)\b", rest):
            if not any(o in consts for o in operands):
                bad.append(where(rest.split(" loc(")[-1].rstrip(")")) if " loc(" in rest else name)
        if op in ("arith.muli", "arith.addi", "arith.subi", "arith.extsi", "arith.extui",
                  "tt.splat", "tt.broadcast", "tt.expand_dims", "arith.select", "arith.divsi",
                  "arith.remsi", "arith.trunci"):  # fmt: skip
            for o in operands:
                walk(o)

    for line in ttir.splitlines():
        if "tt.addptr" in line:
            m = re.search(r"tt\.addptr (%[\w.#]+), (%[\w.#]+)", line)
            if m:
                walk(m.group(2))
    return bad


def ctas_per_sm(regs: int, warps: int, smem: int) -> int:
    """Hopper residency: 64K registers (allocated per warp in units of 256), 228 KB shared memory
    (+1 KB reserved per CTA), at most 32 CTAs and 64 warps per SM."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (65536 // per_warp) // warps
    by_smem = (233472 // (smem + 1024)) if smem else 32
    return max(0, min(32, 64 // warps, by_regs, by_smem))


def _dest_regs(op, operands):
    regs = _regs(operands.split(",")[0])
    return set(range(min(regs), min(regs) + max(1, _width(op) // 4))) if regs else set()


def row_bytes_per_round(ins, row_loops) -> float:
    """Row-load bytes a thread has in flight per memory round trip, in the steady state of the
    innermost loop that issues them (or of the whole kernel without a loop).

    A latency model of the instruction stream: one cycle per instruction, every row load returns
    LATENCY cycles after its issue, an instruction that touches a register an outstanding row
    load writes waits for it. Walking the loop body twice (loads issued late in one iteration
    and used in the next count too), the second lap takes R round trips (its cycles / LATENCY,
    the instructions themselves being negligible); the answer is its row bytes / R. Other loads
    (indices, scores: L1/L2 hits mostly) are not modelled."""
    latency = 1_000_000
    lo, hi = row_loops[0] if row_loops else (ins[0][0], ins[-1][0])
    body = [x for x in ins if lo <= x[0] <= hi]
    clock, outstanding, total, start = 0, [], 0, 0  # outstanding: [(regs, ready_at)]
    for lap in range(2):
        start = clock if lap == 1 else start
        for addr, op, ops, where in body:
            clock += 1
            touched = _regs(ops)
            hit = [i for i, (regs, _) in enumerate(outstanding) if regs & touched]
            if hit:
                clock = max(clock, max(outstanding[i][1] for i in hit))
                outstanding = [x for x in outstanding if x[1] > clock]
            if _is_row_load(op):
                outstanding.append((_dest_regs(op, ops), clock + latency))
                total += _width(op) if lap == 1 else 0
    rounds = max(1.0, (clock - start) / latency)
    return total / round(rounds)


def analyze(v, k) -> dict:
    """Everything the module docstring lists, for compiled kernel k of variant v."""
    cubin, ttgir, ttir = k.asm["cubin"], k.asm["ttgir"], k.asm["ttir"]
    usage = resource_usage(cubin)
    ins = sass_instructions(cubin)
    warps = v["options"].num_warps
    loops = [(tgt, addr) for addr, op, ops, _ in ins if op.startswith("BRA")
             for tgt in [int(m, 16) for m in re.findall(r"0x([0-9a-f]+)", ops)[:1]]
             if tgt < addr]  # fmt: skip
    row = [(a, op, ops) for a, op, ops, where in ins
           if _is_row_load(op)]  # fmt: skip
    row_addrs = [a for a, _, _ in row]
    bars = [a for a, op, _, _ in ins if op.startswith("BAR")]
    smem_ops = [a for a, op, _, _ in ins if op.split(".")[0] in ("STS", "LDS", "LDSM", "STSM")]
    row_loops = sorted(((lo, hi) for lo, hi in loops if any(lo <= a <= hi for a in row_addrs)),
                       key=lambda r: r[1] - r[0])  # innermost first  # fmt: skip
    in_row_loop = lambda a: any(lo <= a <= hi for lo, hi in row_loops)  # noqa: E731
    between = bool(row_addrs) and any(min(row_addrs) < a < max(row_addrs) for a in bars)
    in_flight = row_bytes_per_round(ins, row_loops)
    widths = lambda pred: dict(sorted(collections.Counter(  # noqa: E731
        _width(op) for _, op, _, _ in ins if pred(op)).items()))  # fmt: skip
    ctas = ctas_per_sm(usage.get("reg", 0), warps, k.metadata.shared + usage.get("shared", 0))
    return dict(
        registers=usage.get("reg"),
        spill_instructions=sum(1 for _, op, _, _ in ins if op.split(".")[0] in ("STL", "LDL")),
        stack_bytes=usage.get("stack", 0), local_bytes=usage.get("local", 0),
        shared_static=usage.get("shared", 0), shared_dynamic=k.metadata.shared,
        loads=widths(lambda op: op.startswith("LDG")), stores=widths(lambda op: op.startswith("STG")),
        atomics=widths(lambda op: op.startswith(("RED", "ATOM"))),
        row_loads=dict(sorted(collections.Counter(_width(op) for _, op, _ in row).items())),
        converts_in_loops=_ttgir_converts_in_loops(ttgir),
        barriers_in_row_loops=sum(1 for a in bars if in_row_loop(a)),
        shared_ops_in_row_loops=sum(1 for a in smem_ops if in_row_loop(a)),
        barrier_between_row_loads=between,
        row_bytes_in_flight_per_thread=round(in_flight, 1), ctas_per_sm=ctas,
        bytes_in_flight_per_sm=int(ctas * warps * 32 * in_flight),
        i32_address_products=_i32_address_products(ttir),
    )  # fmt: skip


def expected_row_width(v) -> int:
    """The 16-byte vector the shape allows: ALIGN elements (Dv / h's alignment) of the loaded
    tensor, up to 16 bytes. Kernels without ALIGN (the split reduce): 16 bytes."""
    align = v["constexprs"].get(_arg_index(v, "ALIGN"), None)
    elts = [int(re.sub(r"\D", "", t) or 32) // 8 for n, t in v["signature"].items()
            if n in ("values_ptr", "src_ptr", "grad_ptr", "ws_ptr") and t.startswith("*")]  # fmt: skip
    elt = min(elts) if elts else 4
    return 16 if align is None else min(16, align * elt)


def _arg_index(v, name):
    return (list(v["signature"]).index(name),) if name in v["signature"] else None


def failures(v, r, streams_rows=None) -> list:
    """The checks of the module docstring, for one analyzed variant (the row-load checks for
    the GATHER_KERNELS, or where `streams_rows` says so: the self-check's controls)."""
    bad = []
    if r["spill_instructions"] or r["local_bytes"]:
        bad.append(f"spills: {r['spill_instructions']} STL/LDL, {r['local_bytes']} local bytes")
    if r["i32_address_products"]:
        bad.append(f"int32 address products at {r['i32_address_products']}")
    if v["kernel"] in GATHER_KERNELS if streams_rows is None else streams_rows:
        if not r["row_loads"]:
            bad.append("no row loads found (markers lost?)")
        if r["barriers_in_row_loops"] or r["barrier_between_row_loads"]:
            bad.append("barrier between row loads")
        if r["shared_ops_in_row_loops"]:
            bad.append(f"{r['shared_ops_in_row_loops']} shared-memory ops in the row-load loop")
        want = expected_row_width(v)
        if r["row_loads"] and min(r["row_loads"]) < want:
            bad.append(f"row loads of {min(r['row_loads'])} B where {want} B vectors are possible")
        if r["bytes_in_flight_per_sm"] < PRODUCT["H100 SXM"]:
            bad.append(f"{r['bytes_in_flight_per_sm']} B in flight per SM < the H100 product "
                       f"{PRODUCT['H100 SXM']:.0f}")  # fmt: skip
    return bad


def describe(v) -> str:
    sig = v["signature"]
    dts = "/".join(sig[n][1:] for n in sig if n.endswith("_ptr") and n in (
        "values_ptr", "src_ptr", "grad_ptr", "out_ptr", "dst_ptr", "gvalues_ptr", "ws_ptr", "sr_ptr"))
    keys = ("E", "H_CORES", "BLOCK_D", "BLOCK_K", "UNROLL", "ALIGN", "LOAD_OLD", "NEED_GS", "ATOMIC_DV",
            "M_PAD", "R", "BA", "BB")  # fmt: skip
    c = {n: v["constexprs"].get((i,)) for i, n in enumerate(sig) if n in keys}
    cs = " ".join(f"{n}={int(x) if isinstance(x, bool) else x}" for n, x in c.items() if x is not None)
    consts = [n for i, n in enumerate(sig) if sig[n] == "constexpr" and n not in keys
              and n[0].isupper() is False]  # ints the JIT made constants (== 1)  # fmt: skip
    divs = [n for i, n in enumerate(sig) if v["attrs"].get((i,)) and sig[n] == "i32"]
    extra = (f" const={','.join(consts)}" if consts else "") + (f" div16={','.join(divs)}" if divs else "")
    return f"{v['kernel'].strip('_')} {dts} {cs}{extra}"


# ----------------------------------------------------------------------------- self-check
def ttir_of(fn, args, kwargs) -> str:
    """The TTIR the JIT would build for this launch (front end only: fast)."""
    from triton._C.libtriton import ir

    options, signature, constexprs, attrs = specialize(fn, args, kwargs)
    context = ir.context()
    ir.load_dialects(context)
    BACKEND.load_dialects(context)
    src = ASTSource(fn, signature, constexprs, attrs)
    module = src.make_ir(TARGET, options, BACKEND.get_codegen_implementation(options),
                         BACKEND.get_module_map(), context)  # fmt: skip
    return str(module)


def self_check() -> dict:
    """The int32-offset lint on two tiny kernels: `ptr + s * n` with an int32 loop index (the
    split reduce's old overflow) must be flagged, the int64 form not; and on the real
    `_split_reduce_kernel` at a real launch (SPLIT * n > 2^31 there: T = 8192, E = 4, Dv = 1024,
    SPLIT = 65), whose TTIR must also show the product in i64."""
    import triton.language as tl

    @triton.jit
    def bad(ptr, out, n, SPLIT):
        acc = tl.load(ptr)
        for s in range(1, SPLIT):
            acc += tl.load(ptr + s * n)
        tl.store(out, acc)

    @triton.jit
    def good(ptr, out, n, SPLIT):
        acc = tl.load(ptr)
        for s in range(1, SPLIT):
            acc += tl.load(ptr + s.to(tl.int64) * n)
        tl.store(out, acc)

    x = _meta(8)
    n, split = 8192 * 4 * 1024, 65
    res = {name: _i32_address_products(ttir_of(fn, (x, x, n, split), {}))
           for name, fn in (("int32", bad), ("int64", good))}  # fmt: skip
    ws, out = _meta(split, n), _meta(n, dtype=torch.bfloat16)
    ttir = ttir_of(G._split_reduce_kernel, (ws, out, n, split), dict(BLOCK=512, UNROLL=8,
                   RNE_BY_HAND=False))  # fmt: skip
    res["split_reduce"] = _i32_address_products(ttir)
    res["split_reduce_i64_product"] = bool(re.search(r"arith\.muli [^\n]*: tensor<8x1xi64>", ttir))
    res["controls"] = controls()
    return res


def _compile_checked(fn, args, kwargs, **option_overrides) -> list:
    """Specialize a launch like `variants`, compile it for sm_90 (options overridden), and
    return `failures` with the row-load checks on."""
    options, signature, constexprs, attrs = specialize(fn, args, kwargs)
    opts = dict(options.__dict__, **option_overrides)
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=opts)
    v = dict(kernel=fn.__name__, signature=signature, constexprs=constexprs, attrs=attrs,
             options=options)  # fmt: skip
    return failures(v, analyze(v, k), streams_rows=True)


def controls() -> dict:
    """The compile checks' negative controls: each check must fail on code that has the defect
    it looks for (else a clean table proves nothing), and pass on the same code without it.

    - "broadcast row": the forward before issue #16 (a table row loaded as a 1-D [BLOCK_D]
      vector and broadcast into the 2-D one-hot tile; BLOCK_D = 256 at 2 warps): the layout
      conversion goes through shared memory with barriers between the unrolled row loads.
    - "unaligned row" / "aligned row": a [1, BLOCK_D] bf16 row load at Dv = 1000 (not a multiple
      of 16, so the JIT gives no divisibility hint) without / with the kernels' `Dv // ALIGN *
      ALIGN` (ALIGN = 8: the shape allows 16-byte vectors): 2-byte loads vs 16-byte ones.
    - "spilling fwd": the real `_gather_pool_fwd_kernel` at the training launch (bf16, E = 4),
      compiled with maxnreg = 32 instead of 96: ptxas must spill, and the check must see it."""
    import triton.language as tl

    @triton.jit
    def broadcast_row(rows_ptr, blocks_ptr, values_ptr, out_ptr, M, Dv, E_PAD: tl.constexpr,
                      BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        e_idx = tl.arange(0, E_PAD)
        acc = tl.zeros((E_PAD, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, M, UNROLL):
            for u in tl.static_range(UNROLL):
                row = tl.load(rows_ptr + t * M + k0 + u)
                blk = tl.load(blocks_ptr + t * M + k0 + u)
                v = tl.load(values_ptr + row * Dv + offs, eviction_policy="evict_first")
                hit = (e_idx == blk).to(tl.float32)
                acc += hit[:, None] * v.to(tl.float32)[None, :]  # [E_PAD, BLOCK_D]
        tl.store(out_ptr + (t * E_PAD + e_idx[:, None]) * Dv + offs[None, :], acc)

    @triton.jit
    def row_copy(rows_ptr, values_ptr, out_ptr, M, Dv, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
                 ROUND: tl.constexpr):  # fmt: skip
        if ROUND:
            Dv = Dv // ALIGN * ALIGN
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
        acc = tl.zeros((1, BLOCK_D), dtype=tl.float32)
        for k in range(0, M):
            row = tl.load(rows_ptr + t * M + k)
            acc += tl.load(values_ptr + row * Dv + offs, mask=offs < Dv, other=0.0,
                           eviction_policy="evict_first").to(tl.float32)  # fmt: skip
        tl.store(out_ptr + t * Dv + offs, acc, mask=offs < Dv)

    bf16 = torch.bfloat16
    rows, vals = _meta(64, 160, dtype=torch.int64), _meta(1 << 20, 1024, dtype=bf16)
    out = {"broadcast row": _compile_checked(
        broadcast_row, (rows, rows, vals, _meta(64, 4, 1024), 160, 1024),
        dict(E_PAD=4, BLOCK_D=256, UNROLL=4, num_warps=2))}  # fmt: skip
    vals = _meta(1 << 20, 1000, dtype=bf16)
    for name, round_ in (("unaligned row", False), ("aligned row", True)):
        out[name] = _compile_checked(row_copy, (rows, vals, _meta(64, 1000), 160, 1000),
                                     dict(BLOCK_D=256, ALIGN=8, ROUND=round_, num_warps=1))  # fmt: skip
    captured = capture(lambda: G.gather_pool_forward(*_gather_inputs(8192, 160, 1 << 20, 1024, 2, bf16), 4))
    (_, fn, _, args, kwargs), = [c for c in captured if c[0] == "_gather_pool_fwd_kernel"]
    out["spilling fwd"] = _compile_checked(fn, args, kwargs, maxnreg=32)
    return out


# ----------------------------------------------------------------------------- driver
def run(quick=False, log=print):
    plan = launch_plan(quick)
    found = variants(plan)
    results = []
    for v in found:
        t0 = time.perf_counter()
        try:
            k = triton.compile(ASTSource(v["fn"], v["signature"], v["constexprs"], v["attrs"]),
                               target=TARGET, options=v["options"].__dict__)  # fmt: skip
            r = analyze(v, k)
            r["failures"] = failures(v, r)
            r["ok"] = not r["failures"]
        except Exception as e:  # noqa: BLE001 - report every variant, then fail
            r = dict(ok=False, failures=[f"compile error: {type(e).__name__}: {e}"[-1500:]])
        r.update(variant=describe(v), kernel=v["kernel"], num_warps=v["options"].num_warps,
                 expected_row_width=expected_row_width(v), shapes=v["shapes"],
                 compile_s=round(time.perf_counter() - t0, 1))  # fmt: skip
        results.append(r)
        log(json.dumps({k_: r.get(k_) for k_ in ("variant", "registers", "row_loads",
                        "bytes_in_flight_per_sm", "failures", "compile_s")}))  # fmt: skip
    return results


def below_h200(results) -> str:
    """The gather variants under the H200 product (with the first shape that launches each)."""
    low = [f"{r['variant'].split(' ')[0]} ({r['bytes_in_flight_per_sm'] / 1e3:.1f} KB; "
           f"{r['shapes'][0]})" for r in results if r["kernel"] in GATHER_KERNELS
           and "registers" in r and r["bytes_in_flight_per_sm"] < PRODUCT["H200"]]  # fmt: skip
    return "; ".join(low) if low else "none"


def markdown(results, command, seconds) -> list:
    import platform

    def fmt(d):
        return " ".join(f"{w}B:{n}" for w, n in d.items()) if d else "-"

    def h200(r):
        if r["kernel"] not in GATHER_KERNELS:
            return ""
        return " (yes)" if r["bytes_in_flight_per_sm"] >= PRODUCT["H200"] else " (no)"

    lines = [
        "# Every kernel launch variant compiled for sm_90, as a real launch compiles it (no GPU)",
        "",
        f"- command: `{command}` ({seconds:.0f} s on this machine; TRITON_INTERPRET unset)",
        f"- versions: triton {triton.__version__}, torch {torch.__version__}, python "
        f"{platform.python_version()}; target sm_90 (GPUTarget('cuda', 90, 32)), the ptxas and "
        "nvdisasm Triton ships",
        "- what it is: the launchers run on meta tensors at the shapes listed per row; every "
        "launch is specialized by Triton's JIT binder (divisibility-16 attributes, ints == 1 as "
        "constants) and compiled through the full pipeline; nothing ran on a GPU and nothing "
        "here is a timing. GPU images have Triton 3.6, which may allocate registers differently.",
        f"- bytes in flight per SM = CTAs/SM (registers, shared memory, 32-CTA / 64-warp limits) x "
        f"threads x row-load bytes a thread issues before using the first; goal: the H200 "
        f"bandwidth-latency product {PRODUCT['H200'] / 1e3:.1f} KB (H100 SXM "
        f"{PRODUCT['H100 SXM'] / 1e3:.1f} KB): 4.8 / 3.35 TB/s x 0.7 us / 132 SMs.",
        f"- result: {sum(r['ok'] for r in results)}/{len(results)} variants pass every check "
        "(no spills, no barrier or shared-memory op between row loads, row loads as wide as the "
        "shape allows, no int32 address products, gather kernels >= the H100 product in "
        f"flight); below the H200's: {below_h200(results)}",
        "",
        "| variant | warps | regs | spills (instr / stack B) | shared static + dynamic | LDG widths | "
        "row loads (want) | STG widths | atomics | cvt in loops | BAR / smem ops in row loops | "
        "row B in flight / thread | CTAs/SM | KB in flight / SM (>= H200's) | checks | launched by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "registers" not in r:
            lines.append(f"| {r['variant']} | {r['num_warps']} | compile failed: "
                         f"{'; '.join(r['failures'])[:200]} |" + " |" * 13)  # fmt: skip
            continue
        bar = f"{r['barriers_in_row_loops']}{' (between)' if r['barrier_between_row_loads'] else ''}"
        lines.append(
            f"| {r['variant']} | {r['num_warps']} | {r['registers']} | {r['spill_instructions']} / "
            f"{r['stack_bytes']} | {r['shared_static']} + {r['shared_dynamic']} | {fmt(r['loads'])} | "
            f"{fmt(r['row_loads'])} ({r['expected_row_width']}B) | {fmt(r['stores'])} | "
            f"{fmt(r['atomics'])} | {r['converts_in_loops']} | {bar} / {r['shared_ops_in_row_loops']} | "
            f"{r['row_bytes_in_flight_per_thread']} | {r['ctas_per_sm']} | "
            f"{r['bytes_in_flight_per_sm'] / 1e3:.1f}{h200(r)} | {'ok' if r['ok'] else '; '.join(r['failures'])} | "
            f"{'; '.join(r['shapes'][:3])}{' ...' if len(r['shapes']) > 3 else ''} |"
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md", help="write the results file (markdown; its JSON next to it)")
    ap.add_argument("--json", help="write every variant's numbers here")
    ap.add_argument("--quick", action="store_true", help="the gather kernels at the test's shapes")
    ap.add_argument("--self-check", action="store_true", help="the int32-offset lint's controls")
    args = ap.parse_args()
    if args.self_check:
        print(json.dumps(self_check()))
        return 0
    t0 = time.perf_counter()
    results = run(args.quick)
    seconds = time.perf_counter() - t0
    command = "python tests/kernels/compile_sm90.py" + (" --quick" if args.quick else "") + (
        " --md benchmarks/results/kernels_sm90_compile.md" if args.md else "")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.md:
        from megatron_ultramem.experiments.report import write_report

        write_report(args.md, markdown(results, command, seconds), command,
                     seconds=round(seconds), variants=len(results),
                     passed=sum(r["ok"] for r in results), results=results)  # fmt: skip
    print(f"{sum(r['ok'] for r in results)}/{len(results)} variants pass; {seconds:.0f} s")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
