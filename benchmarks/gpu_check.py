"""One prepared script for a short GPU session: correctness of every kernel on CUDA, the device's
copy bandwidth, and kernel timings against the bytes floor.

    # on the device machine, from the repo root (a few minutes on an H200):
    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT
    # optional, same call: the CPU test-suite on CUDA first
    python -m pytest -x -q tests/kernels && PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT
    # here, without a GPU: run the same script logic on tiny shapes under the Triton interpreter
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_dry

Writes gpu_check.json (every number) and gpu_check.md (tables) into --out, prints the markdown last,
and exits 1 if any correctness check failed. Correctness follows the test-suite's rule (STYLE.md):
kernel_err <= 2 * same-dtype-torch_err + atol, both against a float64 reference; outputs are
pre-filled with NaN (ULTRAMEM_POISON_OUTPUTS) so unwritten elements fail. Timings are
triton.testing.do_bench medians (it flushes the L2 before every repetition); the gather working sets
are GBs anyway, far over the 60 MB L2.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

DRY = "--dry-run" in sys.argv
if DRY:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ULTRAMEM_POISON_OUTPUTS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "kernels"))
sys.path.insert(0, HERE)
import bench_kernels as B  # noqa: E402
import test_gather as TG  # noqa: E402  (the tests' input makers and error helpers: one definition)
import test_topm as TT  # noqa: E402
from megatron_ultramem import reference as R  # noqa: E402
from megatron_ultramem.kernels import gather as KG  # noqa: E402
from megatron_ultramem.kernels import topm as KT  # noqa: E402

DEVICE = TG.DEVICE  # "cuda", or "cpu" under --dry-run
# Slack over 2x the same-dtype torch error (the tests' ATOL, widened for sums of up to 160 terms).
ATOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}
CHECKS = []  # one dict per check: name, ok, metrics


def record(name, ok, **metrics):
    CHECKS.append({"name": name, "ok": bool(ok), **metrics})
    flag = "PASS" if ok else "FAIL"
    shown = (f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"[{flag}] {name} " + " ".join(shown))


def guarded(fn):
    """Run one check; an exception is a failed check, not the end of the session."""

    def run(*args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - report and continue
            traceback.print_exc()
            record(f"{fn.__name__}{args}", False, error=f"{type(e).__name__}: {e}"[:300])

    return run


err = TG.err


# ----------------------------------------------------------------------------- correctness
@guarded
def check_gather(case, dtype):
    T, M, N, Dv, h, E = case
    tag = f"gather {TG._ids(case)} {str(dtype)[6:]}"
    rows, blocks, scores, values = TG.make_inputs(case, dtype)
    out = KG.gather_pool_forward(rows, blocks, scores, values, E)
    ref64 = R.weighted_gather_pool(rows, blocks, scores.double(), values.double(), E)
    ek, et = err(out, ref64), err(R.weighted_gather_pool(rows, blocks, scores, values, E), ref64)
    ok = torch.isfinite(out).all().item() and ek <= 2 * et + ATOL[dtype]
    record(f"{tag} fwd", ok, err=ek, torch_err=et)

    grad = TG.randn(T, E, Dv, seed=7)
    gs64, gv64 = TG.grads_of(
        R.weighted_gather_pool, rows, blocks, scores.double(), values.double(), E, grad
    )
    gs_t, gv_t = TG.grads_of(R.weighted_gather_pool, rows, blocks, scores, values, E, grad)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for mode in ("atomic", "sorted", "main_grad"):
        main = torch.zeros(N, Dv, device=DEVICE, dtype=acc) if mode == "main_grad" else None
        gs, gv = KG.gather_pool_backward(
            grad.to(dtype), rows, blocks, scores, values, deterministic=mode == "sorted",
            values_grad_out=main,
        )  # fmt: skip
        gv = gv if mode == "main_grad" else gv.to(dtype)  # main_grad stays fp32: compare unrounded
        es, ev = err(gs, gs64), err(gv, gv64)
        ok = torch.isfinite(gs).all().item() and es <= 2 * err(gs_t, gs64) + ATOL[dtype]
        ok = ok and ev <= 2 * err(gv_t, gv64) + ATOL[dtype]
        record(
            f"{tag} bwd {mode}", ok, err_scores=es, err_values=ev, torch_err_values=err(gv_t, gv64)
        )


@guarded
def check_determinism(case, dtype):
    """Heavy duplication (N small): sorted path bitwise-identical across runs; atomic drift reported."""
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = TG.make_inputs(case, dtype, seed=3)
    g = TG.randn(T, E, Dv, seed=8).to(dtype)
    runs = [
        KG.gather_pool_backward(g, rows, blocks, scores, values, deterministic=True)[1]
        for _ in range(3)
    ]
    atomic = [KG.gather_pool_backward(g, rows, blocks, scores, values)[1] for _ in range(3)]
    same = all(torch.equal(runs[0], r) for r in runs[1:])
    drift = max((atomic[0] - a).abs().max().item() for a in atomic[1:])
    diff = (runs[0] - atomic[0]).abs().max().item()
    tag = f"determinism {TG._ids(case)} {str(dtype)[6:]} sorted bitwise"
    record(tag, same, atomic_run_to_run=drift, sorted_vs_atomic=diff)


@guarded
def check_compile(dtype):
    """The public op under autograd and torch.compile (aot_eager; inductor too on CUDA)."""
    case = (33, 20, 100, 48, 2, 4)
    rows, blocks, scores, values = TG.make_inputs(case, dtype, seed=4)

    def loss(r, b, s, v):
        return KG.gather_pool(r, b, s, v, case[-1]).float().square().sum()

    s0, v0 = TG.leaf(scores), TG.leaf(values)
    loss(rows, blocks, s0, v0).backward()
    for backend in ["aot_eager"] + ([] if DRY else ["inductor"]):
        torch._dynamo.reset()
        s1, v1 = TG.leaf(scores), TG.leaf(values)
        torch.compile(loss, backend=backend, fullgraph=True)(rows, blocks, s1, v1).backward()
        ok = torch.allclose(s1.grad, s0.grad) and torch.allclose(v1.grad, v0.grad)
        record(f"compile {backend} {str(dtype)[6:]}", ok)


@guarded
def check_embedding_bag(case):
    """E = 1, h = 1: the kernel is a weighted-sum embedding_bag; both against float64."""
    rows, blocks, scores, values = TG.make_inputs(case, torch.float32, seed=5)
    out = KG.gather_pool_forward(rows, blocks, scores, values, 1)[:, 0]
    eb = F.embedding_bag(rows, values, per_sample_weights=scores[..., 0].contiguous(), mode="sum")
    ref64 = R.weighted_gather_pool(rows, blocks, scores.double(), values.double(), 1)[:, 0]
    ek, ee = err(out, ref64), err(eb, ref64)
    record(
        f"embedding_bag {TG._ids(case)}",
        ek <= 2 * ee + ATOL[torch.float32],
        err=ek,
        embedding_bag_err=ee,
    )


@guarded
def check_topm(case, dtype):
    T, H, n, r, h, m = case
    s_row, s_col, cores, u, v = TT.make_inputs(case, dtype, seed=11)
    x64 = [x.double() for x in (s_row, s_col, cores)]
    # Best achievable: exact top-m (float64) over the phase-1 candidates, as in the tests.
    i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1).indices
    i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1).indices
    cand = (i_row[..., :, None] * n + i_col[..., None, :]).reshape(T, H, m * m)
    best = torch.topk(TT.winner_scores(*x64, cand).sum(-1), m, dim=-1).values
    grad = TG.randn(T, H, m, h, seed=12)

    def run(fn):
        xs = TT.leaves(s_row, s_col, cores)
        virtual, scores = fn(*xs, u, v, m)
        TT.check_valid(virtual, case)
        scores.backward(grad.to(dtype))
        xs64 = TT.leaves(*x64)
        scores64 = TT.winner_scores(*xs64, virtual)
        scores64.backward(grad)
        achieved = torch.sort(TT.winner_scores(*x64, virtual).sum(-1), -1, descending=True).values
        errs = [err(achieved, best), err(scores, scores64)]
        return virtual, errs + [err(x.grad, y.grad) for x, y in zip(xs, xs64)]

    vk, ek = run(KT.tucker_topm_fused)
    vr, er = run(R.tucker_topm)
    names = ["selection", "core_scores", "grad_s_row", "grad_s_col", "grad_cores"]
    atol = ATOL[dtype] * max(1.0, best.abs().max().item())
    ok = all(a <= 2 * b + atol for a, b in zip(ek, er))
    metrics = {"rows_identical": (vk == vr).all(-1).float().mean().item()}
    metrics.update({f"err_{k}": a for k, a in zip(names, ek)})
    metrics.update({f"torch_err_{k}": b for k, b in zip(names, er)})
    record(f"topm {TT._ids(case)} {str(dtype)[6:]}", ok, **metrics)


# ----------------------------------------------------------------------------- speed
def copy_bandwidth(nbytes):
    """Device-to-device copy, bytes read + written per second (the memory ceiling to compare to)."""
    x = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    t = B.time_fn(lambda: y.copy_(x), DEVICE, 3)
    return 2 * nbytes / t


def speed(copy_bw, smoke):
    rows = []
    if smoke:
        gather_shapes = [(4, 8, 64, 32, 4, 2, torch.float32)]
        topm_shapes = [(2, 2, 24, 2, 2, 8, torch.float32)]
    else:
        gather_shapes = [  # (T, M, N, Dv, E, h): T = 4096 x 2 tokens, M = H*m = 2*80, Dv = D/2
            (8192, 160, 1 << 20, 1024, 4, 2, torch.bfloat16),
            (8192, 160, 1 << 20, 1024, 1, 1, torch.bfloat16),
            (8192, 160, 1 << 20, 1024, 16, 2, torch.bfloat16),
            (1024, 160, 1 << 20, 1024, 4, 2, torch.bfloat16),
        ]
        topm_shapes = [(8192, 2, 1616, 2, 2, m, torch.bfloat16) for m in (32, 80, 128)]
    reps = 1 if smoke else 0
    for T, M, N, Dv, E, h, dtype in gather_shapes:
        shape = f"T={T} M={M} N={N} Dv={Dv} E={E} h={h} {str(dtype)[6:]}"
        for name, nb, fl, times in B.bench_gather(T, M, N, Dv, E, h, dtype, DEVICE, reps):
            rows.append((shape, name, nb, fl, times))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the next shape's reference needs the room
    for T, H, n, r, h, m, dtype in topm_shapes:
        shape = f"T={T} H={H} n'={n} r={r} h={h} m={m} {str(dtype)[6:]}"
        for name, nb, fl, times in B.bench_topm(T, H, n, r, h, m, dtype, DEVICE, reps):
            rows.append((shape, name, nb, fl, times))
    table = [
        "| kernel | shape | impl | median | bytes floor | GB/s | % of copy bw | x reference | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out = []
    for shape, name, nb, fl, times in rows:
        for impl, t in times.items():
            ref = times.get("reference")
            gbs = nb / t / 1e9 if nb else None
            out.append(dict(kernel=name, shape=shape, impl=impl, seconds=t, bytes=nb, flops=fl,
                            gbs=gbs, pct_copy=(100 * nb / t / copy_bw) if nb else None,
                            speedup=(ref / t) if ref else None))  # fmt: skip
            table.append(
                f"| {name} | {shape} | {impl} | {t * 1e3:.3f} ms | "
                + (
                    f"{nb / 1e9:.3f} GB | {gbs:.0f} | {100 * nb / t / copy_bw:.0f}% | "
                    if nb
                    else "- | - | - | "
                )
                + (f"{ref / t:.2f} | " if ref else "- | ")
                + (f"{fl / t / 1e12:.2f} |" if fl else "- |")
            )
    return out, "\n".join(table)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    if not DRY and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --dry-run to exercise the script under the interpreter)")
    import triton

    t0 = time.perf_counter()
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": "cpu (Triton interpreter, dry run)" if DRY else torch.cuda.get_device_name(),
        "command": "python " + " ".join(sys.argv),
    }
    if not DRY:
        p = torch.cuda.get_device_properties(0)
        env.update(sms=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None),
                   memory_gib=round(p.total_memory / 2**30, 1))  # fmt: skip
    print(json.dumps(env, indent=1))

    # Correctness: the tests' odd shapes (tails, E=9 padding, h=1/2, M=1) plus realistic sizes.
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    gather_cases = list(TG.CASES) if not DRY else TG.CASES[:2]  # (T, M, N, Dv, h, E)
    large = [] if DRY else [(1000, 160, 50000, 1000, 2, 4), (257, 33, 300, 96, 1, 1)]
    for dtype in dtypes:
        for case in gather_cases + (large if dtype != torch.float64 else []):
            check_gather(case, dtype)
    dup = (20, 9, 3, 40, 2, 3) if DRY else (1000, 160, 64, 1024, 2, 4)  # long runs of equal rows
    check_determinism(dup, torch.float32)
    check_determinism(dup, torch.bfloat16)
    check_embedding_bag((6, 5, 20, 16, 1, 1) if DRY else (2048, 160, 100000, 512, 1, 1))
    check_compile(torch.float32)
    topm_cases = list(TT.CASES[:3])  # (T, H, n', r, h, m)
    if not DRY:
        topm_cases += [(4096, 2, 256, 2, 2, m) for m in (1, 13, 80, 128)]
    for dtype in dtypes:
        for case in topm_cases:
            check_topm(case, dtype)
    t_correct = time.perf_counter() - t0

    speed_rows, speed_table, copy_bw = [], "(skipped)", None
    if not args.skip_speed:
        copy_bw = copy_bandwidth(1 << 20 if DRY else 4 << 30)
        print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
        speed_rows, speed_table = speed(copy_bw, smoke=DRY)

    failed = [c for c in CHECKS if not c["ok"]]
    md = [
        f"# GPU check: {env['device']}",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- correctness: {len(CHECKS) - len(failed)}/{len(CHECKS)} checks passed ({t_correct:.0f} s)",
        (
            f"- copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s"
            if copy_bw
            else "- copy bandwidth: skipped"
        ),
        f"- wall time: {time.perf_counter() - t0:.0f} s",
        "",
        "## Failed checks" if failed else "## All correctness checks passed",
        *(
            f"- {c['name']}: {json.dumps({k: v for k, v in c.items() if k not in ('name', 'ok')})}"
            for c in failed
        ),
        "",
        (
            "## Speed (triton.testing.do_bench median)"
            if not DRY
            else "## Speed (interpreter: meaningless)"
        ),
        "",
        speed_table,
        "",
    ]
    md = "\n".join(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(
            {"env": env, "copy_bw": copy_bw, "checks": CHECKS, "speed": speed_rows}, f, indent=1
        )
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    print(md)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
