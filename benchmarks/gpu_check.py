"""The one prepared script for a short GPU session: kernel correctness on CUDA against the
reference, the device's copy bandwidth, kernel timings against the bytes floor, a one-layer decode
step and a training step of UltraMem vs Megatron-Core MoE at matched size, and a short pretraining
run.

    # on the device machine, from the repo root (budgeted to ~6 minutes on an H200):
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT
    # the layer and pretrain sections need megatron-core (>= 0.19 for megatron.training), which
    # the H200 image lacks: carry its wheel (needs only torch, numpy, packaging, all there):
    #   here:  echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps \
    #          --only-binary=:all: --python-version 3.12 --implementation cp \
    #          --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.0
    #   there: run(carry=[".whl"], command="python3 -m pip install -q --no-index --no-deps \
    #          --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && \
    #          PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT")
    # here, without a GPU: the same script logic on tiny shapes under the Triton interpreter
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_dry

Writes gpu_check.json (every number) and gpu_check.md (tables) into --out after every section (a
run cut short still leaves what it measured), prints the markdown last, and exits 1 if any
correctness check failed. Sections, in order, each skipped with a reason when the time budget
(--budget-s) is spent or its dependency is missing:
1. correctness: every kernel path on CUDA against a float64 reference (fp32/bf16/fp16/fp64, the
   tests' odd shapes, decode-size split forwards, phase 2 at m up to 1024 through both kernels,
   the exact fallback, brute force where exact). Rule (STYLE.md): kernel_err <= 2 *
   same-dtype-torch_err + atol; outputs pre-filled with NaN (ULTRAMEM_POISON_OUTPUTS) so unwritten
   elements fail; a device sync after every check so asynchronous CUDA errors land on it.
2. copy bandwidth: a device-to-device copy of a 2 GiB buffer (33x the 60 MB L2), bytes read +
   written over the do_bench median: the ceiling every "% of copy bw" below refers to.
3. kernels: triton.testing.do_bench medians (it flushes the L2 before each repetition; inputs also
   rotate over sets larger than 2x the L2), bytes floor, GB/s, % of copy bandwidth, x reference;
   decode-size gathers with the launch table against the pre-split configuration and a sweep.
4. layer: one decode step ([1, B, D], B = 1..4096, bf16, eval) and one training step
   (forward + backward, 4096 tokens) of the MLP slot: UltraMem (Triton path) vs Megatron-Core MoE
   (SequentialMLP, allgather dispatcher: the image has no grouped GEMM) vs the dense MLP of the
   same activated size, built by megatron_ultramem.experiments.configs at matched parameters;
   parameter bytes each decode step touched (counted from the routing / the selected rows) and
   that over the copy bandwidth as its floor.
5. pretrain: `torchrun --standalone --nproc_per_node 1 -m megatron_ultramem.pretrain --mock-data
   --train-iters 20 ...` (PRETRAIN_ARGS: a small GPT with memories) as a subprocess if that module
   exists; it needs megatron.training, i.e. megatron-core >= 0.19 (dry run: Megatron's argument
   parser on the same arguments, no training).
The GPU targets of issue #12 (gather >= 85% of copy bandwidth forward, >= 60% backward; MoE /
UltraMem decode latency >= 6x at B >= 256) are reported as met / not met; they do not set the
exit code.
"""

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
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
# Slack over 2x the same-dtype torch error (the tests' ATOL, widened for sums of up to 1536 terms).
ATOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}
TARGETS = {"gather_fwd_pct_copy": 85.0, "gather_bwd_pct_copy": 60.0,
           "decode_moe_over_ultramem": 6.0}  # fmt: skip
RESULT = {"env": {}, "checks": [], "copy_bw": None, "speed": [], "layer": {}, "pretrain": {},
          "skipped": [], "targets": []}  # fmt: skip
T0 = time.perf_counter()
BUDGET = [float("inf")]  # seconds, set from --budget-s


def elapsed() -> float:
    return time.perf_counter() - T0


def time_left() -> float:
    return BUDGET[0] - elapsed()


def skip(section: str, why: str):
    RESULT["skipped"].append(f"{section}: not run: {why}")
    print(f"[SKIP] {section}: {why}")


def record(name, ok, **metrics):
    RESULT["checks"].append({"name": name, "ok": bool(ok), **metrics})
    flag = "PASS" if ok else "FAIL"
    shown = (f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"[{flag}] {name} " + " ".join(shown), flush=True)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # asynchronous launch errors surface on the check that caused them


def guarded(fn):
    """Run one check; an exception (CUDA errors included, after a sync) is a failed check."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            fn(*args, **kwargs)
            sync()
        except Exception as e:  # noqa: BLE001 - report and continue
            traceback.print_exc()
            record(f"{fn.__name__}{args}", False, error=f"{type(e).__name__}: {e}"[:300])

    return run


err = TG.err
dname = lambda dtype: str(dtype)[6:]  # noqa: E731


@contextlib.contextmanager
def tiled_phase2():
    """Route every m through the tiled phase-2 kernel (as the tests' `kernel` fixture does)."""
    saved = KT.REGISTER_MAX_M
    KT.REGISTER_MAX_M = 0
    try:
        yield
    finally:
        KT.REGISTER_MAX_M = saved


# ----------------------------------------------------------------------------- 1. correctness
@guarded
def check_gather(case, dtype, backward=True):
    T, M, N, Dv, h, E = case
    tag = f"gather {TG._ids(case)} {dname(dtype)}"
    rows, blocks, scores, values = TG.make_inputs(case, dtype)
    out = KG.gather_pool_forward(rows, blocks, scores, values, E)
    ref64 = R.weighted_gather_pool(rows, blocks, scores.double(), values.double(), E)
    ek, et = err(out, ref64), err(R.weighted_gather_pool(rows, blocks, scores, values, E), ref64)
    ok = torch.isfinite(out).all().item() and ek <= 2 * et + ATOL[dtype]
    cfg = KG.forward_config(T, M, Dv, E, values.element_size(), KG.num_sms(values.device))
    record(f"{tag} fwd", ok, err=ek, torch_err=et, split=cfg.split, block_d=cfg.block_d)
    if not backward:
        return
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
def check_gather_split(case, dtype, split):
    """The decode-size forward with an explicit selection split (None: the launch table)."""
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = TG.make_inputs(case, dtype, seed=9)
    out = KG.gather_pool_forward(rows, blocks, scores, values, E, split=split)
    again = KG.gather_pool_forward(rows, blocks, scores, values, E, split=split)
    ref64 = R.weighted_gather_pool(rows, blocks, scores.double(), values.double(), E)
    ek, et = err(out, ref64), err(R.weighted_gather_pool(rows, blocks, scores, values, E), ref64)
    ok = torch.isfinite(out).all().item() and ek <= 2 * et + ATOL[dtype] and torch.equal(out, again)
    record(f"gather split={split} {TG._ids(case)} {dname(dtype)}", ok, err=ek, torch_err=et)


@guarded
def check_determinism(case, dtype):
    """Heavy duplication (N small): sorted path bitwise-identical over runs, atomic drift shown."""
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
    tag = f"determinism {TG._ids(case)} {dname(dtype)} sorted bitwise"
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
        record(f"compile {backend} {dname(dtype)}", ok)


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
def check_topm(case, dtype, tiled=False):
    """End to end (phase 1 in torch, phase 2 in a kernel) vs the reference, both against the best
    float64 selection over the same candidates, plus the per-core scores and their gradients."""
    T, H, n, r, h, m = case
    s_row, s_col, cores, u, v = TT.make_inputs(case, dtype, seed=11)
    x64 = [x.double() for x in (s_row, s_col, cores)]
    i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1).indices
    i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1).indices
    cand = (i_row[..., :, None] * n + i_col[..., None, :]).reshape(T, H, m * m)
    best = torch.topk(TT.winner_scores(*x64, cand).sum(-1), m, dim=-1).values
    del cand
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

    with tiled_phase2() if tiled else contextlib.nullcontext():
        vk, ek = run(KT.tucker_topm_fused)
    vr, er = run(R.tucker_topm)
    names = ["selection", "core_scores", "grad_s_row", "grad_s_col", "grad_cores"]
    atol = ATOL[dtype] * max(1.0, best.abs().max().item())
    ok = all(a <= 2 * b + atol for a, b in zip(ek, er))
    kernel = "tiled" if tiled or m > KT.REGISTER_MAX_M else "register"
    metrics = {"rows_identical": (vk == vr).all(-1).float().mean().item()}
    metrics.update({f"err_{k}": a for k, a in zip(names, ek)})
    metrics.update({f"torch_err_{k}": b for k, b in zip(names, er)})
    record(f"topm {kernel} {TT._ids(case)} {dname(dtype)}", ok, **metrics)


@guarded
def check_topm_paths(case, dtype):
    """Phase 2 alone at m <= 1024: tiled scratch path == exact fallback (forced by a scratch
    smaller than m) == the register kernel where it fits; fp64: == the stable float64 brute force
    over the candidate grid (same rounding of r-term sums); reports the natural fallback rate."""
    T, H, n, r, h, m = case
    sr, sc, csum = TT.phase1_candidates(case, dtype, seed=13)
    fast, st = KT.phase2_select(sr, sc, csum, m, impl="tiled", return_status=True)
    slow, st_slow = KT.phase2_select(sr, sc, csum, m, impl="tiled", cap=m - 1, return_status=True)
    ok = bool((st_slow == 1).all()) and torch.equal(fast, slow)
    metrics = {"fallback_fraction": st.float().mean().item()}
    if m <= KT.REGISTER_MAX_M:
        same = torch.equal(fast, KT.phase2_select(sr, sc, csum, m, impl="register"))
        ok, metrics["register_equal"] = ok and same, same
    if dtype == torch.float64:
        same = torch.equal(fast, TT.exact_order(sr, sc, csum, m))
        ok, metrics["brute_force_equal"] = ok and same, same
    record(f"topm paths {TT._ids(case)} {dname(dtype)}", ok, **metrics)


@guarded
def check_topm_ties():
    """Integer scores (exact, heavy ties): all three paths give the stable brute-force order."""
    T, H, m, r = 8, 2, 33, 2
    g = torch.Generator().manual_seed(25)
    sr = torch.randint(-2, 3, (T, H, m, r), generator=g).float().to(DEVICE)
    sc = torch.randint(-2, 3, (T, H, m, r), generator=g).float().to(DEVICE)
    csum = torch.randint(0, 3, (H, r, r), generator=g).float().to(DEVICE)
    want = TT.exact_order(sr, sc, csum, m)
    got = {
        "register": KT.phase2_select(sr, sc, csum, m, impl="register"),
        "tiled": KT.phase2_select(sr, sc, csum, m, impl="tiled"),
        "fallback": KT.phase2_select(sr, sc, csum, m, impl="tiled", cap=m - 1),
    }
    record("topm ties", all(torch.equal(x, want) for x in got.values()),
           **{k: torch.equal(x, want) for k, x in got.items()})  # fmt: skip


def correctness_plan():
    """Every check as (function, args, kwargs), most important first: the budget cuts the tail.

    Compiles dominate on a fresh machine (one per dtype x constexpr variant; the tiled phase-2
    kernel is the largest), so fp16 / fp64 variants come last."""
    f32, b16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    plan = []
    gather_cases = list(TG.CASES) if not DRY else TG.CASES[:2]  # (T, M, N, Dv, h, E)
    large = [] if DRY else [(1000, 160, 50000, 1000, 2, 4), (257, 33, 300, 96, 1, 1)]
    split_cases = TG.SPLIT_CASES[:1] if DRY else TG.SPLIT_CASES + [
        (1, 160, 100000, 1024, 2, 4), (16, 1536, 100000, 1024, 2, 4), (7, 1536, 5000, 256, 1, 16)
    ]  # fmt: skip  (decode sizes: the launch table splits them)
    splits = (None,) if DRY else (None, 3)
    small = list(TT.CASES[:3])  # (T, H, n', r, h, m)
    reg_large = [] if DRY else [(4096, 2, 256, 2, 2, m) for m in (1, 13, 80, 128)]
    tiled_large = [(1, 1, 140, 2, 2, 129)] if DRY else [
        (64, 2, 1616, 2, 2, 129), (64, 2, 1616, 2, 2, 257), (32, 2, 1616, 2, 2, 768),
        (16, 2, 1616, 3, 2, 1023), (16, 2, 1616, 2, 2, 1024), (4, 2, 1024, 2, 2, 1024),
    ]  # fmt: skip  (the last: m = n', so TDQKR is the brute-force top-m of the whole grid)
    paths = [(1, 2, 17, 2, 2, 5)] if DRY else [(8, 2, 1616, 2, 2, m) for m in (5, 128, 257, 768)]
    dup = (20, 9, 3, 40, 2, 3) if DRY else (1000, 160, 64, 1024, 2, 4)  # long runs of equal rows

    for dtype in (f32, b16):
        plan += [(check_gather, (c, dtype), {}) for c in gather_cases + large]
        plan += [(check_gather_split, (c, dtype, sp), {}) for c in split_cases for sp in splits]
    plan += [(check_topm, (c, f32), {}) for c in tiled_large]
    plan += [(check_topm, (c, b16), {}) for c in tiled_large[2:3]]
    for dtype in (f32, b16):
        plan += [(check_topm, (c, dtype), {}) for c in small + reg_large]
        plan += [(check_topm, (c, dtype), {"tiled": True}) for c in small[: 2 if DRY else 3]]
    plan += [(check_topm_paths, (c, dt), {}) for c in paths for dt in (f32, f64)]
    bag = (6, 5, 20, 16, 1, 1) if DRY else (2048, 160, 100000, 512, 1, 1)
    plan += [(check_topm_ties, (), {}), (check_determinism, (dup, f32), {}),
             (check_determinism, (dup, b16), {}), (check_embedding_bag, (bag,), {}),
             (check_compile, (f32,), {})]  # fmt: skip
    for dtype in (f16, f64):
        cases = gather_cases + (large if dtype == f16 else [])
        plan += [(check_gather, (c, dtype), {}) for c in cases]
        plan += [(check_gather_split, (c, dtype, None), {}) for c in split_cases]
        plan += [(check_topm, (c, dtype), {}) for c in small + reg_large]
        plan += [(check_topm, (c, dtype), {"tiled": True}) for c in small[:1]]
        plan += [(check_topm, (c, dtype), {}) for c in tiled_large[1:3]]
    return plan


def correctness(share=0.5):
    """Run the plan until `share` of the budget is spent; the rest is listed as not run."""
    plan = correctness_plan()
    for i, (fn, args, kwargs) in enumerate(plan):
        if elapsed() > share * BUDGET[0]:
            names = [f"{f.__name__}{a}" for f, a, _ in plan[i:]]
            skip(f"correctness ({len(names)} of {len(plan)} checks)", "time budget: "
                 + "; ".join(names)[:2000])  # fmt: skip
            break
        fn(*args, **kwargs)


# ----------------------------------------------------------------------------- 2. bandwidth
def copy_bandwidth(nbytes):
    """Device-to-device copy, bytes read + written per second (the memory ceiling to compare to)."""
    x = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    times = [B.time_fn(lambda: y.copy_(x), DEVICE, 3) for _ in range(2)]  # twice: the spread
    return 2 * nbytes / statistics.median(times), [2 * nbytes / t for t in times]


# ----------------------------------------------------------------------------- 3. kernels
def speed(copy_bw):
    reps = 1 if DRY else 0
    if DRY:
        gather_shapes = [(4, 8, 64, 32, 4, 2, torch.float32)]
        decode_shapes = [(1, 40, 64, 32, 4, 2, torch.float32)]
        sweep = {}
        topm_shapes = [(2, 2, 24, 2, 2, 8, torch.float32), (1, 1, 140, 2, 2, 129, torch.float32)]
    else:
        gather_shapes = [  # (T, M, N, Dv, E, h): T = 4096 x 2 tokens, M = H*m = 2*80, Dv = D/2
            (8192, 160, 1 << 20, 1024, 4, 2, torch.bfloat16),
            (8192, 160, 1 << 20, 1024, 1, 1, torch.bfloat16),
            (8192, 160, 1 << 20, 1024, 16, 2, torch.bfloat16),
            (8192, 1536, 1 << 20, 1024, 4, 2, torch.bfloat16),  # UltraMemV2: m = 768
        ]
        decode_shapes = [
            (T, M, 1 << 20, 1024, 4, 2, torch.bfloat16)
            for M in (160, 1536)
            for T in (1, 4, 16, 64, 256, 1024)
        ]
        sweep = {  # fixed alternatives to the launch table, at three decode sizes
            (T, 1536): {
                "bd64 split1": dict(block_d=64, split=1, unroll=8),
                "bd64 split8": dict(block_d=64, split=8, unroll=8),
                "bd64 split32": dict(block_d=64, split=32, unroll=8),
                "bd128 split16 u4": dict(block_d=128, split=16, unroll=4),
                "bd256 split8 u4": dict(block_d=256, split=8, unroll=4),
            }
            for T in (1, 16, 64)
        }
        topm_shapes = [(8192, 2, 1616, 2, 2, m, torch.bfloat16) for m in (32, 80, 128)]
        topm_shapes += [(T, 2, 1616, 2, 2, m, torch.bfloat16) for m in (256, 768, 1024)
                        for T in (1, 64, 1024, 8192)]  # fmt: skip
    rows = []

    def add(shape, kernel, nb, fl, times, extra):
        first = len(rows)
        for impl, t in times.items():
            ref = times.get("reference")
            rows.append(dict(
                kernel=kernel, shape=shape, impl=impl, seconds=t, bytes=nb, flops=fl,
                gbs=nb / t / 1e9 if nb else None,
                pct_copy=(100 * nb / t / copy_bw) if nb and copy_bw else None,
                speedup=(ref / t) if ref else None,
                config=(extra.get(impl) if isinstance(extra.get(impl), dict) else None),
            ))  # fmt: skip
        for k, v in extra.items():  # a scalar note goes to the row whose impl it names
            if not isinstance(v, dict):
                mine = [r for r in rows[first:] if k.startswith(r["impl"] + " ")]
                row = max(mine, key=lambda r: len(r["impl"])) if mine else rows[first]
                row.setdefault("notes", {})[k[len(row["impl"]) :].strip() if mine else k] = v

    for T, M, N, Dv, E, h, dtype in gather_shapes:
        if time_left() < 30:
            skip(f"gather speed T={T} M={M} E={E}", "time budget")
            continue
        shape = f"T={T} M={M} N={N} Dv={Dv} E={E} h={h} {dname(dtype)}"
        for row in B.bench_gather(T, M, N, Dv, E, h, dtype, DEVICE, reps):
            add(shape, *row)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the next shape's reference needs the room
    for T, M, N, Dv, E, h, dtype in decode_shapes:
        if time_left() < 30:
            skip(f"gather decode speed T={T} M={M}", "time budget")
            continue
        shape = f"T={T} M={M} N={N} Dv={Dv} E={E} h={h} {dname(dtype)}"
        variants = {"auto": {}, "unsplit": dict(block_d=None, split=1, unroll=4)}
        widest = KG._block_d(Dv, max(16, min(256, 4096 // KG._next_pow2(E))))
        variants["unsplit"]["block_d"] = widest
        variants.update(sweep.get((T, M), {}))
        for row in B.bench_gather_decode(T, M, N, Dv, E, h, dtype, DEVICE, reps, variants):
            add(shape, *row)
    for T, H, n, r, h, m, dtype in topm_shapes:
        if time_left() < 30:
            skip(f"topm speed T={T} m={m}", "time budget")
            continue
        shape = f"T={T} H={H} n'={n} r={r} h={h} m={m} {dname(dtype)}"
        impls = ("register", "tiled") if m <= KT.REGISTER_MAX_M else ("tiled",)
        for row in B.bench_topm(T, H, n, r, h, m, dtype, DEVICE, reps, impls=impls):
            add(shape, *row)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def speed_table(rows):
    table = [
        "| kernel | shape | impl | median | bytes floor | GB/s | % of copy bw | x reference |"
        " TFLOP/s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nb, t = r["bytes"], r["seconds"]
        cfg = r.get("config")
        notes = ", ".join(f"{k}={v}" for k, v in (cfg or {}).items())
        notes += ", ".join(f"{k}={v:.3g}" for k, v in r.get("notes", {}).items())
        pct = r["pct_copy"]
        table.append(
            f"| {r['kernel']} | {r['shape']} | {r['impl']} | {t * 1e3:.4f} ms | "
            + (f"{nb / 1e6:.4g} MB | {r['gbs']:.4g} | " if nb else "- | - | ")
            + (f"{pct:.3g}% | " if pct is not None else "- | ")
            + (f"{r['speedup']:.2f} | " if r["speedup"] else "- | ")
            + (f"{r['flops'] / t / 1e12:.2f} | " if r["flops"] else "- | ")
            + f"{notes} |"
        )
    return "\n".join(table)


# ----------------------------------------------------------------------------- 4. layer
def layer_sizes():
    from megatron_ultramem.experiments import configs
    from megatron_ultramem.experiments.configs import ModelSize

    if DRY:
        return replace_size(configs.QUICK_SIZE, num_layers=1), (1, 4), 32
    size = ModelSize(  # a paper-like MoE slot (2 of 32 experts, ~ MoE-1.6B-2in34's ratio), D = 1024
        num_layers=1, hidden_size=1024, num_attention_heads=8, seq_length=256, vocab_size=256,
        num_experts=32, topk=2, expert_ffn_hidden_size=2048,
        key_dim=192, num_heads=2, topm=80, ffn_multiple_of=64,
    )  # fmt: skip
    return size, (1, 4, 16, 64, 256, 1024, 4096), 4096


def replace_size(size, **kw):
    from dataclasses import replace

    return replace(size, **kw)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def layer_bench(copy_bw):
    """Decode step and training step of the MLP slot: dense vs MoE vs UltraMem, bf16."""
    if importlib.util.find_spec("megatron") is None or not _has("megatron.core"):
        skip("layer decode/train", "megatron.core is not importable (carry its wheel: see header)")
        return
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_ultramem import train
    from megatron_ultramem.experiments import configs, decode

    train.init_distributed()
    size, batches, train_tokens = layer_sizes()
    dtype = torch.bfloat16
    elt = torch.finfo(dtype).bits // 8
    slots = decode.build_slots(size)
    out = RESULT["layer"]
    out["size"] = {k: getattr(size, k) for k in size.__dataclass_fields__}
    out["variants"] = {k: v.description for k, (_, v) in slots.items()}
    mods = {}
    for kind, (module, _) in slots.items():
        mods[kind] = module.to(device=DEVICE, dtype=dtype).eval()
    out["ultramem_backend"] = (
        "triton" if mods["ultramem"].memory.values.is_cuda and KG.HAVE_TRITON else "CPU path"
    )
    out["params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in mods.items()}
    D = size.hidden_size
    reps = 2 if DRY else 0
    rows = []
    with torch.no_grad():
        for Bsz in batches:
            if time_left() < 40:
                skip(f"layer decode B={Bsz}", "time budget")
                continue
            gen = torch.Generator().manual_seed(Bsz)
            xs = [torch.randn(1, Bsz, D, generator=gen).to(DEVICE, dtype) for _ in range(4)]
            row = {"batch": Bsz}
            for kind, m in mods.items():
                it = iter(range(10**9))
                t = B.time_fn(lambda m=m, it=it: m(xs[next(it) % len(xs)]), DEVICE, reps)
                try:  # parameter bytes the step touched (counted in fp32 bytes: rescaled)
                    touched = decode.bytes_read(kind, m, xs[0])
                    nbytes, n_touched = touched["bytes"] * elt / decode.BYTES, touched["touched"]
                except Exception as e:  # noqa: BLE001 - a timing without its byte count
                    nbytes, n_touched = None, f"not counted: {type(e).__name__}: {e}"[:200]
                floor = 1e3 * nbytes / copy_bw if copy_bw and nbytes else None
                row[kind] = dict(ms=t * 1e3, bytes=nbytes, touched=n_touched, floor_ms=floor)
            row["moe_over_ultramem"] = row["moe"]["ms"] / row["ultramem"]["ms"]
            rows.append(row)
            shown = ", ".join(f"{k} {row[k]['ms']:.3f} ms" for k in mods)
            print(f"  decode B={Bsz}: {shown}, MoE/UltraMem {row['moe_over_ultramem']:.2f}x")
    out["decode"] = rows
    if time_left() < 40:
        skip("layer training step", "time budget")
        return
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=DEVICE))
    s = min(2048, train_tokens)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(s, train_tokens // s, D, generator=gen).to(DEVICE, dtype)
    g = torch.randn(s, train_tokens // s, D, generator=gen).to(DEVICE, dtype)
    trains = {}
    for kind, m in mods.items():
        m.train()

        def step(m=m):
            y, _ = m(x.detach().requires_grad_(True))
            y.backward(g)

        trains[kind] = {"fwd_bwd_ms": 1e3 * B.time_fn(step, DEVICE, reps)}
        for p in m.parameters():
            p.grad = None
        m.eval()
    trains["tokens"] = train_tokens
    out["train"] = trains
    print("  train step: " + ", ".join(f"{k} {v['fwd_bwd_ms']:.3f} ms" for k, v in trains.items()
                                       if isinstance(v, dict)))  # fmt: skip


def layer_tables():
    lay = RESULT["layer"]
    if not lay.get("decode"):
        return []
    kinds = [k for k in ("dense", "moe", "ultramem") if k in lay["decode"][0]]
    md = [
        "## Layer: one decode step of the MLP slot (bf16, eval, do_bench median, cold L2)",
        "",
        *(f"- {k}: {v} ({lay['params'][k]:,} parameters)" for k, v in lay["variants"].items()),
        f"- UltraMem path: {lay.get('ultramem_backend')}",
        "",
        "| B | " + " | ".join(f"{k} ms | {k} MB read | {k} floor ms" for k in kinds)
        + " | MoE / UltraMem |",
        "|---|" + "---|---|---|" * len(kinds) + "---|",
    ]
    for row in lay["decode"]:
        cells = []
        for k in kinds:
            c = row[k]
            floor = f"{c['floor_ms']:.4f}" if c["floor_ms"] is not None else "-"
            mb = f"{c['bytes'] / 1e6:.2f}" if c["bytes"] is not None else "-"
            cells.append(f"{c['ms']:.4f} | {mb} | {floor}")
        ratio = row["moe_over_ultramem"]
        md.append(f"| {row['batch']} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    if lay.get("train"):
        tr = lay["train"]
        md += ["", f"Training step (forward + backward, {tr['tokens']} tokens, bf16): "
               + ", ".join(f"{k} {v['fwd_bwd_ms']:.3f} ms" for k, v in tr.items()
                           if isinstance(v, dict))]  # fmt: skip
    return md


# ----------------------------------------------------------------------------- 5. pretrain
PRETRAIN_ARGS = (
    "--num-layers 4 --hidden-size 512 --num-attention-heads 8 --ffn-hidden-size 1024 "
    "--seq-length 512 --max-position-embeddings 512 --micro-batch-size 8 --global-batch-size 8 "
    "--train-iters 20 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2 "
    "--weight-decay 0.1 --bf16 --transformer-impl local --no-persist-layer-norm "
    "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion "
    "--no-bias-dropout-fusion --no-rope-fusion --mock-data --tokenizer-type NullTokenizer "
    "--vocab-size 1024 --make-vocab-size-divisible-by 64 --log-interval 5 --eval-iters 0 "
    "--disable-bias-linear --ultramem-mode parallel --ultramem-layers 1 --ultramem-num-keys 256 "
    "--ultramem-key-dim 64 --ultramem-topm 32 --ultramem-value-dim 256"
)
"""20 iterations of a 4-layer D=512 GPT with a memory beside every MLP, on mock data (no apex/TE on
the image: local modules, fusions off). Parsed by Megatron's own argument parser in the dry run."""

_PARSE_ONLY = (
    "import sys, shlex, warnings; warnings.filterwarnings('ignore'); "
    "from megatron_ultramem import pretrain as P; a = P.parse_args(shlex.split(sys.argv[1])); "
    "print('parsed: train_iters', a.train_iters, 'mock_data', a.mock_data)"
)


def pretrain(args):
    out = RESULT["pretrain"]
    if not _has("megatron_ultramem.pretrain"):
        out["status"] = "not run: megatron_ultramem.pretrain does not exist in this checkout"
        print(f"[SKIP] pretrain: {out['status']}")
        return
    if not DRY and time_left() < 60:
        out["status"] = "not run: time budget"
        return
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", WORLD_SIZE="1", RANK="0")
    if DRY:  # CPU: parse the GPU run's arguments with Megatron's parser, do not train
        cmd = [sys.executable, "-c", _PARSE_ONLY, args.pretrain_args]
        timeout = 180
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = torchrun + ["--nproc_per_node", "1", "-m", "megatron_ultramem.pretrain"]
        cmd += shlex.split(args.pretrain_args)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the run needs the memory this process's caches hold
        timeout = max(30, min(240, time_left() - 15))
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=os.path.join(HERE, ".."))  # fmt: skip
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", e.stdout or ""
        text = text.decode(errors="replace") if isinstance(text, bytes) else text
    lines = text.strip().splitlines()
    out.update(command=shlex.join(cmd), rc=rc, seconds=time.perf_counter() - t,
               tail="\n".join(lines[-30:]))  # fmt: skip
    what = "argument parse only (dry run)" if DRY else "20 iterations"
    last = lines[-1][:300] if lines else ""
    out["status"] = f"{what}: rc={rc} in {out['seconds']:.0f} s; last line: {last}"
    print(f"[{'PASS' if rc == 0 else 'FAIL'}] pretrain {out['status']}")


# ----------------------------------------------------------------------------- report
def targets():
    """Issue #12's GPU targets against what this run measured."""
    res = []
    speed_rows = RESULT["speed"]

    def best(kernel, impls):
        pcts = [r["pct_copy"] for r in speed_rows if r["kernel"] == kernel and r["impl"] in impls
                and r["pct_copy"] is not None and "T=8192" in r["shape"]]  # fmt: skip
        return min(pcts) if pcts else None

    fwd = best("gather fwd", {"triton"})
    bwd = best("gather bwd", {"triton main_grad"})
    pct = "% of copy bw"
    res.append(("gather fwd, T=8192 shapes, worst", fwd, TARGETS["gather_fwd_pct_copy"], pct))
    bwd_goal = TARGETS["gather_bwd_pct_copy"]
    res.append(("gather bwd into main_grad, T=8192 shapes, worst", bwd, bwd_goal, pct))
    dec = [r["moe_over_ultramem"] for r in RESULT["layer"].get("decode", []) if r["batch"] >= 256]
    res.append(("decode MoE / UltraMem latency, B >= 256, worst B", min(dec) if dec else None,
                TARGETS["decode_moe_over_ultramem"], "x"))  # fmt: skip
    RESULT["targets"] = [dict(name=n, measured=v, target=t, unit=u,
                              met=None if v is None else v >= t) for n, v, t, u in res]  # fmt: skip


def fmt_target(t):
    measured = "-" if t["measured"] is None else f"{t['measured']:.3g} {t['unit']}"
    met = "not measured" if t["met"] is None else ("yes" if t["met"] else "no")
    return f"| {t['name']} | {measured} | >= {t['target']} {t['unit']} | {met} |"


def write_report(args, final=False):
    targets()
    checks = RESULT["checks"]
    failed = [c for c in checks if not c["ok"]]
    env = RESULT["env"]
    bw = RESULT["copy_bw"]
    md = [
        f"# GPU check: {env.get('device')}",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- correctness: {len(checks) - len(failed)}/{len(checks)} checks passed",
        f"- copy bandwidth (read + write): {bw / 1e9:.0f} GB/s (runs: "
        + ", ".join(f"{x / 1e9:.0f}" for x in RESULT["copy_bw_runs"]) + ")"
        if bw else "- copy bandwidth: not measured",
        f"- wall time: {elapsed():.0f} s" + ("" if final else " (report written mid-run)"),
        "",
        "## Failed checks" if failed else "## All correctness checks passed",
        *(f"- {c['name']}: {json.dumps({k: v for k, v in c.items() if k not in ('name', 'ok')})}"
          for c in failed),  # fmt: skip
        "",
        "## Targets (issue #12)",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
        *(fmt_target(t) for t in RESULT["targets"]),
        "",
        "## Kernels (triton.testing.do_bench median)" if not DRY
        else "## Kernels (interpreter: timings meaningless)",
        "",
        speed_table(RESULT["speed"]) if RESULT["speed"] else "(not run)",
        "",
        *layer_tables(),
        "",
        "## Pretrain",
        "",
        f"- {RESULT['pretrain'].get('status', 'not reached')}",
        "",
        "## Skipped",
        "",
        *(f"- {s}" for s in RESULT["skipped"] or ["nothing"]),
        "",
    ]
    md = "\n".join(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(RESULT, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    return md, failed


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    ap.add_argument("--budget-s", type=float, default=380.0,
                    help="wall-clock seconds; later sections are skipped once spent")  # fmt: skip
    ap.add_argument("--skip", default="", help="comma list of sections to skip: "
                    "correctness,speed,layer,pretrain")  # fmt: skip
    ap.add_argument("--pretrain-args", default=PRETRAIN_ARGS, help="arguments of the pretrain run")
    args = ap.parse_args()
    BUDGET[0] = args.budget_s
    if not DRY and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --dry-run to exercise the script under the interpreter)")
    skips = set(filter(None, args.skip.split(",")))
    import triton

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": "cpu (Triton interpreter, dry run)" if DRY else torch.cuda.get_device_name(),
        "command": "python " + " ".join(sys.argv),
    }
    try:
        from importlib import metadata

        env["megatron_core"] = metadata.version("megatron-core")
    except Exception:  # noqa: BLE001
        env["megatron_core"] = "not installed"
    if not DRY:
        p = torch.cuda.get_device_properties(0)
        env.update(sms=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None),
                   memory_gib=round(p.total_memory / 2**30, 1))  # fmt: skip
    RESULT["env"] = env
    RESULT["copy_bw_runs"] = []
    print(json.dumps(env, indent=1), flush=True)

    if "correctness" in skips:
        skip("correctness", "--skip")
    else:
        correctness()
    RESULT["env"]["correctness_s"] = round(elapsed(), 1)
    write_report(args)

    copy_bw = None
    if "speed" not in skips:
        copy_bw, runs = copy_bandwidth(1 << 20 if DRY else 2 << 30)
        RESULT["copy_bw"], RESULT["copy_bw_runs"] = copy_bw, runs
        print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
        try:
            RESULT["speed"] = speed(copy_bw)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            skip("kernel speed", f"{type(e).__name__}: {e}"[:300])
        write_report(args)
    else:
        skip("kernel speed", "--skip")

    if "layer" not in skips:
        try:
            layer_bench(copy_bw)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            skip("layer decode/train", f"{type(e).__name__}: {e}"[:300])
        write_report(args)
    else:
        skip("layer decode/train", "--skip")

    if "pretrain" not in skips:
        pretrain(args)
    else:
        RESULT["pretrain"]["status"] = "not run: --skip"
    md, failed = write_report(args, final=True)
    print(md)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
