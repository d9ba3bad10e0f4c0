"""Decode and training step of one UltraMem layer vs Megatron-Core's MoE and a dense MLP, on CPU.

    # issue #12's table (fp32; ~3 min on 2 cores); writes benchmarks/results/bench_decode_cpu.md
    python benchmarks/bench_decode.py [--threads 2] [--out benchmarks/results/bench_decode_cpu.md]
    # tiny sizes (< 1 min): checks the plumbing, the numbers mean nothing
    python benchmarks/bench_decode.py --smoke --out /tmp/bench_decode_smoke.md

Modules (issue #12's sizes, D=512, fp32; each one alone in the MLP slot, i.e. 'replace' mode):
- UltraMem layer n=256 (N=65,536 rows), K=128, Dv=256, E=4, r=2, h=2, H=2, m=32 (18.0M params),
  timed twice: the layer's CPU default (`ultramem_impl='auto'`, cpu_path.py) and the oracle
  (`ultramem_impl='reference'`, reference.py), the baseline;
- Megatron-Core MoELayer, 16 experts of F=1024, top-2, allgather dispatcher, SequentialMLP (16.8M);
- Megatron-Core MLP, F=2048 (2.1M; the MoE's activated size).

Timing: every call interleaved with the others in one process (A, B, C, D, A, ...), medians.
Decode step: input [1, B, D] in eval mode under no_grad, a fresh random input per call, and a
256 MiB buffer read before each timed call so that the weights come from DRAM as they would in a
model whose other layers ran in between. Training step: forward + backward on [128, T/128, D]
(train mode, gradients dropped after each call, warm cache). The floor column is the layer's
forward FLOPs divided by this machine's measured fp32 GEMM rate (a [1024, 1024] x [1024, 512] mm).
The profile of what is left (torch.profiler, the fast path) follows the tables.
"""

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Dict, Tuple

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from megatron_ultramem.experiments import report  # noqa: E402
from megatron_ultramem.experiments.decode import _Flusher, time_interleaved  # noqa: E402


@dataclass(frozen=True)
class Size:
    hidden: int = 512
    num_keys: int = 256  # n: N = n^2 = 65,536 rows
    key_dim: int = 128
    value_dim: int = 256
    expansion: int = 4
    rank: int = 2
    cores: int = 2
    heads: int = 2
    topm: int = 32
    experts: int = 16
    topk: int = 2
    expert_ffn: int = 1024
    dense_ffn: int = 2048
    batches: Tuple[int, ...] = (1, 8, 64, 256, 1024)
    train_tokens: Tuple[int, ...] = (1024, 4096)
    seq: int = 128
    repeats: int = 21
    warmup: int = 3
    train_repeats: Tuple[int, ...] = (7, 5)
    flush_mib: int = 256


FULL = Size()
SMOKE = replace(
    FULL, hidden=64, num_keys=16, key_dim=16, value_dim=32, topm=8, experts=4, expert_ffn=64,
    dense_ffn=128, batches=(1, 8), train_tokens=(256,), seq=64, repeats=3, warmup=1,
    train_repeats=(2,), flush_mib=8,
)  # fmt: skip


# ---------------------------------------------------------------------- modules
def build(size: Size) -> Dict[str, torch.nn.Module]:
    """{'ultramem', 'ultramem_reference', 'moe', 'dense'}: MLP-slot modules at `size`."""
    from megatron_ultramem.config import UltraMemConfig
    from megatron_ultramem.cpu_compat import CPU_CONFIG
    from megatron_ultramem.experiments import configs
    from megatron_ultramem.layer import UltraMemLayer
    from megatron_ultramem.sizing import MoEShape

    common = dict(
        num_layers=1, hidden_size=size.hidden, num_attention_heads=8, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, **CPU_CONFIG,
    )  # fmt: skip
    out = {}
    for name, impl in (("ultramem", "auto"), ("ultramem_reference", "reference")):
        cfg = UltraMemConfig(
            ffn_hidden_size=size.dense_ffn, ultramem_mode="replace", ultramem_impl=impl,
            ultramem_num_keys=size.num_keys, ultramem_key_dim=size.key_dim,
            ultramem_value_dim=size.value_dim, ultramem_expansion=size.expansion,
            ultramem_tucker_rank=size.rank, ultramem_num_cores=size.cores,
            ultramem_num_heads=size.heads, ultramem_topm=size.topm, **common,
        )  # fmt: skip
        out[name] = UltraMemLayer(cfg, layer_index=0)
    # Megatron's own MoE and MLP, built the way the experiments build them (configs.py: local
    # specs, allgather dispatcher, SequentialMLP) inside a one-layer GPTModel, then taken out.
    msize = configs.ModelSize(
        num_layers=1, hidden_size=size.hidden, num_attention_heads=8, seq_length=size.seq,
        num_experts=size.experts, topk=size.topk, expert_ffn_hidden_size=size.expert_ffn,
    )  # fmt: skip
    moe = MoEShape(size.hidden, size.experts, size.topk, size.expert_ffn, num_layers=1)
    variants = {
        "moe": configs.Variant("moe", "moe", "MoE", size.expert_ffn, moe=moe),
        "dense": configs.Variant("dense", "dense", "dense", size.dense_ffn),
    }
    for name, variant in variants.items():
        model, _ = configs.build_model(variant, msize)
        out[name] = model.decoder.layers[0].mlp
    return out


def forward_flops(size: Size) -> Dict[str, float]:
    """Forward FLOPs per token (2 per multiply-add) of the layers' matrix products."""
    n_side = int(round(size.expansion**0.5)) * size.num_keys
    um = (
        2 * size.key_dim * size.hidden  # query
        + 2 * size.heads * n_side * size.key_dim * size.rank  # rank-r row and column scores
        + size.heads * size.topm * size.value_dim  # pooling
        + size.hidden * size.expansion * size.value_dim  # output projection
    )
    moe = size.hidden * size.experts + size.topk * 2 * size.hidden * size.expert_ffn
    return {"ultramem": 2.0 * um, "moe": 2.0 * moe, "dense": 2.0 * 2 * size.hidden * size.dense_ffn}


def gemm_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 512)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(15):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * 1024 * 1024 * 512 / statistics.median(ts) / 1e9


# ---------------------------------------------------------------------- timing
def _ms(xs):
    return 1e3 * statistics.median(xs)


@torch.no_grad()
def decode_times(mods, size: Size, log=print) -> Dict[int, Dict[str, float]]:
    flush = _Flusher(size.flush_mib)
    for m in mods.values():
        m.eval()
    out = {}
    for B in size.batches:
        g = torch.Generator().manual_seed(B)
        xs = [torch.randn(1, B, size.hidden, generator=g) for _ in range(size.warmup + size.repeats)]
        calls = {k: (lambda r, m=m: m(xs[r])) for k, m in mods.items()}
        t = time_interleaved(calls, size.repeats, size.warmup, flush)
        out[B] = {k: _ms(v) for k, v in t.items()}
        out[B].update({f"{k}_min": 1e3 * min(v) for k, v in t.items()})
        log(f"  decode B={B}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in out[B].items()
                                            if not k.endswith("_min")), flush=True)  # fmt: skip
    return out


def train_times(mods, size: Size, log=print) -> Dict[int, Dict[str, float]]:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    for m in mods.values():
        m.train()
    out = {}
    for T, repeats in zip(size.train_tokens, size.train_repeats):
        g = torch.Generator().manual_seed(T)
        x = torch.randn(size.seq, T // size.seq, size.hidden, generator=g)
        dy = torch.randn(size.seq, T // size.seq, size.hidden, generator=g)

        def step(module):
            def call(r):
                y, _ = module(x.clone().requires_grad_(True))
                y.backward(dy)
                for p in module.parameters():
                    p.grad = None

            return call

        t = time_interleaved({k: step(m) for k, m in mods.items()}, repeats, 1)
        out[T] = {k: _ms(v) for k, v in t.items()}
        log(f"  train T={T}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out[T].items()), flush=True)
        out[T].update({f"{k}_min": 1e3 * min(v) for k, v in t.items()})
    return out


@torch.no_grad()
def check_equal(mods, size: Size) -> Dict[str, float]:
    """The fast path vs the oracle on one decode batch (fp32): selection agreement, output error."""
    fast, ref = mods["ultramem"], mods["ultramem_reference"]
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(64, size.hidden, generator=torch.Generator().manual_seed(7))
    v1, _ = fast.retrieve(x)
    v2, _ = ref.retrieve(x)
    agree = (torch.sort(v1, 1).values == torch.sort(v2, 1).values).double().mean().item()
    y1, y2 = fast(x[None])[0], ref(x[None])[0]
    return {"selection_agreement": agree, "out_rel_err": ((y1 - y2).norm() / y2.norm()).item()}


def profile(module, fn, steps: int = 3, top: int = 12):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return total, [(e.key, e.self_cpu_time_total / steps / 1e3, e.count // steps) for e in rows]


def profiles(mods, size: Size):
    um = mods["ultramem"]
    B, T = size.batches[-1], size.train_tokens[-1]
    x = torch.randn(1, B, size.hidden)

    def decode():
        with torch.no_grad():
            um.eval()(x)

    xt = torch.randn(size.seq, T // size.seq, size.hidden)
    dy = torch.randn_like(xt)

    def train():
        um.train()
        y, _ = um(xt.clone().requires_grad_(True))
        y.backward(dy)
        for p in um.parameters():
            p.grad = None

    return {f"decode step, B={B}": profile(um, decode, 5), f"training step, T={T}": profile(um, train, 2)}


def single_token_bytes(size: Size) -> Dict[str, float]:
    """fp32 parameter bytes one decode token must read (sizing.py's `bytes_per_token` at B = 1),
    the floor at B = 1 where nothing is shared between tokens. UltraMem: everything but the table,
    plus H*m value rows; MoE: the router and the top-k experts."""
    from megatron_ultramem.sizing import MoEShape, UltraMemShape

    um = UltraMemShape(
        hidden_size=size.hidden, key_dim=size.key_dim, num_heads=size.heads,
        num_keys=size.num_keys, expansion=size.expansion, tucker_rank=size.rank,
        num_cores=size.cores, value_dim=size.value_dim, topm=size.topm,
    )  # fmt: skip
    moe = MoEShape(size.hidden, size.experts, size.topk, size.expert_ffn, num_layers=1)
    return {"ultramem": um.bytes_per_token(1, 4), "moe": moe.bytes_per_token(1, 4)}


# ---------------------------------------------------------------------- report
def _targets(dec, tr, size):
    ratio = {B: t["ultramem"] / t["moe"] for B, t in dec.items()}
    small = {B: r for B, r in ratio.items() if B <= 64}
    large = {B: r for B, r in ratio.items() if B > 64}
    lines = ["| target | measured | met? |", "|---|---|---|"]

    def row(label, values, bound):
        worst = max(values.values())
        detail = ", ".join(f"{k}: {v:.2f}x" for k, v in values.items())
        lines.append(f"| {label} | worst {worst:.2f}x ({detail}) | {'yes' if worst <= bound else 'no'} |")

    if small:
        row("decode <= 0.5x MoE for B <= 64", {f"B={B}": r for B, r in small.items()}, 0.5)
    if large:
        row("decode <= 1.0x MoE at B = 256, 1024", {f"B={B}": r for B, r in large.items()}, 1.0)
        row("stretch: decode <= 0.6x MoE at B = 256, 1024", {f"B={B}": r for B, r in large.items()}, 0.6)
    T = size.train_tokens[-1]
    t = {f"T={T}": tr[T]["ultramem"] / tr[T]["moe"]}
    row(f"training step <= 1.5x MoE at T = {T}", t, 1.5)
    row(f"stretch: training step <= 1.0x MoE at T = {T}", t, 1.0)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: plumbing only")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_decode_cpu.md"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SMOKE if args.smoke else FULL
    command = "python benchmarks/bench_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_before = report.uptime()
    t_start = time.perf_counter()

    from megatron_ultramem import train

    train.init_distributed(seed=1234)
    mods = build(size)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in mods.items()}
    flops = forward_flops(size)
    gflops = [gemm_gflops()]
    check = check_equal(mods, size)
    print(f"sizes: {params}; fast vs reference: {check}", flush=True)
    dec = decode_times(mods, size)
    tr = train_times(mods, size)
    gflops.append(gemm_gflops())
    prof = profiles(mods, size)
    wall = time.perf_counter() - t_start
    load_after = report.uptime()
    rate = statistics.mean(gflops)
    b1 = single_token_bytes(size)

    lines = report.header(
        "UltraMem layer vs Megatron-Core MoE on CPU: decode and training step (issue #12)"
        + (" - SMOKE run, not evidence" if args.smoke else ""),
        command, load_before, load_after,
    )  # fmt: skip
    n_side = int(round(size.expansion**0.5)) * size.num_keys
    model_name = " ".join(report._run("lscpu | grep -i 'model name'").split())
    lines += [
        f"CPU: `{model_name}`; torch threads "
        f"{torch.get_num_threads()}; wall time {wall / 60:.1f} min; fp32 GEMM rate "
        f"{rate:.0f} GFLOP/s (median of a [1024, 1024] x [1024, 512] mm, before and after: "
        + ", ".join(f"{g:.0f}" for g in gflops) + ").",
        "",
        "| module | parameters | forward FLOPs / token |",
        "|---|---|---|",
        f"| UltraMem layer (replace mode): n={size.num_keys} (N={size.num_keys**2:,} rows), "
        f"n'={n_side}, K={size.key_dim}, Dv={size.value_dim}, E={size.expansion}, r={size.rank}, "
        f"h={size.cores}, H={size.heads}, m={size.topm} | {params['ultramem']:,} "
        f"| {flops['ultramem'] / 1e6:.2f}M |",
        f"| Megatron-Core MoE, {size.experts} experts top-{size.topk}, D={size.hidden}, "
        f"F={size.expert_ffn}, allgather dispatcher | {params['moe']:,} | {flops['moe'] / 1e6:.2f}M |",
        f"| dense MLP F={size.dense_ffn} | {params['dense']:,} | {flops['dense'] / 1e6:.2f}M |",
        "",
        "`UltraMem` is the layer's CPU default (`ultramem_impl='auto'`: cpu_path.py); `reference` is "
        "the same layer with `ultramem_impl='reference'` (reference.py, the oracle and baseline). "
        f"Fast path vs reference on one 64-token batch (fp32, same weights): selected indices agree "
        f"{100 * check['selection_agreement']:.2f}%, output relative error {check['out_rel_err']:.1e}.",
        "",
        f"## Decode step (ms, median of {size.repeats}, cold cache)",
        "",
        "Medians are the headline; the ratio of the fastest calls is shown too because on a shared "
        "machine a busy neighbour slows some calls (two OpenMP threads wait for each other at every "
        "op, and the layer runs many more small ops than the MoE).",
        "",
        "| decode step, B tokens | " + " | ".join(f"B={B}" for B in dec) + " |",
        "|---|" + "---|" * len(dec),
        "| MoE ms | " + " | ".join(f"{t['moe']:.2f}" for t in dec.values()) + " |",
        "| UltraMem ms | " + " | ".join(f"{t['ultramem']:.2f}" for t in dec.values()) + " |",
        "| UltraMem / MoE | " + " | ".join(f"{t['ultramem'] / t['moe']:.2f}" for t in dec.values()) + " |",
        "| UltraMem reference ms | "
        + " | ".join(f"{t['ultramem_reference']:.2f}" for t in dec.values()) + " |",
        "| reference / MoE | "
        + " | ".join(f"{t['ultramem_reference'] / t['moe']:.2f}" for t in dec.values()) + " |",
        "| dense MLP ms | " + " | ".join(f"{t['dense']:.2f}" for t in dec.values()) + " |",
        "| UltraMem / MoE, fastest calls | "
        + " | ".join(f"{t['ultramem_min'] / t['moe_min']:.2f}" for t in dec.values()) + " |",
        "| UltraMem FLOP floor ms | "
        + " | ".join(f"{flops['ultramem'] * B / rate / 1e6:.2f}" for B in dec) + " |",
        "| UltraMem / floor | "
        + " | ".join(f"{t['ultramem'] / (flops['ultramem'] * B / rate / 1e6):.1f}" for B, t in dec.items())
        + " |",
        "",
        "## Training step (forward + backward, ms, median, warm cache)",
        "",
        "| T tokens | MoE ms | UltraMem ms | UltraMem / MoE | (fastest calls) | reference ms "
        "| reference / MoE | dense ms |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {T} | {t['moe']:.1f} | {t['ultramem']:.1f} | {t['ultramem'] / t['moe']:.2f}x "
            f"| {t['ultramem_min'] / t['moe_min']:.2f}x "
            f"| {t['ultramem_reference']:.1f} | {t['ultramem_reference'] / t['moe']:.2f}x "
            f"| {t['dense']:.1f} |"
            for T, t in tr.items()
        ],
        "",
        "## Targets (issue #12; ratios from this run)",
        "",
        *_targets(dec, tr, size),
        "",
        "What bounds the small-batch ratio: at B = 1 no parameter is shared between tokens, and the "
        f"bytes each module must read are UltraMem {b1['ultramem'] / 2**20:.2f} MiB (query "
        f"projection, both key tables, Wo, H*m value rows) against the MoE's {b1['moe'] / 2**20:.2f} "
        f"MiB (router + top-{size.topk} experts): a bytes floor ratio of "
        f"{b1['ultramem'] / b1['moe']:.2f}. Both are read from DRAM here (cold cache), so "
        f"UltraMem / MoE at B = 1 cannot go below about {b1['ultramem'] / b1['moe']:.2f} at this "
        "configuration, fp32; the key tables (2 H n' K r) are the part a smaller K or fewer keys "
        "(larger E) would cut. From B = 8 on the MoE reads more distinct experts while UltraMem's "
        "fixed reads are shared, so there the gap to the floor is op overhead (profile below).",
        "",
        "## Where the fast path's time goes (torch.profiler, self CPU time per step)",
        "",
    ]
    for label, (total, rows) in prof.items():
        lines += [
            f"{label}: {total:.1f} ms of profiled self time per step (numpy's argpartition, used "
            "by the top-m selection, runs outside aten ops and is not listed).",
            "",
            "| op | self ms/step | calls/step |",
            "|---|---|---|",
            *[f"| `{k}` | {ms:.2f} | {n} |" for k, ms, n in rows],
            "",
        ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def ratios(table):
        return {k: {"ultramem_ms": t["ultramem"], "moe_ms": t["moe"], "ratio": t["ultramem"] / t["moe"]}
                for k, t in table.items()}  # fmt: skip

    report.write_report(args.out, lines, command, decode=ratios(dec), train=ratios(tr),
                        wall_seconds=wall, single_token_bytes_ratio=b1["ultramem"] / b1["moe"])  # fmt: skip
    print(f"wrote {args.out} ({wall / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
