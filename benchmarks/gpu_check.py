"""The one prepared script for a short GPU session: kernel correctness on CUDA against the
reference, host-sync and CUDA-graph checks, the device's copy bandwidth, kernel timings against
the bytes floor, a one-layer decode step and a training step of UltraMem vs Megatron-Core MoE at
matched size, and a short pretraining run.

    # on the device machine, from the repo root (the whole script: < 8 minutes on an H100/H200)
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

Time: --budget-s (default 420 s) is cut into fixed shares, one per section (`SECTIONS`; the
dry run prints the plan). A section ends at its mark (the cumulative share), so an early end
hands its rest to the next; the layer decode and the pretrain run get at least their own share
whenever they start (even after an overrun, which is bounded by one check), so the headline
numbers are always measured. gpu_check.json (every number), gpu_check.md (tables) and
gpu_check.log (this output) are written into --out after every section, so a run cut short keeps
what it measured. Exit code 1 if any correctness or sync check failed.

Sections, in order:
1. correctness: every kernel path on CUDA against a float64 reference (fp32/bf16/fp16/fp64, the
   tests' odd shapes, decode-size split forwards, the sorted forward of large E, the segmented
   backward into fp32 and bf16 main_grad with a hot row, phase 2 at m up to 1024 through both
   kernels, the exact fallback, brute force where exact). Rule (STYLE.md): kernel_err <= 2 *
   same-dtype-torch_err + atol. Only here are outputs pre-filled with NaN
   (ULTRAMEM_POISON_OUTPUTS, so unwritten elements fail); it is off for every timed section and
   for the pretrain subprocess, so no timing includes the fill. A device sync after every check
   lands asynchronous CUDA errors on it.
2. sync: the layer's training step (forward + backward, aux loss on) under
   torch.cuda.set_sync_debug_mode("error") (any host sync raises), and one decode step captured
   in a CUDA graph, replayed on new inputs and compared with eager (dry run: the op recorder of
   tests/kernels/sync_check.py instead; the graph needs CUDA).
3. speed: copy bandwidth (a 2 GiB device-to-device copy: the ceiling of every "% of copy bw"),
   then triton.testing.do_bench medians (inputs rotating over sets larger than 2x the L2) of the
   gathers at training sizes (forward; backward into an fp32 and a bf16 main_grad), decode-size
   forwards (the launch table against fixed configurations) and phase 2.
4. layer: one decode step ([1, B, D], B = 256, 4096, 1, 16, 1024, 4, 64: the headline B >= 256
   first; bf16, eval) and one training step (forward + backward, 4096 tokens) of the MLP slot:
   UltraMem (Triton path) vs Megatron-Core MoE (SequentialMLP, allgather dispatcher) vs the dense
   MLP of the same activated size, at matched parameters; the bytes each decode step touched.
5. pretrain: `torchrun --standalone --nproc_per_node 1 -m megatron_ultramem.pretrain --mock-data
   --train-iters 20 ...` (PRETRAIN_ARGS) as a subprocess, killed at the end of its share (dry
   run: Megatron's argument parser on the same arguments, no training).
The GPU targets of issue #16 (gather >= 85% of copy bandwidth forward, >= 60% backward, the bf16
main_grad backward included; MoE / UltraMem decode latency >= 6x at B >= 256) are reported as
met / not met; they do not set the exit code.
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
POISON = "ULTRAMEM_POISON_OUTPUTS"  # on in the correctness section only (see `poisoned`)
os.environ.pop(POISON, None)

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
          "skipped": [], "targets": [], "budget": []}  # fmt: skip
T0 = time.perf_counter()
BUDGET = [420.0]  # seconds, set from --budget-s
SECTIONS = [  # (name, share of the budget, guaranteed its share whenever it starts)
    ("correctness", 0.20, False),
    ("sync", 0.05, False),
    ("speed", 0.20, False),
    ("layer", 0.22, True),
    ("pretrain", 0.25, True),
]  # the remaining 8%: startup, imports, reports
DEADLINE = [float("inf")]  # the running section's end (perf_counter seconds)


def elapsed() -> float:
    return time.perf_counter() - T0


def time_left() -> float:
    """Seconds left to the running section (its mark, see `run_section`)."""
    return DEADLINE[0] - time.perf_counter()


def section_plan(budget: float):
    """[(name, share_s, mark_s, guaranteed)]: mark = cumulative share, seconds from start."""
    plan, mark = [], 0.0
    for name, share, guaranteed in SECTIONS:
        mark += share * budget
        plan.append((name, share * budget, mark, guaranteed))
    return plan


def run_section(name, fn, *args):
    """Run one section up to its deadline: its mark, or (guaranteed sections) at least its own
    share from now. Records the budget line, writes the reports afterwards."""
    _, share, mark, guaranteed = next(p for p in section_plan(BUDGET[0]) if p[0] == name)
    start = time.perf_counter()
    end = T0 + mark
    if guaranteed:
        end = max(end, start + share)
    DEADLINE[0] = end
    entry = dict(section=name, share_s=round(share, 1), given_s=round(end - start, 1),
                 start_s=round(start - T0, 1), status="ran")  # fmt: skip
    RESULT["budget"].append(entry)
    if end - start < 5:
        entry["status"] = "not run: no time left"
        skip(name, "time budget")
    else:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a section's failure does not stop the others
            traceback.print_exc()
            entry["status"] = f"error: {type(e).__name__}: {e}"[:300]
            skip(name, entry["status"])
    entry["used_s"] = round(time.perf_counter() - start, 1)
    print(f"[section] {name}: used {entry['used_s']} s of {entry['given_s']} s", flush=True)


@contextlib.contextmanager
def poisoned():
    """NaN-prefilled kernel outputs (a forgotten element fails the comparisons): correctness
    checks only, never around a timing or the pretrain run."""
    os.environ[POISON] = "1"
    try:
        yield
    finally:
        os.environ.pop(POISON, None)


def assert_not_poisoned(what: str):
    if os.environ.get(POISON, "0") not in ("", "0"):
        raise RuntimeError(f"{what}: {POISON} is on during a timed section")


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
    cfg = KG.forward_config(T, M, Dv, E, values.element_size(), KG.num_sms(values.device), h)
    record(f"{tag} fwd", ok, err=ek, torch_err=et, path=cfg.path, split=cfg.split,
           block_d=cfg.block_d)  # fmt: skip
    if not backward:
        return
    grad = TG.randn(T, E, Dv, seed=7)
    gs64, gv64 = TG.grads_of(
        R.weighted_gather_pool, rows, blocks, scores.double(), values.double(), E, grad
    )
    gs_t, gv_t = TG.grads_of(R.weighted_gather_pool, rows, blocks, scores, values, E, grad)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    modes = ["default", "deterministic", "fp32 main_grad"]
    modes += ["bf16 main_grad"] if dtype == torch.bfloat16 else []
    for mode in modes:
        main = None
        if "main_grad" in mode:
            main = torch.zeros(N, Dv, device=DEVICE, dtype=acc if "fp32" in mode else dtype)
        gs, gv = KG.gather_pool_backward(
            grad.to(dtype), rows, blocks, scores, values, deterministic=mode == "deterministic",
            values_grad_out=main,
        )  # fmt: skip
        gv = gv if mode == "fp32 main_grad" else gv.to(dtype)  # fp32 main_grad: compare unrounded
        es, ev = err(gs, gs64), err(gv, gv64)
        ok = torch.isfinite(gs).all().item() and es <= 2 * err(gs_t, gs64) + ATOL[dtype]
        ok = ok and ev <= 2 * err(gv_t, gv64) + ATOL[dtype]
        record(
            f"{tag} bwd {mode}", ok, err_scores=es, err_values=ev, torch_err_values=err(gv_t, gv64)
        )


@guarded
def check_hot_row(case, dtype):
    """The segmented backward with one row chosen by most selections (>= 10,000) and untouched
    rows, into a bf16 main_grad (and fp32): equal to float64 to one rounding, untouched rows
    unchanged, bitwise repeatable."""
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = TG.make_inputs(case, dtype, seed=21)
    rows = torch.where(torch.rand(T, M, device=DEVICE) < 0.8, 3, rows % (N // 2))  # hot row 3
    grad = TG.randn(T, E, Dv, seed=22).to(dtype).double()  # the kernel's (rounded) input
    _, gv64 = TG.grads_of(R.weighted_gather_pool, rows, blocks, scores.double(),
                          values.double(), E, grad)  # fmt: skip
    # Dry run: the interpreter re-runs the kernel body in Python per program, loop step and (in
    # the segmented scan) per tile element, so the launch table's 40 programs of 16 entries x 16
    # columns took ~80 s per call on CPU; 10 programs of 64 entries x Dv columns run the same
    # code in seconds. The device run keeps the launch table.
    over = dict(seg=64, unroll=64, block_d=KG._next_pow2(Dv)) if DRY else {}
    for dest in (torch.float32, torch.bfloat16):
        start = TG.randn(N, Dv, seed=23).to(dest)
        runs = []
        for _ in range(2):
            main = start.clone()
            KG.gather_pool_backward(grad.to(dtype), rows, blocks, scores, values,
                                    need_scores=False, values_grad_out=main, **over)  # fmt: skip
            runs.append(main)
        want = start.double() + gv64
        # one rounding of the destination (2^-8 relative in bf16) on top of fp32 sums
        tol = (2.0**-8 if dest == torch.bfloat16 else 1e-5) * want.abs().max().item() + 1e-3
        e = err(runs[0], want)
        same = torch.equal(runs[0], runs[1])
        untouched = torch.equal(runs[0][N // 2 :][3:], start[N // 2 :][3:]) if N > 8 else True
        record(f"hot row {TG._ids(case)} {dname(dtype)} -> {dname(dest)} main_grad",
               e <= tol and same and untouched, err=e, tol=tol, hot=int((rows == 3).sum()),
               bitwise_repeatable=same)  # fmt: skip


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
    # Dry run: one program over all entries, BLOCK_D = the core width (see check_hot_row)
    over = dict(seg=32, unroll=32, block_d=KG._next_pow2(Dv // h)) if DRY else {}
    runs = [
        KG.gather_pool_backward(g, rows, blocks, scores, values, deterministic=True, **over)[1]
        for _ in range(3)
    ]
    atomic = [KG.gather_pool_backward(g, rows, blocks, scores, values, **over)[1]
              for _ in range(3)]  # fmt: skip
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
    # dry run: 2 programs (the interpreter ran the 16 programs of 33 x 33 candidates in ~80 s)
    T, H, m, r = (2, 1, 33, 2) if DRY else (8, 2, 33, 2)
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
    dup = (6, 5, 3, 4, 2, 3) if DRY else (1000, 160, 64, 1024, 2, 4)  # long runs of equal rows

    # 128k selections, ~102k of them row 3, on a GPU; the dry run only exercises the code (the
    # interpreter's segmented scan costs a Python call per entry and column: 640 entries, Dv = 2;
    # tests/kernels/test_gather.py has the 10,000-entry hot row under the interpreter)
    hot = (16, 40, 40, 2, 1, 4) if DRY else (1000, 160, 50000, 1024, 2, 4)
    plan += [(check_hot_row, (hot, b16), {})]
    sorted_fwd = [(3, 13, 5, 24, 1, 9)] if DRY else [(257, 160, 5000, 1024, 2, 16), (3, 13, 5, 24, 1, 9)]
    plan += [(check_gather, (c, b16), {}) for c in sorted_fwd]  # bf16, E >= 9: the sorted path
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


def correctness():
    """Run the plan (outputs poisoned) until the section's deadline; the rest is listed as not
    run. A check is started only with >= 5 s left (the slowest ones compile a kernel)."""
    plan = correctness_plan()
    with poisoned():
        for i, (fn, args, kwargs) in enumerate(plan):
            if time_left() < 5:
                names = [f"{f.__name__}{a}" for f, a, _ in plan[i:]]
                skip(f"correctness ({len(names)} of {len(plan)} checks)", "time budget: "
                     + "; ".join(names)[:2000])  # fmt: skip
                break
            fn(*args, **kwargs)
    RESULT["env"]["correctness_s"] = round(elapsed(), 1)


# ----------------------------------------------------------------------------- 2. sync
def sync_checks():
    """The layer's training step without a host sync; a decode step in a CUDA graph."""
    if not _has("megatron.core"):
        skip("sync", "megatron.core is not importable (carry its wheel: see header)")
        return
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_ultramem import train
    from megatron_ultramem.layer import UltraMemLayer

    train.init_distributed()
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from helpers import small_config

    dtype = torch.float32 if DRY else torch.bfloat16
    size = {} if DRY else dict(hidden_size=256, ultramem_num_keys=32, ultramem_key_dim=64,
                               ultramem_topm=16, ultramem_value_dim=128)  # fmt: skip
    cfg = small_config(dtype, ultramem_impl="triton", ultramem_init="reference",
                       ultramem_aux_loss_alpha=0.01, ultramem_aux_loss_tau=0.0,
                       use_cpu_initialization=DRY, **size)  # fmt: skip
    layer = UltraMemLayer(cfg, layer_index=1).to(DEVICE)
    D = cfg.hidden_size
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=DEVICE))
    layer.values.main_grad = torch.zeros_like(layer.values, dtype=torch.bfloat16)
    layer.values.grad_added_to_main_grad = False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, D, generator=gen).to(DEVICE, dtype).requires_grad_(True)

    def step():
        out, _ = layer(x)
        out.float().square().sum().backward()

    layer.train()
    if DRY:  # no CUDA: the op recorder of the tests, kernels off the record
        sys.path.insert(0, os.path.join(HERE, "..", "tests", "kernels"))
        from sync_check import SyncRecorder, kernels_off_the_record

        with SyncRecorder() as rec, kernels_off_the_record(rec):
            step()
        record("sync: training step, no host sync (op recorder)", not rec.syncs,
               syncs=str(rec.syncs[:5]), ops=len(rec.ops))  # fmt: skip
        skip("sync: CUDA-graph decode step", "needs CUDA")
        return
    step()  # compile the kernels first
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        step()
        ok, why = True, ""
    except RuntimeError as e:
        ok, why = False, str(e)[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    record("sync: training step under set_sync_debug_mode('error')", ok, error=why)
    # Decode in a CUDA graph: warm up on a side stream (compiles), capture, replay on new inputs.
    layer.eval()
    static_x = torch.randn(1, 8, D, generator=gen).to(DEVICE, dtype)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out, _ = layer(static_x)
        except Exception as e:  # noqa: BLE001
            record("sync: CUDA-graph capture of a decode step", False, error=str(e)[:300])
            return
        worst = 0.0
        for seed in range(3):
            new = torch.randn(1, 8, D, generator=torch.Generator().manual_seed(10 + seed))
            static_x.copy_(new.to(DEVICE, dtype))
            graph.replay()
            eager, _ = layer(static_x)
            worst = max(worst, (static_out.float() - eager.float()).abs().max().item())
        sync()
    # Same kernels, same order, no atomics in the forward: bitwise equal expected.
    record("sync: CUDA-graph decode step replayed == eager", worst == 0.0, max_abs_diff=worst)


# ----------------------------------------------------------------------------- 2. bandwidth
def copy_bandwidth(nbytes):
    """Device-to-device copy, bytes read + written per second (the memory ceiling to compare to)."""
    x = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    times = [B.time_fn(lambda: y.copy_(x), DEVICE, 3) for _ in range(2)]  # twice: the spread
    return 2 * nbytes / statistics.median(times), [2 * nbytes / t for t in times]


# ----------------------------------------------------------------------------- 3. kernels
def speed(copy_bw):
    """Kernel timings, most important first (each shape starts only with its usual cost left)."""
    assert_not_poisoned("speed")
    reps = 1 if DRY else 0
    if DRY:
        gather_shapes = [(4, 8, 64, 32, 4, 2, torch.float32), (3, 8, 64, 32, 16, 2, torch.bfloat16)]
        decode_shapes = [(1, 40, 64, 32, 4, 2, torch.float32)]
        sweep = {}
        topm_shapes = [(2, 2, 24, 2, 2, 8, torch.float32), (1, 1, 140, 2, 2, 129, torch.float32)]
    else:
        gather_shapes = [  # (T, M, N, Dv, E, h): T = 4096 x 2 tokens, M = H*m = 2*80, Dv = D/2
            (8192, 160, 1 << 20, 1024, 4, 2, torch.bfloat16),
            (8192, 160, 1 << 20, 1024, 16, 2, torch.bfloat16),  # E = 16: the sorted forward
            (8192, 160, 1 << 20, 1024, 1, 1, torch.bfloat16),
            (8192, 1536, 1 << 20, 1024, 4, 2, torch.bfloat16),  # UltraMemV2: m = 768
        ]
        decode_shapes = [
            (T, M, 1 << 20, 1024, 4, 2, torch.bfloat16) for M in (160, 1536) for T in (1, 16, 256)
        ]
        sweep = {  # fixed alternatives to the launch table
            (T, 1536): {
                "split8": dict(split=8),
                "split96": dict(split=96),
                "bd128 tokens2": dict(block_d=128),
            }
            for T in (1, 16)
        }
        topm_shapes = [(T, 2, 1616, 2, 2, m, torch.bfloat16) for m in (80, 768) for T in (64, 8192)]
    cost = {"gather": 3 if DRY else 20, "decode": 3 if DRY else 4, "topm": 3 if DRY else 6}
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
        if time_left() < cost["gather"]:
            skip(f"gather speed T={T} M={M} E={E}", "time budget")
            continue
        shape = f"T={T} M={M} N={N} Dv={Dv} E={E} h={h} {dname(dtype)}"
        for row in B.bench_gather(T, M, N, Dv, E, h, dtype, DEVICE, reps):
            add(shape, *row)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the next shape's reference needs the room
    for T, M, N, Dv, E, h, dtype in decode_shapes:
        if time_left() < cost["decode"]:
            skip(f"gather decode speed T={T} M={M}", "time budget")
            continue
        shape = f"T={T} M={M} N={N} Dv={Dv} E={E} h={h} {dname(dtype)}"
        variants = {"auto": {}, "unsplit": dict(split=1)}
        variants.update(sweep.get((T, M), {}))
        for row in B.bench_gather_decode(T, M, N, Dv, E, h, dtype, DEVICE, reps, variants):
            add(shape, *row)
    for T, H, n, r, h, m, dtype in topm_shapes:
        if time_left() < cost["topm"]:
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
    return size, (256, 4096, 1, 16, 1024, 4, 64), 4096  # the headline (B >= 256) first


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
    from megatron_ultramem.experiments import decode

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
    assert_not_poisoned("layer")
    with torch.no_grad():
        for Bsz in batches:
            if time_left() < (3 if DRY else 10):
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
    if time_left() < (3 if DRY else 15):
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
    for row in sorted(lay["decode"], key=lambda r: r["batch"]):
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
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", WORLD_SIZE="1", RANK="0")
    env.pop(POISON, None)  # the run is timed (its iteration times): no NaN pre-fill
    if DRY:  # CPU: parse the GPU run's arguments with Megatron's parser, do not train
        cmd = [sys.executable, "-c", _PARSE_ONLY, args.pretrain_args]
        timeout = 180
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = torchrun + ["--nproc_per_node", "1", "-m", "megatron_ultramem.pretrain"]
        cmd += shlex.split(args.pretrain_args)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the run needs the memory this process's caches hold
        timeout = max(10, time_left() - 5)  # killed at the end of the section's share
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
    """Issue #16's GPU targets against what this run measured."""
    res = []
    speed_rows = RESULT["speed"]

    def best(kernel, impls):
        pcts = [r["pct_copy"] for r in speed_rows if r["kernel"] == kernel and r["impl"] in impls
                and r["pct_copy"] is not None and "T=8192" in r["shape"]]  # fmt: skip
        return min(pcts) if pcts else None

    pct = "% of copy bw"
    fwd = best("gather fwd", {"triton"})
    res.append(("gather fwd, T=8192 shapes, worst", fwd, TARGETS["gather_fwd_pct_copy"], pct))
    bwd_goal = TARGETS["gather_bwd_pct_copy"]
    for dest in ("fp32", "bf16"):
        bwd = best(f"gather bwd {dest} main_grad", {"triton"})
        res.append((f"gather bwd into {dest} main_grad, T=8192 shapes, worst", bwd, bwd_goal, pct))
    dec = [r["moe_over_ultramem"] for r in RESULT["layer"].get("decode", []) if r["batch"] >= 256]
    res.append(("decode MoE / UltraMem latency, B >= 256, worst B", min(dec) if dec else None,
                TARGETS["decode_moe_over_ultramem"], "x"))  # fmt: skip
    RESULT["targets"] = [dict(name=n, measured=v, target=t, unit=u,
                              met=None if v is None else v >= t) for n, v, t, u in res]  # fmt: skip


def fmt_target(t):
    measured = "-" if t["measured"] is None else f"{t['measured']:.3g} {t['unit']}"
    met = "not measured" if t["met"] is None else ("yes" if t["met"] else "no")
    return f"| {t['name']} | {measured} | >= {t['target']} {t['unit']} | {met} |"


def budget_table(budget: float) -> str:
    """The section plan (shares of --budget-s) with what each section was given and used."""
    done = {e["section"]: e for e in RESULT["budget"]}
    lines = [f"Budget {budget:.0f} s (the rest of the 100%: startup and reports).", "",
             "| section | share | mark (s from start) | guaranteed | given s | used s | status |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, share, mark, guaranteed in section_plan(budget):
        e = done.get(name, {})
        lines.append(f"| {name} | {share:.0f} s | {mark:.0f} | {'yes' if guaranteed else 'no'} | "
                     f"{e.get('given_s', '-')} | {e.get('used_s', '-')} | {e.get('status', 'not reached')} |")  # fmt: skip
    return "\n".join(lines)


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
        "## Targets (issue #16)",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
        *(fmt_target(t) for t in RESULT["targets"]),
        "",
        "## Section budget",
        "",
        budget_table(args.budget_s),
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


class _Tee:
    """stdout into --out/gpu_check.log as well (flushed per write: a killed run keeps its log)."""

    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="folder for gpu_check.{json,md,log}")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    ap.add_argument("--budget-s", type=float, default=BUDGET[0],
                    help="wall-clock seconds, cut into the sections' shares (SECTIONS)")  # fmt: skip
    ap.add_argument("--skip", default="", help="comma list of sections to skip: "
                    + ",".join(name for name, _, _ in SECTIONS))  # fmt: skip
    ap.add_argument("--pretrain-args", default=PRETRAIN_ARGS, help="arguments of the pretrain run")
    args = ap.parse_args()
    BUDGET[0] = args.budget_s
    if not DRY and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --dry-run to exercise the script under the interpreter)")
    skips = set(filter(None, args.skip.split(",")))
    unknown = skips - {name for name, _, _ in SECTIONS}
    if unknown:
        print(f"--skip: unknown sections {sorted(unknown)}; allowed: "
              + ",".join(name for name, _, _ in SECTIONS), file=sys.stderr)  # fmt: skip
        sys.exit(2)
    os.makedirs(args.out, exist_ok=True)
    sys.stdout = _Tee(sys.stdout, os.path.join(args.out, "gpu_check.log"))
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
    print(budget_table(args.budget_s), flush=True)
    copy_bw = [None]

    def speed_section():
        bw, runs = copy_bandwidth(1 << 20 if DRY else 2 << 30)
        RESULT["copy_bw"], RESULT["copy_bw_runs"] = bw, runs
        copy_bw[0] = bw
        print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
        RESULT["speed"] = speed(bw)

    sections = {
        "correctness": correctness,
        "sync": sync_checks,
        "speed": speed_section,
        "layer": lambda: layer_bench(copy_bw[0]),
        "pretrain": lambda: pretrain(args),
    }
    for name, _, _ in SECTIONS:
        if name in skips:
            skip(name, "--skip")
            RESULT["budget"].append(dict(section=name, status="not run: --skip"))
        else:
            run_section(name, sections[name])
        write_report(args)
    md, failed = write_report(args, final=True)
    print(md)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
