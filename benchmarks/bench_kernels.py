"""Benchmark the UltraMem Triton kernels against the PyTorch reference (and embedding_bag).

    # CPU, Triton interpreter, tiny shapes (< 60 s): numbers check the plumbing, not speed
    python benchmarks/bench_kernels.py --smoke [--out benchmarks/results/kernels_interpreter_smoke.md]
    # CUDA: paper-sized shapes, triton.testing.do_bench medians, GB/s against the bytes floor
    python benchmarks/bench_kernels.py [--out results.md]

For each kernel it prints the bytes it must move (each input read once, each output written once)
and its FLOPs, so that a time can be read against the floor (bytes / copy bandwidth); the
per-kernel formulas are the `*_floor` functions below (also used by benchmarks/gpu_check.py).
The reference implementations are imported from `megatron_ultramem.reference` (one source of truth).
"""

import argparse
import datetime
import os
import platform
import sys
import time

if "--smoke" in sys.argv:  # must precede the triton import (kernels pick the interpreter on import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_ultramem import reference as R  # noqa: E402
from megatron_ultramem.kernels import gather as KG  # noqa: E402
from megatron_ultramem.kernels import topm as KT  # noqa: E402

IDX_BYTES = 8  # int64 rows / blocks / winner indices


# ----------------------------------------------------------------------------- floors
def gather_fwd_floor(T, M, Dv, E, h, elt, s_elt=4):
    """Forward: the T*M selected row slices read once, rows+blocks+scores read, [T, E, Dv] written.

    bytes = T*M*Dv*elt + T*M*(2*8 + h*s_elt) + T*E*Dv*elt;  FLOPs = 2*T*M*Dv (one FMA per element).
    """
    nbytes = T * M * Dv * elt + T * M * (2 * IDX_BYTES + h * s_elt) + T * E * Dv * elt
    return nbytes, 2 * T * M * Dv


def gather_bwd_floor(T, M, Dv, E, h, elt, s_elt=4, distinct_rows=None, g_elt=4):
    """Backward into a main_grad of g_elt bytes (fp32: 4, bf16: 2; no dense gradient).

    Reads: grad_pooled once (T*E*Dv*elt), the selected value rows for grad_scores (T*M*Dv*elt),
    rows+blocks+scores (T*M*(16 + h*s_elt)). Writes: grad_scores (T*M*h*s_elt) and a
    read-modify-write of the U <= min(T*M, N) distinct gradient rows touched (2*U*Dv*g_elt;
    U = T*M as upper bound). FLOPs = 4*T*M*Dv (grad_scores dot + grad_values FMA).
    """
    U = T * M if distinct_rows is None else distinct_rows
    nbytes = (
        T * E * Dv * elt
        + T * M * Dv * elt
        + T * M * (2 * IDX_BYTES + 2 * h * s_elt)
        + 2 * U * Dv * g_elt
    )
    return nbytes, 4 * T * M * Dv


def dense_grad_extra_bytes(N, Dv, elt):
    """Extra bytes of returning a dense values gradient: zero-fill fp32 [N, Dv], read it, write it in
    the table dtype. Avoided by the main_grad path."""
    return N * Dv * (4 + 4 + elt)


def topm_phase2_floor(T, H, m, r, h, elt):
    """Phase 2 (fused): read the [T, H, m, r] candidate rows and columns, write m winner indices.

    bytes = 2*T*H*m*r*elt + T*H*m*8;  FLOPs = T*H*(2*m*r*r + 2*m*m*r) (grid) -- the radix select's
    compares are not counted (they, not bytes or FLOPs, bound both kernels: expect far above the
    floor). The reference also writes and re-reads the [T, H, m, m] grid (2*T*H*m*m*elt more
    bytes, plus torch.topk's own passes). The tiled kernel (m > 128) adds its scratch traffic,
    ~2*T*H*1.3m*(4 + 4) bytes on random data.
    """
    nbytes = 2 * T * H * m * r * elt + T * H * m * IDX_BYTES
    return nbytes, T * H * (2 * m * r * r + 2 * m * m * r)


FLOOR_FORMULAS = [
    "gather fwd: bytes = T*M*Dv*elt + T*M*(16 + h*s_elt) + T*E*Dv*elt; FLOPs = 2*T*M*Dv",
    "gather bwd (into a main_grad of g_elt bytes: fp32 4, bf16 2): bytes = T*E*Dv*elt +"
    " T*M*Dv*elt + T*M*(16 + 2*h*s_elt) + 2*U*Dv*g_elt (U = distinct rows of the benchmark's"
    " draw); FLOPs = 4*T*M*Dv; the dense grad (g_elt = elt) adds its zero-fill N*Dv*elt",
    "topm phase 2: bytes = 2*T*H*m*r*elt + 8*T*H*m; FLOPs = T*H*(2*m*r^2 + 2*m^2*r);"
    " the reference adds 2*T*H*m^2*elt for the grid",
]


# ----------------------------------------------------------------------------- timing
def time_fn(fn, device, reps):
    """Median seconds: do_bench (CUDA events) on GPU; perf_counter on CPU (interpreter smoke only)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()  # warm-up (first interpreter call pays tracing)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def l2_bytes(device):
    """The device's L2 size (60 MB on an H200), or 32 MB where unknown (CPU smoke)."""
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return 32 << 20


class Rotating:
    """Cycle a call through several input sets whose touched bytes together exceed 2x the L2, so a
    repetition never finds the previous repetition's data in cache (do_bench also flushes the L2
    between repetitions; this keeps the numbers honest without relying on that)."""

    def __init__(self, make, touched_bytes, device, max_sets=64):
        self.n = max(1, min(max_sets, -(-2 * l2_bytes(device) // max(1, touched_bytes))))
        self.sets = [make(i) for i in range(self.n)]
        self.i = 0

    def __call__(self, fn):
        def call():
            args = self.sets[self.i % self.n]
            self.i += 1
            return fn(*args)

        return call


def gather_inputs(T, M, N, Dv, E, h, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randint(0, N, (T, M), device=device, generator=g)
    blocks = torch.randint(0, E, (T, M), device=device, generator=g)
    scores = torch.randn(T, M, h, device=device, dtype=dtype, generator=g)
    values = torch.randn(N, Dv, device=device, dtype=dtype, generator=g)
    return rows, blocks, scores, values


def bench_gather(T, M, N, Dv, E, h, dtype, device, reps):
    """Forward and backward at training sizes. The reference (fp32 [T, M, Dv] temporaries, three
    of them in its backward) is skipped above 2^31 gathered elements: it would not fit."""
    rows, blocks, scores, values = gather_inputs(T, M, N, Dv, E, h, dtype, device)
    with_reference = T * M * Dv <= 2**31
    elt = values.element_size()
    grad = torch.randn(T, E, Dv, device=device, dtype=dtype)
    out = []

    fb, ff = gather_fwd_floor(T, M, Dv, E, h, elt, scores.element_size())

    def selections(i):  # fresh rows/blocks/scores per set, the same table
        r, b, s, _ = gather_inputs(T, M, 1, 1, E, h, dtype, device, seed=1000 + i)
        return (torch.randint_like(r, N), b, s)

    rot = Rotating(selections, fb, device, max_sets=8)
    t_k = time_fn(rot(lambda r, b, s: KG.gather_pool_forward(r, b, s, values, E)), device, reps)
    times = {"triton": t_k}
    if with_reference:
        ref = rot(lambda r, b, s: R.weighted_gather_pool(r, b, s, values, E))
        times["reference"] = time_fn(ref, device, reps)
    out.append(("gather fwd", fb, ff, times, {}))
    if E == 1 and h == 1:  # the same math as a weighted-sum embedding_bag
        w = scores[..., 0].contiguous()
        t_e = time_fn(
            lambda: F.embedding_bag(rows, values, per_sample_weights=w, mode="sum"), device, reps
        )
        out[-1][3]["embedding_bag"] = t_e

    distinct = int(torch.unique(rows).numel())  # rows whose gradient is read-modify-written
    s_elt = scores.element_size()
    for dest in (torch.float32, torch.bfloat16):
        g_elt = torch.finfo(dest).bits // 8
        bb, bf = gather_bwd_floor(T, M, Dv, E, h, elt, s_elt, distinct_rows=distinct, g_elt=g_elt)
        main_grad = torch.zeros(N, Dv, device=device, dtype=dest)
        t_main = time_fn(
            lambda main_grad=main_grad: KG.gather_pool_backward(
                grad, rows, blocks, scores, values, values_grad_out=main_grad
            ),
            device,
            reps,
        )
        times = {"triton": t_main}
        if with_reference and dest == torch.float32:
            s_ref, v_ref = scores.clone().requires_grad_(), values.clone().requires_grad_()
            pooled_ref = R.weighted_gather_pool(rows, blocks, s_ref, v_ref, E)
            times["reference"] = time_fn(
                lambda: torch.autograd.grad(pooled_ref, (s_ref, v_ref), grad, retain_graph=True),
                device,
                reps,
            )
            del pooled_ref
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dest]
        out.append((f"gather bwd {name} main_grad", bb, bf, times, {}))
        del main_grad
    # Without main_grad: the dense gradient in the table dtype (zero-filled), bytes + N*Dv*elt.
    bb, bf = gather_bwd_floor(T, M, Dv, E, h, elt, s_elt, distinct_rows=distinct, g_elt=elt)
    t_dense = time_fn(
        lambda: KG.gather_pool_backward(grad, rows, blocks, scores, values), device, reps
    )
    out.append(("gather bwd dense grad", bb + N * Dv * elt, bf, {"triton": t_dense}, {}))
    return out


def bench_gather_decode(T, M, N, Dv, E, h, dtype, device, reps, variants=None):
    """Forward at decode sizes: the launch table's choice against fixed configurations.

    variants: {name: dict(block_d=, split=, unroll=, num_warps=)} (missing entries = the
    table's); default: the table ("auto") and the unsplit single pass ("unsplit": split 1).
    Inputs rotate over sets whose touched rows exceed 2x the L2.
    """
    values = torch.randn(N, Dv, device=device, dtype=dtype)
    elt = values.element_size()
    fb, ff = gather_fwd_floor(T, M, Dv, E, h, elt, 4)
    variants = variants or {"auto": {}, "unsplit": dict(split=1)}

    def selections(i):
        r, b, s, _ = gather_inputs(T, M, 1, 1, E, h, torch.float32, device, seed=2000 + i)
        return (torch.randint_like(r, N), b, s)

    rot = Rotating(selections, fb, device)
    times, configs = {}, {}
    for name, kw in variants.items():
        cfg = KG.forward_config(T, M, Dv, E, elt, KG.num_sms(device), h)
        configs[name] = {k: kw.get(k) or getattr(cfg, k) for k in cfg._fields}
        times[name] = time_fn(
            rot(lambda r, b, s, kw=kw: KG.gather_pool_forward(r, b, s, values, E, **kw)),
            device,
            reps,
        )
    times["reference"] = time_fn(
        rot(lambda r, b, s: R.weighted_gather_pool(r, b, s, values, E)), device, reps
    )
    return [("gather fwd decode", fb, ff, times, configs)]


def bench_topm(T, H, n_side, r, h, m, dtype, device, reps, impls=("auto",), reference=True):
    """Phase 2 alone (kernel impls vs the reference's grid + topk) and end to end (phase 1 in
    torch). The reference is skipped when its [T, H, m, m] grid would exceed 2^31 elements."""
    g = torch.Generator(device=device).manual_seed(1)
    s_row = torch.randn(T, H, n_side, r, device=device, dtype=dtype, generator=g)
    s_col = torch.randn(T, H, n_side, r, device=device, dtype=dtype, generator=g)
    cores = torch.rand(H, h, r, r, device=device, dtype=dtype, generator=g)
    u, v, _ = R.leading_singular_vectors(cores.sum(1))
    i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1).indices
    i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1).indices
    sr = torch.gather(s_row, 2, i_row[..., None].expand(T, H, m, r)).contiguous()
    sc = torch.gather(s_col, 2, i_col[..., None].expand(T, H, m, r)).contiguous()
    csum = cores.float().sum(1)
    reference = reference and T * H * m * m <= 2**31

    def ref_phase2():
        grid = torch.einsum("thar,hrs,thbs->thab", sr, cores.sum(1), sc)
        return torch.topk(grid.reshape(T, H, m * m), m, dim=-1).indices

    fb, ff = topm_phase2_floor(T, H, m, r, h, s_row.element_size())
    phase2, extra = {}, {}
    for impl in impls:
        name = "triton" if impl == "auto" else f"triton {impl}"
        if impl == "register" and m > KT.REGISTER_MAX_M:
            continue
        phase2[name] = time_fn(
            lambda impl=impl: KT.phase2_select(sr, sc, csum, m, impl=impl), device, reps
        )
        if impl in ("tiled",) or (impl == "auto" and m > KT.REGISTER_MAX_M):
            _, status = KT.phase2_select(sr, sc, csum, m, impl="tiled", return_status=True)
            extra[f"{name} fallback fraction"] = status.float().mean().item()
    if reference:
        phase2["reference"] = time_fn(ref_phase2, device, reps)
    args = (s_row, s_col, cores, u, v, m)
    full = {"triton": time_fn(lambda: KT.tucker_topm_fused(*args), device, reps)}
    if reference:
        full["reference"] = time_fn(lambda: R.tucker_topm(*args), device, reps)
    return [
        ("topm phase 2", fb, ff, phase2, extra),
        ("topm end to end (phase 1 in torch)", None, None, full, {}),
    ]


def fmt_rows(results):
    lines = [
        "| kernel | shape | bytes floor | FLOPs | impl | time | GB/s vs floor | x reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, name, nbytes, flops, times, _ in results:
        ref = times.get("reference")
        for impl, t in times.items():
            gbs = f"{nbytes / t / 1e9:.2f}" if nbytes else "-"
            speed = f"{ref / t:.2f}" if ref else "-"
            b = f"{nbytes / 1e6:.3f} MB" if nbytes else "-"
            fl = f"{flops / 1e6:.3f} MFLOP" if flops else "-"
            lines.append(
                f"| {name} | {shape} | {b} | {fl} | {impl} | {t * 1e3:.3f} ms | {gbs} | {speed} |"
            )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes")
    ap.add_argument("--out", help="write a markdown report here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke (Triton interpreter)")
    if args.smoke:
        reps = 1  # after one warm-up call; the interpreter runs each program in Python
        gather_shapes = [  # (T, M, N, Dv, E, h, dtype)
            (4, 8, 64, 32, 4, 2, torch.float32),
            (4, 8, 64, 32, 1, 1, torch.float32),  # the embedding_bag-equivalent case
        ]
        decode_shapes = [(1, 40, 64, 32, 4, 2, torch.float32)]  # splits at T=1
        topm_shapes = [  # (T, H, n', r, h, m, dtype)
            (2, 2, 24, 2, 2, 8, torch.float32),
            (1, 1, 140, 2, 2, 129, torch.float32),  # the tiled kernel
        ]
    else:
        reps = 0
        gather_shapes = [
            (8192, 160, 1 << 20, 1024, 4, 2, torch.bfloat16),  # H=2, m=80, paper E=4 h=2, Dv=D/2
            (8192, 160, 1 << 20, 1024, 1, 1, torch.bfloat16),  # embedding_bag-equivalent
            (8192, 160, 1 << 20, 1024, 16, 2, torch.bfloat16),  # E=16: the ALU-heavy end
        ]
        decode_shapes = [  # v1 M = 2*80 and v2 M = 2*768 at decode batch sizes
            (T, M, 1 << 20, 1024, 4, 2, torch.bfloat16)
            for M in (160, 1536)
            for T in (1, 16, 64, 256)
        ]
        topm_shapes = [
            (8192, 2, 1616, 2, 2, m, torch.bfloat16) for m in (32, 80, 128, 256, 768, 1024)
        ]

    t_start = time.perf_counter()
    results = []
    for T, M, N, Dv, E, h, dtype in gather_shapes:
        shape = f"T={T} M={M} N={N} Dv={Dv} E={E} h={h} {str(dtype)[6:]}"
        for row in bench_gather(T, M, N, Dv, E, h, dtype, device, reps):
            results.append((shape, *row))
    for T, M, N, Dv, E, h, dtype in decode_shapes:
        shape = f"T={T} M={M} N={N} Dv={Dv} E={E} h={h} {str(dtype)[6:]}"
        for row in bench_gather_decode(T, M, N, Dv, E, h, dtype, device, reps):
            results.append((shape, *row))
    for T, H, n_side, r, h, m, dtype in topm_shapes:
        shape = f"T={T} H={H} n'={n_side} r={r} h={h} m={m} {str(dtype)[6:]}"
        impls = ("register", "tiled") if m <= KT.REGISTER_MAX_M else ("tiled",)
        for row in bench_topm(T, H, n_side, r, h, m, dtype, device, reps, impls=impls):
            results.append((shape, *row))
    table = fmt_rows(results)
    elapsed = time.perf_counter() - t_start

    import triton

    mode = "Triton interpreter smoke (CPU; timings measure the interpreter, not the kernels)"
    if device == "cuda":
        mode = f"CUDA, {torch.cuda.get_device_name()} (triton.testing.do_bench median)"
    header = "\n".join(
        [
            f"# Kernel benchmark: {mode}",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"{platform.platform()}",
            f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"triton {triton.__version__}",
            f"- command: `python {' '.join(sys.argv)}`",
            f"- wall time: {elapsed:.1f} s",
            "",
            "",
        ]
    )
    floors = "\n".join(
        ["", "Floors (elt = value bytes, s_elt = score bytes):", ""]
        + [f"- {f}" for f in FLOOR_FORMULAS]
    )
    report = header + table + "\n" + floors + "\n"
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
