"""Memory-size scaling at fixed activated parameters: validation loss against the table size N.

    python -m megatron_ultramem.experiments scaling [--quick] [--seeds 2] [--num-keys 20,40,79,112]

The paper's claim (ULTRAMEM.md, Table 1 and its scaling figure): at constant compute the loss keeps
falling as the value table grows. Here UltraMem (E=4, r=2, h=2, the sweep's K, H, m, Dv) gets n keys
per side (N = n^2 rows) and the dense MLP beside it is sized so that the model keeps the MoE's
activated parameters per token (configs.memory_at_moe_active; asserted within the sweep's
tolerances for activated parameters and FLOPs): the key tables are read by every token, so a larger
grid pays for its keys with a smaller dense MLP (F_d in the table), while total parameters grow
with N. The n of the sweep's matched UltraMem is that variant itself (its runs are shared).
"""

import math
import os
import statistics
import time
from typing import Dict, List, Sequence

from . import configs, report
from .quality import (
    by_variant,
    make_runner,
    mean_std,
    pct_mean_std,
    per_run_table,
    run_all,
    run_header,
    seeds_from_args,
    settings_from_args,
    setup_lines,
    variant_summary,
    write_report,
)

NUM_KEYS = (20, 40, 79, 112)
"""n per side: N = 400 .. 12,544 (31x); 79 is the sweep's matched UltraMem."""

QUICK_NUM_KEYS = (12, 24, 48)


def check_fixed_active(variants: Sequence[configs.Variant], size: configs.ModelSize) -> List[str]:
    """Every size within the sweep's activated and FLOPs tolerances of the MoE; the table."""
    moe = configs.analytic_counts(configs.variant_by_name(size, "moe"), size)
    lines = [
        "| variant | n | N = n^2 | F_d | total params | activated/token | vs MoE | fwd FLOPs/token "
        "| vs MoE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        c = configs.analytic_counts(v, size)
        for k, tol in (("active", configs.ACTIVE_TOL), ("flops", configs.FLOPS_TOL)):
            if abs(c[k] - moe[k]) / moe[k] > tol:
                raise AssertionError(f"{v.name}: {k} {c[k]:,} not within {tol:.0%} of MoE's {moe[k]:,}")
        u = v.ultramem
        lines.append(
            f"| {v.name} | {u.num_keys} | {u.num_values:,} | {u.dense_ffn_hidden_size} | "
            f"{c['total']:,} | {c['active']:,} | {100 * (c['active'] / moe['active'] - 1):+.2f}% "
            f"| {c['flops']:,} | {100 * (c['flops'] / moe['flops'] - 1):+.2f}% |"
        )
    return lines


def fit_log_slope(ns: Sequence[int], losses: Sequence[float]) -> float:
    """Least-squares slope of loss against log2(N): the change per doubling of the table."""
    xs = [math.log2(n) for n in ns]
    mx, my = statistics.mean(xs), statistics.mean(losses)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, losses)) / den if den else float("nan")


def plot(variants, by: Dict[str, List[Dict]], refs: Dict[str, List[float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    Ns = [v.ultramem.num_values for v in variants]
    for ax, key, label in ((ax1, "final_valid_loss", "validation loss (nats/byte)"),
                           (ax2, "value_nats", "loss on fact values (nats/value)")):  # fmt: skip
        get = (lambda r: r["value_split"]["value_nats"]) if key == "value_nats" else (lambda r: r[key])
        means = [statistics.mean(get(r) for r in by[v.name]) for v in variants]
        stds = [statistics.stdev([get(r) for r in by[v.name]]) if len(by[v.name]) > 1 else 0.0
                for v in variants]  # fmt: skip
        ax.errorbar(Ns, means, yerr=stds, marker="o", capsize=3, color="C0", label="UltraMem (mean ± std)")
        for v, N in zip(variants, Ns):
            ax.scatter([N] * len(by[v.name]), [get(r) for r in by[v.name]], s=10, color="C0", alpha=0.4)
        for i, (name, rs) in enumerate(refs.items()):
            vals = [get(r) for r in rs]
            ax.axhline(statistics.mean(vals), color=f"C{i + 1}", ls="--", lw=1,
                       label=f"{name} (quality sweep, n={len(vals)})")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("value-table rows N per layer (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def main(args) -> int:
    settings = settings_from_args(args)
    seeds = seeds_from_args(args, 2)
    if args.num_keys:
        num_keys = [int(x) for x in args.num_keys.split(",")]
    else:
        num_keys = list(QUICK_NUM_KEYS if args.quick else NUM_KEYS)
    size = settings.size
    variants = configs.scaling_variants(size, sorted(num_keys))
    table = check_fixed_active(variants, size)
    print("\n".join(table), flush=True)
    runner = make_runner(args, settings)
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    load_before = report.uptime()
    t_start = time.perf_counter()
    run_all([(runner, v, seed) for seed in range(seeds) for v in variants], args.jobs, args.threads)
    wall = time.perf_counter() - t_start
    load_after = report.uptime()
    results = runner.results
    by = by_variant(results)
    refs = {}  # the sweep's MoE and dense, when their runs are in the cache (never trained here)
    for name in ("moe", "dense"):
        rs = [r for r in (runner.peek(configs.variant_by_name(size, name), s) for s in range(5)) if r]
        if rs:
            refs[name] = rs

    png = os.path.join(args.out, f"evidence_scaling_cpu{suffix}.png")
    plot(variants, by, refs, png, f"UltraMem at the MoE's activated parameters, "
         f"{settings.tokens_per_run:,} tokens per run, CPU")  # fmt: skip
    lines = run_header(
        "Memory-size scaling at fixed activated parameters (CPU)"
        + (" - QUICK smoke run, not evidence" if args.quick else ""),
        report.command_line(), load_before, load_after, runner, wall,
    )
    lines += ["## Set-up", "", *setup_lines(settings, runner.fc, f"{seeds} per size."),
              "- Sizes: n keys per side, N = n^2 value rows per layer (4 layers, one memory each, "
              "beside a dense MLP of F_d), everything else as the sweep's UltraMem; F_d keeps the "
              "activated parameters at the MoE's (the key tables, 2 H sqrt(E) n K r parameters, are "
              "activated for every token).", "",
              "## Sizes (analytic counts, asserted equal to the built models' before each run)", "",
              *table, ""]  # fmt: skip
    rows = ["| n | N | F_d | total params | seeds | val loss | value nats | other nats/byte "
            "| recall trained forms | recall held-out Q | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    means = []
    for v in variants:
        rs, u = by[v.name], v.ultramem
        means.append(statistics.mean(r["final_valid_loss"] for r in rs))
        rows.append(
            f"| {u.num_keys} | {u.num_values:,} | {u.dense_ffn_hidden_size} | {rs[0]['counts']['total']:,} "
            f"| {len(rs)} | {mean_std([r['final_valid_loss'] for r in rs])} "
            f"| {mean_std([r['value_split']['value_nats'] for r in rs], 3)} "
            f"| {mean_std([r['value_split']['other_nats_per_byte'] for r in rs])} "
            f"| {pct_mean_std([r['recall_trained_forms']['accuracy'] for r in rs])} "
            f"| {pct_mean_std([r['recall_heldout_question']['accuracy'] for r in rs])} "
            f"| {statistics.mean(r['tokens_per_second'] for r in rs):,.0f} |"
        )
    Ns = [v.ultramem.num_values for v in variants]
    slope = fit_log_slope(Ns, means)
    falling = all(b < a for a, b in zip(means, means[1:]))
    lines += ["## Results", "", *rows, ""]
    for name, rs in refs.items():
        lines.append(f"Reference from the quality sweep: {name} val loss "
                     f"{mean_std([r['final_valid_loss'] for r in rs])} ({len(rs)} seeds).")  # fmt: skip
    lines += ["",
              f"Least-squares slope of the mean validation loss against log2 N: {slope:+.4f} per "
              f"doubling of the table (N {Ns[0]:,} -> {Ns[-1]:,}, {Ns[-1] / Ns[0]:.0f}x). The mean "
              f"falls at every step: {'yes' if falling else 'no'}.", "",
              f"Plot: `{os.path.basename(png)}`.", "", "## Per run", "", *per_run_table(results)]  # fmt: skip
    md = os.path.join(args.out, f"evidence_scaling_cpu{suffix}.md")
    write_report(
        md, lines, results,
        points=[{"n": v.ultramem.num_keys, "N": v.ultramem.num_values, **variant_summary(by[v.name])}
                for v in variants],
        slope_per_doubling=slope, falling_at_every_step=falling,
        references={name: variant_summary(rs) for name, rs in refs.items()},
    )  # fmt: skip
    print(f"wrote {md} and {png} ({wall / 60:.1f} min)", flush=True)
    return 0
